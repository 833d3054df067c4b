"""Crash points: the crash-safety tests make the daemon die, or fail, at a named step.

`crash_point(name)` exits the process at once, with no clean-up (no `finally`, no atexit,
children left running), as a kill -9 there would, when the environment variable
ENORM_FAULT names that step. When ENORM_FAIL names it (`<step>` or `<step>*<n>`), the
step raises `InjectedFailure` instead, the first n times (default 1), as a failing
kernel or tool call would there. The steps are named `<operation>.<what is done>`, e.g.
`terminate.merged` or `destroy.deleted`; `tests/integration/test_leftovers.py` lists
them. Unset, a crash point costs two dict lookups.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)
EXIT_CODE = 70

_failed: dict[str, int] = {}  # step -> failures injected so far
_lock = threading.Lock()


class InjectedFailure(OSError):
    """A failure ENORM_FAIL asked for."""


def crash_point(point: str) -> None:
    if os.environ.get("ENORM_FAULT") == point:
        log.error("ENORM_FAULT=%s: exiting as a crash would", point)
        os._exit(EXIT_CODE)
    if (fail := os.environ.get("ENORM_FAIL")) is not None:
        step, _, times = fail.partition("*")
        if step == point:
            with _lock:
                n = _failed.get(point, 0)
                if n >= int(times or 1):
                    return
                _failed[point] = n + 1
            log.error("ENORM_FAIL=%s: failing (%d of %s)", fail, n + 1, times or 1)
            raise InjectedFailure(f"injected failure at {point}")
