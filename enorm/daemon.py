"""Wiring of one edge node's daemon: store, Edge Manager, events, auto-scaler, HTTP API.

`Daemon.open` does everything but serving, so tests and the demo run a real node in
their own process and `enorm serve` runs the same thing under waitress.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from flask import Flask

from enorm import api, autoscaler, manager, memory, metrics, migration, scaling, store
from enorm.config import NodeConfig
from enorm.pressure import PressureWatcher

log = logging.getLogger(__name__)


def operator_token(cfg: NodeConfig) -> str:
    """The configured operator token, or the one made at first start (state_dir, 0600)."""
    if cfg.operator_token:
        return cfg.operator_token
    assert cfg.state_dir is not None
    path = Path(cfg.state_dir) / "operator.token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


@dataclass
class Daemon:
    config: NodeConfig
    manager: manager.EdgeManager
    app: Flask
    reconciled: dict = field(default_factory=dict)
    scheduler: autoscaler.Scheduler | None = None
    # Retries merges whose sink was unreachable (containers kept, migration_pending).
    retry: BackgroundScheduler | None = None
    pressure: PressureWatcher | None = None

    @classmethod
    def open(cls, cfg: NodeConfig, *, migrate: manager.Migrate | None = None,
             background: bool = True) -> Daemon:
        """Open the node; `background` schedules the auto-scaler and migration retries."""
        assert cfg.state_dir is not None
        manager.check_unit(cfg)
        client = store.open_store(cfg.store_url, Path(cfg.state_dir))
        node = manager.build(cfg, store.Store(client, cfg.name))
        mgr = manager.EdgeManager(node, migrate=migrate or migration.merge_back_to_sink)
        reconciled = mgr.start()
        node.events.start()
        node_metrics = metrics.NodeMetrics(mgr)
        sched = scaling.scheduler_for(mgr, on_round=node_metrics.on_round)
        retry = None
        if background:
            sched.start()
            retry = BackgroundScheduler(daemon=True)
            retry.add_job(mgr.retry_pending, "interval", seconds=cfg.migration_retry_s,
                          max_instances=1, coalesce=True, id="enorm-migration-retry")
            retry.start()
        watcher = None
        if background and cfg.pressure_interval_s > 0:
            watcher = PressureWatcher(mgr, cfg.pressure_interval_s, cfg.pressure_headroom_mb)
            watcher.start()
        app = api.create_app(mgr, tokens=cfg.tokens, operator_token=operator_token(cfg),
                             autoscale=lambda: scaling.round_report(sched.run_once()),
                             metrics=node_metrics)
        return cls(cfg, mgr, app, reconciled, sched, retry, watcher)

    def close(self) -> None:
        if self.pressure is not None:
            self.pressure.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.retry is not None:
            self.retry.shutdown(wait=True)
        self.manager.events.stop()

    def serve(self) -> None:
        from waitress import serve

        memory.bound_malloc_arenas()
        log.info("enorm %s listening on %s", self.config.name, self.config.url)
        serve(self.app, host=self.config.listen_host, port=self.config.listen_port,
              threads=16, ident="enorm", max_request_body_size=api.MAX_BODY_BYTES,
              max_request_header_size=64 << 10)
