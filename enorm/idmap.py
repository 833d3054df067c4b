"""Unprivileged containers: each container's root is an id range of its own on the host.

Root in a tenant's container maps to host ids `base + slot * 65536 ...` (lxc.idmap), a
separate slot per container, so two tenants' ids never overlap (as LXD's
`security.idmap.isolated`). The shared base rootfs stays owned by host root on disk and
is never copied or shifted: each container sees it through an *idmapped mount* (Linux
5.12+, `open_tree` + `mount_setattr(MOUNT_ATTR_IDMAP)` + `move_mount`) made with its own
user namespace, under an overlay whose writable layer holds the container's files with
their host ids. Launching stays a matter of milliseconds.

Slots are claimed machine-wide (several nodes may share one LXC path) by files created
with O_EXCL under `<lxc_path>/.enorm-idmap/`, each naming its container; a claim whose
container is gone is taken over.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import subprocess
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MOUNTS = Path("/run/enorm-idmap")  # the containers' idmapped views of the base rootfs
RANGE = 65536  # ids per container: 0..65535 inside, `nobody` (65534) included
STALE_CLAIM_S = 120.0  # a claim younger than this may be a container being created

_libc = ctypes.CDLL(None, use_errno=True)
# The same numbers on every architecture (syscalls added after 424 are unified).
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_AT_FDCWD, _AT_EMPTY_PATH, _AT_RECURSIVE = -100, 0x1000, 0x8000
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_MNT_DETACH = 2
_MS_BIND = 0x1000


class IdmapError(RuntimeError):
    """An id range or an idmapped mount could not be set up; the message says which."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(nr: int, *args: object, what: str) -> int:
    # Every integer as a C long: a variadic call must not leave the upper half of a
    # register undefined (mount_setattr then fails with EINVAL).
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    r = _libc.syscall(ctypes.c_long(nr), *conv)
    if r < 0:
        e = ctypes.get_errno()
        raise IdmapError(f"{what}: {os.strerror(e)}")
    return r


@dataclass(frozen=True)
class IdRange:
    """Where the slots live on the host: `count` ids from `start` (uids and gids alike)."""

    start: int
    count: int

    @property
    def slots(self) -> int:
        return self.count // RANGE

    def host_base(self, slot: int) -> int:
        return self.start + slot * RANGE

    def lxc_items(self, slot: int) -> list[str]:
        b = self.host_base(slot)
        return [f"u 0 {b} {RANGE}", f"g 0 {b} {RANGE}"]


def subordinate_ranges(path: Path, user: str = "root") -> list[tuple[int, int]]:
    """The (start, count) ranges /etc/subuid or /etc/subgid gives `user`."""
    out = []
    try:
        for ln in path.read_text().splitlines():
            parts = ln.strip().split(":")
            if len(parts) == 3 and parts[0] == user:
                out.append((int(parts[1]), int(parts[2])))
    except (OSError, ValueError):
        return []
    return out


def registered(rng: IdRange, root: Path = Path("/")) -> list[str]:
    """Files among /etc/subuid and /etc/subgid that do not give root the whole range
    (empty: registered, so that no other tool hands out these ids)."""
    missing = []
    for f in ("etc/subuid", "etc/subgid"):
        if not any(s <= rng.start and rng.start + rng.count <= s + c
                   for s, c in subordinate_ranges(root / f)):
            missing.append("/" + f)
    return missing


class Slots:
    """Machine-wide claims of id slots, one per container."""

    def __init__(self, lxc_path: Path, rng: IdRange | None) -> None:
        self.dir = Path(lxc_path) / ".enorm-idmap"
        # None: privileged containers, which claim nothing (claims left from when the
        # node's were unprivileged are still found and released).
        self.rng = rng
        # What this process claimed, and where its next claim starts looking: a launch
        # reads one claim file, not every container's (an old claim's owner is looked up
        # in LXC, and a busy node holds many).
        self._held: dict[str, int] = {}
        self._next = 0

    def _owner(self, slot: int) -> str | None:
        try:
            return (self.dir / str(slot)).read_text()
        except FileNotFoundError:
            return None

    def of(self, name: str) -> int | None:
        """The slot a container holds, if any."""
        slot = self._held.get(name)
        if slot is not None and self._owner(slot) == name:
            return slot
        return next((slot for slot, owner in self.claims() if owner == name), None)

    def claims(self) -> list[tuple[int, str]]:
        """Every claim on the machine: (slot, container name)."""
        out = []
        if self.dir.is_dir():
            for f in self.dir.iterdir():
                owner = self._owner(int(f.name)) if f.name.isdigit() else None
                if owner is not None:
                    out.append((int(f.name), owner))
        return sorted(out)

    def claim(self, name: str, alive) -> int:
        """A free slot for `name`; `alive(container)` says whether a claim's container
        still exists (a claim of one that is gone is taken over)."""
        assert self.rng is not None, "privileged containers claim no ids"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        n, first = self.rng.slots, self._next
        for slot in [*range(first, n), *range(min(first, n))]:
            path = self.dir / str(slot)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if self._stale(path, alive):
                    with self._locked():
                        if self._stale(path, alive):
                            path.unlink(missing_ok=True)
                    return self.claim(name, alive)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(name)
            self._held[name], self._next = slot, slot + 1
            return slot
        raise IdmapError(f"all {self.rng.slots} id ranges of {self.rng.start}+"
                         f"{self.rng.count} are in use (idmap_count)")

    def _stale(self, path: Path, alive) -> bool:
        try:
            owner, age = path.read_text(), time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age > STALE_CLAIM_S and not alive(owner)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def release(self, name: str) -> None:
        """Give up every slot `name` holds (one, unless a crash left a second)."""
        self._held.pop(name, None)
        for slot, owner in self.claims():
            if owner == name:
                (self.dir / str(slot)).unlink(missing_ok=True)
                self._next = min(self._next, slot)


@contextmanager
def user_namespace(host_base: int) -> Iterator[int]:
    """An fd of a user namespace mapping 0..65535 to host_base.. (for mount_setattr).

    A short-lived `unshare --user` child holds the namespace; we write its maps
    ourselves (as root), so nothing races."""
    p = subprocess.Popen(["unshare", "--user", "sleep", "30"])
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        while True:
            try:
                if os.readlink(f"/proc/{p.pid}/ns/user") != own:
                    break
            except FileNotFoundError:
                pass
            if p.poll() is not None or time.monotonic() > deadline:
                raise IdmapError("could not create a user namespace (unshare --user)")
            time.sleep(0.0005)
        for kind in ("uid_map", "gid_map"):
            Path(f"/proc/{p.pid}/{kind}").write_text(f"0 {host_base} {RANGE}\n")
        fd = os.open(f"/proc/{p.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        p.kill()
        p.wait()
    try:
        yield fd
    finally:
        os.close(fd)


def idmapped_bind(src: Path, dst: Path, userns_fd: int) -> None:
    """Mount `src` at `dst` with its ids shifted by the user namespace's map."""
    fd = _syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(src),
                  _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE, what=f"open_tree {src}")
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        _syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH | _AT_RECURSIVE,
                 ctypes.byref(attr), ctypes.sizeof(attr), what=f"idmapped mount of {src}")
        dst.mkdir(parents=True, exist_ok=True)
        _syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, os.fsencode(dst),
                 _MOVE_MOUNT_F_EMPTY_PATH, what=f"move_mount to {dst}")
    finally:
        os.close(fd)


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    target.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", ctypes.c_ulong(0), opts) != 0:
        e = ctypes.get_errno()
        raise IdmapError(f"overlay mount at {target}: {os.strerror(e)}")


def bind(src: Path, dst: Path) -> None:
    """Mount what is mounted at `src` at `dst` too."""
    dst.mkdir(parents=True, exist_ok=True)
    if _libc.mount(os.fsencode(src), os.fsencode(dst), None, ctypes.c_ulong(_MS_BIND),
                   None) != 0:
        e = ctypes.get_errno()
        raise IdmapError(f"bind mount of {src} at {dst}: {os.strerror(e)}")


def mount_points() -> list[str]:
    """Every mount point of the mount table, in the order they were mounted (a point
    mounted twice over is listed twice)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for ln in f:
            point = ln.split(" ", 5)[4]
            if "\\" in point:  # spaces and the like come octal-escaped
                point = point.encode().decode("unicode_escape")
            out.append(point)
    return out


def mounted(path: Path, points: Collection[str] | None = None) -> bool:
    """Whether something is mounted at `path`. From the mount table (`points`: one read
    of it for several paths): a bind mount from the same file system is invisible to
    `os.path.ismount` (same device)."""
    return os.path.realpath(path) in (mount_points() if points is None else points)


def unmount(path: Path) -> None:
    """Unmount if mounted (lazily when busy: the container is already stopped)."""
    for _ in range(8):  # a mount made twice over (a crash between) is stacked
        if not mounted(path):
            return
        if _libc.umount2(os.fsencode(path), 0) != 0:
            e = ctypes.get_errno()
            if e == errno.EINVAL:  # unmounted meanwhile (the post-stop hook): look again
                continue
            if e != errno.EBUSY or _libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
                raise IdmapError(f"unmount {path}: {os.strerror(ctypes.get_errno())}")
    raise IdmapError(f"unmount {path}: still mounted")


def unmount_hook(*paths: Path) -> str:
    """A post-stop hook (run by LXC on the host however the container stopped) that
    takes the container's mounts away, in order, so that a stopped container is plain
    files: an operator's `lxc-destroy` works, and a start mounts afresh."""
    lines = [f"umount '{p}' 2>/dev/null || umount -l '{p}' 2>/dev/null\n" for p in paths]
    return ("#!/bin/sh\n# enorm: unmount what the node mounted for this container\n"
            + "".join(lines) + "exit 0\n")


def shift_tree(top: Path, host_base: int) -> None:
    """Give files the host wrote into a container's writable layer to its root (their
    ids shifted into its range), without following links."""
    for dirpath, dirs, files in os.walk(top):
        for n in (dirpath, *(os.path.join(dirpath, f) for f in (*dirs, *files))):
            st = os.lstat(n)
            if st.st_uid < RANGE and st.st_gid < RANGE:
                mode = st.st_mode
                os.lchown(n, host_base + st.st_uid, host_base + st.st_gid)
                if not os.path.islink(n):
                    os.chmod(n, mode & 0o7777)  # chown cleared set-id bits
