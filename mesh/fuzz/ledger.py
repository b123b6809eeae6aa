"""What each fuzzed message should get back, what it got, and the run's verdict. Sans-IO.

Rules of this module (docs/fuzzing.md, "What the figures mean", says the same for users):

* A message *must be answered* when the broker can name it in an answer:
  - client port (the authenticated `client` attacker): its first frame is a MessagePack
    map whose `id` is a valid id (the broker's `peek_header` reads it too), unless it is
    a well-formed `cancel` (answered only through the command it cancels), or it carries
    a deadline after the end of the grace period, or its id was sent before;
  - node port (the `node` attacker): three frames, an empty envelope, a header that
    passes `unpack_header`, the whole under the size limit, and a `mesh.*` command or
    an event.
  Such a message is answered when a reply whose `correlation_id` is its id arrives.
  Anything else (and everything the `deaf` link sends) may or may not be answered.
* After the attack stops, replies are read for a grace period; a message that must be
  answered and was not by then counts as *unanswered*. A second reply to one id counts
  as a duplicate. Any message at all received by a `stranger` socket is a breach.
* The ledger takes times as arguments and never reads a clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from ..protocol import MAX_MESSAGE_BYTES, peek_header, unpack_header
from ..protocol.names import ID_MATCH
from .attacks import Shot, Via

__all__ = ["Expect", "expectation", "Ledger", "Bounds", "percentile"]

MAX_EXAMPLES: Final = 20
_STRANGERS: Final = frozenset({Via.PLAIN_CLIENTS, Via.UNKNOWN_KEY_CLIENTS, Via.PLAIN_NODES, Via.UNKNOWN_KEY_NODES, Via.PLAIN_EVENTS})


class Expect(Enum):
    REPLY = "must be answered"
    MAYBE = "may be answered"
    NONE = "cannot be matched"


def _header(frame: bytes) -> dict[str, Any] | None:
    try:
        return unpack_header(frame)
    except Exception:  # noqa: BLE001 - a bug there is the unit fuzzers' to report; here it only means "not valid"
        return None


def _readable_id(frame: bytes) -> str | None:
    try:
        value = peek_header(frame, "id")
    except Exception:  # noqa: BLE001 - likewise
        return None
    return value if isinstance(value, str) and ID_MATCH(value) else None


def expectation(via: Via, frames: Sequence[bytes], answer_by: float, limit: int = MAX_MESSAGE_BYTES) -> tuple[Expect, str | None]:
    """Whether `frames` sent on `via` must be answered (see the module rules), and the id
    its answer carries. `answer_by` is the end of the grace period."""
    if via is Via.CLIENT and frames:
        cid = _readable_id(frames[0])
        if cid is None:
            return Expect.NONE, None
        wire = _header(frames[0]) if len(frames[0]) <= limit else None
        if wire is not None:
            deadline = wire.get("deadline")
            if (wire["type"] == "cancel" and len(frames) == 2) or (deadline is not None and deadline > answer_by):
                return Expect.MAYBE, cid
        return Expect.REPLY, cid
    if via is Via.NODE and len(frames) == 3 and not frames[0] and sum(map(len, frames)) <= limit:
        wire = _header(frames[1])
        if wire is not None and ((wire["type"] == "command" and wire["service"] == "mesh") or wire["type"] == "event"):
            return Expect.REPLY, wire["id"]
    if via in (Via.CLIENT, Via.NODE, Via.DEAF) and len(frames) > 1:
        cid = _readable_id(frames[-2])
        return Expect.MAYBE if cid is not None else Expect.NONE, cid
    return Expect.NONE, None


@dataclass(slots=True)
class _Pending:
    shot: Shot
    sent_at: float


@dataclass(frozen=True, slots=True)
class Bounds:
    """The done-when of issue 15's long run; a run passes when every figure is within."""

    crashes: int = 0
    restarts: int = 0
    tracebacks: int = 0
    unanswered: int = 0
    max_rss_mb: float = 256.0
    victim_failures: int = 0
    victim_p99_ms: float = 50.0
    stranger_replies: int = 0

    def broken(self, figures: dict[str, Any]) -> list[str]:
        """Each bound `figures` breaks, as a sentence."""
        out = [f"{name} = {figures[name]} (bound {bound})" for name, bound in (
            ("crashes", self.crashes), ("restarts", self.restarts), ("tracebacks", self.tracebacks),
            ("unanswered", self.unanswered), ("victim_failures", self.victim_failures),
            ("stranger_replies", self.stranger_replies),
        ) if figures[name] > bound]  # fmt: skip
        if figures["max_rss_mb"] > self.max_rss_mb:
            out.append(f"max_rss_mb = {figures['max_rss_mb']:.1f} (bound {self.max_rss_mb:g})")
        p99 = figures["victim_p99_ms"]
        if p99 is None or p99 > self.victim_p99_ms:
            out.append(f"victim_p99_ms = {p99} (bound {self.victim_p99_ms:g}; none means the victim made no call)")
        return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) of `values`, nearest rank; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Ledger:
    """Counts per socket what was sent and received, and which answers are still owed."""

    answer_by: float
    limit: int = MAX_MESSAGE_BYTES
    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    must: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    uncorrelated: int = 0
    stranger_replies: int = 0
    codes: Counter[int] = field(default_factory=Counter)
    _owed: dict[str, _Pending] = field(default_factory=dict)
    _maybe: set[str] = field(default_factory=set)
    _answered: set[str] = field(default_factory=set)
    reply_ms: list[float] = field(default_factory=list)

    def on_sent(self, shot: Shot, now: float) -> Expect:
        """Record a message that went out (call it only once the send succeeded)."""
        self.sent[shot.via] += 1
        expect, cid = expectation(shot.via, shot.frames, self.answer_by, self.limit)
        if cid is not None and (cid in self._owed or cid in self._maybe or cid in self._answered):
            # The same id twice: the broker rightly answers the pair once or twice.
            self._owed.pop(cid, None)
            self._maybe.add(cid)
            return Expect.MAYBE
        if expect is Expect.REPLY and cid is not None:
            self.must[shot.via] += 1
            self._owed[cid] = _Pending(shot, now)
        elif cid is not None:
            self._maybe.add(cid)
        return expect

    def on_received(self, via: Via, frames: Sequence[bytes], now: float) -> None:
        """Record a message a socket received; `frames` without the node's empty envelope."""
        self.received[via] += 1
        if via in _STRANGERS:
            self.stranger_replies += 1
            return
        if not frames:
            self.uncorrelated += 1
            return
        head = frames[0]
        cid = peek_header(head, "correlation_id")
        if peek_header(head, "type") == "error":
            err = peek_header(head, "error")
            if isinstance(err, dict) and isinstance(err.get("code"), int):
                self.codes[err["code"]] += 1
        if not isinstance(cid, str):
            self.uncorrelated += 1
            return
        pending = self._owed.pop(cid, None)
        if pending is not None:
            self._answered.add(cid)
            self.reply_ms.append((now - pending.sent_at) * 1000.0)
        elif cid in self._answered:
            self.duplicates += 1
        elif cid in self._maybe:
            self._maybe.discard(cid)
            self._answered.add(cid)

    @property
    def owed(self) -> int:
        """Messages that must be answered and are not yet."""
        return len(self._owed)

    def unanswered(self) -> list[Shot]:
        """The shots still owed an answer, oldest first."""
        return [p.shot for p in sorted(self._owed.values(), key=lambda p: p.sent_at)]

    def figures(self) -> dict[str, Any]:
        """The attack side of the summary (the runner adds the broker's and victim's)."""
        return {
            "sent": dict(self.sent),
            "received": dict(self.received),
            "must_answer": dict(self.must),
            "unanswered": self.owed,
            "duplicate_replies": self.duplicates,
            "uncorrelated_replies": self.uncorrelated,
            "stranger_replies": self.stranger_replies,
            "error_codes": {str(k): v for k, v in sorted(self.codes.items())},
            "attacker_reply_p99_ms": percentile(self.reply_ms, 0.99),
            "unanswered_examples": [
                {"who": s.who.value, "index": s.index, "via": s.via.value, "kind": s.kind, "frames": s.hex()}
                for s in self.unanswered()[:MAX_EXAMPLES]
            ],
        }
