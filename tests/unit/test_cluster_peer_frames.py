"""The peer-link frame parser: every frame a cluster ROUTER receives is checked here."""

from __future__ import annotations

import pytest

from mesh.cluster.messages import AppendResponse, Snapshot, SnapshotRequest, VoteRequest, encode_message
from mesh.cluster.transport import (
    KIND_CHUNK,
    KIND_PROPOSAL,
    KIND_RAFT,
    MAX_PROPOSAL_BYTES,
    ChunkIn,
    FrameError,
    ProposalIn,
    RaftIn,
    Reassembly,
    chunk_frames,
    parse_frames,
    raft_in,
)

MEMBERS = ("a", "b", "c")
VOTE = VoteRequest("a", "b", 3, 7, 2, True)


def parse(*frames: bytes):
    return parse_frames(list(frames), "a", MEMBERS)


def test_a_raft_record_from_its_own_link_is_accepted():
    """[routing id, KIND_RAFT, record] with frm == routing id and to == me."""
    assert parse(b"b", KIND_RAFT, encode_message(VOTE)) == RaftIn("b", VOTE)


def test_forwarded_proposal_data_is_accepted_as_is():
    """[routing id, KIND_PROPOSAL, data] is handed over untouched, empty data too."""
    assert parse(b"c", KIND_PROPOSAL, b"\x00data") == ProposalIn("c", b"\x00data")
    assert parse(b"c", KIND_PROPOSAL, b"") == ProposalIn("c", b"")


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ((b"b", KIND_RAFT), "bad_frame_count"),
        ((b"b", KIND_RAFT, b"x", b"y"), "bad_frame_count"),
        ((b"mallory", KIND_RAFT, encode_message(VOTE)), "unknown_peer"),
        ((b"a", KIND_RAFT, encode_message(VOTE)), "unknown_peer"),
        ((b"\xff\xfe", KIND_RAFT, encode_message(VOTE)), "unknown_peer"),
        ((b"b", b"\x07", b""), "unknown_kind"),
        ((b"b", b"", b""), "unknown_kind"),
        ((b"b", KIND_RAFT, b"\xc1"), "bad_message"),
        ((b"b", KIND_RAFT, b"\x93\x09\x01\x02"), "bad_message"),
        ((b"c", KIND_RAFT, encode_message(VOTE)), "spoofed_sender"),
        ((b"b", KIND_RAFT, encode_message(AppendResponse("c", "b", 1, True, 1, 0, 0, 0))), "misaddressed"),
        ((b"b", KIND_PROPOSAL, b"x" * (MAX_PROPOSAL_BYTES + 1)), "too_large"),
    ],
)
def test_bad_frames_are_refused_with_a_reason(frames, reason):
    """Each kind of bad input raises FrameError with the counter name of its reason."""
    with pytest.raises(FrameError) as err:
        parse(*frames)
    assert err.value.reason == reason


def test_refusal_messages_never_hold_payload_bytes():
    """A garbage body or proposal is described by size and sender only."""
    secret = b"TOP-SECRET-PAYLOAD"
    for frames in ((b"b", KIND_RAFT, secret), (b"b", b"\x05", secret)):
        with pytest.raises(FrameError) as err:
            parse(*frames)
        assert "SECRET" not in str(err.value)


def _chunks(record: bytes, number: int, frame_bytes: int = 100) -> list[ChunkIn]:
    out = []
    for frames in chunk_frames(record, number, frame_bytes):
        assert len(frames[1]) <= frame_bytes
        chunk = parse(b"b", *frames)
        assert isinstance(chunk, ChunkIn)
        out.append(chunk)
    return out


def _refused(joiner: Reassembly, chunk: ChunkIn) -> str:
    """The reason `joiner` refuses `chunk` for."""
    with pytest.raises(FrameError) as err:
        joiner.add(chunk)
    return err.value.reason


def test_a_record_in_chunks_is_joined_whole_and_decodes():
    """A big snapshot goes in frame-sized chunks and comes out as the same message."""
    msg = SnapshotRequest("a", "b", 4, Snapshot(9, 3, bytes(range(256)) * 4))
    record = encode_message(msg)
    chunks = _chunks(record, 7)
    assert len(chunks) == -(-len(record) // 84) and {c.count for c in chunks} == {len(chunks)}
    joiner = Reassembly()
    assert [joiner.add(c) for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert raft_in("b", joiner.add(chunks[-1]), "a") == RaftIn("b", msg)


def test_a_gap_drops_the_partial_record_and_the_next_one_still_arrives():
    """Chunks lost to a full queue: the record is dropped, not joined with holes."""
    first, second = _chunks(b"x" * 500, 1), _chunks(b"y" * 500, 2)
    joiner = Reassembly()
    joiner.add(first[0])
    assert _refused(joiner, first[2]) == "chunk_lost"
    assert _refused(joiner, first[3]) == "chunk_lost"  # the rest of the broken record is refused too
    for chunk in second[:-1]:
        assert joiner.add(chunk) is None
    assert joiner.add(second[-1]) == b"y" * 500


def test_chunks_of_another_record_with_the_same_number_are_not_joined():
    """A restarted peer may reuse a number: a different chunk count gives it away."""
    old, new = _chunks(b"o" * 300, 5), _chunks(b"n" * 200, 5)
    joiner = Reassembly()
    joiner.add(new[0])
    assert _refused(joiner, old[1]) == "chunk_lost"


def test_another_frame_from_the_peer_cuts_its_partial_record():
    joiner = Reassembly()
    chunks = _chunks(b"x" * 300, 1)
    joiner.add(chunks[0])
    assert joiner.cut("b") and not joiner.cut("b")
    assert _refused(joiner, chunks[1]) == "chunk_lost"


def test_a_chunked_record_over_the_limit_is_dropped():
    joiner = Reassembly(max_bytes=150)
    chunks = _chunks(b"z" * 300, 1)
    joiner.add(chunks[0])
    assert _refused(joiner, chunks[1]) == "too_large"


@pytest.mark.parametrize(
    "body", [b"", b"\x00" * 16, bytes(8) + (5).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"x",
             bytes(8) + (0).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"x"],
)  # fmt: skip
def test_a_malformed_chunk_is_refused(body):
    """No data, an index past the count, or a 'chunked' record of one chunk."""
    with pytest.raises(FrameError) as err:
        parse(b"b", KIND_CHUNK, body)
    assert err.value.reason == "bad_chunk"
