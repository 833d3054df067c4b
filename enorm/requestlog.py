"""The edge server's request log: computing latency and the time of the last request.

The app in the container appends `<unix ts> <path> <duration_ms>` per request to
`REQUEST_LOG` in its own filesystem. The container's writable layer is the tenant's:
the reader trusts nothing below it (no link followed, regular files only, a bounded
read per call), and reads only what was appended since the last call.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Where the app writes its log, relative to the container's root.
REQUEST_LOG = "var/log/enorm-app/requests.log"



@dataclass(frozen=True)
class Request:
    at: float
    path: str
    duration_ms: float


def parse_line(line: str) -> Request | None:
    """`<unix ts> <path> <duration_ms>`; None for a malformed line. Paths may hold spaces."""
    parts = line.split()
    if len(parts) < 3:
        return None
    try:
        at, dur = float(parts[0]), float(parts[-1])
    except ValueError:
        return None
    if not (math.isfinite(at) and math.isfinite(dur)) or dur < 0:
        return None
    return Request(at, " ".join(parts[1:-1]), dur)


def parse_lines(lines: Iterable[str]) -> tuple[list[Request], int]:
    """Parsed requests and the number of malformed (skipped) lines."""
    out: list[Request] = []
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        r = parse_line(line)
        if r is None:
            bad += 1
        else:
            out.append(r)
    return out, bad


MAX_LOG_READ = 8 << 20  # per server and round: a tenant's huge log costs us no more


class _NotRegular(Exception):
    """The request log is not a regular file (a FIFO would block the round, a device or
    /dev/zero would never end)."""


def _open_beneath(root: Path, path: str):
    """Open `path`, which lies under `root`, following no symbolic link below `root`
    (a tenant's link to a host file is refused), without blocking, regular files only."""
    parts = Path(path).relative_to(root).parts
    flags = os.O_RDONLY | os.O_CLOEXEC
    fd = os.open(root, flags | os.O_DIRECTORY)
    try:
        for p in parts[:-1]:
            nxt = os.open(p, flags | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(leaf).st_mode):
        os.close(leaf)
        raise _NotRegular(path)
    return os.fdopen(leaf, "rb")


@dataclass
class _LogPos:
    dev: int
    ino: int
    offset: int


class LogReader:
    """Reads each request log incrementally: only what was appended since the last call.

    Keeps (device, inode, offset) per path. A new inode (rotated: the old file renamed, a
    new one created) or a file shorter than the offset (truncated, `> log`) restarts at
    the beginning. A last line without its newline is left for the next call. Lines
    written to a rotated file after our last read are not seen (the price of not holding
    files open).
    """

    def __init__(self, max_read: int = MAX_LOG_READ) -> None:
        self._pos: dict[str, _LogPos] = {}
        self.malformed = 0
        self.refused = 0  # logs that were a link, a FIFO, a device...: not read
        self.max_read = max_read

    def read_new(self, path: str | os.PathLike[str],
                 beneath: str | os.PathLike[str] | None = None) -> list[Request]:
        """What was appended since the last call. With `beneath` (the container's
        writable layer), the tenant owns every component of the path below it: no link
        is followed, and only a regular file is read, at most `max_read` bytes a call."""
        key = str(path)
        try:
            f = open(key, "rb") if beneath is None else _open_beneath(Path(beneath), key)
        except FileNotFoundError:
            self._pos.pop(key, None)
            return []
        except (_NotRegular, OSError):
            self._pos.pop(key, None)
            self.refused += 1
            return []
        with f:
            st = os.fstat(f.fileno())
            pos = self._pos.get(key)
            if (
                pos is None
                or (pos.dev, pos.ino) != (st.st_dev, st.st_ino)
                or st.st_size < pos.offset
            ):
                pos = _LogPos(st.st_dev, st.st_ino, 0)
            f.seek(pos.offset)
            data = f.read(self.max_read)
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) >= self.max_read:  # one line longer than we read: skip it
                pos.offset += len(data)
                self.malformed += 1
            self._pos[key] = pos
            return []
        pos.offset += end + 1
        self._pos[key] = pos
        reqs, bad = parse_lines(data[: end + 1].decode("utf-8", "replace").splitlines())
        self.malformed += bad
        return reqs

    def forget(self, path: str | os.PathLike[str]) -> None:
        self._pos.pop(str(path), None)
