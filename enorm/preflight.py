"""Preflight: does this board enforce what enorm promises its tenants?

The most common failure of containers on Raspberry Pi boards is a limit that is silently
not enforced: Raspberry Pi OS boots with the memory controller disabled, and a
`memory.limit_in_bytes` that nobody checks means a tenant may take the board. So the node
refuses to start unless every cgroup controller it writes is enabled, mounted and
writable (a limit written to a scratch cgroup reads back), and the tools it calls exist.
`enorm doctor` prints the same report on demand.

The checks read files under a root directory (`/` on the board, a fixture tree in the
tests), so v1, hybrid and v2 layouts are tested without those machines.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from enorm import disk, idmap

# What enorm writes (cpu, memory, pids) or reads (cpuacct on v1) per container, and
# cpuset, which LXC needs to place a container.
CONTROLLERS_V1 = ("cpu", "cpuacct", "cpuset", "memory", "pids")
CONTROLLERS_V2 = ("cpu", "cpuset", "memory", "pids")
TOOLS = ("lxc-start", "lxc-stop", "iptables", "iptables-restore", "ebtables",
         "ebtables-restore", "ip", "redis-server")
CMDLINE_FIX = ("add `cgroup_enable=cpuset cgroup_enable=memory cgroup_memory=1` to the kernel "
               "command line (Raspberry Pi OS: the one line of /boot/firmware/cmdline.txt, "
               "/boot/cmdline.txt before Bookworm) and reboot; if the controller is still "
               "off after that, `enorm doctor` says what next")
# The command line asks for the controller and the kernel still keeps it off: recent
# Raspberry Pi 5 kernels do (raspberrypi/linux issue 6980).
IGNORED_FIX = ("this kernel does not honour `cgroup_enable=` (recent Raspberry Pi 5 kernels, "
               "raspberrypi/linux issue 6980): boot a kernel that does (an earlier Raspberry "
               "Pi OS kernel, or a distribution kernel such as Debian's linux-image-arm64, "
               "whose memory controller is on), and look in /proc/cmdline for a "
               "`cgroup_disable=` that the boot firmware adds after yours")
SCRATCH_LIMIT = 64 << 20


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _read(root: Path, path: str) -> str | None:
    try:
        return (root / path.lstrip("/")).read_text()
    except OSError:
        return None


def layout(root: Path) -> str:
    """'v1', 'hybrid' (v1 controllers and a v2 tree beside them) or 'v2' (unified at
    /sys/fs/cgroup), from the cgroup file systems that are mounted."""
    unified = beside = False
    for ln in (_read(root, "/proc/self/mounts") or "").splitlines():
        parts = ln.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            unified |= parts[1] == "/sys/fs/cgroup"
            beside |= parts[1] != "/sys/fs/cgroup"
    if unified:
        return "v2"
    return "hybrid" if beside else "v1"


def enabled_controllers(root: Path) -> dict[str, bool]:
    """Controller -> enabled, from /proc/cgroups (the kernel's view, both versions)."""
    out: dict[str, bool] = {}
    for ln in (_read(root, "/proc/cgroups") or "").splitlines():
        if ln.startswith("#") or not ln.strip():
            continue
        name, _hier, _num, enabled = ln.split()[:4]
        out[name] = enabled == "1"
    return out


def mounted_v1(root: Path) -> set[str]:
    """Controllers with a v1 hierarchy mounted under /sys/fs/cgroup."""
    out: set[str] = set()
    for ln in (_read(root, "/proc/self/mounts") or "").splitlines():
        parts = ln.split()
        if len(parts) >= 4 and parts[2] == "cgroup" and parts[1].startswith("/sys/fs/cgroup"):
            out.update(parts[3].split(","))
    return out


def on_cmdline(root: Path, param: str) -> set[str]:
    """Controllers the kernel command line names with `param` (`cgroup_enable=a,b`)."""
    out: set[str] = set()
    for word in (_read(root, "/proc/cmdline") or "").split():
        if word.startswith(f"{param}="):
            out.update(filter(None, word.partition("=")[2].split(",")))
    return out


def disabled_fix(c: str) -> str:
    """The fix for a controller that the command line's `cgroup_disable=c` turns off."""
    return (f"remove `cgroup_disable={c}` from the kernel command line (GRUB: "
            "GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub) and reboot; where "
            "the boot firmware puts it there (Raspberry Pi kernels), " + CMDLINE_FIX)


def check_controllers(root: Path) -> list[Finding]:
    """Each controller enorm needs: enabled by the kernel and usable in the layout."""
    kind = layout(root)
    enabled = enabled_controllers(root)
    asked, off = on_cmdline(root, "cgroup_enable"), on_cmdline(root, "cgroup_disable")
    findings = [Finding("cgroup layout", True, kind)]
    if kind == "v2":
        avail = set((_read(root, "/sys/fs/cgroup/cgroup.controllers") or "").split())
        need = CONTROLLERS_V2
    else:
        avail = mounted_v1(root)
        need = CONTROLLERS_V1
    for c in need:
        if not enabled.get(c, False):
            if c not in enabled:
                detail, fix = "not built into this kernel", "use a kernel with this controller"
            elif c in asked:
                detail, fix = (f"disabled although the command line has cgroup_enable={c}",
                               IGNORED_FIX)
            elif c in off:
                detail, fix = f"disabled by cgroup_disable={c} on the kernel command line", \
                    disabled_fix(c)
            else:
                detail, fix = "disabled by the kernel command line", CMDLINE_FIX
            findings.append(Finding(f"cgroup {c}", False, detail, fix))
        elif c not in avail:
            where = "cgroup.controllers" if kind == "v2" else "a v1 mount under /sys/fs/cgroup"
            findings.append(Finding(f"cgroup {c}", False, f"enabled, but not in {where}",
                                    "mount it (LXC's cgroupfs-mount, or systemd does this)"))
        else:
            findings.append(Finding(f"cgroup {c}", True, "enabled"))
    return findings


def check_tools(path: str | None = None) -> list[Finding]:
    found = {t: shutil.which(t, path=path) for t in TOOLS}
    return [Finding(f"tool {t}", True, at) if at else
            Finding(f"tool {t}", False, "missing", "run scripts/setup.sh (or the Ansible role)")
            for t, at in found.items()]


def check_write_back(root: Path) -> list[Finding]:
    """Write a memory limit and a pids limit to a scratch cgroup and read them back."""
    name = f"enorm-preflight-{os.getpid()}"
    if layout(root) == "v2":
        dirs = {"memory": root / "sys/fs/cgroup" / name}
        dirs["pids"] = dirs["memory"]
        files = {"memory": "memory.max", "pids": "pids.max"}
    else:
        dirs = {c: root / "sys/fs/cgroup" / c / name for c in ("memory", "pids")}
        files = {"memory": "memory.limit_in_bytes", "pids": "pids.max"}
    values = {"memory": str(SCRATCH_LIMIT), "pids": "64"}
    findings = []
    for c in ("memory", "pids"):
        d = dirs[c]
        try:
            d.mkdir(exist_ok=True)
            try:
                (d / files[c]).write_text(values[c])
                back = (d / files[c]).read_text().strip()
            finally:
                d.rmdir()
        except OSError as exc:
            findings.append(Finding(f"write {files[c]}", False, str(exc),
                                    "run enorm as root on a host whose cgroups are writable"))
            continue
        ok = back == values[c]
        findings.append(Finding(f"write {files[c]}", ok,
                                f"wrote {values[c]}, read {back}",
                                "" if ok else "the kernel does not enforce this limit"))
    return findings


def check_idmap(root: Path, ids: idmap.IdRange, live: bool) -> list[Finding]:
    """Unprivileged containers: the id range is registered for root (so that no other
    tool hands it out) and, live, the kernel makes an idmapped mount."""
    span = f"root:{ids.start}:{ids.count}"
    missing = idmap.registered(ids, root)
    out = [Finding("id range", not missing,
                   f"{span} in /etc/subuid and /etc/subgid" if not missing
                   else f"{span} not in {', '.join(missing)}",
                   "" if not missing else f"add the line {span} to both files "
                   "(scripts/setup.sh and the Ansible role do)")]
    if live:
        try:
            with tempfile.TemporaryDirectory(prefix="enorm-idmap-probe-") as tmp:
                src, dst = Path(tmp, "src"), Path(tmp, "dst")
                src.mkdir()
                with idmap.user_namespace(ids.host_base(0)) as ns:
                    idmap.idmapped_bind(src, dst, ns)
                owner = dst.stat().st_uid
                idmap.unmount(dst)
            ok, detail = owner == ids.host_base(0), f"root's directory seen as uid {owner}"
        except (idmap.IdmapError, OSError) as exc:
            ok, detail = False, str(exc)
        out.append(Finding("idmapped mounts", ok, detail, "" if ok else
                           "a kernel with idmapped mounts (Linux 5.12+, overlayfs on "
                           "idmapped layers 5.19+), or `unprivileged = false`"))
    return out


def check_disk() -> Finding:
    """Sized writable layers: make, mount and fill a tiny ext4 image on a loop device."""
    try:
        with tempfile.TemporaryDirectory(prefix="enorm-disk-probe-") as tmp:
            image, target = Path(tmp, "img"), Path(tmp, "m")
            disk.make_image(image, 8)
            disk.mount_image(image, target)
            try:
                full = False
                try:
                    Path(target, "fill").write_bytes(b"\0" * (16 << 20))
                except OSError:
                    full = True
            finally:
                idmap.unmount(target)
        ok, detail = full, ("an 8 MB layer refused 16 MB" if full
                            else "an 8 MB layer took 16 MB: no limit")
    except (disk.DiskError, idmap.IdmapError, OSError) as exc:
        ok, detail = False, str(exc)
    return Finding("disk quota", ok, detail, "" if ok else
                   "loop devices (/dev/loop-control), mkfs.ext4 (e2fsprogs) and mount, "
                   "or `disk_mb = 0` (no limit on what a tenant writes)")


def check_probe_source(address: str) -> Finding:
    """The node's probes leave from `probe_source`: it must be one of this host's."""
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return Finding("probe source", True, f"{address} is local")
    except OSError as exc:
        return Finding("probe source", False, f"cannot send from {address}: {exc.strerror}",
                       "set `probe_source` to an address of this host, or leave it out")


def run(root: Path | str = "/", live: bool = True,
        ids: idmap.IdRange | None = None, disk_mb: int = 0,
        probe_source: str = "") -> list[Finding]:  # fmt: skip
    """Every check; `live` adds the tools on PATH and the write-and-read-back probe;
    `ids` (unprivileged containers) the id range and the idmapped-mount probe; `disk_mb`
    the loop-device probe of sized writable layers; `probe_source` that the probes can
    leave from it."""
    root = Path(root)
    findings = check_controllers(root)
    if live:
        findings += check_tools()
        if all(f.ok for f in findings if f.check in ("cgroup memory", "cgroup pids")):
            findings += check_write_back(root)
    if ids is not None:
        findings += check_idmap(root, ids, live)
    if live:
        findings.append(check_lxcfs(root))
        if disk_mb:
            findings.append(check_disk())
        if probe_source:
            findings.append(check_probe_source(probe_source))
    return findings


def check_lxcfs(root: Path) -> Finding:
    """A container sees its own size (/proc/meminfo, /proc/cpuinfo, the online CPUs)
    only while lxcfs serves /var/lib/lxcfs: LXC's lxcfs hook mounts its files then. A
    mount whose lxcfs died is still listed; reading through it tells."""
    mounted = any(ln.split()[1:3] == ["/var/lib/lxcfs", "fuse.lxcfs"]
                  for ln in (_read(root, "/proc/self/mounts") or "").splitlines())
    try:
        (root / "var/lib/lxcfs/proc/meminfo").read_bytes()
        answers = True
    except OSError:
        answers = False
    if mounted and answers:
        return Finding("lxcfs", True, "serving /var/lib/lxcfs")
    return Finding("lxcfs", False, "stale mount (lxcfs is gone)" if mounted else "not running",
                   ("`umount -l /var/lib/lxcfs`, then " if mounted else "")
                   + "start lxcfs (`systemctl start lxcfs`, or "
                   "`lxcfs --enable-cfs /var/lib/lxcfs`; scripts/setup.sh does)")


def failures(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if not f.ok]


def message(findings: list[Finding]) -> str:
    """One message naming everything missing and its fix (for `enorm serve`)."""
    bad = failures(findings)
    lines = [f"{f.check}: {f.detail}" + (f" -> {f.fix}" if f.fix else "") for f in bad]
    return ("this board cannot enforce enorm's limits; not starting:\n  "
            + "\n  ".join(lines))
