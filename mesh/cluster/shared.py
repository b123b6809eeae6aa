"""The state the brokers of a cluster share: what the replicated log's entries mean.

Rules of this module:

* Sans-IO and deterministic: `apply` is called with the committed entries in log order
  on every broker, and must leave every broker in the same state. Nothing here reads a
  clock or a random source; what varies (a broker's name, a node's id) is in the record.
* Each entry is one MessagePack map with an `op` (`claim`, `outcome`, `run`, `revoke`,
  `event`, `policy`, `keyring`). An
  entry that is not a valid record (a bug, or a newer broker's op) is counted in
  `invalid` and skipped, the same way on every broker.
* Exactly-once bookkeeping: the first `claim` of a command key wins and later ones are
  ignored; the first `outcome` wins. A `run` entry records that a broker started a new
  run (a restart); a claim of one of its earlier runs committed after it is void: that
  run was over before the claim committed, so it never sent the command. Both tables are bounded (`max_commands` keys,
  oldest out first, by log order), so the state, and each snapshot, stays small. The
  outcomes' bytes are bounded too (`max_outcome_bytes`): past it, the oldest outcome is
  dropped but its key is kept as `forgotten`, so that a resend is refused, not run again.
* Events: every broker numbers the committed events in log order with its own event
  bus, so the sequence numbers agree across the cluster and a subscriber can move to
  another broker and replay from where it was. An event is told apart by its topic and
  id: a second proposal of it (a retry after a leader change) is not published again.
  The event records carry the publisher's id, time, topic and metadata, never its
  security map.
* The access policy: the first `policy` entry sets it (each broker proposes the one it
  read from its state directory: the first committed wins) and one marked `replace`
  (`mesh.policy`) changes it. The text is kept as it came; every broker checks it the
  same way when it acts on it.
* Key-ring metadata: the payload key ring's key ids with their activation and
  retirement times, never the keys (they stay with clients and nodes). A `keyring`
  entry replaces the one in force only if its `generation` (the number of rotations
  that made it) is higher, so a machine with an older copy of the ring file cannot
  roll the cluster's view back.
* What the broker must act on (a claim or outcome committed, a token revoked, an event
  published) is collected as effects, in log order, for `take_effects`.
* `snapshot()` / `restore()` carry the whole state; a snapshot is itself a MessagePack
  map with a format version. `capture()` copies the state now and packs it when asked,
  in whichever thread asks (the snapshot is the same bytes).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgpack

from ..protocol import MeshError, ResourceExhaustedError

__all__ = [
    "MAX_COMMANDS",
    "Claimed",
    "Committed",
    "Forgotten",
    "KeyRingSet",
    "Effect",
    "EventSink",
    "PolicySet",
    "Published",
    "Restored",
    "Revoked",
    "RunStarted",
    "SharedState",
    "claim_record",
    "event_record",
    "outcome_record",
    "check_ring",
    "keyring_digest",
    "keyring_record",
    "policy_digest",
    "policy_record",
    "revoke_record",
    "run_record",
    "claimant",
    "parse_claimant",
]

MAX_COMMANDS: Final = 100_000  # exactly-once command keys remembered (claims and outcomes)
# Outcome bytes kept: they are in every broker's memory and in every snapshot.
MAX_OUTCOME_BYTES: Final = 16 * 1024 * 1024
MAX_EVENT_IDS: Final = 100_000  # events remembered, to publish each once however often proposed
MAX_POLICY_CHANGES: Final = 10_000  # mesh.policy change ids remembered, to apply each once
MAX_RING_KEYS: Final = 1_000  # key ids in one key-ring entry
EVENT_SNAPSHOT_BYTES: Final = 16 * 1024 * 1024  # newest retained events carried by a snapshot
SNAPSHOT_VERSION: Final = 1
SNAPSHOT_SLICE: Final = 2_000  # items packed per call when a snapshot is packed (SharedState.capture)
Reshape = Callable[[list[Any]], list[Any]]


@dataclass(frozen=True, slots=True)
class Claimed:
    """The command `key` is to run on node process `node` (claimed by broker `broker`)."""

    key: str
    node: str
    broker: str


@dataclass(frozen=True, slots=True)
class Committed:
    """The outcome of command `key` is committed: `reply` is its [header, payload]."""

    key: str
    reply: tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Forgotten:
    """An outcome of command `key` was committed after its first outcome (or its claim)
    was forgotten for room: nothing can answer it any more, and it is not run again."""

    key: str


@dataclass(frozen=True, slots=True)
class RunStarted:
    """Broker run `claimant` (`claimant()`) is recorded as started."""

    claimant: str


@dataclass(frozen=True, slots=True)
class Restored:
    """The state was replaced by a snapshot: the claims and outcomes it brought came with
    no `Claimed` or `Committed` effects, so the broker reconciles what it waits for."""


@dataclass(frozen=True, slots=True)
class Revoked:
    """A token id revoked cluster-wide, remembered until `expires` (epoch seconds)."""

    jti: str
    expires: float


@dataclass(frozen=True, slots=True)
class Published:
    """The event `id` of `topic` is committed: numbered `seq`, `frames` for subscribers.

    `frames` is None when it was published before (a repeated proposal; `seq` is the
    number it got then) or was refused (`error`, the same on every broker).
    """

    topic: str
    id: str
    seq: int
    frames: list[bytes] | None
    error: MeshError | None = None


@dataclass(frozen=True, slots=True)
class PolicySet:
    """A `policy` entry committed: `text` is the policy in force after it (changed or not),
    `proposed` the digest of the text the entry proposed."""

    proposed: str
    text: str


@dataclass(frozen=True, slots=True)
class KeyRingSet:
    """A `keyring` entry committed: `ring` is the metadata in force after it (changed or
    not), `proposed` the digest of the metadata the entry proposed."""

    proposed: str
    ring: dict[str, Any]


Effect = Claimed | Committed | Forgotten | Restored | RunStarted | Revoked | Published | PolicySet | KeyRingSet


class EventSink(Protocol):
    """The broker's event bus, as the shared state uses it (`mesh.broker.events.EventBus`)."""

    def publish(
        self, published: Mapping[str, Any], payload: bytes, sender: str | None = None
    ) -> tuple[int, list[bytes]]: ...

    def snapshot_topics(self, max_bytes: int) -> dict[str, Any]: ...

    def restore_topics(self, snap: Mapping[str, Any]) -> None: ...


def _pack(record: Mapping[str, Any]) -> bytes:
    return msgpack.packb(record, use_bin_type=True)


def _pack_in_slices(fields: Mapping[str, Any], tables: Mapping[str, tuple[list[Any], Reshape]]) -> bytes:
    """`_pack(fields)`, byte for byte, where a field named in `tables` is that list's items
    reshaped by its function: a MessagePack array is its header and then its items, so it
    is packed `SNAPSHOT_SLICE` items per call, and a thread doing this lets the others run
    in between."""
    packer = msgpack.Packer(use_bin_type=True)
    out = [packer.pack_map_header(len(fields))]
    for name, value in fields.items():
        out.append(packer.pack(name))
        if name not in tables:
            out.append(packer.pack(value))
            continue
        items, reshape = tables[name]
        out.append(packer.pack_array_header(len(items)))
        for start in range(0, len(items), SNAPSHOT_SLICE):
            part = reshape(items[start : start + SNAPSHOT_SLICE])
            out.append(packer.pack(part)[len(packer.pack_array_header(len(part))) :])
    return b"".join(out)


def claim_record(key: str, node: str, broker: str) -> bytes:
    """The log entry claiming command `key` for node process `node`."""
    return _pack({"op": "claim", "key": key, "node": node, "broker": broker})


def outcome_record(key: str, reply: tuple[bytes, bytes] | list[bytes]) -> bytes:
    """The log entry committing command `key`'s reply frames [header, payload]."""
    return _pack({"op": "outcome", "key": key, "reply": [bytes(reply[0]), bytes(reply[1])]})


def event_record(published: Mapping[str, Any], payload: bytes, sender: str | None = None) -> bytes:
    """The log entry publishing an event (the publisher's validated header map): its
    id, time, topic and metadata, its `security` map without the token (a signature
    and encryption info, so subscribers of every broker can check them), the
    publisher's authenticated name when security is on, and its payload frame."""
    event = {k: published[k] for k in ("id", "ts", "topic", "metadata") if k in published}
    security = {k: v for k, v in (published.get("security") or {}).items() if k != "token"}
    if security:
        event["security"] = security
    if sender is not None:
        event["sender"] = sender
    return _pack({"op": "event", "event": event, "payload": bytes(payload)})


def policy_digest(text: str) -> str:
    """A short name for a policy text, the same on every broker."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def policy_record(text: str, *, change: str | None = None) -> bytes:
    """The log entry proposing an access policy (TOML text): without `change`, the one a
    broker read at start (counts only if none is committed); with it, a change
    (`mesh.policy`) under its unique id, applied once however often it is proposed."""
    return _pack({"op": "policy", "text": text, "change": change})


def keyring_digest(ring: Mapping[str, Any]) -> str:
    """A short name for key-ring metadata, the same on every broker."""
    return hashlib.sha256(_pack(ring)).hexdigest()[:16]


def keyring_record(ring: Mapping[str, Any]) -> bytes:
    """The log entry proposing key-ring metadata (`KeyRing.metadata()`)."""
    return _pack({"op": "keyring", "ring": dict(ring)})


def run_record(broker: str, run: int) -> bytes:
    """The log entry saying broker `broker` started its run number `run` (its earlier runs are over)."""
    return _pack({"op": "run", "broker": broker, "run": run})


def claimant(broker: str, run: int) -> str:
    """How a claim names the broker run that proposed it."""
    return f"{broker}/{run}"


def parse_claimant(name: str) -> tuple[str, int | None]:
    """The broker and run number of a `claimant()` (None: a claim of an older broker
    that named no run)."""
    broker, _, run = name.rpartition("/")
    return (broker, int(run)) if broker and run.isdigit() else (name, None)


def revoke_record(jti: str, expires: float) -> bytes:
    """The log entry revoking token id `jti` until `expires`."""
    return _pack({"op": "revoke", "jti": jti, "expires": float(expires)})


class SharedState:
    """The replicated state machine of a broker cluster (see the module rules).

    Args:
        max_commands: exactly-once command keys kept, oldest forgotten first.
        max_outcome_bytes: bytes of committed outcomes kept, oldest dropped first.
        events: the broker's event bus, which numbers and retains committed events;
            without one, event entries count as invalid.
    """

    def __init__(
        self, max_commands: int = MAX_COMMANDS, events: EventSink | None = None,
        max_outcome_bytes: int = MAX_OUTCOME_BYTES,
    ) -> None:  # fmt: skip
        self.max_commands = max_commands
        self.max_outcome_bytes = max_outcome_bytes
        self.events = events
        self.event_ids: OrderedDict[tuple[str, str], int] = OrderedDict()  # (topic, id) -> seq
        self.policy: str | None = None  # the access policy in force (TOML text)
        self.policy_changes: OrderedDict[str, None] = OrderedDict()  # ids of mesh.policy changes applied
        self.keyring: dict[str, Any] | None = None  # the payload key ring's metadata in force
        self.claims: OrderedDict[str, tuple[str, str]] = OrderedDict()  # key -> (node, broker)
        self.claim_ids: dict[str, str] = {}  # command id -> its claimed key (the newest, if ids repeat)
        self.runs: dict[str, int] = {}  # broker name -> the highest run number it started
        self.void_claims = 0  # claims committed after their broker's run was over
        self.outcomes: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()  # in commit order
        self.outcome_bytes = 0
        self.forgotten: set[str] = set()  # claimed keys whose outcome was dropped for room
        self.revoked: dict[str, float] = {}
        self.applied = 0  # index of the last entry applied
        self.invalid = 0  # entries that were not valid records
        self._effects: list[Effect] = []

    def take_effects(self) -> list[Effect]:
        """What the committed entries since the last call mean for the broker, in order."""
        out, self._effects = self._effects, []
        return out

    def apply(self, index: int, data: bytes) -> None:
        """Apply the committed entry at `index` (entries arrive once each, in order)."""
        self.applied = index
        try:
            record = msgpack.unpackb(data, raw=False)
            op = record["op"] if isinstance(record, dict) else None
            if op == "claim":
                self._claim(_text(record, "key"), _text(record, "node"), _text(record, "broker"))
            elif op == "outcome":
                reply = record.get("reply")
                if not (isinstance(reply, list) and len(reply) == 2 and all(isinstance(f, bytes) for f in reply)):
                    raise ValueError("reply")
                self._outcome(_text(record, "key"), (reply[0], reply[1]))
            elif op == "run":
                run = record.get("run")
                if isinstance(run, bool) or not isinstance(run, int):
                    raise ValueError("run")
                broker = _text(record, "broker")
                self.runs[broker] = max(self.runs.get(broker, run), run)
                self._effects.append(RunStarted(claimant(broker, run)))
            elif op == "revoke":
                expires = record.get("expires")
                if isinstance(expires, bool) or not isinstance(expires, (int, float)):
                    raise ValueError("expires")
                jti = _text(record, "jti")
                self.revoked[jti] = float(expires)
                self._effects.append(Revoked(jti, float(expires)))
            elif op == "event":
                self._event(record)
            elif op == "keyring":
                self._keyring(record.get("ring"))
            elif op == "policy":
                text, change = record.get("text"), record.get("change")
                if not isinstance(text, str) or not (change is None or isinstance(change, str)):
                    raise ValueError("policy")
                if self.policy is None or (change is not None and change not in self.policy_changes):
                    self.policy = text
                if change is not None:
                    self.policy_changes[change] = None
                    if len(self.policy_changes) > MAX_POLICY_CHANGES:
                        self.policy_changes.popitem(last=False)
                self._effects.append(PolicySet(change or policy_digest(text), self.policy))
            else:
                raise ValueError("op")
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            self.invalid += 1

    def _claim(self, key: str, node: str, broker: str) -> None:
        name, run = parse_claimant(broker)
        if run is not None and self.runs.get(name, -1) > run:
            # Its broker restarted before this claim committed, so that run never learned of
            # the commit and never sent the command: the claim is void, and another may win.
            self.void_claims += 1
            return
        first = self.claims.setdefault(key, (node, broker))
        self.claim_ids[_command_id(key)] = key
        if len(self.claims) > self.max_commands:
            old, _ = self.claims.popitem(last=False)
            if self.claim_ids.get(_command_id(old)) == old:
                del self.claim_ids[_command_id(old)]
            self._drop_outcome(old)
            self.forgotten.discard(old)
        # Every broker hears which claim won, also the one whose claim lost.
        self._effects.append(Claimed(key, *first))

    def _outcome(self, key: str, reply: tuple[bytes, bytes]) -> None:
        if key not in self.claims or key in self.forgotten:
            # Its claim or first outcome is gone; the broker that proposed this one must
            # still hear that it is in the log, and answer whoever waits there.
            self._effects.append(Forgotten(key))
            return
        first = self.outcomes.get(key)
        if first is None:
            first = self.outcomes[key] = reply
            self.outcome_bytes += _size(reply)
            while self.outcome_bytes > self.max_outcome_bytes and len(self.outcomes) > 1:
                old = next(iter(self.outcomes))
                self._drop_outcome(old)
                self.forgotten.add(old)
        self._effects.append(Committed(key, first))

    def _drop_outcome(self, key: str) -> None:
        reply = self.outcomes.pop(key, None)
        if reply is not None:
            self.outcome_bytes -= _size(reply)

    def _keyring(self, ring: Any) -> None:
        check_ring(ring)
        if self.keyring is None or ring["generation"] > self.keyring["generation"]:
            self.keyring = ring
        self._effects.append(KeyRingSet(keyring_digest(ring), self.keyring))

    def _event(self, record: dict[str, Any]) -> None:
        event, payload = record.get("event"), record.get("payload")
        if self.events is None or not isinstance(event, dict) or not isinstance(payload, bytes):
            raise ValueError("event")
        topic, eid = _text(event, "topic"), _text(event, "id")
        if isinstance(event.get("ts"), bool) or not isinstance(event.get("ts"), (int, float)):
            raise ValueError("ts")
        seen = self.event_ids.get((topic, eid))
        if seen is not None:
            refused = ResourceExhaustedError("the event was refused when first committed") if seen == 0 else None
            self._effects.append(Published(topic, eid, seen, None, refused))
            return
        sender = event.get("sender")
        if not (sender is None or isinstance(sender, str)):
            raise ValueError("sender")
        frames: list[bytes] | None
        error: MeshError | None
        try:
            seq, frames = self.events.publish(event, payload, sender)
        except MeshError as err:
            seq, frames, error = 0, None, err
        else:
            error = None
        self.event_ids[(topic, eid)] = seq  # 0: refused, and a repeat is refused again
        if len(self.event_ids) > MAX_EVENT_IDS:
            self.event_ids.popitem(last=False)
        self._effects.append(Published(topic, eid, seq, frames, error))

    def snapshot(self) -> bytes:
        """The whole state as bytes, for log compaction and lagging members."""
        return self.capture()()

    def capture(self) -> Callable[[], bytes]:
        """The state as it is now, packed into `snapshot()`'s bytes when the result is called.

        The call may come later and from another thread (the cluster's snapshot writer):
        here the tables are only copied (about 15 ms for 100,000 commands), the reshaping
        and packing (about 100 ms for a 20 MB state) happen there, a slice at a time.
        """
        # dict() copies an OrderedDict in half the time list(.items()) takes (8 ms for 50,000)
        claims, outcomes, event_ids = dict(self.claims), dict(self.outcomes), dict(self.event_ids)
        forgotten = list(self.forgotten)
        fields: dict[str, Any] = {  # None: packed from the tables below
            "version": SNAPSHOT_VERSION,
            "applied": self.applied,
            "claims": None,
            "outcomes": None,
            "forgotten": None,
            "revoked": dict(self.revoked),
            "runs": dict(self.runs),
            "event_ids": None,
            "events": self.events.snapshot_topics(EVENT_SNAPSHOT_BYTES) if self.events is not None else None,
            "policy": self.policy,
            "policy_changes": list(self.policy_changes),
            "keyring": self.keyring,
        }

        def pack() -> bytes:
            return _pack_in_slices(fields, {
                "claims": (list(claims.items()), lambda part: [[k, n, b] for k, (n, b) in part]),
                "outcomes": (list(outcomes.items()), lambda part: [[k, h, p] for k, (h, p) in part]),
                "forgotten": (sorted(forgotten), list),
                "event_ids": (list(event_ids.items()), lambda part: [[t, i, q] for (t, i), q in part]),
            })  # fmt: skip

        return pack

    def restore(self, data: bytes) -> None:
        """Replace the state with a snapshot's.

        Raises:
            ValueError: the bytes are not a snapshot of this version.
        """
        try:
            snap = msgpack.unpackb(data, raw=False)
            if not isinstance(snap, dict) or snap.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"not a version {SNAPSHOT_VERSION} shared-state snapshot")
            claims = OrderedDict((str(k), (str(n), str(b))) for k, n, b in snap["claims"])
            outcomes = OrderedDict((str(k), (bytes(h), bytes(p))) for k, h, p in snap["outcomes"])
            forgotten = {str(k) for k in snap.get("forgotten", ())}
            revoked = {str(j): float(e) for j, e in snap["revoked"].items()}
            runs = {str(b): int(r) for b, r in snap.get("runs", {}).items()}
            event_ids = OrderedDict(((str(t), str(i)), int(q)) for t, i, q in snap.get("event_ids", ()))
            applied = int(snap["applied"])
            policy_changes = OrderedDict((str(c), None) for c in snap.get("policy_changes", ()))
            policy = snap.get("policy")
            if policy is not None and not isinstance(policy, str):
                raise TypeError("policy")
            keyring = snap.get("keyring")
            if keyring is not None:
                check_ring(keyring)
        except (TypeError, KeyError, ValueError, msgpack.UnpackException) as exc:
            raise ValueError(f"a damaged shared-state snapshot: {exc}") from None
        if self.events is not None and snap.get("events") is not None:
            self.events.restore_topics(snap["events"])
        self.claims, self.outcomes, self.revoked, self.applied = claims, outcomes, revoked, applied
        self.claim_ids = {_command_id(key): key for key in claims}
        self.runs = runs
        self.outcome_bytes, self.forgotten = sum(map(_size, outcomes.values())), forgotten
        self.event_ids = event_ids
        self.policy, self.policy_changes = policy, policy_changes
        self.keyring = keyring
        # What the broker acts on that the snapshot brought: the revocations, the policy,
        # and (Restored) the claims and outcomes of the commands it waits for.
        self._effects.append(Restored())
        self._effects.extend(Revoked(j, e) for j, e in revoked.items())
        if policy is not None:
            self._effects.append(PolicySet("", policy))
        if keyring is not None:
            self._effects.append(KeyRingSet("", keyring))


def check_ring(ring: Any) -> None:
    """Key-ring metadata as `KeyRing.metadata()` makes it, of at most `MAX_RING_KEYS` keys.

    Raises:
        ValueError: anything else.
    """
    if not isinstance(ring, dict) or not isinstance(ring.get("keys"), dict) or ring.get("active") not in ring["keys"]:
        raise ValueError("keyring")
    if len(ring["keys"]) > MAX_RING_KEYS or set(ring) != {"generation", "active", "keys"}:
        raise ValueError("keyring")
    generation = ring["generation"]
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise ValueError("keyring")
    for kid, times in ring["keys"].items():
        if not isinstance(kid, str) or not kid or not isinstance(times, dict) or set(times) != {"active_from", "retire_at"}:
            raise ValueError("keyring")
        if any(t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))) for t in times.values()):
            raise ValueError("keyring")


def _command_id(key: str) -> str:
    """The command id a command key begins with (`mesh.broker.once.once_key`)."""
    return key.partition("|")[0]


def _size(reply: tuple[bytes, bytes]) -> int:
    return len(reply[0]) + len(reply[1])


def _text(record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value:
        raise ValueError(field)
    return value
