"""What a broker of a cluster runs through the replicated log: exactly-once commands,
events, revocations, the access policy and the payload key ring.

Rules of this module:

* Only the broker run whose claim on an exactly-once command is committed sends it
  (`OnceTable`); every copy of the command waiting anywhere is answered with the
  committed outcome, and a resend after that gets the outcome without running.
* An error proving the command never started is answered at once and not committed.
* Events are numbered when committed, by every broker alike; the publisher's
  acknowledgement waits for the commit. A policy change is answered once committed.
* `apply` acts on what the log committed since the last call; nothing here waits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from ...cluster.messages import MAX_PROPOSAL_BYTES
from ...cluster.shared import (
    Claimed,
    Committed,
    Forgotten,
    KeyRingSet,
    PolicySet,
    Published,
    Restored,
    Revoked,
    RunStarted,
    SharedState,
    check_ring,
    event_record,
    keyring_digest,
    keyring_record,
    parse_claimant,
    policy_digest,
    policy_record,
)
from ...protocol import (
    NEVER_STARTED,
    CommandEvent,
    CommandState,
    Header,
    InvalidStateError,
    MeshError,
    MessageTooLargeError,
    NetworkError,
    NodeLostError,
    ResourceExhaustedError,
    UnavailableError,
    ValidationFailedError,
    advance,
    decode_payload,
    encode_header,
    encode_payload,
    peek_header,
    response_to,
)
from ...security.policy import PolicyError, policy_from_text
from ..config import BrokerConfig
from ..events import check_publishable
from ..once import OnceTable, event_key, keyring_key, policy_key, revoke_key
from ..registry import NodeInfo, Registry
from .commands import CommandBook, Key
from .state import (
    BrokerSecurity,
    Command,
    ConnectionState,
    Outgoing,
    Side,
    error_code,
    error_frames,
    event_ack,
    event_refused,
    ran_on,
    to_peer,
)

__all__ = ["Replicated", "MAX_OUTCOME_REPLY_BYTES", "MAX_UNCOMMITTED_EVENTS", "MAX_POLICY_CHANGES"]

MAX_UNCOMMITTED_EVENTS: Final = 10_000  # events waiting for their commit
MAX_POLICY_CHANGES: Final = 100  # mesh.policy calls waiting for their commit
# An exactly-once reply goes into one log entry with its key and framing.
MAX_OUTCOME_REPLY_BYTES: Final = MAX_PROPOSAL_BYTES - 64 * 1024


class Replicated:
    """A broker's part in the cluster's replicated state (`once` is None until it joins).

    Args:
        config: the broker's limits and name.
        security: the gate and revocations, or None (security off).
        registry: the nodes exactly-once commands are claimed for.
        book: the broker's commands, which the outcomes answer.
        counters: the broker's counters.
        publish: hands committed events' frames to subscribers.
    """

    def __init__(
        self, config: BrokerConfig, security: BrokerSecurity | None, registry: Registry, book: CommandBook,
        counters: Counter[str], publish: Callable[[list[bytes]], None],
    ) -> None:  # fmt: skip
        self.config = config
        self.security = security
        self.registry = registry
        self.book = book
        self.counters = counters
        self._publish = publish
        self.once: OnceTable | None = None
        # (topic, id) of each event waiting for its commit -> who to acknowledge.
        self.event_acks: dict[tuple[str, str], tuple[Side, bytes, dict[str, Any]]] = {}
        # Each change proposed by mesh.policy -> who to answer.
        self.policy_acks: dict[str, list[tuple[Side, bytes, Header]]] = {}

    # ------------------------------------------------------------- membership

    def join_cluster(self, shared: SharedState, now: float, *, run: int) -> None:
        """See `Broker.join_cluster`."""
        self.once = OnceTable(self.config.name, run, shared)
        self.once.propose_run(now)
        if self.security is None:
            return
        if shared.policy is not None:
            self.install_policy(shared.policy)
        if self.security.revocations is not None:
            for jti, expires in shared.revoked.items():  # committed before a crash, maybe never acted on
                self.security.revocations.revoke(jti, expires, now)
        text = self.security.gate.policy.text
        if text is not None:
            self.once.propose_policy(policy_digest(text), policy_record(text), now)

    def offer_keyring(self, ring: dict[str, Any], now: float) -> bool:
        """See `Broker.offer_keyring`."""
        check_ring(ring)
        once = self.once
        if once is None or once.shared.keyring is not None and ring["generation"] <= once.shared.keyring["generation"]:
            return False
        once.propose_keyring(keyring_digest(ring), keyring_record(ring), now)
        return True

    def install_policy(self, text: str) -> None:
        """Put the committed policy `text` in force (it was checked before it was proposed)."""
        assert self.security is not None
        gate = self.security.gate
        if gate.policy.text == text:
            return
        try:
            gate.policy = policy_from_text(text, f"the cluster's log ({policy_digest(text)})")
        except PolicyError:
            self.counters["policy_invalid"] += 1  # a newer broker's policy: keep the one in force
            return
        self.counters["policy_changes"] += 1

    # -------------------------------------------------------- exactly once

    def command(self, cmd: Command, conn: ConnectionState, key: str, now: float) -> list[Outgoing]:
        """An exactly-once command: its committed outcome, or a claim to run it, or a wait.

        Only the broker run whose claim is committed sends the command (`OnceTable`); a
        resend that finds another's claim waits here for the outcome.
        """
        once = self.once
        assert once is not None
        outcome = once.shared.outcomes.get(key)
        if outcome is not None:
            self.counters["once_replayed"] += 1
            return [(Side.CLIENT, cmd.client, list(outcome))]
        if key in once.shared.forgotten:
            return self.book.refuse(cmd.client, cmd.id, _forgotten(cmd), now, command=(cmd.service, cmd.action))
        claim = once.shared.claims.get(key)
        node = None if claim is not None else self.registry.pick(cmd.service, cmd.action)
        if claim is None and (node is None or node.instance is None):
            # No queue here: a queued command would need a claim for a node not yet chosen.
            return self.book.refuse(
                cmd.client, cmd.id,
                ResourceExhaustedError(f"every node of {cmd.service} is busy", details={"exactly_once": True}),
                now, command=(cmd.service, cmd.action),
            )  # fmt: skip
        cmd.once = key
        self.book.track(cmd, conn)
        once.wait(key, (cmd.client, cmd.id))
        if claim is None:
            assert node is not None and node.instance is not None
            once.propose_claim(key, node.instance, now)
            self.counters["once_claims"] += 1
            return []
        if claim[1] == once.claimant:
            return self._start(key, now)
        if self.registry.by_instance(claim[0]) is None:
            return [self.book.fail(cmd, _claimed_node_gone(cmd), now, CommandEvent.FAIL)]
        self.counters["once_awaited"] += 1  # another broker (or run) sends it: await its outcome
        copy = once.copies.pop(key, None)
        if copy is not None:
            once.propose_outcome(key, copy, now)
            self.counters["once_outcomes_copied"] += 1
        elif not once.await_outcome((cmd.client, cmd.id), key, now):
            return [self._outcome_unknown(cmd, claim[1], now)]
        return []

    def _start(self, key: str, now: float) -> list[Outgoing]:
        """Send `key`'s command if this run may (`OnceTable.may_dispatch`): the first of its
        waiting copies goes, once; the others are answered with the outcome. When another
        run holds the claim, what waits here waits `AWAIT_S` for its outcome."""
        once = self.once
        assert once is not None
        instance = once.may_dispatch(key)
        if instance is None:
            claim = once.shared.claims.get(key)
            if claim is not None and claim[1] != once.claimant:
                for ref in once.waiting.get(key, ()):
                    once.await_outcome(ref, key, now)  # answered by the next tick when it is past
            return []
        for ref in once.waiting.get(key, ()):
            cmd = self.book.commands.get(ref)
            if cmd is not None and cmd.once == key and cmd.state is CommandState.RECEIVED:
                return self._dispatch(cmd, instance, now)
        return []

    def _dispatch(self, cmd: Command, instance: str, now: float) -> list[Outgoing]:
        """Send a claimed command to the node process its claim names, and to no other."""
        assert self.once is not None and cmd.once is not None
        node = self.registry.by_instance(instance)
        if node is None:
            return [self.book.fail(cmd, _claimed_node_gone(cmd), now, CommandEvent.FAIL)]
        self.once.dispatched.add(cmd.once)
        self.once.running[(cmd.client, cmd.id)] = cmd.once
        self.counters["once_dispatched"] += 1
        return [self.book.dispatch(cmd, node)]

    def reply(self, key: Key, ident: bytes, header: dict[str, Any], answer: list[bytes], now: float) -> list[Outgoing]:
        """A node's reply to an exactly-once command: proposed as its outcome, answered on commit.

        An error proving the command never started is answered at once (the client
        retries it by itself) and not committed: the claimed node may still run it later.
        """
        once = self.once
        assert once is not None
        okey = once.running.pop(key)
        cmd = self.book.commands.get(key)
        mine = cmd is not None and cmd.state is CommandState.DISPATCHED and ran_on(cmd, ident)
        node = self.registry.nodes.get(ident)
        if node is not None:
            node.completed += 1
        if error_code(header) in NEVER_STARTED:
            once.dispatched.discard(okey)  # the node proved it did not start it: a resend may go again
            if mine:
                assert cmd is not None
                self.book.finish(cmd, CommandEvent.FAIL)
                return [(Side.CLIENT, key[0], answer)]
            return []
        if okey not in once.shared.outcomes:
            size = sum(map(len, answer))
            if size > MAX_OUTCOME_REPLY_BYTES:  # it ran: commit that, since the reply cannot be
                answer = error_frames(MessageTooLargeError(
                    f"the command ran, but its reply of {size} bytes is over what the cluster's log keeps "
                    f"as an exactly-once outcome ({MAX_OUTCOME_REPLY_BYTES} bytes); it is not run again",
                    details={"limit": MAX_OUTCOME_REPLY_BYTES, "exactly_once": True},
                ), now, key[1])  # fmt: skip
            once.propose_outcome(okey, answer, now)
            self.counters["once_outcomes"] += 1
        if mine:
            assert cmd is not None
            cmd.node = None  # the node is done with it; the client waits for the commit
        return []

    def copy(self, node: NodeInfo | None, cid: str, header: dict[str, Any], answer: list[bytes], now: float) -> bool:
        """A node's reply to an exactly-once command this run does not wait for from it: sent
        by another broker (or an earlier run of this one), or answered NODE_LOST here before
        the node spoke again. Kept, or proposed as the outcome at once when a caller waits
        here (its claimant may be dead). True when it was such a reply."""
        once = self.once
        assert once is not None
        key = once.shared.claim_ids.get(cid)
        if key is None or node is None or key in once.shared.outcomes or key in once.shared.forgotten:
            return False
        claim = once.shared.claims.get(key)
        if claim is None or claim[0] != node.instance:
            return False  # not from the node that holds the claim
        if error_code(header) in NEVER_STARTED:
            return True
        if key in once.waiting:
            once.propose_outcome(key, answer, now)
            self.counters["once_outcomes_copied"] += 1
        else:
            once.keep_copy(key, answer)
        return True

    def overdue(self, now: float) -> list[Outgoing]:
        """Tell callers whose command waited `AWAIT_S` on another run's claim that its outcome
        is unknown (it may have run), rather than hold them to their deadline: that run may
        be paused or dead, and only it may send the command."""
        once = self.once
        assert once is not None
        out: list[Outgoing] = []
        for ref in once.overdue(now):
            cmd = self.book.commands.get(ref)
            if cmd is None or cmd.once is None or cmd.state is not CommandState.RECEIVED:
                continue
            claim = once.shared.claims.get(cmd.once)
            if claim is None or cmd.once in once.shared.outcomes:
                continue
            out.append(self._outcome_unknown(cmd, claim[1], now))
        return out

    def _outcome_unknown(self, cmd: Command, claimant: str, now: float) -> Outgoing:
        holder = parse_claimant(claimant)[0]
        err = NetworkError(
            f"{cmd.service}.{cmd.action} is claimed by broker {holder}, which has not committed its outcome: "
            "it may have run; resend it with the same id later to learn it",
            details={"exactly_once": True, "claimed_by": holder, "outcome": "unknown"},
        )
        self.counters["once_unknown"] += 1
        return self.book.fail(cmd, err, now, CommandEvent.FAIL)

    # ---------------------------------------------------------------- apply

    def apply(self, now: float) -> list[Outgoing]:
        """See `Broker.apply_shared`."""
        once = self.once
        if once is None:
            return []
        out: list[Outgoing] = []
        for effect in once.shared.take_effects():
            if isinstance(effect, Claimed):
                once.confirmed(effect.key, outcome=False)
                if effect.key not in once.shared.outcomes:
                    once.saw_claim(effect.key, now)
                out.extend(self._start(effect.key, now))
            elif isinstance(effect, Committed):
                once.confirmed(effect.key, outcome=True)
                out.extend(self._answer(effect.key, effect.reply))
            elif isinstance(effect, Forgotten):
                once.confirmed(effect.key, outcome=True)
                out.extend(self._forget(effect.key, now))
            elif isinstance(effect, RunStarted):
                once.confirmed(f"run {effect.claimant}", outcome=False)
            elif isinstance(effect, Restored):
                out.extend(self._reconcile(now))
            elif isinstance(effect, Published):
                out.extend(self._published(effect, now))
            elif isinstance(effect, KeyRingSet):
                once.confirmed(keyring_key(effect.proposed), outcome=False)
            elif isinstance(effect, PolicySet):
                out.extend(self._policy_set(effect, now))
            elif isinstance(effect, Revoked):
                self._revoked(effect, now)
        return out

    def _published(self, effect: Published, now: float) -> list[Outgoing]:
        """An event is committed: it goes to subscribers, and its publisher (if here) is told."""
        assert self.once is not None
        self.once.confirmed(event_key(effect.topic, effect.id), outcome=False)
        if effect.frames is not None:
            self._publish(effect.frames)
            self.counters["events_committed"] += 1
        waiting = self.event_acks.pop((effect.topic, effect.id), None)
        if waiting is None:
            return []
        side, ident, header = waiting
        if effect.error is not None:
            return [event_refused(self.counters, side, ident, header, effect.error, now)]
        return [event_ack(side, ident, header, effect.seq, now)]

    def _policy_set(self, effect: PolicySet, now: float) -> list[Outgoing]:
        """A policy is committed: it is in force, and the callers who changed it are answered."""
        assert self.once is not None
        self.once.confirmed(policy_key(effect.proposed), outcome=False)
        if self.security is not None:
            self.install_policy(effect.text)
        out: list[Outgoing] = []
        for side, ident, header in self.policy_acks.pop(effect.proposed, ()):
            answer = encode_payload({"policy": policy_digest(effect.text)})
            out.append(to_peer(side, ident, [encode_header(response_to(header, now=now)), answer]))
        return out

    def _revoked(self, effect: Revoked, now: float) -> None:
        """A revocation is committed: this broker refuses the token too."""
        assert self.once is not None
        self.once.confirmed(revoke_key(effect.jti), outcome=False)
        revocations = self.security.revocations if self.security is not None else None
        if revocations is not None:
            try:
                revocations.revoke(effect.jti, effect.expires, now)  # refused here even if the write fails
            except MeshError:
                self.counters["revocations_unsaved"] += 1
            self.counters["revocations_applied"] += 1

    def _answer(self, key: str, reply: tuple[bytes, bytes]) -> list[Outgoing]:
        """`key`'s outcome is committed: every copy of the command waiting here gets it."""
        assert self.once is not None
        self.once.settled(key)
        failed = peek_header(reply[0], "type") == "error"
        out: list[Outgoing] = []
        for ref in self.once.waiting.pop(key, ()):
            cmd = self.book.commands.get(ref)
            if cmd is None or cmd.once != key:
                continue
            if cmd.state is CommandState.RECEIVED:
                cmd.state = advance(cmd.state, CommandEvent.DISPATCH)  # it ran, through another broker
            self.book.finish(cmd, CommandEvent.FAIL if failed else CommandEvent.RESPOND)
            out.append((Side.CLIENT, cmd.client, list(reply)))
        return out

    def _forget(self, key: str, now: float) -> list[Outgoing]:
        """`key`'s outcome was dropped for room: what waits for it is refused, not run."""
        assert self.once is not None
        self.once.settled(key)
        out: list[Outgoing] = []
        for ref in self.once.waiting.pop(key, ()):
            cmd = self.book.commands.get(ref)
            if cmd is not None and cmd.once == key:
                out.append(self.book.fail(cmd, _forgotten(cmd), now, CommandEvent.FAIL))
        return out

    def _reconcile(self, now: float) -> list[Outgoing]:
        """After a snapshot restore: settle every waiting command by what the log now holds.

        Its claims and outcomes arrived without effects, so each key waited for here is
        answered (outcome), refused (forgotten), sent (a claim of this run, never sent) or
        left waiting (another's claim, or none yet: its proposal is repeated).
        """
        once = self.once
        assert once is not None
        shared = once.shared
        out: list[Outgoing] = []
        for key in list(once.waiting):
            outcome = shared.outcomes.get(key)
            if outcome is not None:
                once.confirmed(key, outcome=True)
                out.extend(self._answer(key, outcome))
            elif key in shared.forgotten:
                once.confirmed(key, outcome=True)
                out.extend(self._forget(key, now))
            elif key in shared.claims:
                once.confirmed(key, outcome=False)
                out.extend(self._start(key, now))
        self.counters["once_restores"] += 1
        return out

    # ------------------------------------------------------------ proposals

    def propose_event(
        self, side: Side, ident: bytes, header: dict[str, Any], payload: bytes, now: float, sender: str | None
    ) -> list[Outgoing]:
        """Send a publisher's event through the log; it is acknowledged when committed.

        Raises:
            MeshError: the topic may not be published, too many events wait, or the
                event is too large for one log entry.
        """
        assert self.once is not None
        topic = header["topic"]
        check_publishable(topic)
        if len(self.event_acks) >= MAX_UNCOMMITTED_EVENTS:
            raise UnavailableError(
                f"{MAX_UNCOMMITTED_EVENTS} events wait for the cluster to commit them (is a majority of brokers up?)",
                details={"uncommitted": len(self.event_acks)},
            )
        record = event_record(header, payload, sender)
        if len(record) > MAX_PROPOSAL_BYTES:
            raise MessageTooLargeError(
                f"an event of {len(payload)} bytes is over what the cluster's log takes ({MAX_PROPOSAL_BYTES} bytes)",
                details={"limit": MAX_PROPOSAL_BYTES},
            )
        self.event_acks[(topic, header["id"])] = (side, ident, header)
        self.once.propose_event(topic, header["id"], record, now)
        return []

    def propose_policy(self, ident: bytes, header: Header, payload: bytes, now: float, side: Side) -> list[Outgoing]:
        """`mesh.policy`: a new access policy for every broker of the cluster, answered once
        committed. The gate has already checked that the caller's role may call it.

        Raises:
            MeshError: security is off, there is no cluster, the policy is invalid, or
                too many changes wait for their commit.
        """
        if self.security is None:
            raise InvalidStateError("security is off: there is no access policy to change", details={"action": "policy"})
        if self.once is None:
            raise InvalidStateError(
                "mesh.policy changes a cluster's policy; a single broker reads policy.toml from its state directory at start",
                details={"action": "policy"},
            )
        request = decode_payload(payload)
        text = request.get("policy") if isinstance(request, dict) else None
        if not isinstance(text, str):
            raise ValidationFailedError("policy: the new policy, as TOML text", details={"field": "policy"})
        try:
            policy_from_text(text, "mesh.policy")
        except PolicyError as exc:
            raise ValidationFailedError(
                f"policy: {len(exc.problems)} problem(s): " + "; ".join(str(p) for p in exc.problems),
                details={"field": "policy", "problems": [str(p) for p in exc.problems]},
            ) from None
        if sum(len(v) for v in self.policy_acks.values()) >= MAX_POLICY_CHANGES:
            raise UnavailableError("policy changes wait for the cluster to commit them (is a majority of brokers up?)")
        change = f"{self.config.name}:{header.id}"  # one change, however often it is proposed
        self.policy_acks.setdefault(change, []).append((side, ident, header))
        self.once.propose_policy(change, policy_record(text, change=change), now)
        self.counters["policy_proposed"] += 1
        return []


def _claimed_node_gone(cmd: Command) -> NodeLostError:
    return NodeLostError(
        f"the node claimed to run {cmd.service}.{cmd.action} is gone; the command may have run",
        details={"exactly_once": True},
    )


def _forgotten(cmd: Command) -> InvalidStateError:
    return InvalidStateError(
        f"{cmd.service}.{cmd.action} with this id ran already; its outcome is no longer kept",
        details={"exactly_once": True, "outcome": "forgotten"},
    )
