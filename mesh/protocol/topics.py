"""How topics look on the event socket: the frame-0 rules brokers and subscribers share.

ZeroMQ filters by byte prefix of frame 0. Ending every topic with a dot makes the filter
for a prefix match whole segments: `orders.` matches `orders` and `orders.new`, never
`orders2`. Frames that start with `CONTROL` are for one subscriber (sync markers); the
byte sorts after every topic, so libzmq, which re-sends filters in sorted order when it
reconnects, always re-sends a subscriber's control filter after its real ones.
"""

from __future__ import annotations

from typing import Final

__all__ = ["AUTH", "CONTROL", "MAX_UPSTREAM_BYTES", "REPORT", "topic_frame", "subscription_filter", "covers"]

CONTROL: Final = b"\xff"
# A subscriber's token on a secure broker (mesh/broker/subscribers.py): never published
# to; it sorts after every topic filter, so it follows them when libzmq re-sends them.
AUTH: Final = CONTROL + b"\x00"
# A subscriber's drop report (MessagePack after it), sent as a subscription the broker
# never applies: libzmq mis-assigns the broker's decisions after any upstream message
# that is not an (un)subscription (mesh/broker/subscribers.py).
REPORT: Final = CONTROL + b"\x01"
# The longest message a subscriber may send upstream (a filter, its token, a report).
# libzmq keeps every filter a subscriber sends in a byte-wise trie (applied or not, until
# it unsubscribes or leaves), about 35 bytes of memory per byte, so the events socket
# cuts the link of a subscriber that sends a longer one (MAXMSGSIZE).
MAX_UPSTREAM_BYTES: Final = 4096


def topic_frame(topic: str) -> bytes:
    """Frame 0 of a published event: the topic and a closing dot."""
    return topic.encode() + b"."


def subscription_filter(prefix: str) -> bytes:
    """The ZeroMQ filter for a topic prefix: that topic and every topic below it ('' = all)."""
    return (prefix + ".").encode() if prefix else b""


def covers(prefix: str, topic: str) -> bool:
    """Whether `prefix` ('' for all) covers `topic`, segment by segment."""
    return not prefix or topic == prefix or topic.startswith(prefix + ".")
