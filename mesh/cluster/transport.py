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
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Final

import zmq

from ..protocol.errors import MeshError
from ..security.curve import secure_client, secure_server
from ..security.state import PEER_KEY_NAME, StateLayout
from ..sockets import Secure, frame_peer, peer_dealer, peer_router, send_frames
from .messages import MAX_PROPOSAL_BYTES, MAX_RAFT_MESSAGE_BYTES, Message, decode_message, encode_message

__all__ = [
    "KIND_RAFT",
    "KIND_PROPOSAL",
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


Incoming = RaftIn | ProposalIn


class FrameError(Exception):
    """A peer frame this member refuses; `reason` is the counter it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def parse_frames(frames: list[bytes], me: str, members: Collection[str]) -> Incoming:
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
    if kind != KIND_RAFT:
        raise FrameError("unknown_kind", f"frame kind {kind[:8].hex()} from {frm}")
    try:
        msg = decode_message(body)
    except MeshError as exc:
        # decode_message's messages name fields and sizes, never the data itself.
        raise FrameError("bad_message", f"from {frm}: {exc}") from None
    if msg.frm != frm:
        raise FrameError("spoofed_sender", f"message signed {msg.frm[:64]!r} on the link of {frm}")
    if msg.to != me:
        raise FrameError("misaddressed", f"message from {frm} for {msg.to[:64]!r}")
    return RaftIn(frm, msg)


class PeerTransport:
    """The peer sockets of one member: one ROUTER in, one DEALER out per peer.

    Args:
        ctx: the broker's context (with its ZAP handler when `security` is given).
        me: this member's id; it is the routing id of every DEALER.
        endpoints: member id -> peer endpoint, for every member including this one.
        security: CURVE hooks and the accepted User-Ids, or None for plain links.

    Raises:
        ConfigurationError: an endpoint is malformed or in use, or a key file is bad.
    """

    def __init__(
        self, ctx: zmq.Context, me: str, endpoints: Mapping[str, str], security: PeerSecurity | None = None
    ) -> None:
        self.me = me
        self.members = frozenset(endpoints)
        self.counters: Counter[str] = Counter()
        self._users = security.users if security is not None else None
        limit = MAX_RAFT_MESSAGE_BYTES
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
        """Send one consensus message to `msg.to`; whether it was queued."""
        return self._send(msg.to, KIND_RAFT, encode_message(msg))

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
                out.append(parse_frames(frames, self.me, self.members))
            except FrameError as exc:
                self._refuse(exc.reason, str(exc))
                continue
            self.counters["received"] += 1
        return out

    def _refuse(self, reason: str, detail: str) -> None:
        self.counters[reason] += 1
        n = self.counters[reason]
        if n == 1 or n in (10, 100, 1_000, 10_000) or n % 100_000 == 0:
            log.warning("cluster peer link: dropped a frame (%s, %d so far): %s", reason, n, detail)

    def close(self) -> None:
        """Close every socket at once (linger 0: unsent consensus messages are worthless)."""
        for sock in [getattr(self, "router", None), *getattr(self, "dealers", {}).values()]:
            if sock is not None and not sock.closed:
                sock.close(linger=0)

