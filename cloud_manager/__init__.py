"""The cloud manager: the library a cloud application server embeds to offload users to
enorm edge nodes (handshake, deployment over SSH, data migration, redirection, failover)
and to bring them home when the server is terminated."""

from .deployer import Deployer, DeployError
from .edge_client import EdgeClient, EdgeError, Rejected
from .orchestrator import App, CloudManager, Deployment, NoEdgeAvailable, pokemon_app

__all__ = [
    "App",
    "CloudManager",
    "DeployError",
    "Deployer",
    "Deployment",
    "EdgeClient",
    "EdgeError",
    "NoEdgeAvailable",
    "Rejected",
    "pokemon_app",
]
