"""Naming rules shared by the message model and the codec: services, actions, topics, ids."""

from __future__ import annotations

import re
from typing import Final

from .errors import ValidationFailedError

__all__ = ["NAME_PATTERN", "TOPIC_PATTERN", "ID_PATTERN", "SYSTEM_SERVICE", "check_name", "check_topic", "shown_key"]

NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
TOPIC_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,15}"
ID_PATTERN: Final = r"[\x21-\x7e]{1,64}"
SYSTEM_SERVICE: Final = "mesh"  # the broker's own service: it answers these commands itself

_NAME = re.compile(NAME_PATTERN)
_TOPIC = re.compile(TOPIC_PATTERN)
_ID = re.compile(ID_PATTERN)
ID_MATCH: Final = _ID.fullmatch
SHOWN_KEY: Final = 64  # characters of a peer's key quoted back in an error's field


def shown_key(key: object) -> str:
    """A map key from a peer as an error's field names it: short, whatever the peer sent.

    Error headers have a size limit, and a field must not echo a megabyte back.
    """
    if isinstance(key, str) and len(key) <= SHOWN_KEY:
        return key
    text = key if isinstance(key, str) else repr(key)
    return text if len(text) <= SHOWN_KEY else text[: SHOWN_KEY - 3] + "..."


def _invalid(field: str, problem: str) -> ValidationFailedError:
    return ValidationFailedError(f"{field}: {problem}", details={"field": field})


def check_name(value: object, field: str) -> str:
    """A service or action name: letters, digits, `_` and `-`, at most 64.

    Raises:
        ValidationFailedError: naming `field`.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _invalid(field, f"must match {NAME_PATTERN}")
    return value


def check_topic(value: object, field: str = "topic") -> str:
    """An event topic: 1 to 16 dot-separated names.

    Raises:
        ValidationFailedError: naming `field`.
    """
    if not isinstance(value, str) or not _TOPIC.fullmatch(value):
        raise _invalid(field, "must be dot-separated names")
    return value
