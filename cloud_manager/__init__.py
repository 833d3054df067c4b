"""The cloud manager: the library a cloud application server embeds to offload users to
enorm edge nodes (handshake, deployment over SSH, data migration, redirection, failover)
and to bring them home when the server is terminated."""

from .app import App, EdgeContext, sink_for
from .deployer import Deployer, DeployError
from .edge_client import EdgeClient, EdgeError, Rejected
from .handover import HandoverFailed
from .orchestrator import CloudManager, Deployment, NoEdgeAvailable

__all__ = [
    "App",
    "CloudManager",
    "DeployError",
    "Deployer",
    "Deployment",
    "EdgeClient",
    "EdgeContext",
    "EdgeError",
    "HandoverFailed",
    "NoEdgeAvailable",
    "Rejected",
    "sink_for",
]
