"""The node protocol as the broker sees it: registration, heartbeats, health, departure.

Rules of this module:

* Every message from a node proves it alive. `check_health` makes a node silent past
  1.5 heartbeat intervals suspect (`mesh.node.suspect`; `pick` then prefers other
  nodes) and reports one silent past its liveness window dead; a suspect node that
  speaks again is `mesh.node.recovered`. A node that goes from up to dead in one tick
  (the loop was held up) is announced down only, not suspect first.
* With security on, a node may register only the services the policy gives its CURVE
  identity (`Gate.admit_registration`).
* Lifecycle events name nodes and services, with numbers; never anything secret.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ...link.health import PeerEvent
from ...link.heartbeat import silence_event
from ...protocol import MeshError, decode_payload
from ...security.gate import Peer
from ..config import BrokerConfig
from ..registry import NodeInfo, Registry, parse_load
from .state import BrokerSecurity, ConnectionState, Emit

__all__ = ["Nodes"]


class Nodes:
    """Registers nodes, keeps their load and health, and announces their coming and going.

    Args:
        config: the broker's limits (told to a node when it registers).
        security: the gate that admits registrations, or None (security off).
        registry: the nodes and what they offer.
        node_links: the broker's node connections (what each node still owes).
        counters: the broker's counters.
        emit: publishes a `mesh.*` event.
    """

    def __init__(
        self, config: BrokerConfig, security: BrokerSecurity | None, registry: Registry,
        node_links: dict[bytes, ConnectionState], counters: Counter[str], emit: Emit,
    ) -> None:  # fmt: skip
        self.config = config
        self.security = security
        self.registry = registry
        self.node_links = node_links
        self.counters = counters
        self._emit = emit

    def register(self, ident: bytes, payload: bytes, now: float, peer: Peer) -> dict[str, Any]:
        """`mesh.register`: a node's services (a re-registration replaces them).

        Raises:
            MeshError: the registration is invalid, or the policy refuses a service.
        """
        owed = self.node_links[ident].pending_commands
        before = self.registry.nodes.get(ident)
        offered = set(before.services) if before is not None else set()
        registration = decode_payload(payload)
        if self.security is not None:
            services = registration.get("services") if isinstance(registration, dict) else None
            # Only names can be admitted; other keys are refused by the registry below.
            names = sorted(s for s in services if isinstance(s, str)) if isinstance(services, dict) else []
            self.security.gate.admit_registration(names, peer, now)
        node = self.registry.register(ident, registration, now, owed, peer.user)
        self.counters["registrations"] += 1
        if before is None:
            self._emit("mesh.node.up", node_view(node), now)
        self.services_changed(node, offered, set(node.services), now)
        return {
            "registered": sorted(node.services),
            "broker": self.config.name,
            "max_message_bytes": self.config.max_message_bytes,
        }

    def unregister(self, ident: bytes, now: float) -> dict[str, Any]:
        """`mesh.unregister`: the node leaves routing (what it runs still answers)."""
        self.forget(ident, "unregistered", now)
        if not self.node_links[ident].pending_commands:
            del self.node_links[ident]
        return {"unregistered": True}

    def heartbeat(self, ident: bytes, payload: bytes) -> dict[str, Any]:
        """`mesh.heartbeat`: keep the node's load report; tell it whether it is known."""
        node = self.registry.nodes.get(ident)
        if node is not None:
            self._take_load(node, payload)
        return {"known": node is not None}

    def _take_load(self, node: NodeInfo, payload: bytes) -> None:
        """Keep the valid part of a heartbeat's load report; count a bad one, never refuse it."""
        try:
            load, bad = parse_load(decode_payload(payload))
        except MeshError:
            load, bad = {}, ["payload"]
        if bad:
            self.counters["bad_load_reports"] += 1
        if load:
            node.report_load(load)

    def check_health(self, now: float) -> list[bytes]:
        """Mark nodes silent past 1.5 intervals suspect; return those past their liveness window."""
        dead: list[bytes] = []
        for node in self.registry.nodes.values():
            silence = node.silence(now)
            event = silence_event(silence, node.interval)
            if event is PeerEvent.SILENT:
                node.observe(event)
                dead.append(node.identity)
            elif event is PeerEvent.QUIET and not node.suspect:
                node.observe(event)
                self.counters["nodes_suspected"] += 1
                self._emit("mesh.node.suspect", {**health_view(node), "silent_s": round(silence, 3)}, now)
        return dead

    def heard(self, node: NodeInfo, now: float) -> None:
        """A message from `node`: it is alive (and up again, if it was suspect)."""
        if node.suspect:
            node.observe(PeerEvent.HEARD)
            self.counters["nodes_recovered"] += 1
            self._emit("mesh.node.recovered", {**health_view(node), "silent_s": round(now - node.last_seen, 3)}, now)
        node.last_seen = now

    def forget(self, ident: bytes, reason: str, now: float) -> None:
        """Take a node out of routing and tell subscribers."""
        node = self.registry.remove(ident)
        if node is not None:
            self.services_changed(node, set(node.services), set(), now)
            self._emit("mesh.node.down", {**node_view(node), "reason": reason}, now)

    def services_changed(self, node: NodeInfo, before: set[str], after: set[str], now: float) -> None:
        """Announce the services `node` stopped and started offering."""
        for topic, services in (("mesh.service.unregistered", before - after), ("mesh.service.registered", after - before)):
            for service in sorted(services):
                body = {"service": service, "node": node.name, "id": node.identity.hex(),
                        "nodes": self.registry.count(service)}  # fmt: skip
                self._emit(topic, body, now)


def node_view(node: NodeInfo) -> dict[str, Any]:
    """What lifecycle events say about a node: names and numbers, nothing secret."""
    return {"node": node.name, "id": node.identity.hex(), "capacity": node.capacity, "services": sorted(node.services)}


def health_view(node: NodeInfo) -> dict[str, Any]:
    """What health events say about a node: its name, id and heartbeat interval."""
    return {"node": node.name, "id": node.identity.hex(), "interval": node.interval}
