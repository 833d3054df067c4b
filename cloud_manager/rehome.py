"""Re-homing: users whose server a node ended for want of resources go to another node.

Where the node ended a server for a reason that says so (`TerminationReason.rehome`:
resources, eviction for a higher priority, pre-emption, the basic service's pressure, the
node's shutdown) and the cloud manager was made with `rehome=True`, the users, home
and their data merged, are offloaded again, to any node but that one, in a thread of
their own; if none admits them they stay on the cloud. `CloudManager.rehomed` keeps what
followed: the new deployment, or why there is none.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .orchestrator import CloudManager, Deployment

log = logging.getLogger(__name__)


def after(cm: CloudManager, dep: Deployment) -> bool:
    """`dep` has ended: offload its users again if its end says so; True if under way."""
    if not (cm.rehome and dep.end_reason is not None and dep.end_reason.rehome
            and not cm.closing.is_set()):
        return False
    threading.Thread(target=_offload_again, args=(cm, dep), daemon=True,
                     name=f"rehome-{dep.server_id}").start()
    return True


def _offload_again(cm: CloudManager, dep: Deployment) -> None:
    try:
        cm.rehomed[dep.server_id] = cm.offload(dep.users, exclude=[dep.edge.name])
    except Exception as exc:  # noqa: BLE001 (the users are served by the cloud)
        log.info("users of %s stay on the cloud: %s", dep.server_id, exc)
        cm.rehomed[dep.server_id] = exc
