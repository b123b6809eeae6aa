"""Exactly-once commands across a broker cluster: the bookkeeping of one broker.

Rules of this module:

* Sans-IO. The core asks `key()` for a command's cluster-wide key, records what it
  proposes (`propose_claim`, `propose_outcome`) and hands committed effects back; the
  loop carries `take_proposals()` to the cluster member and the member's committed
  entries into `SharedState`.
* A command of an `exactly_once` action runs only after its claim is committed: the
  claim names one node process (its `instance`) and the broker run that proposed it
  (its `claimant`: the broker's name and this run's number, see `next_run`). Only that
  run sends the command, to that node, once (`dispatched`), and only while no outcome is
  committed. Every other broker, and the same broker after a restart (a later run),
  waits for the outcome instead of sending it again. So a resend, a re-proposed claim,
  a snapshot restore or a failover never runs a command twice: the replicated log
  carries the guarantee, and the node's own resend table is a second line.
* Nodes send their reply to an exactly-once command to every broker: a broker that did
  not send it keeps the copy (`keep_copy`) and proposes it as the outcome when a caller
  waits there, so the outcome survives the death of the run that sent it.
* The price: a claim whose run goes silent (paused, cut off, dead) before it sends the
  command leaves its outcome unknown. A caller waiting elsewhere is told so `AWAIT_S`
  after the claim committed, rather than at its deadline.
* The reply is proposed as the command's outcome and sent to the client only once it
  is committed. A resend, to any broker and after any failover, gets that outcome.
* A token revoked on one broker is revoked there at once and proposed to the log; every
  broker (this one again, harmlessly) adds it to its revocations when it commits.
* An event published through one broker is proposed to the log; every broker numbers
  and delivers it when it commits, and this one acknowledges it to its publisher then.
* A proposal may be lost (a leader change); what waits for a commit is proposed again
  every `RETRY_S`, and at once when a new leader is known, until its effect arrives. The
  shared state keeps the first claim and the first outcome, so a repeated proposal
  changes nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Final

from ..cluster.shared import SharedState, claim_record, claimant, outcome_record, revoke_record, run_record

__all__ = ["next_run", "AWAIT_S", "RETRY_S", "CommandRef", "OnceTable", "event_key", "keyring_key", "once_key", "policy_key", "revoke_key"]

RETRY_S: Final = 1.0
# How long a command whose claim another broker run holds waits here for its outcome
# before its caller is told the outcome is unknown (that run may be paused or dead; a
# healthy one commits an outcome within milliseconds of the node's reply).
AWAIT_S: Final = 0.25
MAX_COPIES: Final = 10_000  # node reply copies kept for commands sent by another broker
MAX_OPEN_CLAIMS: Final = 10_000  # claims without an outcome whose commit time is kept
MAX_DISPATCHED: Final = 1024  # sent keys kept past this only while the log still holds their claim

CommandRef = tuple[bytes, str]  # a command on this broker: (client identity, command id)


def next_run(shared: SharedState, broker: str, clock_ns: int) -> int:
    """A run number for a broker starting now: above every run of it the log knows, and
    from the wall clock (in ns) so that one above runs the local log has not caught up with."""
    return max(clock_ns, shared.runs.get(broker, 0) + 1)


def revoke_key(jti: str) -> str:
    """The key a revocation's proposal waits under (apart from command keys, which hold `|`)."""
    return f"revoke {jti}"


def event_key(topic: str, event_id: str) -> str:
    """The key an event's proposal waits under."""
    return f"event {topic} {event_id}"


def keyring_key(digest: str) -> str:
    """The key a key ring's proposal waits under."""
    return f"keyring {digest}"


def policy_key(digest: str) -> str:
    """The key a policy's proposal waits under."""
    return f"policy {digest}"


def once_key(cid: str, service: str, action: str, subject: str | None) -> str:
    """The cluster-wide key of a command: the same on every broker a client may try.

    A client's connection (its ROUTER identity) changes with the broker, so it is not
    part of the key; the caller's subject is, so one caller cannot read another's outcome.
    """
    return f"{cid}|{service}.{action}|{subject or ''}"


class OnceTable:
    """What one broker waits for from the replicated log (see the module rules).

    Args:
        broker: this broker's name.
        run: this run's number, higher than every earlier run of this broker (`next_run`);
            with the name, it signs the claims proposed here.
        shared: the replicated state this broker's cluster member applies to.
    """

    def __init__(self, broker: str, run: int, shared: SharedState) -> None:
        self.broker = broker
        self.run = run
        self.claimant = claimant(broker, run)
        self.shared = shared
        self.waiting: dict[str, list[CommandRef]] = {}  # key -> commands (client, id) here
        self.running: dict[CommandRef, str] = {}  # dispatched (client, id) -> key
        # Keys this run has sent to a node: never sent again, whatever is proposed or restored.
        # Dropped once the key's outcome (or its forgetting) is committed.
        self.dispatched: set[str] = set()
        # Copies of node replies to commands another broker run sent (nodes send an
        # exactly-once reply to every broker): proposed as the outcome once a caller waits
        # here, so a command whose claimant died after sending it is still answered.
        self.copies: OrderedDict[str, list[bytes]] = OrderedDict()
        # Commands here that wait on another run's claim -> when to stop waiting.
        self.awaiting: dict[CommandRef, float] = {}
        # When this broker saw each claim without an outcome committed: how long it has waited.
        self.claimed_at: OrderedDict[str, float] = OrderedDict()
        self._proposals: list[bytes] = []
        # key -> (record, retry at), in the order of the retry times (`now` never goes back),
        # so that each turn looks only at the records due rather than at every one.
        self._unconfirmed: dict[str, tuple[bytes, float]] = {}
        self._outcomes: set[str] = set()  # the unconfirmed keys whose record is an outcome

    def wait(self, key: str, command: CommandRef) -> None:
        """`command` is answered when `key`'s claim or outcome is committed."""
        self.waiting.setdefault(key, []).append(command)

    def propose_claim(self, key: str, instance: str, now: float) -> None:
        if key not in self._unconfirmed:
            self._propose(key, claim_record(key, instance, self.claimant), now)

    def may_dispatch(self, key: str) -> str | None:
        """The node instance to send `key`'s command to now, or None: only when its committed
        claim is this run's own, it was never sent, and no outcome is committed."""
        claim = self.shared.claims.get(key)
        if claim is None or claim[1] != self.claimant or key in self.dispatched:
            return None
        if key in self.shared.outcomes or key in self.shared.forgotten:
            return None
        return claim[0]

    def settled(self, key: str) -> None:
        """`key`'s outcome (or its forgetting) is committed: nothing of it is sent again."""
        self.dispatched.discard(key)
        self.copies.pop(key, None)
        self.claimed_at.pop(key, None)

    def saw_claim(self, key: str, now: float) -> None:
        """`key`'s claim is committed (as this broker learns it at `now`)."""
        if key not in self.claimed_at:
            self.claimed_at[key] = now
            if len(self.claimed_at) > MAX_OPEN_CLAIMS:
                self.claimed_at.popitem(last=False)

    def await_outcome(self, command: CommandRef, key: str, now: float) -> bool:
        """`command` waits on `key`'s claim, which another run holds: until `AWAIT_S` after
        the claim committed (see `overdue`). False when that time is past already."""
        at = self.claimed_at.get(key, now) + AWAIT_S
        if at <= now:
            return False
        self.awaiting.setdefault(command, at)
        return True

    def overdue(self, now: float) -> list[CommandRef]:
        """The commands that have waited `AWAIT_S` for another run's outcome (forgotten here)."""
        due = [ref for ref, at in self.awaiting.items() if at <= now]
        for ref in due:
            del self.awaiting[ref]
        return due

    def keep_copy(self, key: str, reply: list[bytes]) -> None:
        """A node's reply to `key`, sent by another broker's run: kept until a caller waits here."""
        self.copies[key] = reply
        self.copies.move_to_end(key)
        if len(self.copies) > MAX_COPIES:
            self.copies.popitem(last=False)

    def propose_run(self, now: float) -> None:
        """Tell the cluster this run started: claims of earlier runs committed after it are void."""
        self._propose(f"run {self.claimant}", run_record(self.broker, self.run), now)

    def propose_revoke(self, jti: str, expires: float, now: float) -> None:
        """A token revoked here: every broker of the cluster refuses it once committed."""
        self._propose(revoke_key(jti), revoke_record(jti, expires), now)

    def propose_event(self, topic: str, event_id: str, record: bytes, now: float) -> None:
        """An event published here: every broker numbers and delivers it once committed."""
        self._propose(event_key(topic, event_id), record, now)

    def propose_policy(self, digest: str, record: bytes, now: float) -> None:
        """An access policy (the one read at start, or `mesh.policy`'s) for the whole cluster."""
        self._propose(policy_key(digest), record, now)

    def propose_keyring(self, digest: str, record: bytes, now: float) -> None:
        """The payload key ring's metadata as this broker's state directory holds it."""
        self._propose(keyring_key(digest), record, now)

    def propose_outcome(self, key: str, reply: list[bytes], now: float) -> None:
        self._outcomes.add(key)
        self._propose(key, outcome_record(key, reply), now)

    def _propose(self, key: str, record: bytes, now: float) -> None:
        self._unconfirmed.pop(key, None)  # to the end: the latest retry time
        self._unconfirmed[key] = (record, now + RETRY_S)
        self._proposals.append(record)

    def confirmed(self, key: str, *, outcome: bool) -> None:
        """`key`'s claim (or outcome) is in the log: stop proposing it."""
        if outcome or key not in self._outcomes:
            self._unconfirmed.pop(key, None)
            self._outcomes.discard(key)

    def propose_again(self) -> None:
        """Propose every unconfirmed record at the next `take_proposals` (a new leader:
        what the member forwarded to the old one may be lost with it)."""
        for key, (record, _) in self._unconfirmed.items():
            self._unconfirmed[key] = (record, 0.0)

    def take_proposals(self, now: float) -> list[bytes]:
        """Records to propose: new ones, and those unconfirmed past `RETRY_S`."""
        due = []
        for key, (_, at) in self._unconfirmed.items():
            if at > now:
                break
            due.append(key)
        for key in due:
            self._propose(key, self._unconfirmed[key][0], now)
        out, self._proposals = self._proposals, []
        return out

    def forget_done(self, alive: Mapping[CommandRef, object]) -> None:
        """Drop waiters whose commands are retired (deadline, client gone, cancelled).

        A claim nobody waits for is no longer proposed; an outcome is, until committed,
        so that a resend after the deadline still finds it.
        """
        for key in [k for k, cmds in self.waiting.items() if not any(c in alive for c in cmds)]:
            del self.waiting[key]
            if key not in self._outcomes:
                self._unconfirmed.pop(key, None)
        if len(self.dispatched) > MAX_DISPATCHED:  # keys whose outcome never came, claims since dropped
            self.dispatched = {k for k in self.dispatched if k in self.shared.claims}

    def stats(self) -> dict[str, int]:
        return {
            "waiting": len(self.waiting),
            "running": len(self.running),
            "dispatched": len(self.dispatched),
            "copies": len(self.copies),
            "awaiting": len(self.awaiting),
            "claims_open": len(self.claimed_at),
            "unconfirmed": len(self._unconfirmed),
            "claims": len(self.shared.claims),
            "outcomes": len(self.shared.outcomes),
            "outcome_bytes": self.shared.outcome_bytes,
        }
