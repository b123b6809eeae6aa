"""The monitor's request reader: heads in, a request or a refusal with a stable status out (no sockets)."""

from __future__ import annotations

import json

import pytest

from mesh.monitor.http_wire import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    HeadReader,
    Refusal,
    Request,
    encode_response,
    refusal_response,
)

DATE = "Thu, 01 Jan 2026 00:00:00 GMT"


def read(head: bytes) -> Request | Refusal | None:
    """Feed `head` line by line, as the server's reader does; the first decision (None: still incomplete)."""
    reader = HeadReader()
    for line in head.splitlines(keepends=True):
        outcome = reader.add_line(line)
        if outcome is not None:
            return outcome
    return None


def test_a_plain_get_is_a_request_that_keeps_the_connection_open():
    """HTTP/1.1 keeps alive unless `Connection: close`; names are lower-cased; repeats are joined."""
    request = read(b"GET /varz?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert request == Request("GET", "/varz?x=1", {"host": "a", "authorization": "Bearer t", "x-a": "1, 2"}, True)
    assert read(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive is False  # type: ignore[union-attr]


def test_http_1_0_closes_unless_it_asks_for_keep_alive_and_bare_line_feeds_are_read():
    """An HTTP/1.0 request closes after its response unless it says `Connection: keep-alive`."""
    assert read(b"GET / HTTP/1.0\n\n").keep_alive is False  # type: ignore[union-attr]
    assert read(b"GET / HTTP/1.0\nConnection: Keep-Alive\n\n").keep_alive is True  # type: ignore[union-attr]


def test_blank_lines_before_the_request_line_are_skipped_and_the_head_waits_for_its_blank_line():
    """A stray CRLF before a request is ignored; without the final blank line there is no decision yet."""
    assert read(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n") == Request("GET", "/", {}, True)
    reader = HeadReader()
    assert not reader.started
    assert reader.add_line(b"GET / HTTP/1.1\r\n") is None and reader.started


def test_a_body_with_content_length_is_announced_to_be_dropped():
    """Content-Length up to MAX_BODY_BYTES is accepted; Expect: 100-continue is noted."""
    request = read(b"GET / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert isinstance(request, Request) and request.body_length == 5 and request.expect_continue


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\n\r\n", 400),
        (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
        (b"GET varz HTTP/1.1\r\n\r\n", 400),
        (b"GET / SPDY/3\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"POST /varz HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1), 413),
    ],
)
def test_a_malformed_or_unserved_request_is_refused_with_its_status(head: bytes, status: int):
    """Each kind of bad head gets one stable status and a reason a person can act on."""
    refusal = read(head)
    assert isinstance(refusal, Refusal) and refusal.status == status and refusal.reason


def test_more_than_max_headers_fields_are_refused_before_the_head_ends():
    """MAX_HEADERS fields pass; one more is a 431 as soon as it arrives, not after the blank line."""
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS))
    assert isinstance(read(b"GET / HTTP/1.1\r\n" + fields + b"\r\n"), Request)
    refusal = read(b"GET / HTTP/1.1\r\n" + fields + b"X-last: v\r\n")
    assert refusal == Refusal(431, f"more than {MAX_HEADERS} header fields")


def test_a_head_past_max_head_bytes_is_refused_counting_skipped_blank_lines_too():
    """The request line and headers together (and any blank lines before them) stay under MAX_HEAD_BYTES."""
    big = b"X-Big: " + b"v" * (MAX_HEAD_BYTES - 100) + b"\r\n"
    assert isinstance(read(b"GET / HTTP/1.1\r\n" + big + b"\r\n"), Request)
    assert read(b"GET / HTTP/1.1\r\n" + big + big) == Refusal(431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")
    assert isinstance(read(b"\r\n" * (MAX_HEAD_BYTES // 2 + 1)), Refusal)


def test_responses_carry_length_no_store_and_close_when_asked():
    """A response states its length and `Cache-Control: no-store`; a refusal is JSON and closes."""
    wire = encode_response(200, "application/json", b"{}", keep_alive=True, date=DATE)
    assert wire.startswith(b"HTTP/1.1 200 OK\r\n") and wire.endswith(b"\r\n\r\n{}")
    assert b"Content-Length: 2\r\n" in wire and b"Cache-Control: no-store\r\n" in wire and b"Connection" not in wire
    refusal = refusal_response(Refusal(431, "too many"), date=DATE)
    head, _, body = refusal.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large") and b"Connection: close" in head
    assert json.loads(body) == {"error": "request header fields too large", "hint": "too many"}
