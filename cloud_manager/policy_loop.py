"""The policy loop: every `interval_s`, a snapshot, the policy's plan, the decisions
carried out (`CloudManager.start_policy`, `enorm-cloud policy`).

A round, in order of its steps:
  the app's groups (its `population` hook: `Group`s, or bare `User`s that the nodes'
  probes group by their nearest node) and the users who opted out -> the nodes as the
  registry sees them (up, and whether their last offer admits a server), else as they
  answer now -> what a request of each group is expected to cost on the cloud and on
  each node (`policy.request_ms` of the RTT: the location model's where both locations
  are known, else the node's own probe of the group's users) -> the deployments the loop
  made, and those a node ended for want of resources (re-placed elsewhere) ->
  `policy.plan` -> the decisions through `CloudManager.offload` (to that node only),
  `handover` (to that node, with the users' addresses now) and `withdraw`: the
  withdrawals first, side by side, waited for (their room serves the rest); then the
  offloads and handovers, each group's in the background: the next round does not wait
  for a start-first move of seconds, it only decides nothing more for that group until
  the move is done (`Snapshot.busy`). A decision that fails is recorded, and the later
  ones of its group are skipped; but a move that failed once its new server was recorded
  in the ledger (its lease lost to another process, or its redirect failed) is completed
  by the process that takes its lease: the group is placed there, busy until the ledger
  says it is done (`_taken_over`).
Rounds come every `interval_s`, and also when a clock of the policy's hysteresis comes
due (`policy.next_due`): a move starts when its dwell is met, not up to a round later.
While a clock runs the loop prepares the move it would bring (`prepare_moves`,
`policy.upcoming`): while a better node's dwell runs, the new server started there
(`CloudManager.prepare_handover`); while a group's node is down within the bound, a
server on its refuge with the cloud's copy of the data (`CloudManager.prepare_offload`):
the move, once decided, is the switch alone. A standby not taken is ended once it has
not been wanted for `dwell_s` (or another node is wanted, or the group moved otherwise).
A withdrawal from a node that does not answer (down) has sent the users home all the
same: the group is the policy's to place again at once, and the server waits in
`unreached` until its node is up again; then the node merges it back, in the background,
with the cloud winning every conflict (`merge_home(cloud_wins=True)`): what the users
wrote on the cloud, or on the node they went to, since they came home is newer than
what the server holds. A group whose node is down past the bound and that another node serves better
than the cloud is moved there in one step (`node_down` handover): a server offloaded
from the cloud's copy of the data, the users redirected once, from the dead node's
server to the new one; the dead node's server waits in `unreached` just the same.
Each decision carried out is one log line (logger `cloud_manager.decisions`) and one
`PolicyEvent` (kept in `events`, given to every listener) with its reason, its figures
and the outcome.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from enorm.protocol import User

from .edge_client import EdgeClient, EdgeError
from .policy import (
    Decision,
    DeploymentView,
    GroupView,
    NodeView,
    Reason,
    Settings,
    Snapshot,
    State,
    expected_ms,
    groups_by_nearest,
    next_due,
    plan,
    request_ms,
    upcoming,
)

if TYPE_CHECKING:
    from .handover import Prepared
    from .orchestrator import CloudManager, Deployment, PreparedOffload

log = logging.getLogger(__name__)
decisions = logging.getLogger("cloud_manager.decisions")
PROBE_BATCH = 256  # addresses per probe request (protocol.ProbeRequest)
MAX_PARALLEL = 8  # groups whose decisions are carried out at once
DUE_SLACK_S = 0.01  # a round planned for a clock's due time comes this much after it


@dataclass
class Group:
    """One group of users as the app gives it to the policy."""

    name: str
    users: Sequence[User]
    # Where the group is (latitude, longitude), if the app knows: the location model.
    location: tuple[float, float] | None = None
    priority: int | None = None  # None: the cloud manager's priority
    opt_out: bool = False
    idle_for_s: float | None = None  # since the group's last request; None: unknown


@dataclass
class Standby:
    """A move being prepared while its clock runs (`reason`: better_node or node_down):
    the group's server `server` to `node`; `wanted_at`: the last round that wanted it.
    The future gives a `handover.Prepared` or an `orchestrator.PreparedOffload`."""

    reason: Reason
    node: str
    server: str
    future: Future[Prepared | PreparedOffload]
    wanted_at: float


# The app's hook: called every round with `data_of` (user id -> the Redis that holds the
# user's data now: the cloud's, or their edge server's), it returns the groups now.
DataOf = Callable[[str], Any]
Population = Callable[[DataOf], Iterable[Group | User]]


@dataclass
class PolicyEvent:
    """One decision carried out: what, why, the figures, how it went."""

    kind: str
    group: str
    reason: str
    node: str | None
    to: str | None
    server_id: str | None  # handover and withdraw: the server it ended
    new_server_id: str | None  # offload and handover: the server it made
    users: list[str]
    figures: dict[str, Any]
    ok: bool
    error: str | None = None
    seconds: float = 0.0
    at: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: secrets.token_hex(8))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PolicyLoop:
    """Runs the policy for one CloudManager; `round()` is one tick (tests call it)."""

    def __init__(self, cm: CloudManager, settings: Settings, population: Population,
                 opted_out: Callable[[], Iterable[str]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if settings.cloud_ms is None and settings.cloud_location is None:
            raise ValueError("policy: give cloud_ms or cloud_location (what a request "
                             "costs on the cloud, against which a node must pay)")
        unknown = set(settings.locations) - {e.name for e in cm.edges}
        if unknown:
            raise ValueError(f"policy.locations: no edge node named {sorted(unknown)[0]!r}")
        self.cm, self.settings, self.population = cm, settings, population
        self.opted_out = opted_out or (lambda: ())
        self.clock = clock
        self.state = State()
        self.owned: dict[str, Deployment] = {}  # group -> its live deployment
        self._adopt: list[Deployment] = []
        self._preempted: dict[str, str] = {}  # group -> the node that ended its server
        # servers withdrawn while their node did not answer (users home), not yet merged
        self.unreached: dict[str, tuple[str, Deployment]] = {}  # server id -> group, it
        self._redis: dict[str, Any] = {}  # server id -> a client of its Redis (data_of)
        self._offers: dict[str, Any] = {}  # node -> its last offer (the unit's size)
        self.events: deque[PolicyEvent] = deque(maxlen=1000)
        self.listeners: list[Callable[[PolicyEvent], None]] = []
        # Called with each new server once it holds its users' data, before they are sent
        # there (`enorm-cloud policy` records it in the ledger): if it raises, the move
        # fails, the server ends and nobody was sent there.
        self.before_redirect: Callable[[Deployment], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recording = threading.Lock()
        # `owned` and `unreached` change in the moves' threads too
        self._lock = threading.RLock()
        # group -> its move under way, and the server it will have (for the budget)
        self._moving: dict[str, tuple[Future, DeploymentView]] = {}
        self._movers: ThreadPoolExecutor | None = None
        self.standby: dict[str, Standby] = {}  # group -> its handover being prepared
        # group -> the server another process is completing its move to (`_taken_over`)
        self.carried: dict[str, str] = {}
        self._merging: set[str] = set()  # servers of `unreached` being merged now
        self._planned_at = 0.0  # the last round's `now`
        self._up: set[str] = {e.name for e in cm.edges}  # the nodes up, as last seen

    # -- inputs --------------------------------------------------------------------------
    def adopt(self, dep: Deployment) -> None:
        """A deployment made before (another process, the ledger): the group whose users
        it serves, exactly, is taken as served by it from the next round."""
        self._adopt.append(dep)

    def data_of(self, user: str) -> Any:
        """The Redis that holds `user`'s data now: their edge server's (reached through
        its SSH session) while a deployment of the loop serves them, else the cloud's --
        also while that server's node is down (the round must go on to move them: the
        cloud's copy is older, but there)."""
        from enorm import datasync

        with self._lock:
            owned = list(self.owned.values())
        dep = next((d for d in owned if user in d.user_ids and d.edge.name in self._up
                    and not d.ended.is_set() and d.session is not None), None)
        if dep is None:
            return self.cm.cloud
        client = self._redis.get(dep.server_id)
        if client is None:
            client = self._redis[dep.server_id] = datasync.connect(dep.redis_forward(),
                                                                   timeout=10)
        return client

    def _drop_clients(self) -> None:
        """Clients of servers the loop no longer owns (withdrawn, handed over, ended)."""
        with self._lock:
            live = {d.server_id for d in self.owned.values()}
        for sid in [s for s in self._redis if s not in live]:
            self._redis.pop(sid).close()

    def _groups(self) -> tuple[list[Group], dict[str, dict[str, float | None]]]:
        """The app's groups, and what the nodes' probes found if it took them to group
        bare users (node -> address -> ms)."""
        given = list(self.population(self.data_of))
        groups = [g for g in given if isinstance(g, Group)]
        bare = [u for u in given if isinstance(u, User)]
        rtt: dict[str, dict[str, float | None]] = {}
        if bare:
            by_addr = {str(u.address): u for u in bare}
            rtt = self._probe(list(by_addr))
            for name, addrs in groups_by_nearest(rtt).items():
                groups.append(Group(name, [by_addr[a] for a in addrs]))
        return groups, rtt

    def _probe(self, addresses: list[str]) -> dict[str, dict[str, float | None]]:
        """node -> address -> RTT ms, each node's own probe, 256 addresses a request (the
        protocol's most); a node that fails, or is down, answers nothing."""
        edges = [e for e in self.cm.edges if e.name in self._up]
        if not addresses or not edges:
            return {}

        def ask(e: EdgeClient) -> tuple[str, dict[str, float | None]]:
            out: dict[str, float | None] = {}
            try:
                for i in range(0, len(addresses), PROBE_BATCH):
                    out.update(e.probe(addresses[i:i + PROBE_BATCH]).rtt_ms)
            except EdgeError as exc:
                log.info("policy: %s did not probe: %s", e.name, exc)
            return e.name, out

        with ThreadPoolExecutor(min(16, len(edges))) as pool:
            return dict(pool.map(ask, edges))

    def _nodes(self) -> list[NodeView]:
        reg = self.cm.registry
        out = []
        if reg is not None:
            states = reg.states(e.name for e in self.cm.edges)
            now = reg.clock()
            seen = {n: (None if st is None else st.offer,
                        st is not None and st.up(now, reg.down_after_s))
                    for n, st in states.items()}
        else:  # asked now, side by side (a node that does not answer takes its retries)
            def ask(e: EdgeClient) -> tuple[str, tuple[Any, bool]]:
                try:
                    return e.name, (e.offer(), True)
                except EdgeError:
                    return e.name, (None, False)

            with ThreadPoolExecutor(min(16, len(self.cm.edges)) or 1) as pool:
                seen = dict(pool.map(ask, self.cm.edges))
        # a node holding a standby of ours admitted it: the room it took there is not
        # a reason to stop wanting that node
        holding = {sb.node for sb in self.standby.values()}
        for e in self.cm.edges:
            offer, up = seen[e.name]
            admits = offer is not None and self.cm.priority >= offer.min_priority and (
                offer.admission == "preempt" or e.name in holding
                or min(offer.free.cores / (offer.unit.cores or 1),
                       offer.free.memory_mb / (offer.unit.memory_mb or 1)) >= 1.0)
            out.append(NodeView(e.name, up, admits))
            if offer is not None:
                self._offers[e.name] = offer
        return out

    def snapshot(self) -> tuple[Snapshot, dict[str, Group]]:
        s = self.settings
        with self._lock:  # the moves done since: their groups are the plan's again
            for name in [n for n, (f, _) in self._moving.items() if f.done()]:
                del self._moving[name]
        self._take_ended()
        self._take_carried()
        nodes = self._nodes()  # first: the app's hook reads no data on a node down
        self._up = {n.name for n in nodes if n.up}
        groups, rtt = self._groups()
        self._drop_clients()
        self._take_adopted(groups)
        located = all(e.name in s.locations for e in self.cm.edges)
        probed = {a for per in rtt.values() for a in per}
        sample = {str(u.address) for g in groups if g.location is None or not located
                  for u in g.users[: s.probe_sample]}
        for node, per in self._probe(sorted(sample - probed)).items():
            rtt.setdefault(node, {}).update(per)
        views = []
        for g in groups:
            node_ms: dict[str, float | None] = {}
            for e in self.cm.edges:
                if g.location is not None and e.name in s.locations:
                    node_ms[e.name] = request_ms(
                        expected_ms(g.location, s.locations[e.name], s), s)
                else:
                    known = [ms for u in g.users
                             if (ms := rtt.get(e.name, {}).get(str(u.address))) is not None]
                    node_ms[e.name] = (request_ms(statistics.median(known), s) if known
                                       else None)
            cloud = (s.cloud_ms if s.cloud_ms is not None else
                     request_ms(expected_ms(g.location, s.cloud_location, s), s, cloud=True)
                     if g.location is not None and s.cloud_location is not None else None)
            dep = self.owned.get(g.name)
            views.append(GroupView(
                g.name, frozenset(u.id for u in g.users),
                self.cm.priority if g.priority is None else g.priority, g.opt_out, cloud,
                node_ms, g.idle_for_s, self._preempted.pop(g.name, None)
                if dep is None else None))
        with self._lock:
            moving = {name: view for name, (_, view) in self._moving.items()}
            owned = [(n, d) for n, d in self.owned.items() if n not in moving]
            busy = frozenset(moving) | frozenset(self.carried)
        deps = tuple(DeploymentView(name, d.server_id, d.edge.name,
                                    frozenset(d.user_ids), self._units(d))
                     for name, d in owned) + tuple(moving.values())
        snap = Snapshot(self.clock(), tuple(views), tuple(nodes), deps,
                        frozenset(self.opted_out()), busy)
        return snap, {g.name: g for g in groups}

    def _take_ended(self) -> None:
        """Deployments that ended without the loop (the node's events, reconcile): gone
        from `owned`; those ended for want of resources are re-placed elsewhere."""
        with self._lock:
            for name, dep in list(self.owned.items()):
                if name in self._moving:  # the move ends it and puts the new one here
                    continue
                if dep.ended.is_set() or dep.state != "deployed":
                    del self.owned[name]
                    if dep.end_reason is not None and dep.end_reason.rehome:
                        self._preempted[name] = dep.edge.name

    def _take_carried(self) -> None:
        """The groups whose move another process was completing are the plan's again
        once it is done: their servers' intents released (`Ledger.in_flight`); kept
        busy while the ledger cannot be read."""
        with self._lock:
            carried = list(self.carried.items())
        if not carried:
            return
        try:
            flying = self.cm.intents.ledger.in_flight([sid for _, sid in carried])
        except Exception:  # noqa: BLE001 (Redis: the next round asks again)
            log.exception("policy: reading the ledger's intents")
            return
        for (name, sid), still in zip(carried, flying, strict=True):
            if not still:
                log.info("policy: %s's move to %s completed by another process", name, sid)
                with self._lock:
                    del self.carried[name]

    def _take_adopted(self, groups: list[Group]) -> None:
        by_users = {frozenset(u.id for u in g.users): g.name for g in groups}
        with self._lock:
            for dep in self._adopt:
                name = by_users.get(frozenset(dep.user_ids))
                if name is not None and name not in self.owned and not dep.ended.is_set():
                    self.owned[name] = dep
            self._adopt.clear()

    def _units(self, dep: Deployment) -> float:
        """The server's size in the node's units now (its auto-scaler may have grown
        it); asked only where the budget counts units. Unknown: one unit."""
        offer = self._offers.get(dep.edge.name)
        if self.settings.max_units is None or offer is None:
            return 1.0
        try:
            info = dep.edge.server(dep.server_id)
        except EdgeError:
            return 1.0
        if info is None:
            return 1.0
        unit = offer.unit
        return max(1.0, info.limits.cores / (unit.cores or 1),
                   info.limits.memory_mb / (unit.memory_mb or 1))

    # -- one round -----------------------------------------------------------------------
    def round(self, wait: bool = True) -> list[PolicyEvent]:
        """One round; `wait`: until its moves are done too (else they go on in the
        background, and their events come as they end)."""
        snap, groups = self.snapshot()
        merged = self._merge_unreached({n.name for n in snap.nodes if n.up}, wait)
        planned, self.state = plan(snap, self.state, self.settings)
        self._planned_at = snap.now
        events = merged + self.apply(planned, groups, wait)
        self._prepare(snap, groups)
        return events

    def _prepare(self, snap: Snapshot, groups: dict[str, Group]) -> None:
        """The moves whose clock runs prepared; the standbys no longer wanted ended."""
        s, now = self.settings, snap.now
        with self._lock:
            owned = dict(self.owned)
            busy = set(self._moving) | set(self.carried)
        wanted = upcoming(snap, self.state, s) if s.prepare_moves else {}
        for name, (reason, node) in wanted.items():
            dep, sb, group = owned.get(name), self.standby.get(name), groups.get(name)
            if dep is None or group is None or name in busy:
                continue
            if sb is not None and (sb.reason, sb.node, sb.server) == (reason, node,
                                                                       dep.server_id):
                sb.wanted_at = now
                continue
            if sb is not None:
                self._end_standby(name)
            n = len(snap.deployments) + len(self.standby) + 1
            units = sum(d.units for d in snap.deployments) + len(self.standby) + 1
            if (s.max_servers is not None and n > s.max_servers) or (
                    s.max_units is not None and units > s.max_units):
                continue  # no room in the budget for a standby: prepared when decided
            users = [u for u in group.users if u.id in dep.user_ids]
            log.info("policy: preparing %s's move %s -> %s (%s)", name, dep.edge.name, node,
                     reason)
            if reason == Reason.NODE_DOWN:
                over = {} if group.priority is None else {"priority": group.priority}
                fut = self._mover().submit(self.cm.prepare_offload, users,
                                           self._others(node), **over)
            else:
                fut = self._mover().submit(self.cm.prepare_handover, dep, node, users)
            self.standby[name] = Standby(reason, node, dep.server_id, fut, now)
        for name, sb in list(self.standby.items()):
            dep = owned.get(name)
            if dep is None or dep.server_id != sb.server or (
                    name not in wanted and now - sb.wanted_at >= s.dwell_s):
                self._end_standby(name)

    def _end_standby(self, name: str) -> None:
        sb = self.standby.pop(name)

        def end() -> None:
            try:
                prepared = sb.future.result()
            except Exception:  # noqa: BLE001 (it did not start: nothing to end)
                return
            log.info("policy: %s's standby on %s not needed: ended", name, sb.node)
            prepared.cancel()

        self._mover().submit(end)

    def _claim_standby(self, d: Decision) -> Standby | None:
        """The standby prepared for move `d` (that server to that node), taken out of
        `standby`; another one of its group is ended. In the round's thread."""
        sb = self.standby.get(d.group)
        if sb is None:
            return None
        if d.kind == "handover" and (sb.reason, sb.node, sb.server) == (d.reason, d.to,
                                                                         d.server_id):
            return self.standby.pop(d.group)
        self._end_standby(d.group)
        return None

    def _mover(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._movers is None:
                self._movers = ThreadPoolExecutor(MAX_PARALLEL, "policy-move")
            return self._movers

    def _merge_unreached(self, up: set[str], wait: bool = True) -> list[PolicyEvent]:
        """The servers withdrawn while their node was down, merged home now that it is
        up (the cloud's values win: the users wrote them since they came home); in the
        background (a large merge holds no round up), waited for only if `wait`."""
        with self._lock:
            waiting = [(sid, group, dep) for sid, (group, dep) in self.unreached.items()
                       if dep.edge.name in up and sid not in self._merging]
            self._merging.update(sid for sid, _, _ in waiting)
        started = [self._mover().submit(self._merge_one, *w) for w in waiting]
        return [ev for f in started if (ev := f.result()) is not None] if wait else []

    def _merge_one(self, sid: str, group: str, dep: Deployment) -> PolicyEvent | None:
        try:
            t0 = time.perf_counter()
            try:
                self.cm.merge_home(dep, cloud_wins=True)
                error = None
            except EdgeError as exc:
                if exc.status is None:
                    return None  # still out of reach: a later round
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                del self.unreached[sid]
            merge = dep.merge.model_dump() if dep.merge is not None else {}
            figures = {"state": dep.state, **{k: merge[k] for k in
                       ("keys_migrated", "conflicts", "conflicts_cloud_won", "untouched")
                       if k in merge}}
            ev = PolicyEvent("withdraw", group, str(Reason.NODE_BACK), dep.edge.name, None,
                             sid, None, sorted(dep.user_ids), figures, error is None, error,
                             round(time.perf_counter() - t0, 4))
            return self._record(ev, f"merge {sid} on {dep.edge.name} (its node is back; "
                                    f"the cloud wins conflicts): {figures}")
        finally:
            with self._lock:
                self._merging.discard(sid)

    def apply(self, planned: Sequence[Decision], groups: dict[str, Group],
              wait: bool = True) -> list[PolicyEvent]:
        """The withdrawals first, the groups side by side, waited for (their room and
        budget serve the rest); then the moves, each group's in the background (a
        start-first move takes seconds: neither a group crossing with others nor the
        next round waits for it), waited for only if `wait`. The events of what is done
        when this returns come back in the plan's order."""
        failed: set[str] = set()
        done: dict[int, PolicyEvent] = {}
        withdrawals: dict[str, list[tuple[int, Decision]]] = {}
        moves: dict[str, list[tuple[int, Decision]]] = {}
        for i, d in enumerate(planned):
            (withdrawals if d.kind == "withdraw" else moves).setdefault(d.group, []).append(
                (i, d))
        if withdrawals:
            with ThreadPoolExecutor(min(MAX_PARALLEL, len(withdrawals))) as pool:
                for evs in pool.map(lambda ds: self._carry_out_all(ds, groups, failed),
                                    withdrawals.values()):
                    done.update(evs)
        started = []
        movers = self._mover() if moves else None
        with self._lock:
            for name, ds in moves.items():
                if name in failed:  # its withdrawal failed: its move waits a round
                    continue
                d = ds[-1][1]
                view = DeploymentView(name, "", d.to if d.kind == "handover" else d.node or "",
                                      d.users)
                sb = self._claim_standby(d)
                fut = movers.submit(self._carry_out_all, ds, groups, failed, sb)
                self._moving[name] = (fut, view)
                started.append(fut)
        if wait:
            for fut in started:
                done.update(fut.result())
        return [done[i] for i in sorted(done)]

    def next_round_in(self) -> float | None:
        """Seconds until a clock of the policy comes due (None: none runs)."""
        due = next_due(self.state, self.settings, self._planned_at)
        return None if due is None else due + DUE_SLACK_S - self.clock()

    def _carry_out_all(self, ds: list[tuple[int, Decision]], groups: dict[str, Group],
                       failed: set[str], sb: Standby | None = None
                       ) -> dict[int, PolicyEvent]:
        """One group's decisions of a phase, in order; a failure skips the rest of the
        group's decisions this round."""
        out = {}
        for i, d in ds:
            if d.group in failed:
                continue
            t0 = time.perf_counter()
            with self._lock:
                old = self.owned.get(d.group)
            new = None
            try:
                new = self._carry_out(d, groups.get(d.group), sb)
                error = None
            except Exception as exc:  # noqa: BLE001 (recorded; the loop goes on)
                error = f"{type(exc).__name__}: {exc}"
                failed.add(d.group)
            figures = dict(d.figures)
            if new is not None and "prepared_ahead_s" in new.timings:
                figures["prepared_ahead_s"] = round(new.timings["prepared_ahead_s"], 3)
            if new is not None and self.carried.get(d.group) == new.server_id:
                figures["taken_over"] = True  # completed by the process that took it
            ev = PolicyEvent(d.kind, d.group, str(d.reason), d.node, d.to,
                             None if old is None or d.kind == "offload" else old.server_id,
                             None if new is None else new.server_id, sorted(d.users),
                             figures, error is None, error,
                             round(time.perf_counter() - t0, 4))
            out[i] = self._record(ev, d.describe())
        return out

    def _record(self, ev: PolicyEvent, what: str) -> PolicyEvent:
        """One log line and one event, given to the listeners (one at a time)."""
        with self._recording:
            decisions.info("%s -> %s in %.2f s%s", what, "done" if ev.ok else "FAILED",
                           ev.seconds, f": {ev.new_server_id}" if ev.new_server_id else
                           (f": {ev.error}" if ev.error else ""))
            self.events.append(ev)
            for listener in self.listeners:
                try:
                    listener(ev)
                except Exception:
                    log.exception("policy listener %r", listener)
        return ev

    def _carry_out(self, d: Decision, group: Group | None,
                   sb: Standby | None = None) -> Deployment | None:
        if d.kind == "withdraw":
            self._withdraw(d.group)
            return None
        assert group is not None
        users = [u for u in group.users if u.id in d.users]
        over = {} if group.priority is None else {"priority": group.priority}
        made: list[Deployment] = []  # the new server, once recorded

        def before_redirect(dep: Deployment) -> None:
            if self.before_redirect is not None:
                self.before_redirect(dep)
            made.append(dep)

        try:
            return self._move(d, users, over, sb, before_redirect)
        except Exception as exc:
            new = self._taken_over(d, made, exc)
            if new is not None:
                return new
            if d.reason == Reason.NODE_DOWN:  # the users home (the old node is down)
                with contextlib.suppress(EdgeError):
                    self._withdraw(d.group)
            raise

    def _move(self, d: Decision, users: list[User], over: dict, sb: Standby | None,
              before_redirect: Callable[[Deployment], None]) -> Deployment:
        """An offload or a handover (`before_redirect` once its new server holds the
        data, before the users are sent there)."""
        if d.kind == "offload":
            dep = self._offload(users, d.node, over, before_redirect)
            with self._lock:
                self.owned[d.group] = dep
            return dep
        with self._lock:
            old = self.owned[d.group]
        prepared = self._standby_made(d, sb)
        if d.reason == Reason.NODE_DOWN:
            return self._away_from_down(d.group, old, users, d.to, over, prepared,
                                        before_redirect)
        try:
            if prepared is not None:
                new = prepared.complete(before_redirect)
                new.timings["prepared_ahead_s"] = prepared.seconds
            else:
                new = self.cm.handover(old, to=d.to, users=users,
                                       before_redirect=before_redirect)
        except Exception:
            if old.ended.is_set():
                with self._lock:
                    del self.owned[d.group]
            raise
        with self._lock:
            self.owned[d.group] = new
        return new

    def _taken_over(self, d: Decision, made: list[Deployment], exc: Exception
                    ) -> Deployment | None:
        """A move that failed after its new server was recorded in the ledger: its lease
        was lost to another process (`ledger.Lapsed`), or its redirect failed and its
        lease is left to lapse. Whoever takes it sends the users there (orphans.py), so
        the group is placed there, and busy (no decision) until that is done (`carried`,
        `_take_carried`): offered again meanwhile, its users would be redirected twice,
        the second time away from the server the loop chose. None: not recorded (no
        ledger, or the record failed), the move failed."""
        intents = self.cm.intents if made else None
        if intents is None or intents.ledger.get(made[-1].server_id) is None:
            return None
        new = made[-1]
        with self._lock:
            old = self.owned.get(d.group)
        if d.reason == Reason.NODE_DOWN and old is not None:
            self._unreached(d.group, old)  # merged when its node is back, as below
        with self._lock:
            self.owned[d.group] = new
            self.carried[d.group] = new.server_id
        log.warning("policy: %s's move to %s on %s failed once recorded (%s: %s): "
                    "another process completes it; the group is placed there", d.group,
                    new.server_id, new.edge.name, type(exc).__name__, exc)
        return new

    @staticmethod
    def _standby_made(d: Decision, sb: Standby | None) -> Prepared | PreparedOffload | None:
        """The standby's first half, if it was made (else the whole move now)."""
        if sb is None:
            return None
        try:
            return sb.future.result()
        except Exception as exc:  # noqa: BLE001 (then the whole move now)
            log.info("policy: %s's standby on %s failed (%s); the whole move now",
                     d.group, sb.node, exc)
            return None

    def _others(self, node: str | None) -> list[str]:
        return [e.name for e in self.cm.edges if e.name != node]

    def _offload(self, users: list[User], node: str | None, over: dict,
                 before_redirect: Callable[[Deployment], None] | None) -> Deployment:
        return self.cm.offload(users, exclude=self._others(node),
                               before_redirect=before_redirect, **over)

    def _withdraw(self, group: str) -> None:
        with self._lock:
            dep = self.owned[group]
        try:
            self.cm.withdraw(dep)
        except EdgeError as exc:
            if exc.status is None and "restore" in dep.timings:
                # the node did not answer, the users are home: merged when it is up
                self._unreached(group, dep)
            raise
        with self._lock:
            del self.owned[group]

    def _unreached(self, group: str, dep: Deployment) -> None:
        with self._lock:
            del self.owned[group]
            self.unreached[dep.server_id] = (group, dep)
        self.cm.close_session(dep)

    def _away_from_down(self, group: str, old: Deployment, users: list[User], to: str | None,
                        over: dict, prepared: PreparedOffload | None,
                        before_redirect: Callable[[Deployment], None]) -> Deployment:
        """A group whose node is down, in one move: a server on `to` from the cloud's
        copy of its data (`prepared` while the bound ran, or now), the users redirected
        from the dead one's straight there; the dead server waits in `unreached`
        (merged, the cloud winning, when its node is back). If that fails, the users go
        home (a `node_down` withdrawal, `_carry_out`)."""
        if prepared is not None:
            new = prepared.complete(before_redirect)
            new.timings["prepared_ahead_s"] = prepared.seconds
        else:
            new = self._offload(users, to, over, before_redirect)
        self._unreached(group, old)
        with self._lock:
            self.owned[group] = new
        return new

    # -- the thread ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self.run, args=(self._stop,),
                                            daemon=True, name="enorm-policy")
            self._thread.start()

    def run(self, stop: threading.Event) -> None:
        """A round every `interval_s` until `stop` is set or the manager closes."""
        while not stop.is_set() and not self.cm.closing.is_set():
            t0 = time.monotonic()
            try:
                self.round(wait=False)
            except Exception:  # the loop outlives a bad round (a hook that raised, Redis)
                log.exception("policy round failed")
            wait = self.settings.interval_s - (time.monotonic() - t0)
            due = self.next_round_in()
            stop.wait(max(0.0, wait if due is None else min(wait, due)))

    def stop(self) -> None:
        """The rounds end, and the moves under way are waited for."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        for name in list(self.standby):
            self._end_standby(name)
        if self._movers is not None:
            self._movers.shutdown(wait=True)
            self._movers = None
        for client in self._redis.values():
            client.close()
        self._redis.clear()


def population_from(spec: str, cloud_redis: Any, options: dict[str, Any]) -> Population:
    """The app's hook named `module:function` in the config, made with the cloud Redis
    and `population_options`."""
    import importlib

    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"policy.population: cannot load {spec}: {exc}") from exc
    try:
        return factory(cloud_redis, **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"policy.population_options: {exc}") from exc


def run_cli(cm: CloudManager, ledger: Any, cfg: Any, once: bool,
            say: Callable[[PolicyEvent], None]) -> None:
    """`enorm-cloud policy`: the loop in the foreground over the ledger's deployments
    (adopted), recording what it does there, until SIGINT/SIGTERM (or one round). A new
    server is recorded before its users are sent there (`before_redirect`), so that no
    reconcile takes it for an orphan and a crash in between leaves a recorded server in
    flight, never users on an unrecorded one: once its lease lapsed, a reconcile (this
    command's next start, or another process's) sends its users there (orphans.py); a
    server ended as an orphan meanwhile (`Ended`) fails its move, nobody sent there.
    The servers a move ended are forgotten after it."""
    import signal

    from .ledger import Entry

    loop = PolicyLoop(cm, cfg.policy, population_from(cfg.policy.population, cm.cloud,
                                                     cfg.policy.population_options))
    cm.rehome = False
    for dep in _ledger_deployments(cm, ledger):
        loop.adopt(dep)

    def record(dep: Deployment) -> None:
        ledger.record(Entry(server_id=dep.server_id, node=dep.edge.name, app=cm.app.name,
                            url=dep.url, users=dep.users))

    def forget(ev: PolicyEvent) -> None:
        if not ev.ok:
            return
        old = cm.deployments.get(ev.server_id or "")
        # kept while its merge is pending (as `withdraw`) or its node down (not merged)
        if old is not None and old.state != "migration_pending" \
                and old.server_id not in loop.unreached:
            ledger.forget(old.server_id)

    loop.before_redirect = record
    loop.listeners += [forget, say]
    if once:  # no dwell runs across two processes: nothing to prepare ahead
        loop.settings = loop.settings.model_copy(update={"prepare_moves": False})
        loop.round()
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    heartbeats = cm.start_heartbeats(cfg.heartbeat_interval_s,
                                     max_rate=cfg.heartbeat_max_rate)
    orphans = cm.start_orphans(ledger, cfg.orphans_interval_s, cfg.orphans_grace_s,
                               cfg.orphans_max_rate)
    try:
        loop.run(stop)
    finally:
        loop.stop()  # the moves under way finished, the standbys ended
        orphans.stop()
        heartbeats.stop()


def _ledger_deployments(cm: CloudManager, ledger: Any) -> list[Deployment]:
    """The app's deployments in the ledger, as Deployments the loop can end or move."""
    edges = {e.name: e for e in cm.edges}
    out = []
    for e in ledger.all():
        if e.app == cm.app.name and e.node in edges:
            dep = e.deployment(edges[e.node])
            with cm.lock:
                cm.deployments[dep.server_id] = dep
            out.append(dep)
    return out
