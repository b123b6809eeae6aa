"""The access policy of a broker cluster (sans-IO): the first policy committed is in force
on every broker, and `mesh.policy` changes it everywhere once committed."""

from __future__ import annotations

from typing import Any

import msgpack

from mesh.broker import Broker, BrokerConfig
from mesh.broker.core import BrokerSecurity, Outgoing
from mesh.cluster.shared import SharedState
from mesh.protocol import (
    ErrorCode,
    MessageType,
    encode_command_header,
    encode_payload,
    unpack_header,
)
from mesh.security.gate import Gate, GateSettings, Peer
from mesh.security.policy import policy_from_text
from mesh.security.tokens import TokenIssuer, TokenSettings, TokenVerifier
from mesh.testing.frames import CLIENT, error_of, header_of, only, payload_of

NOW = 1_700_000_000.0
SECRET = b"k" * 32
SETTINGS = TokenSettings("HS256", "mesh", "mesh")
ALICE = Peer("alice", "127.0.0.1")
FIRST = """
[roles.admin]
allow = ["*"]

[roles.reader]
allow = ["mesh.ping", "echo.echo"]
"""
# What b2 read from its own state directory: a reader may call nothing there.
OTHER = """
[roles.admin]
allow = ["*"]

[roles.reader]
allow = []
"""
CHANGED = FIRST.replace('["mesh.ping", "echo.echo"]', '["mesh.ping", "echo.echo", "mesh.services"]')


def secure_broker(name: str, policy: str) -> Broker:
    gate = Gate(GateSettings(), TokenVerifier(SETTINGS, SECRET), policy_from_text(policy, f"{name}/policy.toml"))
    return Broker(BrokerConfig(name=name), BrokerSecurity(gate))


class Cluster:
    """Two secure broker cores that read different policy files, and the log they share."""

    def __init__(self) -> None:
        self.log: list[bytes] = []
        self.brokers = [secure_broker("b1", FIRST), secure_broker("b2", OTHER)]
        self.states = [SharedState(events=b.events) for b in self.brokers]
        for broker, state in zip(self.brokers, self.states, strict=True):
            broker.join_cluster(state, NOW, run=1)

    def commit(self) -> list[list[Outgoing]]:
        for broker in self.brokers:
            self.log.extend(broker.take_proposals(NOW))
        for state in self.states:
            for index in range(state.applied + 1, len(self.log) + 1):
                state.apply(index, self.log[index - 1])
        return [broker.apply_shared(NOW) for broker in self.brokers]


def call_frames(action: str, payload: Any = None, *, role: str = "admin", id: str = "c1") -> list[bytes]:
    """`mesh.<action>` with a token of `role`: [header, payload]."""
    header = unpack_header(encode_command_header("mesh", action, id=id, now=NOW))
    header["security"] = {"level": 1, "token": TokenIssuer(SETTINGS, SECRET).issue("alice", [role], 600, NOW)}
    return [msgpack.packb(header), encode_payload(payload)]


def call(broker: Broker, action: str, payload: Any = None, *, role: str, id: str) -> list[Outgoing]:
    """A client's `mesh.<action>` with a token of `role`."""
    return broker.client_message(CLIENT, call_frames(action, payload, role=role, id=id), NOW, ALICE)


def allowed(broker: Broker, action: str, id: str) -> bool:
    out = only(call(broker, action, role="reader", id=id))
    return header_of(out[2]).type is MessageType.RESPONSE


def test_the_first_committed_policy_is_in_force_on_every_broker() -> None:
    cluster = Cluster()
    b1, b2 = cluster.brokers
    assert not allowed(b2, "ping", "p1")  # b2's own file, until the log says otherwise
    cluster.commit()
    assert allowed(b1, "ping", "p2") and allowed(b2, "ping", "p3")
    assert all(s.policy == FIRST for s in cluster.states)
    assert b1.take_proposals(NOW + 5) == [] and b2.take_proposals(NOW + 5) == []  # both confirmed


def test_mesh_policy_changes_it_everywhere_once_committed() -> None:
    cluster = Cluster()
    cluster.commit()
    b1, b2 = cluster.brokers
    assert not allowed(b2, "services", "s1")
    refused = only(call(b1, "policy", {"policy": CHANGED}, role="reader", id="x1"))
    assert error_of(refused[2]).code == ErrorCode.ACCESS_DENIED  # only a role that may call mesh.policy
    assert call(b1, "policy", {"policy": CHANGED}, role="admin", id="x2") == []  # answered when committed
    acks = cluster.commit()
    assert payload_of(only(acks[0])[2])["policy"] and acks[1] == []
    assert allowed(b2, "services", "s2") and allowed(b1, "services", "s3")


def test_a_policy_with_problems_is_refused_with_each_one() -> None:
    cluster = Cluster()
    out = only(call(cluster.brokers[0], "policy", {"policy": "[roles.x]\nallow = 3\nfoo = 1\n"}, role="admin", id="x1"))
    err = error_of(out[2])
    assert err.code == ErrorCode.VALIDATION_FAILED and len(err.details["problems"]) == 2
    proposals = [msgpack.unpackb(p) for p in cluster.brokers[0].take_proposals(NOW)]
    assert [(p["op"], p.get("change")) for p in proposals] == [("run", None), ("policy", None)]  # start-up ones only


def test_a_snapshot_brings_the_policy_to_a_broker_that_missed_it() -> None:
    cluster = Cluster()
    cluster.commit()
    late = secure_broker("b3", OTHER)
    state = SharedState(events=late.events)
    late.join_cluster(state, NOW, run=1)
    state.restore(cluster.states[0].snapshot())
    late.apply_shared(NOW)
    assert allowed(late, "ping", "p1")


def test_a_repeated_change_does_not_undo_a_later_one() -> None:
    cluster = Cluster()
    cluster.commit()
    b1, b2 = cluster.brokers
    call(b1, "policy", {"policy": CHANGED}, role="admin", id="x1")
    first = b1.take_proposals(NOW)  # the change, as the member forwarded it
    cluster.log.extend(first)
    cluster.commit()
    call(b2, "policy", {"policy": FIRST}, role="admin", id="x2")
    cluster.commit()
    cluster.log.extend(first)  # the first change proposed again (a retry after a leader change)
    cluster.commit()
    assert all(s.policy == FIRST for s in cluster.states)
    assert not allowed(b1, "services", "s1")


def test_a_node_may_not_change_the_policy() -> None:
    cluster = Cluster()
    b1, _ = cluster.brokers
    out = only(b1.node_message(b"node-x", [b"", *call_frames("policy", {"policy": CHANGED})], NOW, ALICE))
    assert error_of(out[2][1:]).code == ErrorCode.ACCESS_DENIED
    assert [msgpack.unpackb(p).get("change") for p in b1.take_proposals(NOW)] == [None, None]  # run, start-up policy
