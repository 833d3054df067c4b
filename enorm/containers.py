"""The LXC driver (python3-lxc): nothing else in enorm talks to LXC.

An edge server is an overlay snapshot clone of the base container: the clone shares the
base rootfs read-only and writes into its own delta directory, which is why launching
takes milliseconds. Limits are cgroup settings: CPU as a CFS quota (so a unit may be a
fraction of a core) and a memory limit, for cgroup v1 and v2; the writable layer is a
sized file system of its own (`enorm.disk`). The quota also sets how many CPUs the
container may run on (a cpuset of its unit rounded up), so that `nproc` and the thread
pools sized from it inside see the unit rather than the board.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import _lxc
import lxc
import psutil

from enorm import disk, idmap, network
from enorm.faults import crash_point
from enorm.network import wait_tcp
from enorm.protocol import Resources

log = logging.getLogger(__name__)

CFS_PERIOD_US = 100_000
# lxcfs's view of a container's own size (when lxcfs serves /var/lib/lxcfs; `optional`:
# a missing or dead lxcfs leaves the host's files, as LXC's own hook would).
LXCFS_ENTRIES = [
    *(f"lxc.mount.entry = /var/lib/lxcfs/proc/{f} proc/{f} none bind,optional 0 0"
      for f in ("cpuinfo", "diskstats", "loadavg", "meminfo", "slabinfo", "stat", "swaps",
                "uptime")),
    "lxc.mount.entry = /var/lib/lxcfs/sys/devices/system/cpu sys/devices/system/cpu "
    "none bind,optional 0 0",
]


def cpu_list(cpus: list[int]) -> str:
    """The kernel's list format (`0-2,5`), so that a value read back compares equal."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_cpu_list(text: str) -> list[int]:
    """`0-2,5` -> [0, 1, 2, 5] (empty text: none)."""
    out: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def cpuset(cores: float, host: list[int], first: int) -> list[int]:
    """The CPUs a unit of `cores` may run on: as many as the quota rounded up (at least
    one, at most the board's), consecutive from the host CPU at position `first`
    (wrapping). The quota still bounds the time: the set only says where, and how many
    CPUs the container counts. `first` comes from the container's address, so that
    neighbours spread over the board's CPUs; a resize keeps it."""
    n = min(len(host), max(1, math.ceil(round(cores, 3))))
    return [host[(first + i) % len(host)] for i in range(n)]


class Container(lxc.Container):
    """python3-lxc's Container without its `network` list, which enorm does not use: the
    list points back at its container, so that each instance was a reference cycle that
    only the collector freed, with liblxc's copy of the container's config (~26 KB of C
    memory each). Dozens a termination (`stop` polls the state) piled up between the
    collector's rounds and grew the heap (issue 28); these go with their last reference."""

    def __init__(self, name: str, config_path: str) -> None:
        _lxc.Container.__init__(self, name, config_path)


class ContainerError(RuntimeError):
    """LXC refused an operation; the message names the container and the step."""


class LimitRefused(ContainerError):
    """The kernel refused a new limit (`memory`: a memory limit, e.g. below what the
    container holds); what was written before it has been put back."""

    def __init__(self, message: str, memory: bool) -> None:
        super().__init__(message)
        self.memory = memory


def cgroup_version() -> int:
    """2 on a unified hierarchy, 1 where the memory controller is a v1 hierarchy."""
    return 1 if os.path.isdir("/sys/fs/cgroup/memory") else 2


@dataclass(frozen=True)
class Usage:
    """What a container used: CPU time (ns, cumulative) and memory now (bytes)."""

    cpu_ns: int
    memory_bytes: int


class Containers:
    """Containers of one edge node: names start with the node's prefix."""

    def __init__(self, lxc_path: Path, prefix: str, base: str, pids_max: int = 512,
                 ids: idmap.IdRange | None = None, disk_mb: int = 0,
                 layer_pool: int = 0) -> None:
        self.lxc_path = str(lxc_path)
        self.prefix = prefix
        self.base = base
        self.pids_max = pids_max
        self.v = cgroup_version()
        # None: privileged containers (root inside is root on the host).
        self.ids = ids
        self.slots = idmap.Slots(lxc_path, ids)
        # A name this node makes: its prefix and one word (a server id), so that no
        # other node's container or a base container (`enorm-base-*`) is ever taken.
        self._name = re.compile(re.escape(prefix) + "[a-z0-9]+")
        self._real_path = os.path.realpath(lxc_path)
        # 0: the writable layer is a plain directory on the board's file system.
        self.disk_mb = disk_mb
        # Writable layers made ahead of the handshakes (started by the daemon).
        self.layers = disk.LayerPool(Path(lxc_path) / f"{prefix}layer-pool", disk_mb,
                                     layer_pool)
        # The CPUs containers are placed on: those the daemon may use itself.
        self.host_cpus = sorted(os.sched_getaffinity(0))

    # -- helpers -------------------------------------------------------------------------
    def _get(self, name: str) -> lxc.Container:
        if not self._name.fullmatch(name) or name == self.base:
            raise ContainerError(f"{name}: not a container of this node ({self.prefix}*)")
        return Container(name, self.lxc_path)

    def _claim_holds(self, owner: str) -> bool:
        """Whether an old id claim's container (any node's) is still there: defined, or
        with a config LXC cannot load (being written or removed, or a crash's leftover:
        its files may still be owned by that range, so the claim stands). Raising here
        failed an unrelated node's launch (a soak's, beside a test's container)."""
        try:
            return Container(owner, self.lxc_path).defined
        except RuntimeError:
            return True

    def _limit_items(self, limits: Resources, first: int) -> dict[str, str]:
        """The cgroup items of `limits`; `first`: the position of the container's first
        CPU among the host's (see `cpuset`)."""
        quota = max(1000, round(limits.cores * CFS_PERIOD_US))
        mem = limits.memory_mb * (1 << 20)
        cpus = cpu_list(cpuset(limits.cores, self.host_cpus, first))
        if self.v == 1:
            return {
                "cpu.cfs_period_us": str(CFS_PERIOD_US),
                "cpu.cfs_quota_us": str(quota),
                "memory.limit_in_bytes": str(mem),
                "cpuset.cpus": cpus,
            }
        return {"cpu.max": f"{quota} {CFS_PERIOD_US}", "memory.max": str(mem),
                "cpuset.cpus": cpus}  # fmt: skip

    def _first_cpu(self, address: str) -> int:
        """Where the container's cpuset starts: by its address, so that neighbours (given
        consecutive addresses) spread over the board's CPUs and a resize or a restore
        keeps the place."""
        return int(ipaddress.ip_address(address.split("/")[0])) % len(self.host_cpus)

    def _address(self, c: lxc.Container) -> str:
        found = c.get_config_item("lxc.net.0.ipv4.address")
        return (found[0] if isinstance(found, list) and found else found) or "0.0.0.0"

    def delta_dir(self, name: str) -> Path:
        """Host-side path of the clone's writable layer (what the container wrote)."""
        return self._layer(name) / "delta"

    def _layer(self, name: str) -> Path:
        """The overlay's directory: its upper ("delta") and work dirs, on the sized
        image when there is one (both must be on one file system)."""
        return Path(self.lxc_path) / name / "overlay"

    def _mount_layer(self, name: str) -> None:
        """Make (once: from the pool when it has one ready) and mount the container's
        sized writable layer, if the node limits disk; again after a reboot or a stop."""
        if not self.disk_mb:
            return
        image = Path(self.lxc_path) / name / "overlay.img"
        try:
            if not image.exists() and not self.layers.take(image, self._layer(name)):
                disk.make_image(image, self.disk_mb)
            disk.mount_image(image, self._layer(name))
        except disk.DiskError as exc:
            raise ContainerError(f"{name}: writable layer: {exc}") from None
        self.delta_dir(name).mkdir(exist_ok=True)

    def _mounts(self, name: str) -> list[Path]:
        """What the node mounts for a container, in unmount order."""
        return [self._rootfs(name), self._lower(name), self._layer(name)]

    def _dir(self, name: str) -> str:
        """The container's directory, as the mount table names it."""
        return os.path.join(self._real_path, name)

    def _rootfs(self, name: str) -> Path:
        """Where an unprivileged container's overlay is mounted (its `dir:` rootfs)."""
        return Path(self.lxc_path) / name / "rootfs"

    @staticmethod
    def _lower(name: str) -> Path:
        """The base rootfs seen through the container's idmapped mount. Outside the
        container's directory, so that no recursive delete of it can reach the base."""
        return idmap.MOUNTS / name

    def _mount_rootfs(self, name: str) -> None:
        """Mount the idmapped base and the overlay of an unprivileged container (again
        after a reboot or a crash: mounts do not outlive them)."""
        assert self.ids is not None
        slot = self.slots.of(name)
        if slot is None:
            raise ContainerError(f"{name}: holds no id range (created privileged?)")
        lower, target = self._lower(name), self._rootfs(name)
        points = set(idmap.mount_points())  # one read of the table, which grows with them
        if not idmap.mounted(lower, points):
            with idmap.user_namespace(self.ids.host_base(slot)) as ns:
                idmap.idmapped_bind(Path(self.lxc_path) / self.base / "rootfs", lower, ns)
        if not idmap.mounted(target, points):
            ov = Path(self.lxc_path) / name / "overlay"
            (ov / "work").mkdir(exist_ok=True)
            idmap.mount_overlay(lower, ov / "delta", ov / "work", target)

    # -- lifecycle -----------------------------------------------------------------------
    def create(
        self,
        name: str,
        *,
        address: str,
        prefixlen: int,
        gateway: str,
        bridge: str,
        limits: Resources,
        authorized_key: str,
        redis_password: str,
        veth: str | None = None,
        mac: str | None = None,
    ) -> None:
        """Clone the base, give the clone its address, limits, SSH key and Redis password.

        `veth` and `mac` fix the host-side interface name and the MAC, so that the node's
        bridge guard can name them before the container starts.
        """
        base = Container(self.base, self.lxc_path)
        if not base.defined:
            raise ContainerError(
                f"{self.base}: base container missing (run `enorm image build`)"
            )
        # `lxc-copy` rather than `Container.clone()`, for `start`'s reason: liblxc forks
        # the caller to mount the clone's rootfs, and a fork of this daemon made the
        # clone 14-19 ms (0-60 servers held), where lxc-copy run from it takes 11-12.
        proc = subprocess.run(["lxc-copy", "-n", self.base, "-P", self.lxc_path, "-N", name,
                               "-s", "-B", "overlay"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ContainerError(f"{name}: clone of {self.base} failed: "
                                 f"{proc.stderr.strip()[-400:]}")
        c = Container(name, self.lxc_path)
        crash_point("create.cloned")
        mac = mac or "00:16:3e:" + ":".join(secrets.token_hex(1) for _ in range(3))
        items = {
            "lxc.uts.name": name[-63:],
            "lxc.net.0.type": "veth",
            "lxc.net.0.link": bridge,
            "lxc.net.0.flags": "up",
            "lxc.net.0.name": "eth0",
            "lxc.net.0.hwaddr": mac,
            "lxc.net.0.ipv4.address": f"{address}/{prefixlen}",
            "lxc.net.0.ipv4.gateway": gateway,
        }
        if veth:
            items["lxc.net.0.veth.pair"] = veth
        slot = None
        if self.ids is not None:
            slot = self.slots.claim(name, self._claim_holds)
            crash_point("create.claimed")
        key = "lxc.cgroup." if self.v == 1 else "lxc.cgroup2."
        limit_items = self._limit_items(limits, self._first_cpu(address))
        items.update({key + k: v for k, v in limit_items.items()})
        items[key + "pids.max"] = str(self.pids_max)  # a fork storm stays inside
        c.clear_config_item("lxc.net.0.type")
        for k, v in items.items():
            if not c.set_config_item(k, v):
                raise ContainerError(f"{name}: cannot set {k}={v}")
        if not c.save_config():
            raise ContainerError(f"{name}: cannot save config")
        # Run by LXC on the host however the container stopped: a stopped container is
        # plain files (an operator's `lxc-destroy` works) and a start mounts afresh.
        hook = Path(self.lxc_path) / name / "enorm-unmount"
        hook.write_text(idmap.unmount_hook(*self._mounts(name)))
        hook.chmod(0o700)
        # Written after the `lxc.include` that brings in lxcfs's hooks, which they clear:
        # its mount hook is a shell script running ~9 `mount`s per start (76 ms of
        # lxc-start here, 20 ms with the same binds as mount entries made by liblxc).
        drop = ["lxc.hook.mount", "lxc.hook.post-stop"]
        add = ["lxc.hook.mount =", "lxc.hook.post-stop =", f"lxc.hook.post-stop = {hook}",
               *LXCFS_ENTRIES]
        if slot is not None:
            # liblxc refuses to change a defined container's rootfs through the API: the
            # overlay becomes our own mount, started as a plain directory, and the id map
            # goes with it.
            drop += ["lxc.rootfs.path", "lxc.idmap"]
            add.append(f"lxc.rootfs.path = dir:{self._rootfs(name)}")
            add += [f"lxc.idmap = {v}" for v in self.ids.lxc_items(slot)]  # type: ignore[union-attr]
        conf = Path(self.lxc_path) / name / "config"
        lines = [ln for ln in conf.read_text().splitlines() if not ln.startswith(tuple(drop))]
        conf.write_text("\n".join(lines + add) + "\n")
        self._mount_layer(name)
        crash_point("create.mounted")
        delta = self.delta_dir(name)
        ssh = delta / "root/.ssh"
        ssh.mkdir(parents=True, exist_ok=True)
        ssh.chmod(0o700)
        (ssh / "authorized_keys").write_text(authorized_key.strip() + "\n")
        (ssh / "authorized_keys").chmod(0o600)
        conf = delta / "etc/redis/enorm-auth.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(f"requirepass {redis_password}\n")
        conf.chmod(0o600)
        if slot is not None:
            host_root = self.ids.host_base(slot)  # type: ignore[union-attr]
            # Directories the host made in the writable layer shadow the base's: same
            # modes as there (/root is 0700), owned by the container's root.
            (delta / "root").chmod(0o700)
            idmap.shift_tree(delta, host_root)
            # The container's root must reach its rootfs through the container directory.
            cdir = Path(self.lxc_path) / name
            os.chown(cdir, 0, host_root)
            cdir.chmod(0o750)

    def started(self, name: str) -> None:
        """The handshake of `name` is over (its sshd answers, or the launch failed): its
        writable layer, if it took one from the pool, lets the pool refill."""
        self.layers.started(Path(self.lxc_path) / name / "overlay.img")

    def start(self, name: str) -> None:
        """Start through `lxc-start` rather than `Container.start()`: liblxc forks the
        caller to make each container's monitor, and a fork of this daemon kept ~8 MB
        of private pages per container (bench.peers: 275 -> 74 MB with 32 containers).
        `lxc-start` forks a small C process instead."""
        c = self._get(name)
        if c.running:
            return
        self._wait_monitor_gone(name)
        self._mount_layer(name)
        if self.ids is not None and self.slots.of(name) is not None:
            try:
                self._mount_rootfs(name)
            except idmap.IdmapError as exc:
                raise ContainerError(f"{name}: {exc}") from None
        # The container's init inherits lxc-start's umask. The daemon's own is not to be
        # trusted: a liblxc call in another of its threads can change it for a moment,
        # and an init started then made /run/sshd group-writable, which sshd refuses to
        # start with (the soak: 3 handshakes in 900 "sshd not up", and once every one
        # after the change stuck).
        proc = subprocess.run(["lxc-start", "-n", name, "-P", self.lxc_path,
                               "-p", str(self._monitor_pidfile(name))],
                              capture_output=True, text=True, umask=0o022)
        if proc.returncode != 0:
            raise ContainerError(f"{name}: start failed: {proc.stderr.strip()[-400:]} "
                                 f"(see lxc-start -n {name} -F -l debug)")

    def stop(self, name: str, timeout: float = 10.0) -> None:
        """Stop at once: SIGKILL to the container's init, then wait for STOPPED.

        The data was merged back before (or the container is kept). liblxc's own stop()
        polls for the state change for about half a second; polling ourselves every
        2 ms finds it stopped in about 40 ms.
        """
        c = self._get(name)
        pid = c.init_pid
        if not c.running or pid <= 0:
            return
        # A veth named by `lxc.net.0.veth.pair` is deleted by LXC after the container
        # died, waiting for the dying namespace (about 0.5 s, one time in two); deleted
        # first, it takes milliseconds.
        veth = c.get_config_item("lxc.net.0.veth.pair")
        if veth:
            network.delete_link(veth)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while Container(name, self.lxc_path).state != "STOPPED":
            if time.monotonic() > deadline:
                if not c.stop():
                    raise ContainerError(f"{name}: did not stop within {timeout}s")
                break
            time.sleep(0.002)
        self._wait_monitor_gone(name)

    def kill(self, name: str, timeout: float = 10.0) -> None:
        """SIGKILL to the container's init, and wait until it has died: the kernel kills
        every other process of its PID namespace before init can, so then all of the
        tenant's CPU and memory are free. What LXC does after (veth, STOPPED, the
        post-stop hook) is `stop`'s, which a termination leaves to its release."""
        pid = self._get(name).init_pid
        if pid <= 0:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.002)
        raise ContainerError(f"{name}: init {pid} alive {timeout}s after SIGKILL")

    def _monitor_pidfile(self, name: str) -> Path:
        return Path(self.lxc_path) / name / "enorm-monitor.pid"

    def _wait_monitor_gone(self, name: str, timeout: float = 10.0) -> None:
        """LXC reports STOPPED before its monitor has run the post-stop hook, which
        unmounts the container's layers: a start in between would find them mounted,
        keep them, and lose them to the late hook (`enorm down --force` right after a
        plain `down` failed so). Wait for the monitor (`lxc-start -p`) to exit."""
        try:
            pid = int(self._monitor_pidfile(name).read_text())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if name not in " ".join(psutil.Process(pid).cmdline()):
                    return  # the pid is someone else's now
            except psutil.Error:
                return
            time.sleep(0.002)

    def destroy(self, name: str) -> None:
        """Remove the container and everything of it, whatever state a crash left it in
        (see `leftovers`): stopped; its mounts taken away, last mounted first (the
        overlay, the idmapped base under it, the writable layer); LXC's destroy while
        it has a config; then what LXC or a crash left: the directory (LXC removes the
        config first), loop devices of its image, the idmapped base's mount point, the
        id claim. Idempotent: a crash at any step is finished by the next call."""
        self.stop(name)
        crash_point("destroy.stopped")
        self._unmount(name)
        crash_point("destroy.unmounted")
        c = self._get(name)
        if c.defined and not c.destroy():
            if self._get(name).running:
                raise ContainerError(f"{name}: destroy failed")
            log.warning("%s: LXC's destroy failed; removing its directory", name)
        crash_point("destroy.deleted")
        self._release(name)

    def _unmount(self, name: str) -> None:
        """Unmount everything under the container's directory and its idmapped base,
        the last mounted first (as `umount -R`)."""
        top, lower = self._dir(name), str(self._lower(name))
        for point in reversed(idmap.mount_points()):
            if point == lower or point.startswith(top + "/"):
                idmap.unmount(Path(point))

    def _release(self, name: str) -> None:
        """What is left once LXC is done (or could not be): loop devices, the directory,
        the idmapped base's mount point, the id claim."""
        top = self._dir(name)
        bound = disk.release_loops(top)
        if bound:  # its file system still in use somewhere: it goes with the last user
            log.warning("%s: loop devices %s still bound to its image", name, " ".join(bound))
        if os.path.lexists(top):
            if any(p.startswith(top + "/") for p in idmap.mount_points()):
                raise ContainerError(f"{name}: still mounted under {top}; not removed")
            shutil.rmtree(top)
        with contextlib.suppress(FileNotFoundError):
            self._lower(name).rmdir()
        self.slots.release(name)

    def leftovers(self) -> list[str]:
        """Every container of this node that anything is left of on the machine, whatever
        state a crash left it in: known to LXC (its config), a directory without a config
        (a kill between LXC's removing the config and the directory), a mount under its
        directory or of its idmapped base (with the directory gone or not), a loop
        device of its writable layer (its image deleted or not), an id claim."""
        found = set(self.names())
        found.update(os.listdir(self._real_path))
        if idmap.MOUNTS.is_dir():
            found.update(os.listdir(idmap.MOUNTS))
        paths = [*idmap.mount_points(), *map(str, disk.loop_devices().values())]
        for top in (self._real_path, str(idmap.MOUNTS)):
            found.update(p[len(top) + 1:].split("/")[0] for p in paths
                         if p.startswith(top + "/"))
        found.update(owner for _, owner in self.slots.claims())
        return sorted(n for n in found if self._name.fullmatch(n) and n != self.base)

    def uid_base(self, name: str) -> int | None:
        """The host id of the container's root (None: privileged)."""
        slot = self.slots.of(name) if self.ids is not None else None
        return None if slot is None else self.ids.host_base(slot)  # type: ignore[union-attr]

    def names(self) -> list[str]:
        """Every container of this node that LXC knows (it has a config), running or not."""
        return [n for n in lxc.list_containers(config_path=self.lxc_path)
                if self._name.fullmatch(n) and n != self.base]

    def running(self, name: str) -> bool:
        return self._get(name).running

    def exists(self, name: str) -> bool:
        return self._get(name).defined

    # -- limits and usage ----------------------------------------------------------------
    def set_limits(self, name: str, limits: Resources, was: Resources | None = None) -> None:
        """Apply new limits to the running container (the auto-scaler's mechanism), all
        or nothing (LimitRefused): what was written goes back to `was` (the limits the
        node gave it) or, without it, to the values read first (three more liblxc calls:
        23 ms on the amd64 board VM, where a resize took 149-187 ms).

        Only the kernel's values change; the store keeps the limits and `reconcile`
        applies them again if the container is ever restarted. In v1 the period is set
        once at creation, so a change is two writes.
        """
        c = self._get(name)
        if not c.running:
            raise ContainerError(f"{name}: not running, cannot change its limits")
        first = self._first_cpu(self._address(c))
        items = self._limit_items(limits, first)
        items.pop("cpu.cfs_period_us", None)
        # All or nothing: the memory first (the item a kernel refuses: usage above the
        # new limit), and what was written goes back if a later item is refused.
        order = sorted(items, key=lambda k: not k.startswith("memory"))
        before = (self._limit_items(was, first) if was is not None else
                  {k: (c.get_cgroup_item(k) or "").strip() for k in order})
        done: list[str] = []
        for k in order:
            if not c.set_cgroup_item(k, items[k]):
                for w in reversed(done):
                    c.set_cgroup_item(w, before[w])
                raise LimitRefused(
                    f"{name}: the kernel refused cgroup {k}={items[k]}"
                    + (" (memory in use is above the new limit)" if "memory" in k else ""),
                    memory="memory" in k)
            done.append(k)

    def restore(self, name: str, limits: Resources) -> dict[str, str]:
        """Write back every limit item (CPU, memory, pids) that differs from what the node
        set, e.g. after a write behind the node's back; returns the items as found."""
        c = self._get(name)
        first = self._first_cpu(self._address(c))
        want = {**self._limit_items(limits, first), "pids.max": str(self.pids_max)}
        found = {k: (c.get_cgroup_item(k) or "").strip() for k in want}
        changed = {k: v for k, v in found.items() if v != want[k]}
        for k in changed:
            if not c.set_cgroup_item(k, want[k]):
                raise ContainerError(f"{name}: the kernel refused cgroup {k}={want[k]}")
        return changed

    def limits(self, name: str) -> Resources:
        """The limits the kernel enforces now, read back from the cgroup."""
        c = self._get(name)
        if self.v == 1:
            quota = int(c.get_cgroup_item("cpu.cfs_quota_us"))
            period = int(c.get_cgroup_item("cpu.cfs_period_us"))
            mem = int(c.get_cgroup_item("memory.limit_in_bytes"))
        else:
            q, p = c.get_cgroup_item("cpu.max").split()
            quota, period = (-1 if q == "max" else int(q)), int(p)
            m = c.get_cgroup_item("memory.max")
            mem = -1 if m == "max" else int(m)
        cores = round(quota / period, 3) if quota > 0 else 0.0
        return Resources(cores=cores, memory_mb=mem >> 20 if mem > 0 else 0)

    def usage(self, name: str) -> Usage:
        c = self._get(name)
        if self.v == 1:
            cpu = int(c.get_cgroup_item("cpuacct.usage") or 0)
            mem = int(c.get_cgroup_item("memory.usage_in_bytes") or 0)
        else:
            stat = dict(
                line.split() for line in (c.get_cgroup_item("cpu.stat") or "").splitlines()
            )
            cpu = int(stat.get("usage_usec", 0)) * 1000
            mem = int(c.get_cgroup_item("memory.current") or 0)
        return Usage(cpu_ns=cpu, memory_bytes=mem)

    def memory_stat(self, name: str) -> tuple[dict[str, int], int]:
        """The cgroup's memory statistics (v1: with the kernel's share as "kernel") and
        its peak usage in bytes."""
        c = self._get(name)
        stat = {k: int(v) for k, v in (ln.split() for ln in
                                       (c.get_cgroup_item("memory.stat") or "").splitlines())}
        if self.v == 1:
            stat["kernel"] = int(c.get_cgroup_item("memory.kmem.usage_in_bytes") or 0)
            peak = c.get_cgroup_item("memory.max_usage_in_bytes")
        else:
            peak = c.get_cgroup_item("memory.peak") or c.get_cgroup_item("memory.current")
        return stat, int(peak or 0)

    def wait_ssh(self, address: str, timeout: float = 10.0, name: str | None = None) -> float:
        """Wait until the container's sshd accepts TCP; returns the seconds it took."""
        try:
            return wait_tcp(address, 22, timeout, interval=0.002)
        except TimeoutError:
            seen = f" (seen: {self._seen(name, address)})" if name else ""
            raise ContainerError(f"{address}: sshd not up after {timeout}s{seen}") from None

    def _seen(self, name: str, address: str) -> str:
        """What a launch that timed out looked like: the container's state, its processes,
        the host's neighbour entry for its address (for the operator and the 503)."""
        try:
            c = self._get(name)
            comms = []
            if c.running and c.init_pid > 0:
                init = psutil.Process(c.init_pid)
                comms = [p.name() for p in [init, *init.children(recursive=True)][:12]]
            neigh = network.neighbour(address)
            # A network manager of the board (systemd-networkd matching `Type=ether`)
            # takes a veth off the bridge: the container runs, nothing reaches it.
            veth, bridge = (c.get_config_item(f"lxc.net.0.{k}") for k in ("veth.pair", "link"))
            on = network.master(veth) if veth else "?"
            port = f"veth {veth} on {on}" + ("" if on == bridge else
                                             f" (not on {bridge}: taken by a network manager?)")
            # What sshd needs from the writable layer (lstat: the tenant's files).
            delta = self.delta_dir(name)
            files = []
            for rel in ("etc/ssh/ssh_host_ed25519_key", "run/sshd"):
                try:
                    st = os.lstat(delta / rel)
                    files.append(f"{rel} {oct(st.st_mode)} uid {st.st_uid} {st.st_size} B")
                except OSError as exc:
                    files.append(f"{rel} {exc.strerror}")
            return (f"state {c.state}, processes {','.join(comms) or 'none'}, "
                    f"neighbour {neigh}, {port}, {'; '.join(files)}")
        except Exception as exc:  # a diagnosis must not hide the timeout
            return f"{type(exc).__name__}: {exc}"
