"""What the cloud learns of its edge servers, and what it does about it.

- The node's events on the callback (`POST <path>`, `blueprint`): each body is parsed into
  a `protocol.Event` where it enters (400 naming the field otherwise; the node retries
  only a 5xx's event). `server.terminated`: the edge merged the data already; the users
  go home and their data is confirmed on the cloud, and where the node ended the server
  for want of resources they may be offloaded again (`rehome`).
  `server.migration_failed`: the users go home now, the merge comes later.
- A user's client that found its server dead (`POST <path>/dead`): that deployment is
  checked at once.
- `reconcile`: every live deployment against its node; a server the node no longer has,
  with no event received (lost, or the callback was down for longer than the node kept
  trying), is ended here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flask import Blueprint, jsonify, request
from pydantic import ValidationError

from enorm.protocol import Event, MergeReport, TerminationReason

from . import rehome
from .edge_client import EdgeError

if TYPE_CHECKING:
    from .orchestrator import CloudManager

log = logging.getLogger(__name__)


def handle(cm: CloudManager, event: Event) -> str:
    """An event the edge node posted; returns what was done (for logs and tests)."""
    with cm.lock:
        dep = cm.deployments.get(event.server_id)
        if dep is None:
            return "unknown server"
        if event.type == "server.terminated":
            if dep.ended.is_set():
                return "already ended"
            cm.app.restore(dep.user_ids)  # the node's rules went with the server
            cm.close_session(dep)
            dep.merge = MergeReport.model_validate(
                {k: v for k, v in event.data.items() if k in MergeReport.model_fields})
            keys = dep.merge.keys_migrated
            if dep.state == "handing_over":  # ended for its handover through the cloud
                cm.finish(dep, "handed_over", TerminationReason.HANDOVER, keys)
                return "handed over"
            cm.finish(dep, "terminated", event.reason, keys)
            if rehome.after(cm, dep):
                return "users restored, offloading them to another node"
            return "users restored"
        if event.type == "server.migration_failed":
            if dep.ended.is_set():
                return "already ended"  # a retry succeeded before this event came
            # The edge keeps the data (container stopped) and retries the merge; the
            # users go home now, and the edge's values replace the cloud's later.
            cm.app.restore(dep.user_ids)
            cm.close_session(dep)
            dep.state = "migration_pending"
            dep.end_reason = event.reason
            return "users restored, merge pending"
        return "noted"


def reconcile(cm: CloudManager) -> dict[str, str]:
    """Check every live deployment against its edge node. A server the node no longer
    has, with no event received, is ended here: users home, their data confirmed on the
    cloud. An unreachable node is left alone (its servers may well be serving). Returns
    what was done per server id."""
    done: dict[str, str] = {}
    with cm.lock:
        live = [d for d in cm.deployments.values()
                if not d.ended.is_set() and d.state == "deployed"]
    for dep in live:
        try:
            info = dep.edge.server(dep.server_id)
        except EdgeError as exc:
            done[dep.server_id] = f"node unreachable: {exc}"
            continue
        if info is not None:
            continue
        with cm.lock:
            if dep.ended.is_set():
                continue
            log.warning("server %s is gone from %s without an event: users home",
                        dep.server_id, dep.edge.name)
            cm.app.restore(dep.user_ids)
            cm.close_session(dep)
            cm.finish(dep, "terminated", TerminationReason.GONE_WITHOUT_EVENT, 0)
        done[dep.server_id] = ("users restored, data confirmed" if dep.confirmed
                               else "users restored, data NOT on the cloud")
    return done


def user_reports_dead(cm: CloudManager, user: str) -> str:
    """A user's client found its edge server dead: check that deployment now rather than
    at the next interval. Returns what was done."""
    with cm.lock:
        dep = next((d for d in cm.deployments.values()
                    if user in d.user_ids and not d.ended.is_set()), None)
    if dep is None:
        return "not offloaded"
    return reconcile(cm).get(dep.server_id, "server alive")


def blueprint(cm: CloudManager, path: str = "/edge-events",
              name: str = "enorm_cloud_manager") -> Blueprint:
    """`POST <path>`: the callback URL edge nodes send events to (2xx = acknowledged);
    `POST <path>/dead`: a game client could not reach its edge server. `name`: the
    blueprint's, unique in one Flask app (two managers, two names)."""
    bp = Blueprint(name, __name__)

    @bp.post(path)
    def _edge_event():
        try:
            event = Event.model_validate_json(request.get_data(cache=False))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"] if str(p).isidentifier())
            return jsonify({"error": "bad_request", "field": field or "body",
                            "detail": f"not an enorm event: {err['msg']}"}), 400
        try:
            done = handle(cm, event)
        except Exception as exc:  # the edge retries until acknowledged
            log.exception("event %s", event.id)
            return jsonify({"error": str(exc)}), 500
        return jsonify({"ok": True, "done": done})

    @bp.post(f"{path}/dead")
    def _user_reports_dead():
        body = request.get_json(silent=True)
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(user, str) or not user:
            return jsonify({"error": "bad_request", "field": "user",
                            "detail": "must be a user id"}), 400
        return jsonify({"ok": True, "done": user_reports_dead(cm, user)})

    return bp
