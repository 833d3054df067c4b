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

from flask import Flask

from enorm import api, control_loop, manager, memory, metrics, migration, store
from enorm.config import NodeConfig

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
    # The rounds, the latency loop, the pressure watch and the merge retries.
    loop: control_loop.ControlLoop | None = None

    @classmethod
    def open(cls, cfg: NodeConfig, *, migrate: manager.Migrate | None = None,
             background: bool = True) -> Daemon:
        """Open the node; `background` starts the control loop's jobs."""
        assert cfg.state_dir is not None
        manager.check_unit(cfg)
        client = store.open_store(cfg.store_url, Path(cfg.state_dir))
        node = manager.build(cfg, store.Store(client, cfg.name))
        mgr = manager.EdgeManager(node, migrate=migrate or migration.merge_back_to_sink)
        reconciled = mgr.start()
        node.events.start()
        node_metrics = metrics.NodeMetrics(mgr)
        loop = control_loop.node_loop(mgr, on_round=node_metrics.on_round)
        if background:
            loop.start()
        app = api.create_app(mgr, tokens=cfg.tokens, operator_token=operator_token(cfg),
                             autoscale=lambda: control_loop.round_report(loop.run_once()),
                             metrics=node_metrics)
        return cls(cfg, mgr, app, reconciled, loop)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.shutdown()
        self.manager.events.stop()

    def serve(self) -> None:
        from waitress import serve

        memory.bound_malloc_arenas()
        log.info("enorm %s listening on %s", self.config.name, self.config.url)
        serve(self.app, host=self.config.listen_host, port=self.config.listen_port,
              threads=16, ident="enorm", max_request_body_size=api.MAX_BODY_BYTES,
              max_request_header_size=64 << 10)
