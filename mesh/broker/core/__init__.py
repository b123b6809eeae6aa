"""The broker's routing core, sans-IO: `Broker` and the records it keeps.

Nothing here imports zmq or asyncio, or reads a clock: `mesh.broker.loop` drives it.
"""

from .broker import Broker, BrokerSecurity, Command, ConnectionState, Outgoing, Side

__all__ = ["Broker", "BrokerSecurity", "Command", "ConnectionState", "Outgoing", "Side"]
