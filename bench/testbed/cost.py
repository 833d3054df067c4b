"""What the testbed itself costs, beside what it measures: the CPU seconds of each part a
bench run started, over the run, per request (and per packet for the delayers), and what
share of the machine that is.

Parts:
- `generator`: the load generator's processes (JMeter, wrk, Locust), cgroup `enbd-gen`;
- `delayers`: every link's delayer processes, cgroup `enbd-delay`;
- `cloud`: the cloud tier (game server, its Redis, the cloud manager), cgroup `enbd-cloud`;
- `edge`: the edge servers' containers (game server, Redis, sshd), LXC's own groups;
- `node`: the edge node daemons (`enorm serve`), from /proc/<pid>/stat;
- `machine`: every CPU's busy time (/proc/stat), so that `other` (machine minus the
  parts) holds what no part accounts for: the kernel's packet work on the links in
  softirq context, and whatever else runs on a shared machine.

The groups are cgroup v1 `cpuacct` groups (this machine's hierarchy); a process joins
one before it execs (`Group.launcher`), so its children count too. The testbed is the
generator and the delayers: `testbed_share` is their CPU over the run's wall time and
all cores, the figure the issue's goal ("under a third of the machine") is about.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CPUACCT = Path("/sys/fs/cgroup/cpuacct")
TICK = os.sysconf("SC_CLK_TCK")
PARTS = ("generator", "delayers", "edge", "cloud", "node")
TESTBED = ("generator", "delayers")


class Group:
    """A cpuacct group of the testbed's own processes."""

    def __init__(self, name: str):
        self.path = CPUACCT / name

    def open(self) -> Group:
        self.path.mkdir(exist_ok=True)
        return self

    def launcher(self) -> list[str]:
        """A command prefix: the command's process joins the group, then execs (so what
        it starts, e.g. `ip netns exec ... java`, counts as well)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs")]

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def cpu_s(self) -> float:
        return _usage_s(self.path)

    def user_sys_s(self) -> tuple[float, float]:
        """The CPU in user space and in the kernel (for a delayer, the kernel part is
        mostly the packets' own path through the stack, run when it gives its verdict)."""
        return _usage_s(self.path, "_user"), _usage_s(self.path, "_sys")

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a process still in it: left for the next run
            self.path.rmdir()


GENERATOR, DELAYERS, CLOUD = Group("enbd-gen"), Group("enbd-delay"), Group("enbd-cloud")


def _usage_s(path: Path, part: str = "") -> float:
    try:
        return int((path / f"cpuacct.usage{part}").read_text()) / 1e9
    except (OSError, ValueError):
        return 0.0


def process_cpu_s(pid: int) -> float:
    """User + system CPU of a process and of its children it has waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / TICK


def machine_busy_s() -> float:
    """Busy time of all CPUs: everything but idle and iowait."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in cpu[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


@dataclass
class Sample:
    """CPU seconds so far: every part's, of it in user space (the rest is the kernel's:
    for the generator and the delayers mostly the packets' own path through the stack),
    each container's (total, user), and the packets the delayers have seen."""

    t: float
    cpu_s: dict[str, float]
    user_s: dict[str, float]
    containers: dict[str, tuple[float, float]]
    packets: int
    loadavg: tuple[float, float, float] = field(default_factory=os.getloadavg)


def sample(node_pids: list[int], container_prefixes: list[str], packets: int) -> Sample:
    """Every part's CPU seconds now. `container_prefixes`: the edge nodes' container
    name prefixes (LXC names a container's groups `lxc.payload.<name>`)."""
    containers = {p.name: (_usage_s(p), _usage_s(p, "_user")) for prefix in container_prefixes
                  for p in CPUACCT.glob(f"lxc.payload.{prefix}*")}  # fmt: skip
    groups = {"generator": GENERATOR, "delayers": DELAYERS, "cloud": CLOUD}
    return Sample(
        t=time.monotonic(),
        cpu_s={**{k: g.cpu_s() for k, g in groups.items()},
               "node": sum(process_cpu_s(p) for p in node_pids), "machine": machine_busy_s()},
        user_s={k: g.user_sys_s()[0] for k, g in groups.items()},
        containers=containers,
        packets=packets,
    )  # fmt: skip


def between(a: Sample, b: Sample, requests: int) -> dict:
    """The run from sample `a` to `b` with `requests` requests sent: each part's CPU
    seconds, per request (ms), its share of the machine (wall time x cores), the
    delayers' CPU per packet (us) and the load average at both ends."""
    wall = max(b.t - a.t, 1e-9)
    cores = os.cpu_count() or 1
    cpu = {k: b.cpu_s[k] - a.cpu_s[k] for k in b.cpu_s}
    user = {k: b.user_s[k] - a.user_s[k] for k in b.user_s}
    # a container started within the run counts from zero
    cpu["edge"] = sum(v[0] - a.containers.get(k, (0.0, 0.0))[0] for k, v in b.containers.items())
    user["edge"] = sum(v[1] - a.containers.get(k, (0.0, 0.0))[1]
                       for k, v in b.containers.items())
    cpu["other"] = cpu["machine"] - sum(cpu[k] for k in PARTS)
    packets = b.packets - a.packets
    testbed = sum(cpu[k] for k in TESTBED)
    return {
        "wall_s": round(wall, 3), "cores": cores, "requests": requests, "packets": packets,
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "user_s": {k: round(v, 3) for k, v in user.items()},
        "ms_per_request": {k: round(v * 1000 / requests, 4) if requests else None
                           for k, v in cpu.items()},
        "share": {k: round(v / (wall * cores), 4) for k, v in cpu.items()},
        "delayer_us_per_packet": round(cpu["delayers"] * 1e6 / packets, 2) if packets else None,
        "testbed_share": round(testbed / (wall * cores), 4),
        "loadavg": {"start": a.loadavg, "end": b.loadavg},
    }  # fmt: skip


def summary(c: dict) -> str:
    """One line for the printed report."""
    ms = c["ms_per_request"]
    parts = ", ".join(f"{k} {ms[k]:.3f}" for k in (*PARTS, "other") if ms[k] is not None)
    per_packet = c["delayer_us_per_packet"]
    user = c["user_s"]["delayers"] / c["cpu_s"]["delayers"] if c["cpu_s"]["delayers"] else 0
    return (f"  cost per request (CPU ms): {parts}; delayers {per_packet} us/packet "
            f"({user:.0%} in user space); "
            f"testbed (generator + delayers) {c['testbed_share']:.0%} of the machine, "
            f"machine busy {c['share']['machine']:.0%}; load {c['loadavg']['start'][0]:.2f}"
            f" -> {c['loadavg']['end'][0]:.2f}")
