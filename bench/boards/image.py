"""The container image for a board, built on the host (`enorm_image_tarball`).

Building the base image on an emulated board runs debootstrap's second stage under
TCG; on the host it runs natively (amd64) or under qemu-user (arm64), then the rootfs is
tarred and the playbook copies it to the board, where `enorm image import` makes it the
base: the operator's "build once, push to many boards" path. The lab measures both
(`make boards` uses this one, see BENCHMARKS.md).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.boards import disk
from enorm import images

CACHE = Path("/var/cache/enorm/boards")


def tarball(arch: str, progress: Callable[[str], None], cache: Path = CACHE) -> tuple[Path, float]:
    """The rootfs of the debian recipe for `arch` as a tarball (cached); seconds it took."""
    t0 = time.monotonic()
    disk.ensure_binfmt(arch)
    recipe = images.load_recipe("debian")
    rootfs = images._debootstrap(recipe, arch, progress)  # cached under /var/cache/enorm
    out = cache / f"image-debian-{arch}.tar"
    if out.exists() and out.stat().st_mtime >= rootfs.stat().st_mtime:
        return out, 0.0
    tmp = out.with_suffix(".tmp")
    subprocess.run(["nice", "-n", "10", "tar", "--numeric-owner", "-C", str(rootfs), "-cf",
                    str(tmp), "."], check=True)
    tmp.rename(out)
    return out, round(time.monotonic() - t0, 1)
