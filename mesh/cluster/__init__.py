"""The replicated log of the broker cluster: consensus core (sans-IO), storage (SQLite).

`raft` is the Raft state machine (no I/O), `records` the data it shares with its caller
(roles, settings, `Ready`), `messages` its wire records and codec,
`storage` the durable SQLite state, `sim` a deterministic fault simulator that checks
the core's safety. `transport` holds the ZeroMQ peer links between brokers and
`member` the `ClusterMember` a broker's loop drives (import them from their modules:
they bring in zmq, the core does not).
"""

from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all
from .raft import *  # noqa: F403
from .raft import __all__ as _raft_all

__all__ = [*_messages_all, *_raft_all]
