"""The message model: one frozen record per part of a message, built by validating constructors.

Rules of this module:

* A `Header` is everything a broker needs to route and authorise; the payload is kept
  apart so the broker can forward it without decoding it (it may be ciphertext).
* Records are immutable. Replies are made from the command they answer
  (`response_to`, `error_to`), so correlation ids cannot be forgotten.
* No clock is read here: every constructor takes the timestamp from its caller.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Final

from .errors import MeshError
from .names import check_name, check_topic

__all__ = [
    "PROTOCOL_VERSION",
    "MessageType",
    "SecurityLevel",
    "SecurityInfo",
    "ErrorInfo",
    "Header",
    "Message",
    "new_id",
    "command",
    "event",
    "response_to",
    "error_to",
    "error_header",
]

PROTOCOL_VERSION: Final = 1


class MessageType(StrEnum):
    COMMAND = "command"
    RESPONSE = "response"
    EVENT = "event"
    ERROR = "error"
    CANCEL = "cancel"  # client -> broker -> node: stop the command `correlation_id` names
    PROGRESS = "progress"  # node -> broker -> client: how far the command `correlation_id` is


class SecurityLevel(IntEnum):
    """How strongly a message is protected; later levels include the earlier ones."""

    NONE = 0
    AUTHENTICATED = 1
    ENCRYPTED = 2
    SIGNED = 3


@dataclass(frozen=True, slots=True)
class SecurityInfo:
    """The seed's security metadata; empty by default (security is off)."""

    security_level: SecurityLevel = SecurityLevel.NONE
    encryption_info: Mapping[str, Any] | None = None
    signature: bytes | None = None
    auth_token: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What an `error` message reports: a stable code and whether a retry can help."""

    code: int
    message: str
    retryable: bool
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Header:
    """The routing and authorisation frame of a message."""

    type: MessageType
    id: str
    timestamp: float
    service: str | None = None
    action: str | None = None
    topic: str | None = None
    seq: int | None = None  # an event's number in its topic, stamped by the broker
    correlation_id: str | None = None
    deadline: float | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    security: SecurityInfo | None = None
    error: ErrorInfo | None = None
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Message:
    """A header with its decoded payload (any MessagePack value)."""

    header: Header
    payload: Any = None

    # The seed names these on the message itself; they read through to the header.
    @property
    def id(self) -> str:
        return self.header.id

    @property
    def type(self) -> MessageType:
        return self.header.type


_ID_PREFIX: str
_ID_COUNTER: Iterator[int]


def _reseed() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(8).hex()
    _ID_COUNTER = itertools.count()


_reseed()
os.register_at_fork(after_in_child=_reseed)  # a forked child must not repeat its parent's ids


def new_id() -> str:
    """A fresh message id, unique across processes: 64 random bits, then a counter (32 hex digits).

    Ids only need to be unique, not secret (the broker keys commands by sender too), and
    a counter costs a fraction of a system call for random bytes on every message.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def command(
    service: str,
    action: str,
    *,
    now: float,
    deadline: float | None = None,
    id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    security: SecurityInfo | None = None,
) -> Header:
    """Header of a command to `service.action`. Reuse `id` when retrying.

    Raises:
        ValidationFailedError: `service` or `action` is not a valid name.
    """
    check_name(service, "service")
    check_name(action, "action")
    return Header(
        type=MessageType.COMMAND,
        id=id or new_id(),
        timestamp=now,
        service=service,
        action=action,
        deadline=deadline,
        metadata=dict(metadata or {}),
        security=security,
    )


def event(
    topic: str,
    *,
    now: float,
    id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    security: SecurityInfo | None = None,
) -> Header:
    """Header of an event to publish on `topic` (the broker stamps its `seq`).

    Raises:
        ValidationFailedError: `topic` is not a valid topic.
    """
    check_topic(topic)
    return Header(
        type=MessageType.EVENT,
        id=id or new_id(),
        timestamp=now,
        topic=topic,
        metadata=dict(metadata or {}),
        security=security,
    )


def response_to(cmd: Header, *, now: float) -> Header:
    """Header of the successful reply to `cmd`."""
    return Header(
        type=MessageType.RESPONSE,
        id=new_id(),
        timestamp=now,
        service=cmd.service,
        action=cmd.action,
        correlation_id=cmd.id,
    )


def error_header(
    err: MeshError, *, now: float, correlation_id: str | None = None
) -> Header:
    """Header of an `error` message reporting `err` (to `correlation_id` when known)."""
    return Header(
        type=MessageType.ERROR,
        id=new_id(),
        timestamp=now,
        correlation_id=correlation_id,
        error=ErrorInfo(
            code=int(err.code),
            message=err.message,
            retryable=bool(err.retryable),
            details=dict(err.details),
        ),
    )


def error_to(cmd: Header, err: MeshError, *, now: float) -> Header:
    """Header of the error reply to `cmd`."""
    return error_header(err, now=now, correlation_id=cmd.id)
