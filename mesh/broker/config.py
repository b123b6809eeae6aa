"""The limits of one broker: what its routing core is built with."""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol import MAX_MESSAGE_BYTES
from .events import DEFAULT_RULE, RetentionRule

__all__ = ["BrokerConfig"]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Limits of one broker (set from the topology's `[brokers.NAME]` table)."""

    name: str = "broker"
    queue_limit: int = 1024
    default_timeout: float = 30.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    retention: tuple[RetentionRule, ...] = (DEFAULT_RULE,)
    max_topics: int = 10_000
    max_retained_bytes: int = 64 * 1024 * 1024
    event_hwm: int = 10_000  # events queued per subscriber before it starts missing some
    # Answered commands remembered for resends: this many, this long, this many bytes.
    recent_replies: int = 10_000
    recent_reply_s: float = 60.0
    recent_reply_bytes: int = 64 * 1024 * 1024
