"""The broker's security checks on each message, in one place and without sockets.

Rules of this module:

* `Gate` decides; it never sends. Each `admit_*` returns the sender's `Identity` or
  raises the `SecurityError` for the first check that fails, in this order: replay
  (timestamp skew, then a repeated id), token (present, valid, not revoked, bound to
  the CURVE key the message came over), security level, then the access policy.
* Every refusal is counted and kept as an audit record: who (the subject or CURVE
  name, when known), what (service.action or topic), the code and a short reason.
  Never a token, a key or a payload.
* The replay window is bounded by time: ids are remembered for twice the allowed clock
  skew, which is as long as a copy could still pass the skew check. Each is kept as one
  64-bit hash (about 100 bytes with its expiry), so 15,000 messages/s with the default
  10 s skew hold some 30 MB; `MAX_REMEMBERED` caps it (the oldest go first, counted).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from ..protocol import (
    AccessDeniedError,
    AuthenticationFailedError,
    MeshError,
    ReplayDetectedError,
    SecurityLevel,
    SecurityLevelTooLowError,
    SignatureInvalidError,
)
from ..protocol.names import SYSTEM_SERVICE

__all__ = ["Gate", "GateSettings", "Peer", "AuditRecord"]

AUDIT_RECORDS: Final = 1000
MAX_REMEMBERED: Final = 1_000_000


class _Identity(Protocol):
    subject: str
    roles: frozenset[str]
    jti: str
    expires: float


class _Verifier(Protocol):
    def verify(self, token: str, now: float) -> Any: ...


class _Decision(Protocol):
    @property
    def allowed(self) -> bool: ...
    @property
    def reason(self) -> str: ...


class _Policy(Protocol):
    source: str  # where it was read from, for messages
    text: str | None  # the TOML it was read from: what a cluster's log carries

    def decide(self, roles: frozenset[str], service: str, action: str, peer_ip: str | None) -> _Decision: ...
    def may_register(self, identity: str, service: str) -> _Decision: ...
    def may_publish(self, roles: frozenset[str], topic: str, peer_ip: str | None = None) -> _Decision: ...
    def may_subscribe(self, roles: frozenset[str], prefix: str, peer_ip: str | None = None) -> _Decision: ...
    def may_node_publish(self, identity: str | None, topic: str) -> _Decision: ...


@dataclass(frozen=True, slots=True)
class Peer:
    """Who a message came from, as the link says: the CURVE key's name (ZAP User-Id) and IP."""

    user: str | None = None
    address: str | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One refusal, without secrets."""

    time: float
    who: str
    what: str
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class GateSettings:
    """Levels and windows: `min_level` for every message, raised per service by `service_levels`."""

    min_level: int = int(SecurityLevel.AUTHENTICATED)
    service_levels: Mapping[str, int] = field(default_factory=dict)
    max_skew: float = 10.0


class Gate:
    """Admits or refuses each message a broker receives when security is on."""

    def __init__(self, settings: GateSettings, verifier: _Verifier, policy: _Policy) -> None:
        self.settings = settings
        self.verifier = verifier
        self.policy = policy
        self.counters: Counter[str] = Counter()
        self.audit: deque[AuditRecord] = deque(maxlen=AUDIT_RECORDS)
        self._seen: set[int] = set()  # hashes of (sender, id, ts) inside the window
        self._expiry: deque[tuple[float, int]] = deque()  # (forget at, hash), oldest first

    # --------------------------------------------------------------- messages

    def admit_command(self, header: Mapping[str, Any], peer: Peer, now: float) -> Any:
        """Check a client's command; return its sender's identity.

        Raises:
            SecurityError: the first check that fails (see the module rules).
        """
        what = f"{header.get('service')}.{header.get('action')}"
        identity = self._authenticate(header, peer, now, what)
        service, action = header["service"], header["action"]
        try:
            self._check_level(header, service)
            decision = self.policy.decide(identity.roles, service, action, peer.address)
            if not decision.allowed:
                raise AccessDeniedError(f"{what} is not allowed: {decision.reason}", details={"reason": decision.reason})
        except MeshError as err:
            raise self._refused(err, identity.subject, what, now) from None
        self.counters["admitted"] += 1
        return identity

    def admit_event(self, header: Mapping[str, Any], peer: Peer, now: float) -> Any:
        """Check a publisher's event; return its sender's identity.

        Raises:
            SecurityError: the first check that fails.
        """
        topic = header["topic"]
        identity = self._authenticate(header, peer, now, topic)
        decision = self.policy.may_publish(identity.roles, topic, peer.address)
        if not decision.allowed:
            err = AccessDeniedError(f"publishing on {topic} is not allowed: {decision.reason}", details={"reason": decision.reason})
            raise self._refused(err, identity.subject, topic, now)
        return identity

    def admit_node_event(self, header: Mapping[str, Any], peer: Peer, now: float) -> None:
        """Check an event a handler node publishes on the node port.

        A node has no token: it is known by its CURVE key's name, and publishes only the
        topics its `[nodes.NAME]` rule lists (`publish`).

        Raises:
            SecurityError: a replay, or a topic the node may not publish.
        """
        topic = header["topic"]
        who = peer.user or "?"
        try:
            self._check_replay(header, peer, now)
            decision = self.policy.may_node_publish(peer.user, topic)
            if not decision.allowed:
                raise AccessDeniedError(
                    f"publishing on {topic} is not allowed: {decision.reason}", details={"reason": decision.reason}
                )
        except MeshError as err:
            raise self._refused(err, who, topic, now) from None

    def admit_subscriber(self, token: str, peer: Peer, now: float) -> Any:
        """Check the token a subscriber shows on the events port; return its identity.

        No replay check: libzmq shows the same token again on every reconnect, and it
        only counts on the link of the key it was issued for.

        Raises:
            SecurityError: a bad, expired or revoked token, or one of another key.
        """
        who = peer.user or "?"
        try:
            identity = self._verify_bound(token, peer, now)
        except MeshError as err:
            raise self._refused(err, who, "subscribe", now) from None
        return identity

    def may_subscribe(self, identity: Any, prefix: str, peer: Peer, now: float) -> MeshError | None:
        """None when `identity` may receive every event under `prefix` ('' = all), else the
        refusal (counted and audited), for the caller to report."""
        decision = self.policy.may_subscribe(identity.roles, prefix, peer.address)
        if decision.allowed:
            return None
        err = AccessDeniedError(
            f"subscribing to {prefix or '*'} is not allowed: {decision.reason}",
            details={"reason": decision.reason, "prefix": prefix},
        )
        return self._refused(err, identity.subject, f"subscribe {prefix or '*'}", now)

    def audit_refusal(self, err: MeshError, who: str, what: str, now: float) -> None:
        """Count and audit a refusal decided elsewhere (a subscription's limits)."""
        self._refused(err, who, what, now)

    def admit_registration(self, services: list[str], peer: Peer, now: float) -> None:
        """Check that the node on this link may offer each of `services`.

        A node is known by its CURVE key's name; only names the policy lists for a
        service may register it, so a rogue node cannot take a service over.

        Raises:
            AuthenticationFailedError: the link carries no CURVE identity.
            AccessDeniedError: the first service it may not offer.
        """
        who = peer.user
        if not who:
            raise self._refused(AuthenticationFailedError("the node has no CURVE identity", details={"reason": "no identity"}), "?", "mesh.register", now)
        for service in services:
            decision = self.policy.may_register(who, service)
            if not decision.allowed:
                err = AccessDeniedError(
                    f"node {who} may not offer {service}: {decision.reason}",
                    details={"reason": decision.reason, "service": service},
                )
                raise self._refused(err, who, f"register {service}", now)

    # ------------------------------------------------------------------ checks

    def _authenticate(self, header: Mapping[str, Any], peer: Peer, now: float, what: str) -> Any:
        who = peer.user or "?"
        try:
            self._check_replay(header, peer, now)
            identity = self._verify_bound((header.get("security") or {}).get("token"), peer, now)
        except MeshError as err:
            raise self._refused(err, who, what, now) from None
        return identity

    def _verify_bound(self, token: Any, peer: Peer, now: float) -> Any:
        if not token:
            raise AuthenticationFailedError("a token is required", details={"reason": "missing token"})
        identity = self.verifier.verify(token, now)
        if peer.user is not None and identity.subject != peer.user:
            # A token only counts on the link of the key it was issued for: a stolen
            # token is useless without the matching CURVE secret key.
            raise AuthenticationFailedError(
                "the token was issued for another key", details={"reason": "token not bound to this key"}
            )
        return identity

    def _check_replay(self, header: Mapping[str, Any], peer: Peer, now: float) -> None:
        ts = header["ts"]
        skew = self.settings.max_skew
        if abs(now - ts) > skew:
            raise ReplayDetectedError(
                f"the message's time is more than {skew:g} s from the broker's", details={"reason": "clock skew"}
            )
        self._forget_old(now)
        key = hash((peer.user, header["id"], ts))
        if key in self._seen:
            raise ReplayDetectedError("this message was already received", details={"reason": "repeated id"})
        self._seen.add(key)
        self._expiry.append((now + 2 * skew, key))

    def _forget_old(self, now: float) -> None:
        expiry, seen = self._expiry, self._seen
        while expiry and (expiry[0][0] <= now or len(expiry) > MAX_REMEMBERED):
            if expiry[0][0] > now:
                self.counters["replay_window_full"] += 1
            _, key = expiry.popleft()
            seen.discard(key)

    def _check_level(self, header: Mapping[str, Any], service: str) -> None:
        sec = header.get("security") or {}
        level = sec.get("level", 0)
        required = max(self.settings.min_level, self.settings.service_levels.get(service, 0))
        if service == SYSTEM_SERVICE:
            # The broker answers mesh.* itself and holds no payload key: it reads them plain.
            required = min(required, SecurityLevel.AUTHENTICATED)
        if level < required:
            raise SecurityLevelTooLowError(
                f"{service} requires security level {required}, the message has {level}",
                details={"required": required, "level": level},
            )
        if level >= SecurityLevel.ENCRYPTED and not sec.get("encryption"):
            # The level is high enough; what it lacks is the encryption it claims. Naming
            # a `required` level here would read as "send level 1", which is not the fix.
            raise SecurityLevelTooLowError(
                f"the message claims security level {level} but its payload is not encrypted",
                details={"level": level, "missing": "encryption"},
            )
        if level >= SecurityLevel.SIGNED and not sec.get("signature"):
            raise SignatureInvalidError("the message claims a signature but has none", details={"reason": "missing"})

    def _refused(self, err: MeshError, who: str, what: str, now: float) -> MeshError:
        self.counters[f"refused_{int(err.code)}"] += 1
        reason = str(err.details.get("reason", err.message))[:200]
        self.audit.append(AuditRecord(now, who, what, int(err.code), reason))
        return err

    def stats(self) -> dict[str, Any]:
        """Counters and the latest refusals (no secrets in either)."""
        return {
            "counters": dict(self.counters),
            "replay_window": len(self._seen),
            "audit": [
                {"time": r.time, "who": r.who, "what": r.what, "code": r.code, "reason": r.reason}
                for r in list(self.audit)[-50:]
            ],
        }
