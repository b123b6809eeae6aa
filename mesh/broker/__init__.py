"""The broker: a sans-IO routing core (`Broker`); the socket loop that runs it is `mesh.broker.loop`.

Importing this package loads no ZeroMQ: `BrokerServer`, `ClusterSettings` and `Endpoints`
are imported from `mesh.broker.loop`, the one module of the broker that owns sockets.
"""

from .config import BrokerConfig
from .core import Broker, Command, ConnectionState, Outgoing, Side
from .registry import ActionSpec, NodeInfo, Registry

__all__ = [
    "ActionSpec",
    "Broker",
    "BrokerConfig",
    "Command",
    "ConnectionState",
    "NodeInfo",
    "Outgoing",
    "Registry",
    "Side",
]
