"""Fuzzing the codec where a peer's bytes first meet our code: only MeshError comes out.

The inputs are the fuzz suite's own (mesh.fuzz): valid messages of every kind built with
the codec's encoders, mutated structurally and byte-wise, and hostile MessagePack (deep
nesting, a million empty maps, lengths that lie, non-string and bin keys, huge ints,
ext types, invalid UTF-8). Each example is one seed; see tests/unit/fuzzing.py.
"""

from __future__ import annotations

import random
import time

from fuzzing import LIMITS, SEEDS, broker_stack, examples, only_mesh_errors
from hypothesis import given

from mesh.fuzz.attacks import Who, shot
from mesh.fuzz.mutate import hostile_msgpack
from mesh.protocol import decode_header, decode_payload, peek_header, unpack_header

NOW = time.time()


def _frames(seed: int) -> list[bytes]:
    """The frames of one client and one node message of `seed`, and hostile MessagePack."""
    rng = random.Random(seed)
    frames = [*shot(seed, Who.CLIENT, 0, NOW, limits=LIMITS).frames, *shot(seed, Who.NODE, 0, NOW, limits=LIMITS).frames]
    return [*frames, hostile_msgpack(rng, LIMITS.frame)]


@examples(fast=300)
@given(seed=SEEDS)
def test_header_decoders_raise_only_mesh_errors(seed: int) -> None:
    """unpack_header and decode_header raise a MeshError (a code for the sender) or nothing."""
    for frame in _frames(seed):
        only_mesh_errors(unpack_header, frame)
        only_mesh_errors(decode_header, frame)


@examples(fast=300)
@given(seed=SEEDS)
def test_payload_decoder_raises_only_mesh_errors(seed: int) -> None:
    """decode_payload raises BadFormatError or nothing, whatever the bytes."""
    for frame in _frames(seed):
        only_mesh_errors(decode_payload, frame)


@examples(fast=300)
@given(seed=SEEDS)
def test_peek_header_never_raises(seed: int) -> None:
    """peek_header (salvaging an id from a bad message) never raises at all."""
    for frame in _frames(seed):
        for key in ("id", "correlation_id", "type"):
            try:
                with broker_stack():
                    peek_header(frame, key)
            except Exception as exc:
                raise AssertionError(f"peek_header raised {type(exc).__name__} on {frame[:512].hex()}") from exc
