"""`enorm-cloud`: the cloud side's commands, a thin layer over the cloud-manager library.

`nodes`, `offload`, `deployments`, `where`, `handover` and `withdraw` read a config file
(edge nodes, their tokens, the cloud Redis, the app; see cloud_manager/config.py) and keep
a ledger of deployments in the cloud Redis, so one invocation sees what another did.
(The game's demo is the game's: `enorm-demo`, games/pokemon/demo.py.)

Exit codes: 0 ok, 1 failed, 2 bad usage or config (a node that refuses the configured
token, or a callback or sink its operator does not allow, is a config error: the message
names the field), 3 an edge node does not answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from enorm import output
from enorm.output import EXIT_UNREACHABLE, EXIT_USAGE, fail

from . import config as cloud_config


@click.group()
def main() -> None:
    """The cloud manager's tools.

    \b
    Exit codes: 0 ok, 1 failed, 2 bad usage or config (also: a node refuses the token,
    or a callback or sink its operator does not allow), 3 an edge node does not answer.
    Piped, tables become tab-separated lines; --json gives JSON.
    """
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")


config_option = click.option(
    "--config", "-c", "config_path", envvar="ENORM_CLOUD_CONFIG",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"the cloud side's config (TOML); default {cloud_config.DEFAULT_PATH}")
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")


def edge_failure(exc: Exception) -> NoReturn:
    """Exit with the code an edge node's answer means, the message naming the cause: a
    token it does not know or a request it refuses is the config's (2), no answer is 3,
    anything else 1."""
    from cloud_manager import EdgeError, RequestRefused, Unauthorized

    if isinstance(exc, Unauthorized):
        fail(f"nodes.{exc.node}.token: the node refused it (401): fix the token or "
             f"token_file, or ask the node's operator to add it ({exc})", EXIT_USAGE)
    if isinstance(exc, RequestRefused):
        fail(str(exc), EXIT_USAGE)
    if isinstance(exc, EdgeError) and exc.status is None:
        fail(str(exc), EXIT_UNREACHABLE)
    fail(str(exc))


def _config(path: Path | None) -> cloud_config.CloudConfig:
    try:
        return cloud_config.load(path)
    except cloud_config.ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


class Cloud:
    """The library objects one command needs, built from the config and closed after."""

    def __init__(self, cfg: cloud_config.CloudConfig) -> None:
        from cloud_manager import EdgeClient
        from enorm import datasync

        from .ledger import Ledger

        self.cfg = cfg
        try:
            self.edges = {n.name: EdgeClient(n.url, n.bearer(), name=n.name) for n in cfg.nodes}
        except cloud_config.ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
        self.redis = datasync.connect(cfg.cloud_redis, cluster=cfg.cluster)
        self.ledger = Ledger(self.redis)
        self.ledger.adopt_legacy()  # a ledger an older enorm-cloud wrote

    def registry(self):
        from .registry import Registry

        return Registry(self.redis, down_after_s=self.cfg.down_after_s,
                        weights=self.weights())

    def weights(self):
        from .placement import Weights

        return Weights(**self.cfg.placement_weights.model_dump())

    def heartbeat(self) -> dict:
        """One heartbeat round now (a one-shot command has no background thread)."""
        from .registry import Heartbeats

        return Heartbeats(self.registry(), list(self.edges.values()),
                          self.cfg.heartbeat_interval_s,
                          max_rate=self.cfg.heartbeat_max_rate).beat()

    def manager(self, only: str | None = None):
        from cloud_manager import CloudManager
        from enorm.protocol import DataSink

        try:
            app = self.cfg.app_factory()(self.redis, **self.cfg.app_options)
        except cloud_config.ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
        except TypeError as exc:
            fail(f"app_options: {exc}", EXIT_USAGE)
        edges = [self.edges[only]] if only else list(self.edges.values())
        mgr = CloudManager(
            edges, app, cloud_redis=self.redis,
            sink=DataSink(url=self.cfg.sink_url or self.cfg.cloud_redis,
                          cluster=self.cfg.cluster, shared_patterns=app.shared_patterns),
            callback_url=self.cfg.callback_url, priority=self.cfg.priority,
            latency_objective_ms=self.cfg.latency_objective_ms,
            registry=None if only else self.registry(), placement=self.cfg.placement,
            weights=self.weights(),
            handover_path=self.cfg.handover_path)
        # its offloads in flight leased: another process carries them on if it dies
        mgr.start_intents(self.ledger, self.cfg.offload_lease_s)
        return mgr

    def close(self) -> None:
        for e in self.edges.values():
            e.close()
        self.redis.close()


@contextlib.contextmanager
def cloud(path: Path | None) -> Iterator[Cloud]:
    from enorm import datasync

    c = Cloud(_config(path))
    try:
        yield c
    except datasync.SyncError as exc:
        fail(f"cloud Redis: {exc}")
    except Exception as exc:
        import redis

        if isinstance(exc, redis.RedisError):
            fail(f"cloud Redis {c.cfg.cloud_redis}: {exc}", EXIT_UNREACHABLE)
        raise
    finally:
        c.close()


def _res(r: Any) -> str:
    return f"{r.cores:g} cores / {r.memory_mb} MB"


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@main.command()
@config_option
@json_option
def nodes(config_path: Path | None, as_json: bool) -> None:
    """The configured edge nodes and their offers (free resources, unit, policy, load), as
    one heartbeat round finds them; recorded in the registry (cloud Redis)."""
    rows, data, unreachable, refused = [], [], 0, []
    with cloud(config_path) as c:
        states = c.heartbeat()
        now = time.time()
        for name, edge in c.edges.items():
            st = states[name]
            up = st.up(now, c.cfg.down_after_s)
            data.append({**st.as_dict(), "up": up})
            if st.status == 401:
                refused.append(name)
                rows.append((name, edge.url, "token refused (401)", "", "", "", "", ""))
                continue
            if st.error is not None:
                unreachable += 1
                state = ("unreachable" if st.seen_at is None
                         else "up (no answer now)" if up else "down")
                seen = "" if st.seen_at is None else f"seen {now - st.seen_at:.0f} s ago"
                rows.append((name, edge.url, state, seen, "", "", "", ""))
                continue
            o = st.offer
            assert o is not None
            rows.append((name, edge.url, "up", _res(o.free), _res(o.unit), o.servers,
                         o.admission, f"{o.load:.2f}"))
    if as_json:
        _emit_json(data)
    else:
        output.table("edge nodes", ("name", "url", "state", "free", "unit", "servers",
                                    "admission", "load/core"), rows)
    if refused:
        fail("; ".join(f"nodes.{n}.token: the node refused it (401)" for n in refused),
             EXIT_USAGE)
    if unreachable == len(data):
        sys.exit(EXIT_UNREACHABLE)


def _parse_users(users: tuple[str, ...]):
    from pydantic import ValidationError

    from enorm.protocol import User

    out = []
    for u in users:
        uid, _, addr = u.partition("=")
        try:
            out.append(User(id=uid, address=addr or "127.0.0.1"))
        except ValidationError as exc:
            e = exc.errors()[0]
            raise click.BadParameter(f"{u}: {e['loc'][0]}: {e['msg']}",
                                     param_hint="USERS") from None
    return out


@main.command()
@config_option
@json_option
@click.option("--node", help="this node only (default: the first that admits)")
@click.argument("users", nargs=-1, required=True)
def offload(config_path: Path | None, as_json: bool, node: str | None,
            users: tuple[str, ...]) -> None:
    """Offload USERS (ID or ID=ADDRESS) of the app to an edge server."""
    from cloud_manager import DeployError, EdgeError, NoEdgeAvailable

    from .ledger import Ended, Entry

    parsed = _parse_users(users)
    with cloud(config_path) as c:
        if node is not None:
            try:
                c.cfg.node(node)
            except cloud_config.ConfigError as exc:
                fail(str(exc), EXIT_USAGE)
        if node is None:
            c.heartbeat()  # the registry as of now: down nodes are passed over
        mgr = c.manager(only=node)
        output.progress(f"offloading {len(parsed)} users of {mgr.app.name} ...")

        def record(dep) -> None:  # before the users are sent: no redirected orphan
            c.ledger.record(Entry(server_id=dep.server_id, node=dep.edge.name,
                                  app=mgr.app.name, url=dep.url, users=dep.users))

        try:
            dep = mgr.offload(parsed, before_redirect=record)
        except Ended as exc:
            fail(f"{exc} (it took longer than the orphans' grace; server withdrawn)")
        except NoEdgeAvailable as exc:
            gone = all(r.startswith("unreachable") for r in exc.refusals.values())
            fail(str(exc), EXIT_UNREACHABLE if gone else 1)
        except EdgeError as exc:  # every node refused the request itself
            edge_failure(exc)
        except DeployError as exc:
            fail(f"deployment failed (server withdrawn): {exc}")
        finally:
            mgr.close()
    result = {"server_id": dep.server_id, "node": dep.edge.name, "url": dep.url,
              "users": dep.user_ids, "refused": dep.refused, "placement": dep.placement,
              "keys_copied": dep.keys_copied,
              "timings_s": {k: round(v, 4) for k, v in dep.timings.items()}}
    if as_json:
        _emit_json(result)
    else:
        output.line(f"server {dep.server_id} on {dep.edge.name} serves {len(dep.users)} users "
                    f"at {dep.url} ({result['keys_copied']} keys copied, "
                    f"{dep.timings['total']:.2f} s)")


@main.command()
@config_option
@json_option
def deployments(config_path: Path | None, as_json: bool) -> None:
    """Edge servers serving this cloud's users, with their state on the node now."""
    from cloud_manager import EdgeError, Unauthorized

    rows, data = [], []
    with cloud(config_path) as c:
        for e in c.ledger.all():
            edge = c.edges.get(e.node)
            state, limits = "unknown node", None
            if edge is not None:
                try:
                    info = edge.server(e.server_id)
                    state = "gone" if info is None else info.state
                    limits = None if info is None else info.limits
                except Unauthorized:
                    state = "token refused (401)"
                except EdgeError as exc:
                    state = "node unreachable" if exc.status is None else f"error {exc.status}"
            data.append({**e.__dict__, "users": e.user_ids, "state": state,
                         "limits": limits.model_dump() if limits else None})
            rows.append((e.server_id, e.node, e.app, len(e.users), e.url, state,
                         _res(limits) if limits else ""))
    if as_json:
        _emit_json(data)
    else:
        output.table("deployments", ("server", "node", "app", "users", "url", "state",
                                     "limits"), rows)


@main.command()
@config_option
@json_option
@click.argument("user")
def where(config_path: Path | None, as_json: bool, user: str) -> None:
    """Which server serves USER: an edge server, or the cloud."""
    with cloud(config_path) as c:
        e = c.ledger.where(user)
    data = {"user": user, "served_by": "cloud" if e is None else "edge",
            **({} if e is None else {"server_id": e.server_id, "node": e.node, "url": e.url})}
    if as_json:
        _emit_json(data)
    elif e is None:
        output.line(f"{user}: cloud")
    else:
        output.line(f"{user}: edge server {e.server_id} on {e.node} at {e.url}")


def _ledger_deployment(c: Cloud, server_id: str):
    """The ledger's record of `server_id` as a Deployment (exit 2 if there is none)."""
    e = c.ledger.get(server_id)
    if e is None:
        fail(f"server_id: no deployment {server_id} in the ledger", EXIT_USAGE)
    if e.node not in c.edges:
        fail(f"server_id: its node {e.node} is not in the config", EXIT_USAGE)
    return e, e.deployment(c.edges[e.node])


@main.command()
@config_option
@json_option
@click.option("--to", "node", help="this node (default: where the placement puts them)")
@click.argument("server_id")
@click.argument("users", nargs=-1)
def handover(config_path: Path | None, as_json: bool, node: str | None, server_id: str,
             users: tuple[str, ...]) -> None:  # fmt: skip
    """Move a server's users to a new server on another node, start-first: the new one
    runs before the old one is merged back and destroyed. USERS (ID=ADDRESS): where they
    are now, if they moved (default: the addresses they were offloaded with)."""
    from cloud_manager import (
        DeployError,
        EdgeError,
        HandoverFailed,
        NoEdgeAvailable,
        RequestRefused,
        Unauthorized,
    )

    from .ledger import Entry

    parsed = _parse_users(users) if users else None
    with cloud(config_path) as c:
        e, dep = _ledger_deployment(c, server_id)
        if node is not None:
            try:
                c.cfg.node(node)
            except cloud_config.ConfigError as exc:
                fail(str(exc), EXIT_USAGE)
            if node == e.node:
                fail(f"--to: {server_id} is on {node} already", EXIT_USAGE)
        c.heartbeat()
        mgr = c.manager()
        output.progress(f"handing {server_id}'s {len(e.users)} users over from {e.node} ...")

        def record(new) -> None:  # before the users are sent (as `offload`)
            c.ledger.record(Entry(server_id=new.server_id, node=new.edge.name, app=e.app,
                                  url=new.url, users=new.users))

        try:
            new = mgr.handover(dep, to=node, users=parsed, before_redirect=record)
        except ValueError as exc:
            fail(f"users: {exc}", EXIT_USAGE)
        except NoEdgeAvailable as exc:
            fail(f"{exc}; the users stay on {e.node}")
        except HandoverFailed as exc:
            if dep.ended.is_set():  # the old server is gone, its data merged
                c.ledger.forget(server_id)
            fail(f"handover failed: {exc}")
        except (Unauthorized, RequestRefused) as exc:
            edge_failure(exc)
        except (DeployError, EdgeError) as exc:
            fail(f"handover failed before the switch (new server withdrawn; the users stay "
                 f"on {e.node}): {exc}")
        finally:
            mgr.close()
        c.ledger.forget(server_id)
    data = {"server_id": new.server_id, "node": new.edge.name, "url": new.url,
            "from": {"server_id": server_id, "node": e.node, "state": dep.state,
                     "keys_migrated": dep.keys_migrated, "confirmed": dep.confirmed},
            "path": new.handover_path,
            "keys_copied": new.keys_copied,
            "timings_s": {k: round(v, 4) for k, v in new.timings.items()}}
    if as_json:
        _emit_json(data)
    else:
        output.line(f"{len(new.users)} users moved from {server_id} on {e.node} to "
                    f"{new.server_id} on {new.edge.name} at {new.url} in "
                    f"{new.timings['total']:.2f} s ({new.timings['interruption']:.2f} s "
                    + ("switching, data node to node)" if new.handover_path == "direct"
                       else "served by the cloud)"))


@main.command()
@config_option
@json_option
@click.argument("server_id")
def withdraw(config_path: Path | None, as_json: bool, server_id: str) -> None:
    """Bring a server's users home; the edge merges their data back, then destroys it."""
    from cloud_manager import EdgeError

    with cloud(config_path) as c:
        e, dep = _ledger_deployment(c, server_id)
        mgr = c.manager(only=e.node)
        output.progress(f"withdrawing {server_id} from {e.node} (data merged back) ...")
        try:
            dep = mgr.withdraw(dep)
        except EdgeError as exc:
            edge_failure(exc)
        if dep.state != "migration_pending":
            c.ledger.forget(server_id)
    merge = dep.merge.model_dump() if dep.merge is not None else {}
    data = {"server_id": server_id, "state": dep.state, "keys_migrated": dep.keys_migrated,
            "confirmed": dep.confirmed, "merge": merge}
    if as_json:
        _emit_json(data)
    else:
        output.line(f"{server_id}: {dep.state}, {dep.keys_migrated} keys merged back, "
                    f"data on the cloud: {'confirmed' if dep.confirmed else 'NOT confirmed'}")
        for what, n, sample in (("untouched (left as copied on the edge: the cloud's value "
                                 "stands)", merge.get("untouched"), None),
                                ("deleted on the cloud", merge.get("keys_deleted"), None),
                                ("conflicts", merge.get("conflicts"),
                                 merge.get("conflict_sample")),
                                ("not owned (dropped)", merge.get("not_owned"),
                                 merge.get("not_owned_sample")),
                                ("not merged (no rule for the type)", merge.get("not_merged"),
                                 merge.get("not_merged_sample"))):
            if n:
                output.line(f"  {n} {what}" + (f": {', '.join(sample)}" if sample else ""))
    if dep.state == "migration_pending":
        fail("the merge failed; the edge keeps the data and retries")


@main.command()
@config_option
@json_option
@click.option("--once", is_flag=True, help="one round now, then exit")
def policy(config_path: Path | None, as_json: bool, once: bool) -> None:
    """Let the cloud manager decide where the app's groups are served (the config's
    [policy]: offload where a node pays, hand over, withdraw): one line per decision,
    until interrupted. The deployments it makes are in the ledger."""
    from .policy_loop import run_cli

    cfg = _config(config_path)
    if not cfg.policy.enabled:
        fail("policy.enabled: the policy is off in the config (set enabled = true)",
             EXIT_USAGE)
    if cfg.policy.population is None:
        fail("policy.population: name the app's hook (module:function) that gives its "
             "groups of users", EXIT_USAGE)
    with cloud(config_path) as c:
        c.heartbeat()
        mgr = c.manager()
        try:
            run_cli(mgr, c.ledger, cfg, once, _emit_line if as_json else _say)
        except ValueError as exc:
            fail(str(exc), EXIT_USAGE)
        finally:
            mgr.close()


def _emit_line(ev: Any) -> None:
    click.echo(json.dumps(ev.as_dict(), default=str), nl=True)


def _say(ev: Any) -> None:
    output.line(f"{ev.kind} {ev.group} ({ev.reason}): "
                + (f"{ev.node} -> {ev.to}" if ev.to else (ev.node or ""))
                + (f", server {ev.new_server_id}" if ev.new_server_id else "")
                + ("" if ev.ok else f" FAILED: {ev.error}"))


if __name__ == "__main__":
    main()
