"""What the base image needs to come up, and whether the node's unit gives it that.

A unit smaller than what the image's own sshd and Redis take to start does not fail at
configuration time: every handshake fails later, as "sshd not up" after the launch
timeout, or the OOM killer takes the tenant's Redis. So the node measures the image once
(a probe container started by the same mechanism as a tenant's, with room to spare, read
when sshd and Redis accept), keeps the figure beside the image, and refuses to start with
a unit below it plus headroom. A rebuilt or updated image is measured again.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

NEEDS_FILE = "enorm-needs.json"
# Room above the measured start-up for the tenant's own first requests and for page cache
# the kernel would otherwise have to take back at once.
HEADROOM = 1.25


@dataclass(frozen=True)
class Needs:
    """The image's start-up, measured: memory that cannot be reclaimed (anonymous and
    kernel memory plus mapped files: the processes' own pages and their binaries) and
    the cgroup's peak including page cache; the seconds until sshd accepted."""

    memory_mb: float
    peak_mb: float
    start_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def path(lxc_path: Path | str, base: str) -> Path:
    return Path(lxc_path) / base / NEEDS_FILE


def load(lxc_path: Path | str, base: str) -> Needs | None:
    """The figure kept beside the image; None if not measured (or unreadable)."""
    try:
        d = json.loads(path(lxc_path, base).read_text())
        return Needs(float(d["memory_mb"]), float(d["peak_mb"]), float(d["start_s"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(lxc_path: Path | str, base: str, needs: Needs) -> None:
    """Atomically, so that two nodes measuring at once leave one whole file."""
    p = path(lxc_path, base)
    tmp = p.with_name(f".{p.name}.{os.getpid()}")
    tmp.write_text(json.dumps(needs.as_dict()) + "\n")
    tmp.replace(p)


def least_memory_mb(needs: Needs) -> int:
    """The least memory a server of the image may have: its start-up and the headroom."""
    return math.ceil(needs.memory_mb * HEADROOM)


def unit_problem(unit_memory_mb: int, needs: Needs, base: str) -> str | None:
    """Why this unit cannot hold the image, or None when it can (policy, pure)."""
    want = least_memory_mb(needs)
    if unit_memory_mb >= want:
        return None
    return (f"unit.memory_mb: {unit_memory_mb} MB is less than the base image {base} needs "
            f"to start its sshd and Redis ({needs.memory_mb:.0f} MB measured, "
            f"{want} MB with {HEADROOM - 1:.0%} headroom); raise the unit or slim the "
            f"image (delete {path('<lxc_path>', base)} to measure again)")


def from_cgroup(stat: dict[str, int], peak_bytes: int, start_s: float) -> Needs:
    """The needs from a settled container's memory statistics (v1 or v2 names)."""
    if "anon" in stat:  # v2
        held = stat.get("anon", 0) + stat.get("kernel", 0) + stat.get("file_mapped", 0)
    else:  # v1: the kernel's share comes from memory.kmem.usage_in_bytes, as "kernel"
        held = stat.get("rss", 0) + stat.get("kernel", 0) + stat.get("mapped_file", 0)
    return Needs(round(held / 2**20, 1), round(peak_bytes / 2**20, 1), round(start_s, 3))
