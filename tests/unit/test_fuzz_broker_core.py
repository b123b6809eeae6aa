"""Fuzzing the broker's sans-IO core with security on: it never raises, and it answers
every client message it can name.

Each example is one seed: a secure core (the state `mesh up` makes) with a real echo
node registered, fed 24 messages of the fuzz suite's client attacker (an admitted key
with its valid reader token) and node attacker (the kv node's key), in a seeded order.
Commands the core dispatches are answered: by the echo node properly, by the attacker
node as `mesh.fuzz.attacks.answer` says (well, twice, broken, or never). Then the clock
moves past every deadline. The ledger of `mesh.fuzz.ledger` (the same the end-to-end run
uses) then says which client messages were owed an answer and did not get one.
"""

from __future__ import annotations

import random

import pytest
from fuzzing import LIMITS, SEEDS, SecureCore, broker_stack, examples, secure_core
from hypothesis import given

from mesh.broker import Broker, Side
from mesh.fuzz.attacks import Via, Who, answer, shot
from mesh.fuzz.corpus import registration, reply_to, unpack_wire
from mesh.fuzz.ledger import Ledger
from mesh.fuzz.mutate import pack
from mesh.protocol import encode_command_header, encode_payload

CLIENT = b"\x00fuzz-client"
ATTACKER = b"\x00kv-attacker"
ECHO = b"\x00echo-node"
MESSAGES = 24


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> SecureCore:
    return secure_core(tmp_path_factory.mktemp("fuzz-core"))


class _Feeder:
    """Feeds a core as its loop would and hands what it sends back to the ledger and nodes."""

    def __init__(self, core: SecureCore, seed: int) -> None:
        self.core, self.seed = core, seed
        self.broker: Broker = core.broker()
        self.ledger = Ledger(answer_by=core.now + 10.0, limit=LIMITS.message)
        self.answers = 0

    def call(self, method, *args) -> None:
        with broker_stack():
            out = method(*args)
        for side, ident, frames in out:
            if side is Side.CLIENT and ident == CLIENT:
                self.ledger.on_received(Via.CLIENT, frames, self.core.now)
            elif side is Side.NODE and ident == ATTACKER:
                if frames and frames[0]:
                    self.answers += 1
                    for reply in answer(self.seed, self.answers, list(frames), self.core.now):
                        self.call(self.broker.node_message, ATTACKER, reply, self.core.now, self.core.node)
                else:
                    self.ledger.on_received(Via.NODE, frames[1:], self.core.now)
            elif side is Side.NODE and ident == ECHO and frames and frames[0]:
                wire, payload = reply_to(random.Random(0), unpack_wire(frames[1]), self.core.now, "echo-reply")
                wire.pop("error", None)
                wire["type"] = "response"
                self.call(self.broker.node_message, ECHO, [frames[0], pack(wire), payload], self.core.now, self.core.echo)


def _register_echo(feeder: _Feeder) -> None:
    now = feeder.core.now
    header = encode_command_header("mesh", "register", id="reg-echo", now=now)
    payload = encode_payload(registration(random.Random(0), name="echo", service="echo"))
    feeder.call(feeder.broker.node_message, ECHO, [b"", header, payload], now, feeder.core.echo)


@examples(fast=120)
@given(seed=SEEDS)
def test_core_never_raises_and_answers_every_client_message(core: SecureCore, seed: int) -> None:
    """client_message, node_message and tick never raise on fuzzed input, and every client
    message with a readable id gets exactly one answer by the time its deadline passed."""
    feeder = _Feeder(core, seed)
    _register_echo(feeder)
    rng = random.Random(seed)
    counts = {Who.CLIENT: 0, Who.NODE: 0}
    for _ in range(MESSAGES):
        who = Who.CLIENT if rng.random() < 0.6 else Who.NODE
        s = shot(seed, who, counts[who], core.now, core.seal if who is Who.CLIENT else (lambda w, p, n: (pack(w), p)), LIMITS)
        counts[who] += 1
        feeder.ledger.on_sent(s, core.now)
        try:
            if who is Who.CLIENT:
                feeder.call(feeder.broker.client_message, CLIENT, s.frames, core.now, core.client)
            else:
                feeder.call(feeder.broker.node_message, ATTACKER, s.frames, core.now, core.node)
        except Exception as exc:
            raise AssertionError(f"{who}#{s.index} ({s.kind}) raised {type(exc).__name__}: {exc!s:.200}; frames {s.hex(512)}") from exc
    feeder.call(feeder.broker.tick, core.now + 60.0)
    owed = feeder.ledger.unanswered()
    assert not owed, f"{len(owed)} unanswered, first: {owed[0].who}#{owed[0].index} ({owed[0].kind}) frames {owed[0].hex(512)}"
    assert feeder.ledger.duplicates == 0
