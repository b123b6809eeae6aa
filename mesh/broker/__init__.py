"""The broker: a sans-IO routing core (`Broker`) and the socket loop that runs it."""

from .core import Broker, BrokerConfig, Command, ConnectionState, Outgoing, Side
from .loop import BrokerServer, ClusterSettings, Endpoints
from .registry import ActionSpec, NodeInfo, Registry

__all__ = [
    "ActionSpec",
    "Broker",
    "BrokerConfig",
    "BrokerServer",
    "ClusterSettings",
    "Command",
    "ConnectionState",
    "Endpoints",
    "NodeInfo",
    "Outgoing",
    "Registry",
    "Side",
]
