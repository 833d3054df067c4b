"""A container's writable layer with a size limit: an ext4 image on a loop device.

What a tenant writes (its files, its Redis AOF, a `dd` gone wild) lands in the overlay's
upper layer. On the board's own file system that layer could fill the SD card for every
tenant and for the node's store; inside a sized image the tenant gets ENOSPC at its
limit and nobody else notices. Board file systems rarely have project quotas enabled
(they need an unmounted `tune2fs`), loop devices exist everywhere, and the image costs
~15 ms per handshake (sparse file, lazy-initialised ext4, `mount -o loop`). The image is
sparse: the disk holds what was written, not the limit.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from enorm import idmap

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
