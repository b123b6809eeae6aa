"""Two broker cores sharing one replicated log, for sans-IO cluster tests (`mesh.testing.sharedlog`).

The log is a list both brokers' proposals go into, in the order taken; each broker's
`SharedState` applies it, as the cluster member does once entries commit.
"""

from __future__ import annotations

from typing import Any

from ..broker import Broker, BrokerConfig, Outgoing
from ..cluster.shared import SharedState
from .frames import header_of, node_system, registration

__all__ = ["ONCE", "Cluster"]

# The declarations of a node offering one exactly-once action, `pay.charge`.
ONCE = {"pay": {"charge": {"description": "charge a card", "schema": {}, "exactly_once": True}}}


class Cluster:
    """Two broker cores and the log they share."""

    def __init__(self, **config: Any) -> None:
        self.log: list[bytes] = []
        self.registrations: list[tuple[bytes, dict[str, object]]] = []
        self.brokers = [Broker(BrokerConfig(name=f"b{i}", **config)) for i in (1, 2)]
        self.states = [SharedState(events=broker.events) for broker in self.brokers]
        for broker, state in zip(self.brokers, self.states, strict=True):
            broker.join_cluster(state, 0.0, run=1)
        self.commit(0.0)  # each broker's `run` entry: the tests start from a settled log

    def register(self, ident: bytes, instance: str, *, capacity: int = 2) -> None:
        """Register node `ident` (offering `ONCE`) with both brokers, as it registers with each."""
        payload = {**registration(ONCE, capacity=capacity, name=ident.decode()), "instance": instance}
        self.registrations.append((ident, payload))
        for broker in self.brokers:
            out = broker.node_message(ident, node_system("register", payload), 0.0)
            assert header_of(out[0][2][1:]).type.value == "response"

    def restart(self, index: int, *, run: int) -> Broker:
        """Broker `index` restarted: a new core and state that replay the whole log, with the
        node registered again (as it re-registers with a restarted broker)."""
        broker = Broker(BrokerConfig(name=f"b{index + 1}"))
        state = SharedState(events=broker.events)
        for i, entry in enumerate(self.log, 1):
            state.apply(i, entry)
        state.take_effects()  # what the restart re-applied concerns no command of this run
        broker.join_cluster(state, 0.0, run=run)
        self.brokers[index], self.states[index] = broker, state
        for ident, payload in self.registrations:
            broker.node_message(ident, node_system("register", payload), 0.0)
        return broker

    def commit(self, now: float = 1.0, *, drop: bool = False, paused: frozenset[int] = frozenset()) -> list[list[Outgoing]]:
        """Take every broker's proposals into the log (or lose them), apply, act; a broker
        in `paused` neither proposes nor applies nor acts (its answer is [])."""
        for i, broker in enumerate(self.brokers):
            if i in paused:
                continue
            taken = broker.take_proposals(now)
            if not drop:
                self.log.extend(taken)
        for i, state in enumerate(self.states):
            if i in paused:
                continue
            for index in range(state.applied + 1, len(self.log) + 1):
                state.apply(index, self.log[index - 1])
        return [[] if i in paused else broker.apply_shared(now) for i, broker in enumerate(self.brokers)]
