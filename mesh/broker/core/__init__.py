"""The broker's routing core, sans-IO, split by concern.

* `broker`: `Broker`, which reads each message and hands it to the part that decides;
* `commands`: the accepted commands (tracking, queues, dispatch, deadlines, node loss);
* `nodes`: the node protocol (registration, heartbeats, health, departure);
* `system`: the `mesh.*` actions;
* `replicated`: a cluster's shared state (exactly-once, events, policy, revocations);
* `state`: the records and reply helpers they share.

Nothing here imports zmq or asyncio, or reads a clock: `mesh.broker.loop` drives it.
"""

from .broker import Broker
from .state import BrokerSecurity, Command, ConnectionState, Outgoing, Side

__all__ = ["Broker", "BrokerSecurity", "Command", "ConnectionState", "Outgoing", "Side"]
