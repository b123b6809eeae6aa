"""Which node offers which service action, and how loaded each node is.

Rules of this module:

* A node registers all of its services at once; registering again replaces them.
* `pick()` returns a node that offers the action and has room, so a node's capacity is
  never exceeded. It prefers, in order: a node that is not suspect, the least load
  (in-flight / capacity), then the node whose turn it is in a rotation where reported
  handler latency costs turns, never the work itself: a node reporting L ms waits
  2^floor(log2(1 + L)) - 1 extra picks (none under 1 ms, 1 under 3 ms, 3 under 7 ms,
  ...). Nodes that differ by noise so share work evenly, a genuinely slow node gets a
  smaller share, and none is starved (a strict latency tie-break starved the nodes
  whose report happened to be worse, and froze their reports: only commands a node
  runs update them). Load still comes first: a slow node holds its commands longer.
* A node's health (`PeerState`) changes only through `mesh.link.health`'s table:
  silence past `SUSPECT_MISSES` heartbeat intervals makes it suspect, past
  `LIVENESS_MISSES` dead, and any message makes it up again (`silence_event`). Nodes
  use the same thresholds for their broker.
* Load reports (`parse_load`) keep the fields that are valid and name the others; a
  bad report never fails the heartbeat that carried it.
* A registration is checked whole before anything changes (`parse_registration`):
  every key and value by type, each schema (payload and result) by `check_schema`, and
  its size against `MAX_REGISTRATION_BYTES` / `MAX_SCHEMA_BYTES` / `MAX_ACTIONS`. A refused one leaves
  the node's previous registration in place.
* `mesh.services` is read in pages (`page`) in (service, action) order, each within a
  byte budget the caller gives, so that what any number of nodes register always
  reaches a client in answers it can receive. A page holds at least one action, and
  one action always fits a budget of half a message (see the limits above).
* A broker that was itself paused heard nothing meanwhile (`liveness.PauseWatch`: a
  gap over `SELF_PAUSE_S` between two `turn` calls, which the broker makes once per
  tick): every node's silence then counts from the resume (`NodeInfo.silence`), so each
  gets its whole liveness window to speak before it is declared dead. A node that
  stays silent is declared dead that window later.
* The registry holds no sockets and reads no clock.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from ..link.health import TRANSITIONS, PeerEvent, PeerState
from ..link.heartbeat import DEFAULT_HEARTBEAT_S, LIVENESS_MISSES
from ..liveness import PauseWatch
from ..protocol import (
    MAX_ACTIONS,
    MAX_REGISTRATION_BYTES,
    AccessDeniedError,
    MessageTooLargeError,
    ValidationFailedError,
    check_name,
    check_schema,
    encode_payload,
    shown_key,
    transition,
)
from ..protocol.registration import MAX_DESCRIPTION, check_hints

__all__ = [
    "ActionSpec",
    "NodeInfo",
    "Registry",
    "parse_registration",
    "parse_load",
    "parse_page_request",
    "MAX_CAPACITY",
    "MAX_PAGE_ACTIONS",
]

MAX_CAPACITY: Final = 10_000
# Actions in one `mesh.services` page, at most and by default (the byte budget may cut sooner).
MAX_PAGE_ACTIONS: Final = 1000
# MessagePack bytes a page spends around an action's entry and around a service's
# (keys, map headers, the node count): upper bounds, so a page never passes its budget.
_ACTION_OVERHEAD: Final = 8
_SERVICE_OVERHEAD: Final = 48
MAX_QUEUED: Final = 1_000_000
MAX_LATENCY_MS: Final = 86_400_000.0  # a day: anything longer is a broken clock
# A reported handler latency past this many doublings of (1 ms + latency) costs no more turns.
MAX_LATENCY_DOUBLINGS: Final = 20


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """What a node says about one action: shown to callers by `mesh.services`."""

    description: str
    schema: Mapping[str, Any]
    idempotent: bool = False
    # Outcomes committed to the cluster's replicated log before the reply (cluster only).
    exactly_once: bool = False
    # What the action does to the world (`HINTS`): name -> bool, only those the node declared.
    hints: Mapping[str, bool] = field(default_factory=dict)
    # The JSON Schema of the action's result (None: not declared).
    result_schema: Mapping[str, Any] | None = None
    size: int = 0  # bytes of `described()` encoded, what it costs a `mesh.services` page

    def described(self) -> dict[str, Any]:
        """The action's entry in `mesh.services` (hints and result schema only when declared)."""
        out = {
            "description": self.description,
            "schema": dict(self.schema),
            "idempotent": self.idempotent,
            "exactly_once": self.exactly_once,
            **self.hints,
        }
        if self.result_schema is not None:
            out["result_schema"] = dict(self.result_schema)
        return out


@dataclass(slots=True)
class NodeInfo:
    """A registered node: what it offers, its capacity and what it still owes."""

    identity: bytes
    name: str
    capacity: int
    services: dict[str, dict[str, ActionSpec]]
    registered_at: float
    last_seen: float
    liveness: float  # seconds of silence after which the node counts as dead
    interval: float = DEFAULT_HEARTBEAT_S
    # Replies the node still owes, shared with the broker's view of its link, so that
    # capacity counts what the node is really running, across re-registrations too.
    owed: set[Any] = field(default_factory=set)
    completed: int = 0
    order: int = 0
    state: PeerState = PeerState.UP
    suspect: bool = False  # state is SUSPECT, kept as a flag for pick()'s hot loop
    # The node's own last load report (`parse_load`); None until it sends one.
    reported: dict[str, float] | None = None
    latency_turns: int = 0  # extra picks reported latency_ms costs in pick()'s rotation; 0 until reported
    # The node process's own id (the same on every broker of a cluster), or None.
    instance: str | None = None
    # The key the node's link authenticated with (None without security).
    owner: str | None = None
    # When the broker last resumed from its own pause; silence counts from here at most.
    excused_at: float = -math.inf

    @property
    def in_flight(self) -> int:
        return len(self.owed)

    @property
    def load(self) -> float:
        return len(self.owed) / self.capacity


    def silence(self, now: float) -> float:
        """Seconds this node has been silent while the broker was listening (see the rules)."""
        return now - max(self.last_seen, self.excused_at)

    def observe(self, event: PeerEvent) -> PeerState:
        """Apply a health event; returns the state before it."""
        before = self.state
        self.state = transition(TRANSITIONS, before, event, subject=f"node {self.name}")
        self.suspect = self.state is PeerState.SUSPECT
        return before

    def report_load(self, load: dict[str, float]) -> None:
        """Keep the valid fields of a load report (see `parse_load`)."""
        self.reported = {**(self.reported or {}), **load}
        latency = load.get("latency_ms")
        if latency is not None:
            self.latency_turns = 2 ** min(int(math.log2(1.0 + latency)), MAX_LATENCY_DOUBLINGS) - 1


@dataclass(slots=True)
class _Registration:
    name: str
    capacity: int
    heartbeat_interval: float
    instance: str | None = None
    services: dict[str, dict[str, ActionSpec]] = field(default_factory=dict)


def _field_error(field_name: str, problem: str) -> ValidationFailedError:
    return ValidationFailedError(f"{field_name}: {problem}", details={"field": field_name})


def parse_registration(payload: Any) -> _Registration:
    """Validate a node's `mesh.register` payload.

    Raises:
        ValidationFailedError: naming the first field that is wrong.
        MessageTooLargeError: the payload, one schema, or the number of actions is over
            its limit (`details.limit`, and `details.field` naming what).
    """
    if not isinstance(payload, dict):
        raise _field_error("payload", "must be a map")
    size = len(encode_payload(payload))
    if size > MAX_REGISTRATION_BYTES:
        raise MessageTooLargeError(
            f"the registration is {size} bytes encoded, limit {MAX_REGISTRATION_BYTES}",
            details={"field": "payload", "limit": MAX_REGISTRATION_BYTES, "size": size},
        )
    name = payload.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise _field_error("name", "must be a string of 1 to 128 characters")
    capacity = payload.get("capacity")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 0 < capacity <= MAX_CAPACITY:
        raise _field_error("capacity", f"must be an integer from 1 to {MAX_CAPACITY}")
    services = payload.get("services")
    if not isinstance(services, dict) or not services:
        raise _field_error("services", "must be a non-empty map of service name to actions")
    interval = payload.get("heartbeat_interval", DEFAULT_HEARTBEAT_S)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.05 <= interval <= 60:
        raise _field_error("heartbeat_interval", "must be a number of seconds from 0.05 to 60")
    instance = payload.get("instance")
    if instance is not None and (not isinstance(instance, str) or not 0 < len(instance) <= 64):
        raise _field_error("instance", "must be a string of 1 to 64 characters")
    reg = _Registration(name, capacity, float(interval), instance)
    declared = 0
    for svc, spec in services.items():
        check_name(svc, f"services.{shown_key(svc)}")
        if svc == "mesh":
            raise _field_error("services.mesh", "the name is reserved for the broker")
        actions = spec.get("actions") if isinstance(spec, dict) else None
        if not isinstance(actions, dict) or not actions:
            raise _field_error(f"services.{svc}.actions", "must be a non-empty map")
        declared += len(actions)
        if declared > MAX_ACTIONS:
            raise MessageTooLargeError(
                f"services: more than {MAX_ACTIONS} actions in one registration",
                details={"field": "services", "limit": MAX_ACTIONS},
            )
        parsed: dict[str, ActionSpec] = {}
        for act, aspec in actions.items():
            where = f"services.{svc}.actions.{shown_key(act)}"
            check_name(act, where)
            if not isinstance(aspec, dict):
                raise _field_error(where, "must be a map")
            desc = aspec.get("description", "")
            if not isinstance(desc, str) or len(desc) > MAX_DESCRIPTION:
                raise _field_error(f"{where}.description", f"must be a string of at most {MAX_DESCRIPTION}")
            schema = aspec.get("schema", {})
            if not isinstance(schema, dict):
                raise _field_error(f"{where}.schema", "must be a JSON Schema object")
            check_schema(schema, f"{where}.schema")
            flags = []
            for flag in ("idempotent", "exactly_once"):
                value = aspec.get(flag, False)
                if not isinstance(value, bool):
                    raise _field_error(f"{where}.{flag}", "must be a boolean")
                flags.append(value)
            idempotent, exactly_once = flags
            hints = check_hints(aspec, where)
            result_schema = aspec.get("result_schema")
            if result_schema is not None:
                if not isinstance(result_schema, dict):
                    raise _field_error(f"{where}.result_schema", "must be a JSON Schema object")
                check_schema(result_schema, f"{where}.result_schema")
            entry = ActionSpec(desc, schema, idempotent, exactly_once, hints=hints, result_schema=result_schema)
            parsed[act] = replace(entry, size=len(encode_payload(entry.described())))
        reg.services[svc] = parsed
    return reg


def parse_page_request(request: Mapping[str, Any]) -> tuple[tuple[str, str] | None, int]:
    """Where a `mesh.services` page starts and how many actions it may hold at most.

    Args:
        request: the `mesh.services` payload: `after` (null, or "service.action" as a
            page's `next` said) and `limit` (1 to MAX_PAGE_ACTIONS), both optional.

    Raises:
        ValidationFailedError: naming `after` or `limit`.
    """
    after = request.get("after")
    start: tuple[str, str] | None = None
    if after is not None:
        svc, dot, act = after.partition(".") if isinstance(after, str) else ("", "", "")
        if not dot:
            raise _field_error("after", 'must be null or "service.action", as a page\'s "next" gives it')
        start = (check_name(svc, "after"), check_name(act, "after"))
    limit = request.get("limit", MAX_PAGE_ACTIONS)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_PAGE_ACTIONS:
        raise _field_error("limit", f"must be an integer from 1 to {MAX_PAGE_ACTIONS}")
    return start, limit


def parse_load(payload: Any) -> tuple[dict[str, float], list[str]]:
    """The valid fields of a node's heartbeat load report, and the names of the bad ones.

    Fields (all optional): `in_flight` (0..MAX_CAPACITY), `capacity` (1..MAX_CAPACITY),
    `queued` (0..MAX_QUEUED) and `latency_ms` (a finite number, 0..MAX_LATENCY_MS).
    A payload that is not a map is one bad field named "payload"; None is no report.
    """
    if payload is None:
        return {}, []
    if not isinstance(payload, dict):
        return {}, ["payload"]
    good: dict[str, float] = {}
    bad: list[str] = []
    for name, low, high in (("in_flight", 0, MAX_CAPACITY), ("capacity", 1, MAX_CAPACITY), ("queued", 0, MAX_QUEUED)):
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            good[name] = value
        else:
            bad.append(name)
    latency = payload.get("latency_ms")
    if latency is not None:
        if (
            isinstance(latency, (int, float))
            and not isinstance(latency, bool)
            and math.isfinite(latency)
            and 0.0 <= latency <= MAX_LATENCY_MS
        ):
            good["latency_ms"] = float(latency)
        else:
            bad.append("latency_ms")
    return good, bad


class Registry:
    """Live nodes and the (service, action) pairs each one offers."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, NodeInfo] = {}
        self._by_action: dict[tuple[str, str], list[NodeInfo]] = {}
        self._services: dict[str, int] = {}  # service -> number of nodes offering it
        self._once: dict[tuple[str, str], int] = {}  # exactly-once action -> nodes declaring it
        self._instances: dict[str, NodeInfo] = {}  # a node process's own id -> its registration here
        self._order = itertools.count(1)  # 0 is "never picked", which goes first
        self._sorted: list[tuple[str, str]] | None = None  # _by_action's keys in order, for pages
        self.pauses = PauseWatch()  # the broker's own pauses, seen between its ticks

    def turn(self, now: float) -> float:
        """Note one tick of the broker at `now`, before any node's silence is judged.

        Returns:
            How long the broker was paused before this tick (0.0: it was not); after a
            pause every node's silence counts from `now`.
        """
        gap = self.pauses.turn(now)
        if gap:
            for node in self.nodes.values():
                node.excused_at = now
        return gap

    def register(
        self, identity: bytes, payload: Any, now: float, owed: set[Any] | None = None, owner: str | None = None
    ) -> NodeInfo:
        """Add or replace a node's registration (validated by `parse_registration`).

        `owed` is the set of replies the node still owes (kept across registrations).
        `owner` is the name of the key the node's link authenticated with (None without
        security): a process id (`instance`) registered by one key cannot be taken by
        another, since exactly-once commands and their replies follow that id.

        Raises:
            ValidationFailedError: the registration is not valid.
            AccessDeniedError: its `instance` is registered here by a node of another key.
        """
        reg = parse_registration(payload)
        holder = self._instances.get(reg.instance) if reg.instance is not None else None
        if holder is not None and holder.identity != identity and holder.owner != owner:
            raise AccessDeniedError(
                "this node process id is registered by another node's key", details={"field": "instance"}
            )
        if identity in self.nodes:
            self.remove(identity)
        node = NodeInfo(
            identity=identity,
            name=reg.name,
            capacity=reg.capacity,
            services=reg.services,
            registered_at=now,
            last_seen=now,
            liveness=LIVENESS_MISSES * reg.heartbeat_interval,
            interval=reg.heartbeat_interval,
            owed=owed if owed is not None else set(),
            instance=reg.instance,
            owner=owner,
        )
        self.nodes[identity] = node
        self._sorted = None
        if reg.instance is not None:
            self._instances[reg.instance] = node
        for svc, actions in reg.services.items():
            self._services[svc] = self._services.get(svc, 0) + 1
            for act, spec in actions.items():
                self._by_action.setdefault((svc, act), []).append(node)
                if spec.exactly_once:
                    self._once[(svc, act)] = self._once.get((svc, act), 0) + 1
        return node

    def remove(self, identity: bytes) -> NodeInfo | None:
        """Forget a node; returns it (with its in-flight count) or None if unknown."""
        node = self.nodes.pop(identity, None)
        if node is None:
            return None
        self._sorted = None
        if node.instance is not None and self._instances.get(node.instance) is node:
            del self._instances[node.instance]
        for svc, actions in node.services.items():
            left = self._services[svc] - 1
            if left:
                self._services[svc] = left
            else:
                del self._services[svc]
            for act, spec in actions.items():
                if spec.exactly_once:
                    once = self._once[(svc, act)] - 1
                    if once:
                        self._once[(svc, act)] = once
                    else:
                        del self._once[(svc, act)]
                peers = self._by_action[(svc, act)]
                peers.remove(node)
                if not peers:
                    del self._by_action[(svc, act)]
        return node

    def has_service(self, service: str) -> bool:
        return service in self._services

    def count(self, service: str) -> int:
        """How many nodes offer `service`."""
        return self._services.get(service, 0)

    def offers(self, service: str, action: str) -> bool:
        return (service, action) in self._by_action

    def exactly_once(self, service: str, action: str) -> bool:
        """Whether a node offering `service.action` declared it exactly-once."""
        return (service, action) in self._once

    def by_instance(self, instance: str) -> NodeInfo | None:
        """The registration of the node process with this own id, if it is registered here."""
        return self._instances.get(instance)

    def pick(self, service: str, action: str) -> NodeInfo | None:
        """The best node with room for one more command (see the module rules), or None.

        A suspect node still gets work when no other has room: it may only be slow.
        On the hot path: one tuple per candidate, attributes read once.
        """
        best: NodeInfo | None = None
        best_key: tuple[bool, float, int] | None = None
        for node in self._by_action.get((service, action), ()):
            running = len(node.owed)
            capacity = node.capacity
            if running >= capacity:
                continue
            key = (node.suspect, running / capacity, node.order + node.latency_turns)
            if best_key is None or key < best_key:
                best, best_key = node, key
        if best is not None:
            best.order = next(self._order)  # rotate among otherwise equal nodes
        return best

    def actions_of(self, node: NodeInfo) -> Iterator[tuple[str, str]]:
        for svc, actions in node.services.items():
            for act in actions:
                yield svc, act

    def describe(self) -> dict[str, Any]:
        """The whole registry as `mesh.services` shows it (for views inside the broker)."""
        return self.page(None, max_bytes=None, limit=None)[0]

    def page(
        self,
        after: tuple[str, str] | None,
        *,
        max_bytes: int | None,
        limit: int | None = MAX_PAGE_ACTIONS,
        allowed: Callable[[str, str], bool] | None = None,
    ) -> tuple[dict[str, Any], tuple[str, str] | None]:
        """One page of `mesh.services`: the actions after `after`, in (service, action) order.

        Args:
            after: the last action of the previous page, or None for the first page.
            max_bytes: the page's encoded size stays within this (None: no bound), except
                that a page always holds at least one action.
            limit: at most this many actions (None: no bound).
            allowed: only actions for which this says True (the caller's view).

        Returns:
            service -> {"nodes": int, "actions": {action: entry}}, as `mesh.services` has
            always answered; and the last action given when more follow, else None.
            When several nodes offer an action, the earliest registered one's entry is shown.
        """
        if self._sorted is None:
            self._sorted = sorted(self._by_action)
        keys = self._sorted
        out: dict[str, Any] = {}
        used = count = 0
        last: tuple[str, str] | None = None
        for i in range(bisect.bisect_right(keys, after) if after is not None else 0, len(keys)):
            svc, act = key = keys[i]
            if allowed is not None and not allowed(svc, act):
                continue
            spec = self._by_action[key][0].services[svc][act]
            entry = out.get(svc)
            cost = spec.size + len(act) + _ACTION_OVERHEAD + (0 if entry else len(svc) + _SERVICE_OVERHEAD)
            if count and ((limit is not None and count >= limit) or (max_bytes is not None and used + cost > max_bytes)):
                return out, last
            if entry is None:
                entry = out[svc] = {"nodes": self._services[svc], "actions": {}}
            entry["actions"][act] = spec.described()
            used += cost
            count += 1
            last = key
        return out, None
