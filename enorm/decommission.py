"""Decommissioning (`enorm down`): nothing of the node is left on the board.

Whatever a crash left (the daemon killed at any step of a launch or a termination, its
store's Redis killed too), in order:

    open the node unsized (no unit check, no measuring: a node going down starts
    nothing) and reconcile it (launches undone, terminations finished, anything left of
    its containers in any state removed) -> terminate every server, its data merged
    back -> with `force`, discard the servers whose sink is gone, their keys saved to
    files -> remove what is left of its containers once more -> its chains and bridge
    guards -> wipe its store -> stop the store's Redis -> remove its bridge

The store's Redis is stopped whatever failed before (its data is in its AOF: a later
`serve` or `down` starts it again). A server whose data could not be merged back stops
the rest: the node stays in place (that container stopped and kept, chains, records,
bridge) for `down --force`. The subnet's unreachable route stays (network.remove_bridge).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from enorm import network, reconcile, store
from enorm.config import NodeConfig
from enorm.daemon import Daemon


class Refused(RuntimeError):
    """The node was not taken down entirely; the message says what is left and why."""


@dataclass
class Report:
    terminated: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    # Servers discarded with --force: id -> the file holding their keys.
    saved: dict[str, Path] = field(default_factory=dict)
    # What reconciliation and the sweeps removed that no record owned.
    leftovers: list[str] = field(default_factory=list)


def down(cfg: NodeConfig, *, force: bool = False, keep_bridge: bool = False,
         progress: Callable[[str], None] = lambda _: None) -> Report:  # fmt: skip
    """Take the node down (the steps above); Refused if something stays."""
    assert cfg.state_dir is not None
    report = Report()
    try:
        d = Daemon.open(cfg, background=False, sized=False)
        try:
            _down(d, force, report, progress)
        finally:
            d.close()
    finally:
        if cfg.store_url is None:
            store.stop_managed(Path(cfg.state_dir))
    if not keep_bridge:
        network.remove_bridge(cfg.bridge)
    return report


def _down(d: Daemon, force: bool, report: Report, progress: Callable[[str], None]) -> None:
    node, ends = d.node, d.manager.ends
    report.leftovers += d.reconciled.get("orphans", [])
    n = len(node.store.servers())
    if n:
        progress(f"terminating {n} servers (data merged back first) ...")
    r = ends.shutdown()
    report.terminated, report.pending = r.terminated, r.pending
    for sid in r.retrying:  # a removal that failed: once more now, not in the background
        if ends.retry_destroy(sid):
            report.terminated.append(sid)
    if r.pending and force:
        assert d.config.state_dir is not None
        report.saved = ends.discard_pending(Path(d.config.state_dir) / "discarded")
    elif r.pending:
        raise Refused("some servers kept their data (sink unreachable); node left in place "
                      "(`enorm down --force` saves their keys to files and discards them)")
    errors: dict[str, str] = {}
    owned = {s.container for s in node.store.servers()}
    report.leftovers += reconcile.sweep(node, owned, errors)
    node.firewall.teardown()
    left = node.store.servers()
    if left or errors:
        raise Refused("not removed: " + "; ".join(
            [f"server {s.id} ({s.state})" for s in left]
            + [f"{name}: {why}" for name, why in errors.items()]))
    node.store.wipe()
