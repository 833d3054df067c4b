"""The cloud manager: the library a cloud application server embeds to offload users to
enorm edge nodes (handshake, deployment over SSH, data migration, redirection, failover)
and to bring them home when the server is terminated.

An app needs only what is exported here (docs/apps.md, "Writing an app for enorm"): its
declaration (`App`, `EdgeContext`, `KeySchema`, `files_of` and `APP_DIR` for its files),
the manager (`CloudManager`, `Deployment`) and the errors it may raise."""

from enorm.datasync import KeySchema, SyncError
from enorm.protocol import MergeReport, User

from .app import App, EdgeContext, sink_for
from .deployer import APP_DIR, Deployer, DeployError, files_of
from .edge_client import (
    DestinationNotAllowed,
    EdgeClient,
    EdgeError,
    Forbidden,
    Rejected,
    RequestRefused,
    Unauthorized,
)
from .handover import HandoverFailed
from .ledger import CloudUnreachable
from .orchestrator import CloudManager, Deployment, NoEdgeAvailable

__all__ = [
    "APP_DIR",
    "App",
    "CloudManager",
    "CloudUnreachable",
    "DeployError",
    "Deployer",
    "Deployment",
    "DestinationNotAllowed",
    "EdgeClient",
    "EdgeContext",
    "EdgeError",
    "Forbidden",
    "HandoverFailed",
    "KeySchema",
    "MergeReport",
    "NoEdgeAvailable",
    "Rejected",
    "RequestRefused",
    "SyncError",
    "Unauthorized",
    "User",
    "files_of",
    "sink_for",
]
