"""A container's writable layer with a size limit: an ext4 image on a loop device.

What a tenant writes (its files, its Redis AOF, a `dd` gone wild) lands in the overlay's
upper layer. On the board's own file system that layer could fill the SD card for every
tenant and for the node's store; inside a sized image the tenant gets ENOSPC at its
limit and nobody else notices. Board file systems rarely have project quotas enabled
(they need an unmounted `tune2fs`), loop devices exist everywhere. The image is sparse:
the disk holds what was written, not the limit.

Making one (sparse file, lazy-initialised ext4, `mount -o loop`, then the kernel zeroing
its inode tables in the background) cost the handshake 30-90 ms, so a few are made and
mounted ahead of time (`LayerPool`, refilled by a thread off the handshake's path); a
handshake takes one (a bind mount and a rename: under a millisecond) and makes its own
only when the pool is empty (a burst).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

from enorm import idmap

log = logging.getLogger(__name__)

# Lazy inode-table and journal init: mkfs writes a few hundred KB, not the whole journal.
MKFS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]


class DiskError(RuntimeError):
    """The writable layer could not be made or mounted; the message says which step."""


def make_image(image: Path, size_mb: int) -> None:
    """A sparse file of `size_mb` with an empty ext4 in it (owner root, mode 0600)."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size_mb << 20)
    finally:
        os.close(fd)
    proc = subprocess.run([*MKFS, str(image)], capture_output=True, text=True)
    if proc.returncode != 0:
        image.unlink(missing_ok=True)
        raise DiskError(f"mkfs.ext4 {image}: {proc.stderr.strip()[-300:]}")


def mount_image(image: Path, target: Path) -> None:
    """Mount the image at `target` (idempotent). `-o loop` sets the loop device to
    detach itself when the file system is unmounted, however that happens."""
    if idmap.mounted(target):
        return
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-o", "loop,noatime,nodev,nosuid", str(image), str(target)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise DiskError(f"mount {image} at {target}: {proc.stderr.strip()[-300:]}")


def loop_devices() -> dict[str, Path]:
    """Every bound loop device and its backing file (also when that file has been deleted
    since: the kernel keeps the device until it is detached)."""
    out = {}
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = f.read_text().strip().removesuffix(" (deleted)")
        except OSError:  # detached meanwhile
            continue
        out[f"/dev/{f.parts[3]}"] = Path(backing)
    return out


def release_loops(top: str, wait_s: float = 2.0) -> list[str]:
    """The loop devices of files under `top` go; returns those still bound after
    `wait_s` (a file system still in use somewhere, the sweep finds them later).

    One that clears itself (`mount -o loop`) goes at its file system's last unmount, a
    moment after the unmount (later after a lazy one): it is waited for, not detached.
    Detaching it raced with the kernel: the device, freed in between, was bound by
    another container's mount (the soak: `losetup -d` failed with ENXIO, and could as
    well have hit that container's device). One bound without autoclear (by hand, or a
    crash between `losetup` and `mount`) is detached."""
    deadline = time.monotonic() + wait_s
    while True:
        ours = {d: b for d, b in loop_devices().items() if str(b).startswith(top + "/")}
        for device in [d for d in ours if not _autoclear(d)]:
            subprocess.run(["losetup", "-d", device], capture_output=True)
        if not ours or time.monotonic() > deadline:
            return sorted(ours)
        time.sleep(0.005)


def _autoclear(device: str) -> bool:
    try:
        return (Path("/sys/block") / Path(device).name / "loop/autoclear").read_text()[0] == "1"
    except (OSError, IndexError):  # detached meanwhile
        return True


QUIET_S = 10.0  # the longest the pool's refill waits for a handshake's container start


class LayerPool:
    """Writable layers of one size made and mounted ahead of the handshakes that take
    them. Each waits in `<directory>/<id>/` (`overlay.img`, mounted at `mnt`); the
    directory carries the node's prefix, and `clear` (at each start and at `enorm down`)
    removes whatever is in it, also what a crash left half made or half taken."""

    def __init__(self, directory: Path, size_mb: int, depth: int) -> None:
        self.directory, self.size_mb, self.depth = directory, size_mb, depth
        self._ready: list[Path] = []
        self._spent: list[Path] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._filler: threading.Thread | None = None
        self.taken = 0  # handshakes served from the pool
        self.missed = 0  # handshakes that found it empty and made their own
        # Images given to handshakes still starting their container, and set while there
        # is none: the filler waits for it (at most QUIET_S). Making a layer (mkfs, a loop
        # mount) and unmounting the spent one beside a container's start slowed that
        # start by a third (contending with lxc-start's own mounts); a burst that empties
        # the pool sets it at once, so that the next handshakes of the burst find layers.
        self._starting: set[Path] = set()
        self._quiet = threading.Event()
        self._quiet.set()

    def take(self, image: Path, target: Path) -> bool:
        """Give a ready layer the path `image`, mounted at `target`; False when none is
        ready (the caller makes one)."""
        with self._lock:
            entry = self._ready.pop() if self._ready else None
            if entry is not None:
                self.taken += 1
                self._starting.add(image)
                self._quiet.clear()
            elif self.depth:
                self.missed += 1
        if entry is None:
            self._quiet.set()  # a burst: refill now
            self._wake.set()
            return False
        try:
            idmap.bind(entry / "mnt", target)
            os.rename(entry / "overlay.img", image)
        except (OSError, idmap.IdmapError) as exc:
            raise DiskError(f"layer from the pool ({entry}): {exc}") from None
        finally:
            with self._lock:  # its pool-side mount (an unmount waits for RCU: tens of
                self._spent.append(entry)  # ms on a busy board) is the filler's to remove
            self._wake.set()  # after the append: else a filler awake already misses it
        return True

    def started(self, image: Path) -> None:
        """The handshake that took `image` has its container up (or gave up): the pool
        refills once no other such handshake is under way."""
        with self._lock:
            self._starting.discard(image)
            if not self._starting:
                self._quiet.set()

    def ready(self) -> int:
        with self._lock:
            return len(self._ready)

    def start(self) -> None:
        """Fill the pool, and again after each take, in a thread of its own."""
        if self.depth <= 0 or self.size_mb <= 0 or self._filler is not None:
            return
        self._filler = threading.Thread(target=self._fill, daemon=True, name="enorm-layers")
        self._wake.set()
        self._filler.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._filler is not None:
            self._filler.join(timeout=30)

    def _fill(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            if not self._quiet.wait(QUIET_S):
                with self._lock:  # a handshake that never said: not waited for again
                    self._starting.clear()
            with self._lock:
                spent, self._spent = self._spent, []
            for entry in spent:  # the loop device goes with the layer's last unmount
                try:
                    idmap.unmount(entry / "mnt")
                    (entry / "mnt").rmdir()
                    entry.rmdir()
                except (OSError, idmap.IdmapError) as exc:  # `clear` removes it later
                    log.warning("writable layer pool: %s not removed: %s", entry, exc)
            while not self._stopping.is_set() and self.ready() < self.depth:
                entry = self.directory / secrets.token_hex(4)
                try:
                    entry.mkdir(parents=True, mode=0o700)
                    make_image(entry / "overlay.img", self.size_mb)
                    mount_image(entry / "overlay.img", entry / "mnt")
                except (OSError, DiskError):
                    log.exception("writable layer pool: %s not made; handshakes make "
                                  "their own", entry)
                    self._stopping.wait(5.0)
                    break
                with self._lock:
                    self._ready.append(entry)

    def clear(self) -> list[str]:
        """Remove every layer of the pool (ready, half made, half taken): unmounted, its
        loop device gone, its files deleted. Returns the loop devices still bound."""
        with self._lock:
            self._ready.clear()
            self._spent.clear()
        top = str(self.directory)
        for point in reversed(idmap.mount_points()):
            if point.startswith(top + "/"):
                idmap.unmount(Path(point))
        bound = release_loops(top)
        shutil.rmtree(self.directory, ignore_errors=True)
        return bound
