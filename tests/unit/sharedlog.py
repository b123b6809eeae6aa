"""Two broker cores sharing one replicated log, for the sans-IO cluster tests.

The log is a list both brokers' proposals go into, in the order taken; each broker's
`SharedState` applies it, as the cluster member does once entries commit.
"""

from __future__ import annotations

from frames import header_of, node_system, registration

from mesh.broker import Broker, BrokerConfig
from mesh.broker.core import Outgoing
from mesh.cluster.shared import SharedState

ONCE = {"pay": {"charge": {"description": "charge a card", "schema": {}, "exactly_once": True}}}


class Cluster:
    """Two broker cores and the log they share."""

    def __init__(self, **config: int) -> None:
        self.log: list[bytes] = []
        self.brokers = [Broker(BrokerConfig(name=f"b{i}", **config)) for i in (1, 2)]
        self.states = [SharedState(events=broker.events) for broker in self.brokers]
        for broker, state in zip(self.brokers, self.states):
            broker.join_cluster(state)

    def register(self, ident: bytes, instance: str, *, capacity: int = 2) -> None:
        payload = {**registration(ONCE, capacity=capacity, name=ident.decode()), "instance": instance}
        for broker in self.brokers:
            out = broker.node_message(ident, node_system("register", payload), 0.0)
            assert header_of(out[0][2][1:]).type.value == "response"

    def commit(self, now: float = 1.0, *, drop: bool = False) -> list[list[Outgoing]]:
        """Take every broker's proposals into the log (or lose them), apply, act."""
        for broker in self.brokers:
            taken = broker.take_proposals(now)
            if not drop:
                self.log.extend(taken)
        for state in self.states:
            for index in range(state.applied + 1, len(self.log) + 1):
                state.apply(index, self.log[index - 1])
        return [broker.apply_shared(now) for broker in self.brokers]
