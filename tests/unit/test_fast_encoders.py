"""The hot-path header encoders write exactly what the record-based codec writes."""

from __future__ import annotations

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from mesh.protocol import (
    command,
    decode_header,
    encode_command_header,
    encode_event_header,
    encode_header,
    encode_response_header,
    encode_stamped_event,
    event,
    response_to,
    unpack_header,
)

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
ids = st.from_regex(r"[\x21-\x7e]{1,64}", fullmatch=True)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
metadata = st.dictionaries(st.text(max_size=8), st.integers(-1000, 1000) | st.text(max_size=8), max_size=5)


@given(names, names, ids, times, st.none() | times, metadata)
def test_command_header_bytes_match_the_codec(service, action, cid, now, deadline, meta):
    """encode_command_header gives the bytes of encode_header(command(...))."""
    fast = encode_command_header(service, action, id=cid, now=now, deadline=deadline, metadata=meta)
    slow = encode_header(command(service, action, now=now, deadline=deadline, id=cid, metadata=meta))
    assert fast == slow


@given(names, names, ids, times)
def test_response_header_matches_the_codec_but_for_its_fresh_id(service, action, cid, now):
    """encode_response_header answers the command like response_to does (each reply gets a new id)."""
    frame = encode_header(command(service, action, now=1.0, id=cid))
    fast = msgpack.unpackb(encode_response_header(unpack_header(frame), now))
    slow = msgpack.unpackb(encode_header(response_to(decode_header(frame), now=now)))
    assert fast.pop("id") != slow.pop("id")
    assert list(fast.items()) == list(slow.items())
    assert decode_header(encode_response_header(unpack_header(frame), now)).correlation_id == cid


topics = st.from_regex(r"[a-z0-9_-]{1,8}(\.[a-z0-9_-]{1,8}){0,3}", fullmatch=True)


@given(topics, ids, times, metadata)
def test_event_header_bytes_match_the_codec(topic, eid, now, meta):
    """encode_event_header gives the bytes of encode_header(event(...))."""
    assert encode_event_header(topic, id=eid, now=now, metadata=meta) == encode_header(
        event(topic, now=now, id=eid, metadata=meta)
    )


@given(topics, ids, times, metadata, st.integers(1, 2**53))
def test_stamped_event_is_the_published_one_with_its_seq(topic, eid, now, meta, seq):
    """The broker's header for subscribers decodes to the publisher's fields plus seq."""
    published = decode_header(encode_header(event(topic, now=now, id=eid, metadata=meta)))
    stamped = decode_header(encode_stamped_event(unpack_header(encode_header(event(topic, now=now, id=eid, metadata=meta))), seq))
    assert stamped.seq == seq
    assert (stamped.topic, stamped.id, stamped.timestamp, dict(stamped.metadata)) == (
        published.topic, published.id, published.timestamp, dict(published.metadata)
    )
