"""The container image for a board, built on the host (`enorm_image_tarball`).

Building the base image on an emulated board runs debootstrap's second stage under
TCG; on the host it runs natively (amd64) or under qemu-user (arm64), then the cached
root file system is tarred and the playbook copies it to the board, where `enorm image
import` makes it the base: the operator's "build once, push to many boards" path.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.boards import at_nice
from enorm import images

CACHE = Path("/var/cache/enorm/boards")


def tarball(arch: str, progress: Callable[[str], None], cache: Path = CACHE) -> tuple[Path, float]:
    """The debian recipe's root file system for `arch` as a tarball (cached with the
    image cache's key); seconds it took."""
    t0 = time.monotonic()
    base = images.build("debian", arch=arch, progress=progress)
    rootfs = images.CACHE_DIR / images.record(Path("/var/lib/lxc"), base)["rootfs"]
    out = cache / f"image-{rootfs.name}.tar"
    if out.exists():
        return out, 0.0
    for old in cache.glob(f"image-debian-*-{arch}*.tar"):  # another package list's
        old.unlink()
    tmp = out.with_suffix(".tmp")
    subprocess.run([*at_nice(), "tar", "--numeric-owner", "-C", str(rootfs), "-cf",
                    str(tmp), "."], check=True)
    tmp.rename(out)
    return out, round(time.monotonic() - t0, 1)
