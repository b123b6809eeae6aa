"""The commands a broker accepted: tracking, queues, dispatch, deadlines and node loss.

Rules of this module:

* Every tracked command is answered exactly once: by its node (`complete`), or here with
  an error (`fail`); one the broker will not route is answered without being tracked
  (`refuse`). Every broker-made failure of a named command is published as
  `mesh.command.failed` (ids and codes only).
* A dispatched command keeps its node's slot until the node answers or is lost, even
  after its deadline or a cancel, so a node's capacity is never exceeded by a replacement.
* Queued commands go to the first node with a free slot, oldest first; those nobody
  offers any more fail NODE_LOST.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from ...link.replies import RecentReplies
from ...protocol import (
    NEVER_STARTED,
    CancelledError,
    CommandEvent,
    CommandState,
    DeadlineExceededError,
    MeshError,
    NodeLostError,
    ResourceExhaustedError,
    advance,
)
from ..config import BrokerConfig
from ..registry import NodeInfo, Registry
from .state import Command, ConnectionState, Emit, Outgoing, Side, error_code, error_frames, ran_on

__all__ = ["CommandBook"]

Key = tuple[bytes, str]  # (client identity, command id)


class CommandBook:
    """Every command between its acceptance and its one answer, and who owes each.

    Args:
        config: the broker's limits (queue size, reply cache bounds).
        registry: the nodes commands go to.
        clients: the broker's client connections, whose pending ids this keeps.
        counters: the broker's counters.
        emit: publishes a `mesh.*` event.
    """

    def __init__(
        self, config: BrokerConfig, registry: Registry, clients: dict[bytes, ConnectionState],
        counters: Counter[str], emit: Emit,
    ) -> None:  # fmt: skip
        self.config = config
        self.registry = registry
        self.clients = clients
        self.counters = counters
        self._emit = emit
        self.commands: dict[Key, Command] = {}
        self.queues: dict[tuple[str, str], deque[Command]] = {}
        self.queued = 0
        self.owed_by: dict[Key, bytes] = {}  # running command -> node identity
        self.recent = RecentReplies(config.recent_replies, config.recent_reply_s, config.recent_reply_bytes)

    # ------------------------------------------------------------ in and out

    def route(self, cmd: Command, conn: ConnectionState, now: float) -> list[Outgoing]:
        """Track a new command and send it to a node, or queue it, or refuse it (queue full)."""
        key = (cmd.client, cmd.id)
        holder = self.registry.nodes.get(self.owed_by.get(key, b""))
        if holder is not None:
            # A resend of a command that timed out while this node still runs it: the
            # running copy's answer will serve the resend, and nothing runs twice.
            self.track(cmd, conn)
            cmd.state = advance(cmd.state, CommandEvent.DISPATCH)
            cmd.node = holder
            self.counters["rejoined"] += 1
            return []
        node = self.registry.pick(cmd.service, cmd.action)
        if node is not None:
            self.track(cmd, conn)
            return [self.dispatch(cmd, node)]
        if self.queued >= self.config.queue_limit:
            err = ResourceExhaustedError(
                f"every node of {cmd.service} is busy and the queue is full",
                details={"queue_limit": self.config.queue_limit},
            )
            return self.refuse(cmd.client, cmd.id, err, now, command=(cmd.service, cmd.action))
        self.track(cmd, conn)
        cmd.state = advance(cmd.state, CommandEvent.ENQUEUE)
        self.enqueue(cmd)
        return []

    def track(self, cmd: Command, conn: ConnectionState) -> None:
        """Hold `cmd` until it is answered; its client's connection counts it pending."""
        self.commands[(cmd.client, cmd.id)] = cmd
        conn.pending_commands.add(cmd.id)

    def enqueue(self, cmd: Command, front: bool = False) -> None:
        """Queue `cmd` for a node of its action (at the front: it was routed before)."""
        q = self.queues.get((cmd.service, cmd.action))
        if q is None:
            q = self.queues[(cmd.service, cmd.action)] = deque()
        q.appendleft(cmd) if front else q.append(cmd)
        self.queued += 1

    def unqueue(self, cmd: Command) -> None:
        """Take a queued `cmd` out of its queue (it is answered without running)."""
        self.queues[(cmd.service, cmd.action)].remove(cmd)
        self.queued -= 1

    def dispatch(self, cmd: Command, node: NodeInfo) -> Outgoing:
        """Send `cmd` to `node`, which owes its answer from now on."""
        cmd.state = advance(cmd.state, CommandEvent.DISPATCH)
        cmd.node = node
        key = (cmd.client, cmd.id)
        node.owed.add(key)
        self.owed_by[key] = node.identity
        self.counters["dispatched"] += 1
        if cmd.sender:  # security on: the node checks signatures against this name
            return (Side.NODE, node.identity, [cmd.client, cmd.header, cmd.payload, cmd.sender])
        return (Side.NODE, node.identity, [cmd.client, cmd.header, cmd.payload])

    def finish(self, cmd: Command, event: CommandEvent) -> None:
        """Retire `cmd` with its last transition (it is answered)."""
        cmd.state = advance(cmd.state, event)
        del self.commands[(cmd.client, cmd.id)]
        conn = self.clients.get(cmd.client)
        if conn is not None:
            conn.pending_commands.discard(cmd.id)
        self.counters[cmd.state.value] += 1

    def refuse(
        self, ident: bytes, cid: str, err: MeshError, now: float, outcome: str = "failed",
        command: tuple[str, str] | None = None,
    ) -> list[Outgoing]:  # fmt: skip
        """Answer a command the broker will not route (it was never tracked)."""
        self.counters[outcome] += 1
        self.counters[f"error_{int(err.code)}"] += 1
        if command is not None:
            self.command_failed(cid, *command, int(err.code), now)
        return [(Side.CLIENT, ident, error_frames(err, now, cid))]

    def fail(self, cmd: Command, err: MeshError, now: float, event: CommandEvent) -> Outgoing:
        """Answer a tracked command with an error and retire it."""
        self.finish(cmd, event)
        self.counters[f"error_{int(err.code)}"] += 1
        self.command_failed(cmd.id, cmd.service, cmd.action, int(err.code), now)
        return (Side.CLIENT, cmd.client, error_frames(err, now, cmd.id))

    def command_failed(self, cid: str, service: str, action: str, code: int, now: float) -> None:
        """Tell subscribers a command failed (`mesh.command.failed`)."""
        self._emit("mesh.command.failed", {"id": cid, "service": service, "action": action, "code": code}, now)

    def cancel(self, ident: bytes, cid: str, header_frame: bytes, now: float) -> list[Outgoing]:
        """A client's `cancel` of its command `cid`: answer it CANCELLED, tell its node.

        A command the broker no longer holds (answered, expired, never sent) is ignored:
        its one answer is already on its way. A dispatched command keeps its node slot
        until the node answers, as after a deadline, and that late answer is dropped.
        """
        cmd = self.commands.get((ident, cid))
        if cmd is None:
            self.counters["cancels_ignored"] += 1
            return []
        self.counters["cancelled"] += 1
        out: list[Outgoing] = []
        if cmd.state is CommandState.QUEUED:
            self.unqueue(cmd)
        elif cmd.node is not None:
            out.append((Side.NODE, cmd.node.identity, [ident, header_frame, b"\xc0"]))
        err = CancelledError(
            f"{cmd.service}.{cmd.action} was cancelled by its caller", details={"state": cmd.state.value}
        )
        out.append(self.fail(cmd, err, now, CommandEvent.FAIL))
        return out

    # ------------------------------------------------------------ node replies

    def complete(
        self, key: Key, ident: bytes, header: dict[str, Any], answer: list[bytes], now: float
    ) -> list[Outgoing]:
        """A node's reply to a command it owed (its slot is already settled): the client's
        answer, remembered for resends unless it proves the command never started."""
        cmd = self.commands.get(key)
        if cmd is None or cmd.state is not CommandState.DISPATCHED or not ran_on(cmd, ident):
            # It timed out, its client left, or it was resent elsewhere: only the slot frees.
            self.counters["late_replies"] += 1
            return []
        node = self.registry.nodes.get(ident)
        if node is not None:
            node.completed += 1
        if header["type"] == "response":
            self.finish(cmd, CommandEvent.RESPOND)
            self.recent.put(key, answer, now)
        else:
            self.finish(cmd, CommandEvent.FAIL)
            code = error_code(header)
            self.command_failed(cmd.id, cmd.service, cmd.action, code, now)
            if code not in NEVER_STARTED:
                self.recent.put(key, answer, now)
        return [(Side.CLIENT, key[0], answer)]

    def settle(self, link: ConnectionState, ident: bytes, key: Key) -> None:
        """The node no longer owes `key`: its slot is free."""
        link.pending_commands.discard(key)
        if self.owed_by.get(key) == ident:
            del self.owed_by[key]

    # ---------------------------------------------------------------- queues

    def drain_queues(self, node: NodeInfo) -> list[Outgoing]:
        """Give a node with free slots the oldest queued commands it can run."""
        out: list[Outgoing] = []
        while self.queued and node.in_flight < node.capacity:
            best: deque[Command] | None = None
            for key in self.registry.actions_of(node):
                q = self.queues.get(key)
                if q and (best is None or q[0].received_at < best[0].received_at):
                    best = q
            if best is None:
                break
            cmd = best.popleft()
            self.queued -= 1
            out.append(self.dispatch(cmd, node))
        return out

    def route_queued(self, now: float) -> list[Outgoing]:
        """Dispatch queued commands to any node with room; fail those nobody offers now."""
        out: list[Outgoing] = []
        for key, q in list(self.queues.items()):
            while q:
                if not self.registry.offers(*key):
                    cmd = q.popleft()
                    self.queued -= 1
                    err = NodeLostError(f"no node offers {key[0]}.{key[1]} any more")
                    out.append(self.fail(cmd, err, now, CommandEvent.FAIL))
                    continue
                node = self.registry.pick(*key)
                if node is None:
                    break
                cmd = q.popleft()
                self.queued -= 1
                out.append(self.dispatch(cmd, node))
        return out

    def after_registry_change(self, node: NodeInfo | None, now: float) -> list[Outgoing]:
        """After a node (re)registers or leaves: feed it queued work, fail what nobody offers."""
        out = self.drain_queues(node) if node is not None else []
        out.extend(self.route_queued(now))
        return out

    # ------------------------------------------------------ deadlines and loss

    def expire(self, now: float) -> list[Outgoing]:
        """Answer DEADLINE_EXCEEDED every command past its deadline.

        A dispatched command keeps its node slot until the node answers (or is lost), so
        the node's capacity is never exceeded by a replacement.
        """
        out: list[Outgoing] = []
        for cmd in [c for c in self.commands.values() if c.deadline <= now]:
            if cmd.state is CommandState.QUEUED:
                self.unqueue(cmd)
            err = DeadlineExceededError(
                f"{cmd.service}.{cmd.action} did not answer in time", details={"state": cmd.state.value}
            )
            out.append(self.fail(cmd, err, now, CommandEvent.EXPIRE))
        return out

    def node_lost(self, ident: bytes, owed: set[Key], unsent: set[Key], now: float) -> list[Outgoing]:
        """Settle what a node that is gone owed (`owed`; `unsent` never reached it).

        Commands that never reached it, and those of idempotent actions, are routed again;
        the others it was running are answered NODE_LOST (they may or may not have run).
        """
        out: list[Outgoing] = []
        requeue: list[Command] = []
        for key in owed:
            if self.owed_by.get(key) == ident:
                del self.owed_by[key]
            cmd = self.commands.get(key)
            if cmd is None or cmd.state is not CommandState.DISPATCHED or not ran_on(cmd, ident):
                continue
            spec = cmd.node.services.get(cmd.service, {}).get(cmd.action) if cmd.node else None
            cmd.node = None
            if cmd.once is None and (key in unsent or (spec is not None and spec.idempotent)):
                requeue.append(cmd)
                continue
            err = NodeLostError(
                f"the node running {cmd.service}.{cmd.action} is gone",
                details={"exactly_once": True} if cmd.once is not None else None,
            )
            out.append(self.fail(cmd, err, now, CommandEvent.FAIL))
        # Route them again, oldest first, ahead of newer ones.
        self.counters["redispatched"] += len(requeue)
        for cmd in sorted(requeue, key=lambda c: c.received_at, reverse=True):
            cmd.state = advance(cmd.state, CommandEvent.REQUEUE)
            self.enqueue(cmd, front=True)
        out.extend(self.route_queued(now))
        return out

    def abandon(self, client: bytes, cid: str) -> None:
        """Retire a command whose client is gone; a node running it frees its slot on reply."""
        cmd = self.commands.get((client, cid))
        if cmd is None:
            return
        if cmd.state is CommandState.QUEUED:
            self.unqueue(cmd)
        cmd.state = advance(cmd.state, CommandEvent.FAIL)
        del self.commands[(client, cid)]
        self.counters["abandoned"] += 1
