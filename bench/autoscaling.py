"""Benchmark one auto-scaling round (monitor + plan + apply) on real containers.

1, 8, 32 and 128 containers, each with 1 user or with 128 users (16,384 users at most).
The users' addresses live in a network namespace this benchmark creates: 198.18.0.0/16 is
routed into it over a veth pair and is local there (one `local` route: the namespace's
kernel answers every TCP probe with an RST), and the whole 198.18.0.0/15 is guarded by an
`unreachable` route of high metric, so probes never leave the machine. The node runs in
this process (`Daemon.open`, nothing scheduled) with a small unit (0.05 core, 16 MB; at
0.01 core sshd may need over 10 s to come up on a busy machine) and a large capacity;
before each measured round every container's request log gets a slow
request, so each round scales every container up: apply writes every cgroup.

The floor is the bare cgroup work of a round for the same containers, measured in the
same run: per container, write the CPU quota and the memory limit and read CPU and memory
use, through the same python3-lxc bindings the driver uses (`floor_s`, 128 containers).

    python -m bench.autoscaling [--rounds 5] [--profile]

Writes bench/results/autoscaling.json and bench/results/autoscaling.png. Everything made
here (node `bas`: containers enorm-bas-*, bridge enbas0, chains ENORM-BAS*, netns
enbas-users, routes) is removed at the end, also on failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import cProfile
import ipaddress
import json
import os
import platform
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import lxc

from enorm import autoscaler, config, control_loop
from enorm.daemon import Daemon
from enorm.protocol import SetupRequest, TerminationReason, User
from enorm.requestlog import REQUEST_LOG

RESULTS = Path(__file__).resolve().parent / "results"
CONTAINERS = (1, 8, 32, 128)
USERS_PER_CONTAINER = (1, 128)

NODE = "bas"
BRIDGE = "enbas0"
SUBNET = "10.86.0.0/24"
PORTS = (52000, 52399)
NETNS = "enbas-users"
VETH_HOST, VETH_NS = "enbash0", "enbasn0"
LINK_HOST, LINK_NS = "198.19.255.1", "198.19.255.2"  # a /30 for the veth pair
USERS_NET = ipaddress.IPv4Network("198.18.0.0/16")  # local inside the namespace
GUARD_NET = "198.18.0.0/15"
GUARD_METRIC = "4000"
SETTLE_S = 3.0
SSH_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEnormBenchmarkKeyNobodyHoldsItsPrivatePart0 bench"
)


def _ip(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _remove_users_namespace() -> None:
    _ip("route", "del", str(USERS_NET), check=False)
    _ip("link", "del", VETH_HOST, check=False)
    _ip("netns", "del", NETNS, check=False)


@contextmanager
def users_namespace() -> Iterator[None]:
    """The users' side: a namespace where every address of USERS_NET is local."""
    _ip("route", "replace", "unreachable", GUARD_NET, "metric", GUARD_METRIC)
    try:
        _remove_users_namespace()  # left over from a killed run
        _ip("netns", "add", NETNS)
        _ip("link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", NETNS)
        _ip("addr", "add", f"{LINK_HOST}/30", "dev", VETH_HOST)
        _ip("link", "set", VETH_HOST, "up")
        _ip("-n", NETNS, "addr", "add", f"{LINK_NS}/30", "dev", VETH_NS)
        _ip("-n", NETNS, "link", "set", VETH_NS, "up")
        _ip("-n", NETNS, "link", "set", "lo", "up")
        _ip("-n", NETNS, "route", "add", "local", str(USERS_NET), "dev", "lo")
        _ip("route", "add", str(USERS_NET), "via", LINK_NS, "dev", VETH_HOST)
        yield
    finally:
        _remove_users_namespace()
        _ip("route", "del", "unreachable", GUARD_NET, "metric", GUARD_METRIC, check=False)


def user_address(i: int) -> str:
    return str(USERS_NET.network_address + 1 + i)


def node_config(state: Path) -> Path:
    path = state / "node.toml"
    path.write_text(
        f'name = "{NODE}"\n'
        f'listen_port = 18470\n'
        f'state_dir = "{state}"\n'
        f'bridge = "{BRIDGE}"\n'
        f'subnet = "{SUBNET}"\n'
        f"port_range = [{PORTS[0]}, {PORTS[1]}]\n"
        "cores = 1024.0\n"
        "memory_mb = 4194304\n"
        "reserve_cores = 0.0\n"
        "reserve_memory_mb = 0\n"
        'basic_service = "measured"\n'
        "unit = { cores = 0.05, memory_mb = 16 }\n"
        "autoscale_interval_s = 3600.0\n"
        'operator_token = "bench-operator"\n'
        'tokens = { "bench-token" = "bench" }\n'
    )
    return path


def node_down(cfg_path: Path) -> None:
    proc = subprocess.run([str(Path(sys.executable).parent / "enorm"), "down", "-c",
                           str(cfg_path)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(f"enorm down failed:\n{proc.stdout}{proc.stderr}", file=sys.stderr)


class Bench:
    def __init__(self, daemon: Daemon, rounds: int) -> None:
        self.d = daemon
        self.mgr = daemon.manager
        self.rounds = rounds
        self.node_round = control_loop.Observer(self.mgr)
        self.options = autoscaler.Options.from_config(self.mgr.node.config)
        self.snapshot_s = 0.0

    def _snapshot(self) -> autoscaler.Snapshot:
        t0 = time.perf_counter()
        try:
            return self.node_round.snapshot()
        finally:
            self.snapshot_s = time.perf_counter() - t0

    def launch(self, index: int, users: int) -> None:
        first = index * users
        req = SetupRequest(
            app="bench",
            priority=index % 10,
            users=[User(id=f"u{first + k}", address=user_address(first + k))
                   for k in range(users)],
            latency_objective_ms=50,
            ssh_public_key=SSH_KEY,
        )
        self.mgr.handshake(req, owner="bench")

    def grow_to(self, n: int, users: int) -> None:
        have = len(self.mgr.node.store.servers())
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: self.launch(i, users), range(have, n)))

    def terminate_all(self) -> None:
        for s in self.mgr.node.store.servers():
            self.mgr.terminate(s.id, TerminationReason.CLOUD_WITHDRAWAL)

    def slow_request_everywhere(self) -> None:
        now = time.time()
        for s in self.mgr.node.store.servers():
            path = self.mgr.node.containers.delta_dir(s.container) / REQUEST_LOG
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(f"{now:.3f} /api/location 120\n")

    def round(self) -> tuple[float, dict]:
        """One measured round through the node's scheduler (the path of the daemon)."""
        self.slow_request_everywhere()
        sched = control_loop.ControlLoop(self._snapshot, self.mgr, self.options, 3600.0)
        r = sched.run_once()
        if r.error:
            raise RuntimeError(f"round failed: {r.error}")
        failed = [x for x in r.results if not x.ok]
        if failed:
            raise RuntimeError(f"actions failed: {failed[:3]}")
        assert r.snapshot is not None
        lost = sum(1 for rep in self.node_round.monitor.last_reports.values()
                   if rep.network is not None and rep.network.lost)
        p0 = time.perf_counter()
        autoscaler.plan(r.snapshot, self.options)
        plan_s = time.perf_counter() - p0
        return r.duration_s, {
            "monitor_s": self.snapshot_s,
            "plan_s": plan_s,
            "apply_s": max(0.0, r.duration_s - self.snapshot_s - plan_s),
            "actions": len(r.actions),
            "servers_with_lost_probes": lost,
        }

    def floor(self) -> float:
        """Bare cgroup writes and reads for the same containers, through python3-lxc."""
        names = [s.container for s in self.mgr.node.store.servers()]
        t0 = time.perf_counter()
        for name in names:
            c = lxc.Container(name, str(self.mgr.node.config.lxc_path))
            quota = c.get_cgroup_item("cpu.cfs_quota_us")
            mem = c.get_cgroup_item("memory.limit_in_bytes")
            c.set_cgroup_item("cpu.cfs_quota_us", quota)
            c.set_cgroup_item("memory.limit_in_bytes", mem)
            c.get_cgroup_item("cpuacct.usage")
            c.get_cgroup_item("memory.usage_in_bytes")
        return time.perf_counter() - t0

    def measure(self, profile: bool, only: set[str] | None = None) -> dict:
        round_s: dict[str, float] = {}
        details: dict[str, dict] = {}
        floors: dict[str, float] = {}
        for users in USERS_PER_CONTAINER:
            self.terminate_all()
            self.node_round = control_loop.Observer(self.mgr)
            for n in CONTAINERS:
                key = f"{n}x{users}"
                if only and key not in only:
                    continue
                t0 = time.perf_counter()
                self.grow_to(n, users)
                launch_s = time.perf_counter() - t0
                time.sleep(SETTLE_S)  # let the new containers finish booting (sshd, redis)
                self.round()  # warm-up: first log reads, first cgroup samples
                runs = [self.round() for _ in range(self.rounds)]
                times = sorted(t for t, _ in runs)
                round_s[key] = statistics.median(times)
                best = min(runs, key=lambda x: abs(x[0] - round_s[key]))[1]
                floor_runs = sorted(self.floor() for _ in range(self.rounds))
                floors[key] = statistics.median(floor_runs)
                details[key] = {"containers": n, "users": n * users, "rounds_s": times,
                                "floor_s": floors[key], "launch_s": launch_s, **best}
                print(f"{key:>8}: round {round_s[key]:.3f} s (monitor {best['monitor_s']:.3f},"
                      f" plan {best['plan_s']:.4f}, apply {best['apply_s']:.3f}; "
                      f"{best['actions']} actions), floor {floors[key]:.3f} s", flush=True)
                if profile:
                    prof = cProfile.Profile()
                    prof.runcall(self.round)
                    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return {"round_s": round_s, "floor_s": floors.get(f"{CONTAINERS[-1]}x1"),
                "floor_by_scenario_s": floors, "details": details}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for users, marker in zip(USERS_PER_CONTAINER, "os", strict=True):
        ys = [result["round_s"][f"{n}x{users}"] for n in CONTAINERS]
        ax.plot(CONTAINERS, ys, marker=marker, label=f"round, {users} user(s) per container")
    floors = [result["floor_by_scenario_s"][f"{n}x1"] for n in CONTAINERS]
    ax.plot(CONTAINERS, floors, "k--", label="floor: bare cgroup writes + reads")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="target (1 s)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(CONTAINERS, [str(n) for n in CONTAINERS])
    ax.set_xlabel("containers")
    ax.set_ylabel("seconds per auto-scaling round")
    ax.set_title("enorm: one auto-scaling round (monitor + plan + apply)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per scenario")
    ap.add_argument("--profile", action="store_true",
                    help="print a cProfile of one more round per scenario")
    ap.add_argument("--only", nargs="*", metavar="NxU",
                    help="only these scenarios, e.g. 128x128 (for profiling; no files written)")
    ap.add_argument("--out", type=Path, default=RESULTS / "autoscaling.json")
    args = ap.parse_args(argv)
    only = set(args.only) if args.only else None

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    with tempfile.TemporaryDirectory(prefix="enorm-bench-autoscaling-") as tmp:
        cfg_path = node_config(Path(tmp))
        cfg = config.load(cfg_path)
        with users_namespace():
            d = Daemon.open(cfg, background=False)
            try:
                result = Bench(d, args.rounds).measure(args.profile, only)
            finally:
                d.close()
                node_down(cfg_path)
    if only:
        print(json.dumps(result["round_s"]))
        return 0
    result["machine"] = {"python": platform.python_version(), "kernel": platform.release(),
                         "cpus": len(os.sched_getaffinity(0))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
