"""Fuzzing registration and policy parsing: a bad one is refused with its code, never more.

Registrations are the kv node's, broken the ways attackers broke them (non-string service
and action keys, schemas with $ref cycles or {"type": 12} or near the size limit, a
payload of empty maps) or mutated structurally. Policies are the generated policy.toml
with lines dropped, repeated, cut, or given odd TOML values (arrays 1,000 deep, dates,
bad networks, wrong tables). Each example is one seed; see tests/unit/fuzzing.py.
"""

from __future__ import annotations

import random
import time

from fuzzing import LIMITS, SEEDS, broker_stack, examples, only_mesh_errors
from hypothesis import given

from mesh.broker.registry import Registry
from mesh.fuzz.attacks import hostile_registration
from mesh.fuzz.corpus import hostile_policy, registration
from mesh.fuzz.mutate import mutate_value, pack
from mesh.protocol import MeshError, decode_payload
from mesh.security.policy import PolicyError, policy_from_text

NOW = time.time()


def _register(payload: object) -> None:
    Registry().register(b"node-1", payload, NOW, set())


@examples(fast=300)
@given(seed=SEEDS)
def test_hostile_registration_frames_raise_only_mesh_errors(seed: int) -> None:
    """A registration frame as the broker gets it: decoded, then registered; MeshError or nothing."""
    frame = hostile_registration(random.Random(seed), LIMITS)
    try:
        payload = decode_payload(frame)
    except MeshError:
        return
    only_mesh_errors(_register, payload)


@examples(fast=300)
@given(seed=SEEDS)
def test_mutated_registrations_raise_only_mesh_errors(seed: int) -> None:
    """Registry.register on a structurally mutated registration (twice mutated, any key
    type a decoder may give) raises a MeshError or nothing."""
    rng = random.Random(seed)
    frame = pack(mutate_value(rng, mutate_value(rng, registration(rng))), rng)
    try:
        payload = decode_payload(frame)  # only what can come off the wire
    except MeshError:
        return
    only_mesh_errors(_register, payload)


@examples(fast=200)
@given(seed=SEEDS)
def test_hostile_policy_text_raises_only_policy_errors(seed: int) -> None:
    """policy_from_text refuses a bad policy with PolicyError (listing its problems), nothing else."""
    text = hostile_policy(random.Random(seed))
    try:
        with broker_stack():
            policy_from_text(text, "fuzz")
    except PolicyError:
        pass
    except Exception as exc:
        raise AssertionError(f"policy_from_text raised {type(exc).__name__} on {text[:2000]!r}") from exc
