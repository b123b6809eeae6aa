"""Who receives which events: the broker's decisions on subscriptions, without sockets.

Rules of this module:

* The events socket is an XPUB in manual mode: a filter a subscriber sends takes effect
  only when `Subscribers.upstream` returns it as an `Apply`, and the loop applies it at
  once, before reading the next message, so it reaches the link that sent it.
* Every filter the broker applies is bounded: at most `MAX_FILTER_BYTES` long (a topic frame is at most
  about 1,100 bytes), at most `MAX_FILTERS` in force per subscriber key and
  `MAX_PENDING` waiting for their key's token. libzmq itself keeps a byte-wise trie of
  every filter a subscriber sends, applied or not, until it unsubscribes or leaves, so
  the socket cuts any upstream message over `MAX_UPSTREAM_BYTES` (mesh/sockets.py)
  before it reaches that trie; how many short ones a link sends is not bounded here
  (docs/security.md, "Limits").
* Without security every bounded filter is applied; all subscribers share one key.
* With security a subscriber proves who it is with an auth filter, `AUTH + token`,
  which is never applied (nothing is ever published to it). The token must be valid
  and issued to the CURVE key of the link (the ZAP User-Id of the frame). Filters that
  come before it wait for it: libzmq re-sends a subscriber's filters in sorted order
  when it reconnects, and `AUTH` sorts after every topic filter. A topic filter is then
  applied only when a role of the token may subscribe to its whole prefix
  (`Policy.may_subscribe`; the filter for every topic needs `*`); a filter that is not
  a topic prefix is refused, and so is a sync request whose id is not 32 to 64
  printable characters (a shorter one would receive other subscribers' markers). What
  was allowed stays in force on that link until it unsubscribes or closes; a reconnect
  is checked again.
* A refused filter is counted, audited by the gate, and told to its subscriber in the
  `refused` list of its next sync marker (never silence). Sync requests (`CONTROL` +
  the subscription's id) of a key whose token has not come yet wait for it too.
* Counts are released by unsubscriptions, including those libzmq sends on its own for
  a link that closed (they carry no User-Id: the count of any key holding the filter
  is released, which is exact in total).
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

from ..protocol import (
    AuthenticationFailedError,
    MeshError,
    ResourceExhaustedError,
    UnavailableError,
    ValidationFailedError,
    quote,
)
from ..protocol.names import _TOPIC
from ..protocol.topics import AUTH, CONTROL, MAX_UPSTREAM_BYTES, REPORT
from ..security.gate import Gate, Peer
from .events import EventBus

__all__ = ["Apply", "Subscribers", "MAX_FILTER_BYTES", "MAX_FILTERS", "MAX_PENDING"]

MAX_FILTER_BYTES: Final = 1200  # a topic of 16 x 64 characters and its dots, or CONTROL + an id
MAX_AUTH_BYTES: Final = MAX_UPSTREAM_BYTES - 1  # AUTH + a token
MAX_FILTERS: Final = 1000  # in force per subscriber key
MAX_PENDING: Final = 256  # waiting per key for its token
MAX_KEYS: Final = 10_000  # keys whose tokens are remembered (the oldest go first)
MAX_REFUSALS: Final = 32  # refusals kept per key for its next sync marker
_SYNC_ID: Final = re.compile(r"[\x21-\x7e]{32,64}")


@dataclass(frozen=True, slots=True)
class Apply:
    """Subscribe (or unsubscribe) the link that sent the last message to `filter`."""

    subscribe: bool
    filter: bytes


@dataclass(slots=True)
class _Key:
    """What the broker knows of one subscriber key (a CURVE key name, or None)."""

    user: str | None = None
    identity: Any = None  # the token's identity, once shown
    token: str = ""  # checked again (cached) before each new filter
    held: Counter[bytes] = field(default_factory=Counter)  # filters in force, per link count
    count: int = 0  # sum of `held`
    pending: list[bytes] = field(default_factory=list)  # filters and sync requests waiting
    refused: list[dict[str, Any]] = field(default_factory=list)  # for the next sync marker


class Subscribers:
    """The subscription decisions of one broker (see the module rules).

    Args:
        bus: the event bus, which numbers sync markers and keeps drop reports.
        gate: the security gate (None with security off).
    """

    def __init__(self, bus: EventBus, gate: Gate | None = None) -> None:
        self.bus = bus
        self.gate = gate
        self.keys: OrderedDict[str | None, _Key] = OrderedDict()
        self.holders: dict[bytes, Counter[str | None]] = {}  # filter -> keys holding it
        self.in_force = 0
        self.counters: Counter[str] = Counter()

    def upstream(
        self, frame: bytes, peer: Peer, now: float, aligned: bool = True
    ) -> tuple[list[Apply], list[list[bytes]]]:
        """A message a subscriber sent: what to apply to its link, and markers to publish.

        `aligned` is False while libzmq may apply a decision to another link than the
        sender's (see the loop): then nothing is applied; a subscription is refused
        UNAVAILABLE (retryable) and an unsubscription is left to the link's close.
        """
        kind, flt = frame[:1], frame[1:]
        if kind not in (b"\x00", b"\x01"):
            self.counters["upstream_ignored"] += 1  # not an (un)subscription: see `aligned`
            return [], []
        if flt.startswith(REPORT):
            if kind == b"\x01":
                self.bus.report(flt[len(REPORT):], now)
            return [], []  # never applied, so never undone
        if not aligned:
            self.counters["filters_unsafe"] += 1
            if kind == b"\x01" and not flt.startswith(AUTH):
                key = self._key(peer.user if self.gate is not None else None)
                self._refuse(key, flt, UnavailableError(
                    "the events port could not tell this subscription's link: subscribe again",
                    details={"reason": "link unknown"}), now, audit=False)
            return [], []
        if kind == b"\x01":
            return self._subscribe(flt, peer, now)
        return self._unsubscribe(flt, peer.user if self.gate is not None else None), []

    # -------------------------------------------------------------- subscribe

    def _subscribe(self, flt: bytes, peer: Peer, now: float) -> tuple[list[Apply], list[list[bytes]]]:
        user = peer.user if self.gate is not None else None
        key = self._key(user)
        if flt.startswith(AUTH):
            if self.gate is None or len(flt) > MAX_AUTH_BYTES:
                self.counters["auth_ignored"] += 1
                return [], []
            return self._authenticate(key, flt[len(AUTH):], peer, now)
        if len(flt) > MAX_FILTER_BYTES:
            self._refuse(key, flt, ValidationFailedError(
                f"a filter is at most {MAX_FILTER_BYTES} bytes", details={"reason": "filter too long", "limit": MAX_FILTER_BYTES}), now)
            return [], []
        if flt.startswith(CONTROL) and not _SYNC_ID.fullmatch(flt[len(CONTROL):].decode("ascii", "replace")):
            # A short one would be a prefix of other subscribers' sync filters.
            self._refuse(key, flt, ValidationFailedError(
                "a sync request is ff and an id of 32 to 64 printable characters",
                details={"reason": "not a sync request"}), now)
            return [], []
        if self.gate is not None and not self._known(key, now):
            if len(key.pending) >= MAX_PENDING:
                self._refuse(key, flt, ResourceExhaustedError(
                    f"{MAX_PENDING} filters wait for this subscriber's token already",
                    details={"reason": "too many pending", "limit": MAX_PENDING}), now)
            else:
                key.pending.append(flt)
            return [], []
        return self._decide(key, flt, peer, now)

    def _authenticate(self, key: _Key, token_bytes: bytes, peer: Peer, now: float) -> tuple[list[Apply], list[list[bytes]]]:
        assert self.gate is not None
        try:
            token = token_bytes.decode("utf-8")
            identity = self.gate.admit_subscriber(token, peer, now)
        except UnicodeDecodeError:
            identity = None
            self._refuse(key, AUTH, AuthenticationFailedError("a token is text", details={"reason": "bad token"}), now)
        except MeshError as err:
            identity = None
            self._refuse(key, AUTH, err, now, audit=False)  # the gate audited it
        if identity is None:
            self.counters["auth_refused"] += 1
            key.identity, key.token = None, ""
        else:
            self.counters["auth_accepted"] += 1
            key.identity, key.token = identity, token
        pending, key.pending = key.pending, []
        applied: list[Apply] = []
        markers: list[list[bytes]] = []
        for flt in pending:
            if identity is None:
                if flt.startswith(CONTROL):  # the marker tells the subscriber what was refused
                    if not self._full(key, flt, now):
                        applied.append(self._hold(key, flt))
                        markers.append(self._marker(key, flt, now))
                else:
                    self._refuse(key, flt, AuthenticationFailedError(
                        "no valid token for this subscriber", details={"reason": "no valid token"}), now, audit=False)
                continue
            more, marks = self._decide(key, flt, peer, now)
            applied += more
            markers += marks
        return applied, markers

    def _decide(self, key: _Key, flt: bytes, peer: Peer, now: float) -> tuple[list[Apply], list[list[bytes]]]:
        """Apply `flt` for a key whose token is known (or with security off), or refuse it."""
        if flt.startswith(CONTROL):  # a sync request: answered on a filter of its own
            if self._full(key, flt, now):
                return [], []
            return [self._hold(key, flt)], [self._marker(key, flt, now)]
        if self.gate is not None:
            prefix = _prefix_of(flt)
            if prefix is None:
                self._refuse(key, flt, ValidationFailedError(
                    "a filter is a topic prefix and a dot ('' for every topic)", details={"reason": "not a topic filter"}), now)
                return [], []
            err = self.gate.may_subscribe(key.identity, prefix, peer, now)
            if err is not None:
                self._refuse(key, flt, err, now, audit=False)
                return [], []
        if self._full(key, flt, now):
            return [], []
        return [self._hold(key, flt)], []

    def _full(self, key: _Key, flt: bytes, now: float) -> bool:
        if key.count < MAX_FILTERS:
            return False
        self._refuse(key, flt, ResourceExhaustedError(
            f"a subscriber has at most {MAX_FILTERS} filters in force", details={"reason": "too many filters", "limit": MAX_FILTERS}), now)
        return True

    def _hold(self, key: _Key, flt: bytes) -> Apply:
        key.held[flt] += 1
        key.count += 1
        self.holders.setdefault(flt, Counter())[key.user] += 1
        self.in_force += 1
        self.counters["filters_applied"] += 1
        return Apply(True, flt)

    # ------------------------------------------------------------ unsubscribe

    def _unsubscribe(self, flt: bytes, user: str | None) -> list[Apply]:
        key = self.keys.get(user)
        if key is not None and flt in key.pending:
            key.pending.remove(flt)
            return []
        holders = self.holders.get(flt)
        if not holders or user not in holders and (user is not None or self.gate is None):
            return [Apply(False, flt)]  # nothing counted; libzmq forgets it if it held it
        if user not in holders:  # a link that closed (libzmq's own unsubscription): any holder
            user = next(iter(holders))
        holders[user] -= 1
        if not holders[user]:
            del holders[user]
            if not holders:
                del self.holders[flt]
        held = self.keys[user].held
        held[flt] -= 1
        self.keys[user].count -= 1
        if not held[flt]:
            del held[flt]
        self.in_force -= 1
        return [Apply(False, flt)]

    # ---------------------------------------------------------------- helpers

    def _key(self, user: str | None) -> _Key:
        key = self.keys.get(user)
        if key is None:
            if len(self.keys) >= MAX_KEYS:
                for old, state in self.keys.items():  # the oldest key holding nothing goes
                    if not state.held:
                        del self.keys[old]
                        break
            key = self.keys[user] = _Key(user)
        return key

    def _known(self, key: _Key, now: float) -> bool:
        """Whether the key's token still holds: checked again each time (a cached check),
        so a revoked or expired token authorises no new filter."""
        if key.identity is None or self.gate is None:
            return False
        try:
            self.gate.admit_subscriber(key.token, Peer(key.user), now)
        except MeshError:
            key.identity = None
            return False
        return True

    def _refuse(self, key: _Key, flt: bytes, err: MeshError, now: float, *, audit: bool = True) -> None:
        """Count a refused filter and keep it for the subscriber's next sync marker.

        The marker names the filter as the subscriber wrote its prefix ('' for every
        topic; "(token)" and "(sync)" for the other two kinds), cut to `MAX_QUOTE`.
        """
        self.counters["filters_refused"] += 1
        self.counters[f"refused_{int(err.code)}"] += 1
        if flt.startswith(AUTH):
            what = "(token)"
        elif flt.startswith(CONTROL):
            what = "(sync)"
        else:
            what = quote(flt.removesuffix(b".").decode("utf-8", "replace"))
        reason = quote(str(err.details.get("reason", err.message)))
        if audit and self.gate is not None:
            self.gate.audit_refusal(err, key.user or "?", f"subscribe {what or '*'}", now)
        if len(key.refused) < MAX_REFUSALS:
            key.refused.append({"filter": what, "code": int(err.code), "reason": reason})

    def _marker(self, key: _Key, flt: bytes, now: float) -> list[bytes]:
        refused, key.refused = key.refused, []
        return self.bus.sync_marker(flt, now, refused)

    def stats(self) -> dict[str, Any]:
        """Sizes and counters for monitoring (names of keys, never tokens)."""
        return {
            "filters": self.in_force,
            "keys": len(self.keys),
            "pending": sum(len(k.pending) for k in self.keys.values()),
            "counters": dict(self.counters),
        }


def _prefix_of(flt: bytes) -> str | None:
    """The topic prefix a filter stands for ('' for every topic), or None if it is none."""
    if not flt:
        return ""
    if not flt.endswith(b"."):
        return None
    try:
        prefix = flt[:-1].decode("ascii")
    except UnicodeDecodeError:
        return None
    return prefix if _TOPIC.fullmatch(prefix) else None
