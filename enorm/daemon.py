"""Wiring of one edge node's daemon: store, the node's parts, the Edge Manager and its jobs
(termination, handover), events, the control loop, HTTP API.

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

from enorm import (
    api,
    control_loop,
    handover,
    manager,
    memory,
    metrics,
    migration,
    reconcile,
    store,
    termination,
)
from enorm.config import NodeConfig
from enorm.node import Node, build, check_unit

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
    def open(cls, cfg: NodeConfig, *, migrate: termination.Migrate | None = None,
             background: bool = True, sized: bool = True) -> Daemon:
        """Open the node; `background` starts the control loop's jobs; `sized` refuses a
        unit the base image cannot start in (`enorm down`, which starts nothing, opens
        the node unsized)."""
        assert cfg.state_dir is not None
        if sized:
            check_unit(cfg)
        client = store.open_store(cfg.store_url, Path(cfg.state_dir))
        node = build(cfg, store.Store(client, cfg.name))
        ends = termination.Terminator(node, migrate or migration.merge_back_to_sink)
        mgr = manager.EdgeManager(node, ends)
        reconciled = reconcile.start(node, ends, sized)
        node.events.start()
        node_metrics = metrics.NodeMetrics(node)
        loop = control_loop.node_loop(mgr, on_round=node_metrics.on_round)
        if background:
            loop.start()
        app = api.create_app(mgr, handover.Handovers(node, ends), tokens=cfg.tokens,
                             operator_token=operator_token(cfg),
                             autoscale=lambda: control_loop.round_report(loop.run_once()),
                             metrics=node_metrics)
        return cls(cfg, mgr, app, reconciled, loop)

    @property
    def node(self) -> Node:
        return self.manager.node

    def close(self) -> None:
        if self.loop is not None:
            self.loop.shutdown()
        self.node.releases.close()
        self.node.releases.drain()
        self.node.containers.layers.stop()
        self.node.events.stop()

    def serve(self) -> None:
        """Serve under waitress (after `memory.bound_malloc_arenas`, called before
        `open` starts any thread: see there)."""
        from waitress import serve

        memory.collect_small_and_often()
        log.info("enorm %s listening on %s", self.config.name, self.config.url)
        serve(self.app, host=self.config.listen_host, port=self.config.listen_port,
              threads=16, ident="enorm", max_request_body_size=api.MAX_BODY_BYTES,
              max_request_header_size=64 << 10)
