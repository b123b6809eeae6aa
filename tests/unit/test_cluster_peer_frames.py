"""The peer-link frame parser: every frame a cluster ROUTER receives is checked here."""

from __future__ import annotations

import pytest

from mesh.cluster.messages import AppendResponse, VoteRequest, encode_message
from mesh.cluster.transport import (
    KIND_PROPOSAL,
    KIND_RAFT,
    MAX_PROPOSAL_BYTES,
    FrameError,
    ProposalIn,
    RaftIn,
    parse_frames,
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
