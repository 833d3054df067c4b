"""Crash points: the crash-safety tests make the daemon die at a named step.

`crash_point(name)` exits the process at once, with no clean-up (no `finally`, no atexit,
children left running), as a kill -9 there would, when the environment variable
ENORM_FAULT names that step. The steps are named `<operation>.<what is done>`, e.g.
`terminate.merged` or `destroy.deleted`; `tests/integration/test_leftovers.py` lists
them. Unset, a crash point costs one dict lookup.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
EXIT_CODE = 70


def crash_point(point: str) -> None:
    if os.environ.get("ENORM_FAULT") == point:
        log.error("ENORM_FAULT=%s: exiting as a crash would", point)
        os._exit(EXIT_CODE)
