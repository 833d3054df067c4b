"""The daemon's process memory: glibc's allocator held on to what big requests freed.

Measured with 100,000-user setup requests (create+delete cycles): RSS grew 64 -> 320 MB
over 6 cycles, because each of waitress's threads got its own malloc arena and kept the
freed memory; with 2 arenas and a trim after big bodies it stays near 150 MB.

Small requests too (issue 28): each handshake and termination leaves ~20 objects in
reference cycles, freed only by the collector's full collections (then every few hundred
cycles); the heap and pymalloc's arenas grew to each new peak of that garbage plus the
requests in flight and kept it, so RSS climbed in steps of 1-4 MB (3,000 soak cycles:
80.7 -> 95.4 MB). With full collections while the garbage is small and a trim after
each: 80.4 -> 87.7 MB. The largest such garbage was python3-lxc's container handles,
~26 KB of C memory each (`containers.Container` has no cycle now); with them gone and
glibc tuned below, the saw-tooth went from 3.6 to 0.9 MB over a 1,000-cycle soak
(RELIABILITY.md, with what is still not explained).
"""

from __future__ import annotations

import ctypes
import gc
import os
from typing import Any

# glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 << 10  # glibc's starting value, kept


def bound_malloc_arenas(arenas: int = 1) -> None:
    """Keep the daemon's RSS flat: by default glibc gives each of waitress's 16 threads its
    own malloc arena and keeps what a big request freed in it, so a 7 MB setup request
    (100,000 users) grew RSS by ~30 MB per new thread (measured: 64 -> 320 MB over 6
    create+delete cycles; with 2 arenas it stays at ~165 MB). One arena (the GIL
    serialises the threads anyway) and a fixed mmap threshold: glibc raises it to the
    largest block freed so far (up to 32 MB), after which big bodies and buffers come
    from the heap and leave holes there; fixed, they are mapped and unmapped whole, and
    the trim threshold stays at its 128 KB. The two together took the small cycles'
    saw-tooth from 2.2 to 0.9 MB (1,000-cycle soaks side by side, RELIABILITY.md).
    glibc's own MALLOC_ARENA_MAX or GLIBC_TUNABLES, when set, win. Called before the
    daemon starts any thread: a thread takes its arena at its first malloc and keeps it,
    so called later (it was, once the node was open) it left three arenas: 1 MB more
    RSS with 8 servers, measured side by side on a real daemon."""
    if "MALLOC_ARENA_MAX" in os.environ or "GLIBC_TUNABLES" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, arenas)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: nothing to bound
        pass


def release_memory() -> None:
    """Hand what a big request freed back to the kernel (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def collect_small_and_often() -> None:
    """Full collections while the garbage is small, and its pages handed back after each
    (see above). `gc.freeze()` takes what the daemon built at start (modules, the app,
    ~77,000 objects) out of the collector's count: a full collection comes once the
    long-lived objects since have grown by a quarter, not once a quarter of the startup
    objects have piled up (~19,000 objects of garbage, the peaks the heap grew to), and
    each one walks only what came after the start."""
    gc.collect()
    gc.freeze()

    def trim(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            release_memory()

    gc.callbacks.append(trim)
