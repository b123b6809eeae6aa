"""The broker's own actions, `mesh.*`: ping, services, stats, replay, the node protocol
(register, unregister, heartbeat), tokens (renew, revoke) and the cluster's policy.

Rules of this module:

* Every request is answered once, on the side it came from, with its result or its
  error's code; nothing raises out of `System.answer`.
* An answer over LARGE_ANSWER_BYTES carries an `ack` nonce the peer must show back
  before more than MAX_UNREAD_ANSWERS of them wait unread (`_large_answer`).
* With security on, the gate has already admitted the caller (`identity`); `mesh.replay`
  and `mesh.services {"callable": true}` also follow the caller's roles.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from ...protocol import (
    MAX_MESSAGE_BYTES,
    AccessDeniedError,
    HandlerNotFoundError,
    Header,
    MeshError,
    MessageTooLargeError,
    ResourceExhaustedError,
    ValidationFailedError,
    decode_header,
    decode_payload,
    encode_header,
    encode_payload,
    new_id,
    response_to,
)
from ...protocol.names import SYSTEM_SERVICE
from ...security.gate import Peer
from ..config import BrokerConfig
from ..events import EventBus
from ..registry import Registry, parse_page_request
from .nodes import Nodes
from .replicated import Replicated
from .state import NOBODY, BrokerSecurity, ConnectionState, Outgoing, Side, error_frames, to_peer

__all__ = ["System", "LARGE_ANSWER_BYTES", "MAX_UNREAD_ANSWERS", "NODE_ACTIONS"]

NODE_ACTIONS: Final = frozenset({"register", "unregister", "heartbeat"})
# System answers larger than this must be acknowledged (`System._large_answer`).
LARGE_ANSWER_BYTES: Final = 16 * 1024
MAX_UNREAD_ANSWERS: Final = 4


class System:
    """Answers `mesh.*` requests from clients and nodes.

    Args:
        config: the broker's limits and name.
        security: the gate, token issuer and revocations, or None (security off).
        registry: the nodes and services, for `mesh.services`.
        events: the event bus, for `mesh.ping` and `mesh.replay`.
        links: the broker's client and node connections, by side (unread large answers).
        counters: the broker's counters.
        nodes: the node protocol (`mesh.register`, `mesh.unregister`, `mesh.heartbeat`).
        replicated: the cluster's shared state (`mesh.policy`, revocations).
        stats: the broker's `stats()`, for `mesh.stats`.
    """

    def __init__(
        self, config: BrokerConfig, security: BrokerSecurity | None, registry: Registry, events: EventBus,
        links: dict[Side, dict[bytes, ConnectionState]], counters: Counter[str], nodes: Nodes,
        replicated: Replicated, stats: Callable[[], dict[str, Any]],
    ) -> None:  # fmt: skip
        self.config = config
        self.security = security
        self.registry = registry
        self.events = events
        self.links = links
        self.counters = counters
        self.nodes = nodes
        self.replicated = replicated
        self.stats = stats
        self.events_endpoint: str | None = None  # told to clients by mesh.ping (set by the loop)

    def answer(
        self, ident: bytes, header_frame: bytes, payload: bytes, now: float, side: Side, *,
        identity: Any = None, peer: Peer = NOBODY,
    ) -> list[Outgoing]:  # fmt: skip
        """A `mesh.*` request from `ident` on `side`: its answer, or its error."""
        header = decode_header(header_frame)
        conn = self.links[side].get(ident)
        try:
            payload = _take_ack(conn, payload)
            if header.action == "policy":
                if side is not Side.CLIENT or (self.security is not None and identity is None):
                    raise AccessDeniedError("mesh.policy is for clients whose role allows it", details={"action": "policy"})
                return self.replicated.propose_policy(ident, header, payload, now, side)
            result = self._result(ident, header, payload, now, side, identity, peer)
            body = encode_payload(result)
            # The whole registry in one answer is a map of service names: no room for a
            # nonce, so it is not counted (it is bounded by half a message; pages are).
            if (
                len(body) > LARGE_ANSWER_BYTES and conn is not None and isinstance(result, dict)
                and (header.action != "services" or "next" in result)
            ):
                body = self._large_answer(conn, result, body)
        except MeshError as err:
            self.counters["failed"] += 1
            self.counters[f"error_{int(err.code)}"] += 1
            return [to_peer(side, ident, error_frames(err, now, header.id))]
        self.counters["completed"] += 1
        return [to_peer(side, ident, [encode_header(response_to(header, now=now)), body])]

    def _large_answer(self, conn: ConnectionState, result: dict[str, Any], body: bytes) -> bytes:
        """A system answer over LARGE_ANSWER_BYTES, sent only while the peer has read the
        earlier ones: it carries an `ack` nonce the peer shows in a later `mesh.*` request
        (the SDK does), and at most MAX_UNREAD_ANSWERS of them may wait unshown.

        A peer that asks without reading would otherwise grow the broker's send queue by
        half a megabyte per small request; this way it grows by at most a few answers.

        Raises:
            ResourceExhaustedError: MAX_UNREAD_ANSWERS large answers wait already.
        """
        if len(conn.unread) >= MAX_UNREAD_ANSWERS:
            self.counters["unread_answers_refused"] += 1
            raise ResourceExhaustedError(
                f"{MAX_UNREAD_ANSWERS} large answers to this connection were not acknowledged yet: read them, "
                "and show the last one's `ack` in the next mesh.* request",
                details={"reason": "unread answers", "limit": MAX_UNREAD_ANSWERS},
            )
        nonce = new_id()
        conn.unread.append(nonce)
        return encode_payload({**result, "ack": nonce})

    def _result(
        self, ident: bytes, header: Header, payload: bytes, now: float, side: Side, identity: Any, peer: Peer
    ) -> Any:
        action = header.action
        if action == "ping":
            return {"pong": True, "broker": self.config.name, "time": now, "events": self.events_endpoint,
                    "instance": self.events.epoch}  # fmt: skip
        if action == "services":
            return self._services(payload, identity, peer)
        if action == "stats":
            return self.stats()
        if action == "replay":
            request = decode_payload(payload)
            if self.security is not None:
                self._check_replay_access(request, identity, peer, now)
            # Half the message limit leaves room for the MessagePack around the events.
            return self.events.replay(request, self.config.max_message_bytes // 2)
        if action in ("renew", "revoke") and self.security is not None and identity is not None:
            return self._token_action(action, identity, decode_payload(payload), now)
        if side is Side.NODE and action == "register":
            return self.nodes.register(ident, payload, now, peer)
        if side is Side.NODE and action == "unregister":
            return self.nodes.unregister(ident, now)
        if side is Side.NODE and action == "heartbeat":
            return self.nodes.heartbeat(ident, payload)
        if action in NODE_ACTIONS:
            raise AccessDeniedError(f"mesh.{action} is for handler nodes", details={"action": action})
        raise HandlerNotFoundError(
            f"the broker has no action mesh.{action}",
            details={"service": SYSTEM_SERVICE, "action": action},
        )

    def _check_replay_access(self, request: Any, identity: Any, peer: Peer, now: float) -> None:
        """`mesh.replay` follows the subscription rule: the caller's roles must cover the
        whole prefix it replays, as they must for a live subscription to it."""
        assert self.security is not None
        prefix = request.get("prefix", "") if isinstance(request, dict) else ""
        if identity is None or not isinstance(prefix, str):
            return  # a malformed request: the event bus refuses it, naming the field
        err = self.security.gate.may_subscribe(identity, prefix, peer, now)
        if err is not None:
            raise err

    def _services(self, payload: bytes, identity: Any, peer: Peer) -> dict[str, Any]:
        """The registry, or one page of it; with `{"callable": true}`, only the actions the
        caller may run (the MCP bridge lists as tools exactly what its role may call;
        without security every caller may call everything).

        An answer fits half of the smaller of the broker's and the protocol's message
        limits, so every client can receive it: a request with `after` (or `limit`) gets
        `{"services": <a page>, "next": "service.action" or null}`; one without gets the
        whole registry as before, or MESSAGE_TOO_LARGE when it no longer fits one answer.

        Raises:
            ValidationFailedError: a bad `after` or `limit`.
            MessageTooLargeError: the whole registry was asked for and does not fit.
        """
        try:
            request = decode_payload(payload)
        except MeshError:
            request = None
        if not isinstance(request, dict):
            request = {}
        allowed = None
        if request.get("callable") is True and self.security is not None and identity is not None:
            policy = self.security.gate.policy

            def allowed(svc: str, act: str) -> bool:
                return policy.decide(identity.roles, svc, act, peer.address).allowed

        budget = min(self.config.max_message_bytes, MAX_MESSAGE_BYTES) // 2
        paged = "after" in request or "limit" in request
        after, limit = parse_page_request(request) if paged else (None, None)
        services, last = self.registry.page(after, max_bytes=budget, limit=limit, allowed=allowed)
        if paged:
            return {"services": services, "next": ".".join(last) if last else None}
        if last is not None:
            raise MessageTooLargeError(
                f"the registry is larger than one answer may be ({budget} bytes): "
                'ask for it in pages, {"after": null} first (`Client.services()` does)',
                details={"limit": budget},
            )
        return services

    def _token_action(self, action: str, identity: Any, request: Any, now: float) -> Any:
        """`mesh.renew` (a fresh token for the caller) and `mesh.revoke` (by jti, persisted).

        The gate has already checked that the caller's role may call the action.
        """
        assert self.security is not None
        sec = self.security
        if action == "renew":
            if sec.issuer is None:
                raise HandlerNotFoundError("this broker does not issue tokens", details={"action": action})
            token = sec.issuer.renew(identity, now, sec.renew_ttl)
            self.counters["tokens_renewed"] += 1
            return {"token": token, "expires": now + sec.renew_ttl}
        if sec.revocations is None:
            raise HandlerNotFoundError("this broker keeps no revocations", details={"action": action})
        if not isinstance(request, dict) or not isinstance(request.get("jti"), str):
            raise ValidationFailedError("jti: the token id to revoke", details={"field": "jti"})
        expires = request.get("expires", now + 365 * 86400)
        if isinstance(expires, bool) or not isinstance(expires, (int, float)):
            raise ValidationFailedError("expires: when the revoked token would expire (epoch seconds)", details={"field": "expires"})
        sec.revocations.revoke(request["jti"], float(expires), now)
        once = self.replicated.once
        if once is not None:
            once.propose_revoke(request["jti"], float(expires), now)
        self.counters["tokens_revoked"] += 1
        return {"revoked": request["jti"]}


def _take_ack(conn: ConnectionState | None, payload: bytes) -> bytes:
    """A `mesh.*` request's payload without its `ack`; the answers it acknowledges (that
    one and every earlier one) no longer count as unread."""
    if b"ack" not in payload:
        return payload
    request = decode_payload(payload)
    if not isinstance(request, dict) or "ack" not in request:
        return payload
    nonce = request.pop("ack")
    if conn is not None and nonce in conn.unread:
        while conn.unread.popleft() != nonce:
            pass
    return encode_payload(request)
