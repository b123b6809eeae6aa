"""Peer links between the brokers of a cluster: consensus messages and forwarded proposals.

Rules of this module:

* Each broker binds one ROUTER on its own peer endpoint and connects one DEALER, named
  by its own member id, to every other member's ROUTER. A message to peer X leaves on
  the DEALER to X; everything a broker receives arrives on its ROUTER. No reply ever
  travels back on a ROUTER, so a link is one-way and a restarted peer simply connects
  again (ROUTER_HANDOVER gives it its routing id back at once).
* A peer frame is `[kind, body]` (the ROUTER adds the sender's routing id in front):
  `KIND_RAFT` carries one `encode_message` record, `KIND_PROPOSAL` carries proposal
  data a follower forwards to the leader. `parse_frames` checks everything (frame
  count, known sender, kind, size, codec, that the record's `frm` is the link's
  routing id and its `to` is this member) and is the only way bytes become input.
* A record larger than `CHUNK_BYTES` (a big snapshot or append) goes as `KIND_CHUNK`
  frames, back to back: a 16-byte header (record number, chunk index, chunk count) and
  a slice of the record. Small frames keep a slow link showing progress on each
  message. ZeroMQ keeps a link's frames in order, so `Reassembly` joins them as they come;
  a gap, or any other frame from that peer before the last chunk, means the sender's
  queue dropped some: the partial record is dropped too (Raft sends it again). Record
  numbers start at random, so a restarted peer's record is not joined to its old one.
* Bad input never raises out of `receive`: it is counted in `counters` under its
  reason and logged without payload bytes (the first time, then at 10, 100, ...).
* Sends never block. A peer that is down or whose queue is full (`PEER_HWM`) loses the
  message (counted as `send_dropped`): Raft resends what matters on its next heartbeat.
* With `PeerSecurity` every socket is CURVE: the ROUTER is a server checked by the
  context's ZAP handler, the DEALERs are clients, and a frame is accepted only from a
  link whose ZAP User-Id is one of `PeerSecurity.users` (by default `broker-peer`),
  so a client or node whose key the broker admits cannot speak for a broker.
"""

from __future__ import annotations

import logging
import os
import random
import struct
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

import zmq

from ..protocol.errors import MeshError
from ..security.curve import secure_client, secure_server
from ..security.state import PEER_KEY_NAME, StateLayout
from ..sockets import Secure, frame_peer, peer_dealer, peer_router, send_frames
from .messages import (
    MAX_CHUNKED_MESSAGE_BYTES,
    MAX_PROPOSAL_BYTES,
    MAX_RAFT_MESSAGE_BYTES,
    Message,
    decode_message,
    encode_message,
)

__all__ = [
    "KIND_RAFT",
    "KIND_PROPOSAL",
    "KIND_CHUNK",
    "CHUNK_BYTES",
    "ChunkIn",
    "Reassembly",
    "MAX_PROPOSAL_BYTES",
    "PEER_HWM",
    "PeerSecurity",
    "RaftIn",
    "ProposalIn",
    "Incoming",
    "FrameError",
    "parse_frames",
    "PeerTransport",
]

KIND_RAFT: Final = b"\x01"
KIND_PROPOSAL: Final = b"\x02"
KIND_CHUNK: Final = b"\x03"
_CHUNK_HEADER: Final = struct.Struct(">QII")  # record number, chunk index, chunk count
CHUNK_BYTES: Final = 4 * 1024 * 1024  # the largest frame sent; larger records go in chunks
PEER_HWM: Final = 1000
RECV_BATCH: Final = 256

log = logging.getLogger("mesh.cluster")


@dataclass(frozen=True)
class PeerSecurity:
    """CURVE on the peer links: the ROUTER's server hook, the DEALERs' client hook, and
    the ZAP User-Ids (key names) whose frames are accepted.

    The context the links live in needs a running ZAP handler (`CurveAuthenticator`)
    whose allowed keys include the client key, as a broker with security on has.
    """

    server: Secure
    client: Secure
    users: frozenset[str] = field(default_factory=lambda: frozenset({PEER_KEY_NAME}))

    @classmethod
    def from_state(cls, state: str | os.PathLike[str]) -> PeerSecurity:
        """The peer security of a state directory made by `ensure_state`.

        The ROUTER serves with the brokers' pair (`curve/broker.key_secret`); the DEALERs
        are clients with `curve/broker-peer.key_secret`, admitted through
        `curve/allowed/broker-peer.key`. The key files are read when a link opens, so a
        missing file raises `ConfigurationError` from the transport's constructor.
        """
        layout = StateLayout.at(state)
        server_secret, peer_secret, broker_public = layout.broker_secret, layout.peer_secret, layout.broker_public
        return cls(
            server=lambda sock: secure_server(sock, server_secret),
            client=lambda sock: secure_client(sock, peer_secret, broker_public),
        )


@dataclass(frozen=True, slots=True)
class RaftIn:
    """A consensus message from peer `frm` (already checked to come from its own link)."""

    frm: str
    message: Message


@dataclass(frozen=True, slots=True)
class ProposalIn:
    """Proposal data that peer `frm` forwarded to this member (it thinks we lead)."""

    frm: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ChunkIn:
    """Chunk `index` of `count` of record number `number` from peer `frm`."""

    frm: str
    number: int
    index: int
    count: int
    data: bytes


Incoming = RaftIn | ProposalIn


class FrameError(Exception):
    """A peer frame this member refuses; `reason` is the counter it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def parse_frames(frames: list[bytes], me: str, members: Collection[str]) -> Incoming | ChunkIn:
    """Turn the frames a peer ROUTER received into input for the member.

    Args:
        frames: `[routing_id, kind, body]` as the ROUTER delivered them.
        me: this member's id (the only valid `to`).
        members: the ids a frame may come from.

    Raises:
        FrameError: anything wrong; its `reason` names the problem in a few words and
            its message never holds payload bytes.
    """
    if len(frames) != 3:
        raise FrameError("bad_frame_count", f"{len(frames)} frames instead of [routing id, kind, body]")
    ident, kind, body = frames
    try:
        frm = ident.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("unknown_peer", "a routing id that is not UTF-8") from None
    if frm == me or frm not in members:
        raise FrameError("unknown_peer", f"routing id {frm[:64]!r} is not a peer member")
    if kind == KIND_PROPOSAL:
        if len(body) > MAX_PROPOSAL_BYTES:
            raise FrameError("too_large", f"proposal of {len(body)} bytes from {frm}")
        return ProposalIn(frm, body)
    if kind == KIND_CHUNK:
        if len(body) <= _CHUNK_HEADER.size:
            raise FrameError("bad_chunk", f"a chunk of {len(body)} bytes from {frm}")
        number, index, count = _CHUNK_HEADER.unpack_from(body)
        if not 2 <= count <= MAX_CHUNKED_MESSAGE_BYTES // 1024 or index >= count:
            raise FrameError("bad_chunk", f"chunk {index} of {count} from {frm}")
        return ChunkIn(frm, number, index, count, body[_CHUNK_HEADER.size :])
    if kind != KIND_RAFT:
        raise FrameError("unknown_kind", f"frame kind {kind[:8].hex()} from {frm}")
    return raft_in(frm, body, me)


def raft_in(frm: str, body: bytes, me: str, limit: int = MAX_RAFT_MESSAGE_BYTES) -> RaftIn:
    """Decode one consensus record that came on `frm`'s link and check who it is from and for.

    Raises:
        FrameError: see `parse_frames`.
    """
    try:
        msg = decode_message(body, limit)
    except MeshError as exc:
        # decode_message's messages name fields and sizes, never the data itself.
        raise FrameError("bad_message", f"from {frm}: {exc}") from None
    if msg.frm != frm:
        raise FrameError("spoofed_sender", f"message signed {msg.frm[:64]!r} on the link of {frm}")
    if msg.to != me:
        raise FrameError("misaddressed", f"message from {frm} for {msg.to[:64]!r}")
    return RaftIn(frm, msg)


def chunk_frames(record: bytes, number: int, frame_bytes: int) -> Iterator[list[bytes]]:
    """`[KIND_CHUNK, body]` frames that carry `record` in bodies of at most `frame_bytes`,
    made one at a time."""
    size = frame_bytes - _CHUNK_HEADER.size
    count = -(-len(record) // size)
    view = memoryview(record)
    for i in range(count):
        yield [KIND_CHUNK, _CHUNK_HEADER.pack(number, i, count) + view[i * size : (i + 1) * size]]


class Reassembly:
    """Joins the chunks of each peer's large records, one record per peer at a time.

    Args:
        max_bytes: the most a joined record may hold; past it the chunks are dropped.
    """

    def __init__(self, max_bytes: int = MAX_CHUNKED_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        # peer -> (record number, chunk count, chunks so far, their bytes)
        self._partial: dict[str, tuple[int, int, list[bytes], int]] = {}

    def add(self, chunk: ChunkIn) -> bytes | None:
        """The whole record once `chunk` completes it, else None.

        Raises:
            FrameError: a chunk that does not follow the one before (chunks were lost),
                or a record over `max_bytes`; what was gathered of it is dropped.
        """
        number, count, parts, size = self._partial.pop(chunk.frm, (chunk.number, chunk.count, [], 0))
        if chunk.index == 0:
            number, count, parts, size = chunk.number, chunk.count, [], 0
        if (chunk.number, chunk.count, chunk.index) != (number, count, len(parts)):
            raise FrameError("chunk_lost", f"chunk {chunk.index} of record {chunk.number} from {chunk.frm} out of turn")
        size += len(chunk.data)
        if size > self.max_bytes:
            raise FrameError("too_large", f"a chunked record of over {self.max_bytes} bytes from {chunk.frm}")
        parts.append(chunk.data)
        if len(parts) < count:
            self._partial[chunk.frm] = (number, count, parts, size)
            return None
        return b"".join(parts)

    def cut(self, frm: str) -> bool:
        """Another frame came from `frm`: a record of its still missing chunks never will be
        complete (its chunks are sent back to back). Whether one was dropped."""
        return self._partial.pop(frm, None) is not None


class PeerTransport:
    """The peer sockets of one member: one ROUTER in, one DEALER out per peer.

    Args:
        ctx: the broker's context (with its ZAP handler when `security` is given).
        me: this member's id; it is the routing id of every DEALER.
        endpoints: member id -> peer endpoint, for every member including this one.
        security: CURVE hooks and the accepted User-Ids, or None for plain links.
        chunk_bytes: the largest frame sent (and, twice over, taken); larger records go in chunks.

    Raises:
        ConfigurationError: an endpoint is malformed or in use, or a key file is bad.
    """

    def __init__(
        self, ctx: zmq.Context, me: str, endpoints: Mapping[str, str], security: PeerSecurity | None = None,
        *, chunk_bytes: int = CHUNK_BYTES,
    ) -> None:  # fmt: skip
        if chunk_bytes <= 2 * _CHUNK_HEADER.size:
            raise ValueError(f"chunk_bytes must be over {2 * _CHUNK_HEADER.size}")
        self.me = me
        self.members = frozenset(endpoints)
        self.counters: Counter[str] = Counter()
        self.chunk_bytes = chunk_bytes
        self._users = security.users if security is not None else None
        self._reassembly = Reassembly()
        self._chunked = random.getrandbits(63)  # numbers the records sent in chunks
        limit = chunk_bytes
        self.router = peer_router(
            ctx, endpoints[me], limit, PEER_HWM, security.server if security is not None else None
        )
        self.dealers: dict[str, zmq.Socket] = {}
        try:
            for peer, endpoint in sorted(endpoints.items()):
                if peer != me:
                    self.dealers[peer] = peer_dealer(
                        ctx, endpoint, me.encode(), limit, PEER_HWM,
                        security.client if security is not None else None,
                    )  # fmt: skip
        except Exception:
            self.close()
            raise

    def send_message(self, msg: Message) -> bool:
        """Send one consensus message to `msg.to`, in chunks if it is larger than a
        frame; whether it was all queued."""
        record = encode_message(msg)
        if len(record) <= self.chunk_bytes:
            return self._send(msg.to, KIND_RAFT, record)
        if len(record) > MAX_CHUNKED_MESSAGE_BYTES:
            self._refuse("send_too_large", f"a {type(msg).__name__} of {len(record)} bytes is too large to send")
            return False
        self._chunked = (self._chunked + 1) % (1 << 64)
        self.counters["sent_chunked"] += 1
        chunks = chunk_frames(record, self._chunked, self.chunk_bytes)
        return all(self._send(msg.to, kind, body) for kind, body in chunks)

    def forward_proposal(self, leader: str, data: bytes) -> bool:
        """Send proposal data to the member believed to lead; whether it was queued."""
        return self._send(leader, KIND_PROPOSAL, data)

    def _send(self, peer: str, kind: bytes, body: bytes) -> bool:
        sock = self.dealers.get(peer)
        if sock is None:
            self.counters["send_unknown_peer"] += 1
            return False
        try:
            send_frames(sock, [kind, body])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EAGAIN:
                raise
            self.counters["send_dropped"] += 1
            return False
        self.counters["sent"] += 1
        return True

    def receive(self, limit: int = RECV_BATCH) -> list[Incoming]:
        """Up to `limit` waiting frames from the ROUTER, checked; never blocks or raises
        for bad input (see the module rules)."""
        out: list[Incoming] = []
        recv = self.router.recv
        for _ in range(limit):
            try:
                first = recv(zmq.NOBLOCK, copy=False)
                frames = [first.bytes]
                more = first.more
                last = first
                while more:
                    last = recv(zmq.NOBLOCK, copy=False)
                    frames.append(last.bytes)
                    more = last.more
            except zmq.Again:
                break
            if self._users is not None:
                user, _ = frame_peer(last)  # the User-Id of the link (on any frame of it)
                if user not in self._users:
                    self._refuse("unauthorized", f"a link with User-Id {user!r} is not a broker peer")
                    continue
            try:
                item = parse_frames(frames, self.me, self.members)
                if isinstance(item, ChunkIn):
                    record = self._reassembly.add(item)
                    if record is None:
                        continue
                    item = raft_in(item.frm, record, self.me, MAX_CHUNKED_MESSAGE_BYTES)
                elif self._reassembly.cut(item.frm):
                    self._refuse("chunk_lost", f"a chunked record from {item.frm} was cut short")
                out.append(item)
            except FrameError as exc:
                self._refuse(exc.reason, str(exc))
                continue
            self.counters["received"] += 1
        return out

    def _refuse(self, reason: str, detail: str) -> None:
        self.counters[reason] += 1
        n = self.counters[reason]
        if n == 1 or n in (10, 100, 1_000, 10_000) or n % 100_000 == 0:
            log.warning("cluster peer link: dropped (%s, %d so far): %s", reason, n, detail)

    def close(self) -> None:
        """Close every socket at once (linger 0: unsent consensus messages are worthless)."""
        for sock in [getattr(self, "router", None), *getattr(self, "dealers", {}).values()]:
            if sock is not None and not sock.closed:
                sock.close(linger=0)

