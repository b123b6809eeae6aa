"""HTTP/1.1 as the monitor speaks it: request heads in, decisions and response bytes out; no sockets.

Rules of this module:

* Only what the monitor needs: a GET of a path with its headers. A body is allowed with
  `Content-Length` only, and discarded; anything else is a `Refusal`.
* Limits are checked as each line arrives, before work proportional to the input:
  `MAX_HEAD_BYTES` for the request line and headers together, `MAX_HEADERS` fields,
  `MAX_BODY_BYTES` of body.
* A refusal carries the HTTP status and a one-line reason a person understands; the
  server answers it as JSON and closes the connection. Nothing here reads a clock: the
  `Date` header's value comes in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

__all__ = ["MAX_BODY_BYTES", "MAX_HEADERS", "MAX_HEAD_BYTES", "HeadReader", "Refusal", "Request",
           "encode_response", "refusal_response"]

MAX_HEAD_BYTES: Final = 16 * 1024  # request line and header fields, with their line ends
MAX_HEADERS: Final = 64  # header fields in one request
MAX_BODY_BYTES: Final = 64 * 1024  # a GET needs none; a small one is read and dropped
SERVER: Final = "mesh-monitor"
_TOKEN_CHARS: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request head.

    Attributes:
        method: as sent (only GET is served).
        target: the request target (a path, or an absolute URL).
        headers: field values by lower-case name; repeated fields joined with ", ".
        keep_alive: whether the connection stays open after the response.
        body_length: bytes of body that follow the head (to read and drop).
        expect_continue: the client waits for `100 Continue` before sending the body.
    """

    method: str
    target: str
    headers: Mapping[str, str]
    keep_alive: bool
    body_length: int = 0
    expect_continue: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the monitor will not serve: the status to answer and why."""

    status: int
    reason: str


class HeadReader:
    """Collects one request head, line by line, and decides on it once the blank line arrives.

    `add_line()` takes each line with its line end (CRLF or a bare LF) and returns None
    while more lines are needed, then a `Request` or a `Refusal`. Blank lines before the
    request line are skipped (RFC 9112, 2.2) but count towards `MAX_HEAD_BYTES`.
    """

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._size = 0

    @property
    def started(self) -> bool:
        """Whether any byte of this request has arrived (a stalled peer, not an idle one)."""
        return self._size > 0

    def add_line(self, line: bytes) -> Request | Refusal | None:
        """Take one more line of the head.

        Args:
            line: the line as received, with its line end.

        Returns:
            None while the head is incomplete, else the decision on the whole head.
        """
        self._size += len(line)
        if self._size > MAX_HEAD_BYTES:
            return Refusal(431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")
        content = line[:-2] if line.endswith(b"\r\n") else line.removesuffix(b"\n")
        if content:
            if len(self._lines) > MAX_HEADERS:  # the request line plus MAX_HEADERS fields so far
                return Refusal(431, f"more than {MAX_HEADERS} header fields")
            self._lines.append(content)
            return None
        return parse_head(self._lines) if self._lines else None


def parse_head(lines: Sequence[bytes]) -> Request | Refusal:
    """Decide on a complete head: the request line, then the header fields (no line ends).

    Returns:
        The request, or why it is refused.
    """
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN_CHARS or not _printable(parts[1]):
        return Refusal(400, "the request line is not METHOD TARGET HTTP/1.1")
    method, target, version = (p.decode("ascii") for p in parts)
    if not (target.startswith("/") or target.startswith(("http://", "https://"))):
        return Refusal(400, "the request target is not a path")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/") and version[5:].replace(".", "", 1).isdigit():
            return Refusal(505, "only HTTP/1.0 and HTTP/1.1 are spoken")
        return Refusal(400, "the request line is not METHOD TARGET HTTP/1.1")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= _TOKEN_CHARS:  # also a folded line or a space before ':'
            return Refusal(400, "a header field is not NAME: VALUE")
        key, text = name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")
        if key == "content-length" and key in headers and headers[key] != text:
            return Refusal(400, "two different Content-Length values")
        headers[key] = f"{headers[key]}, {text}" if key in headers and key != "content-length" else text
    if method != "GET":
        return Refusal(501, f"{method} is not served; the monitor answers GET only")
    if "transfer-encoding" in headers:
        return Refusal(501, "a body needs Content-Length; Transfer-Encoding is not accepted")
    length = headers.get("content-length", "0")
    if not length.isdigit() or not length.isascii():
        return Refusal(400, "Content-Length is not a number")
    if int(length) > MAX_BODY_BYTES:
        return Refusal(413, f"a body of more than {MAX_BODY_BYTES} bytes")
    options = {o.strip().lower() for o in headers.get("connection", "").split(",")}
    keep_alive = "close" not in options if version == "HTTP/1.1" else "keep-alive" in options
    expect = headers.get("expect", "").lower() == "100-continue"
    return Request(method, target, headers, keep_alive, int(length), expect)


def _printable(value: bytes) -> bool:
    return bool(value) and all(0x21 <= b <= 0x7E for b in value)


def encode_response(
    status: int,
    content_type: str,
    body: bytes,
    *,
    keep_alive: bool,
    date: str,
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The bytes of one response.

    Args:
        status: the HTTP status.
        content_type: the body's media type.
        body: the whole body (its length is sent).
        keep_alive: False adds `Connection: close`.
        date: the `Date` header's value (an IMF-fixdate).
        extra: further header fields.

    Returns:
        Status line, headers and body.
    """
    fields = [("Server", SERVER), ("Date", date), ("Content-Type", content_type),
              ("Content-Length", str(len(body))), ("Cache-Control", "no-store"), *extra]
    if not keep_alive:
        fields.append(("Connection", "close"))
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields)
    return head.encode("latin-1") + b"\r\n" + body


def refusal_response(refusal: Refusal, *, date: str) -> bytes:
    """The response that ends a connection for `refusal`: JSON `{"error", "hint"}`, then close."""
    body = json.dumps({"error": HTTPStatus(refusal.status).phrase.lower(), "hint": refusal.reason}).encode()
    return encode_response(refusal.status, "application/json", body, keep_alive=False, date=date)
