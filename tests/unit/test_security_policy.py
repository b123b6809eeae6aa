"""Every rule of the access policy, and every problem a policy file can have.

No sockets: the policy is a sans-IO core that answers `Decision(allowed, reason)`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from mesh.protocol import ConfigurationError, ErrorCode
from mesh.security import policy as policy_module
from mesh.security.policy import (
    Decision,
    Policy,
    PolicyError,
    load_policy,
    parse_policy,
)

EXAMPLE = """
[roles.reader]
allow = ["kv.get", "kv.list", "echo.*", "mesh.ping"]   # service.action patterns
deny = ["kv.delete"]                                    # deny wins over allow
cidrs = ["127.0.0.0/8", "10.0.0.0/8"]
renew = true
publish = ["orders.*"]
subscribe = ["*"]

[roles.writer]
allow = ["kv.*"]

[roles.admin]
allow = ["*"]

[roles.auditor]
allow = ["audit.*"]
deny = ["*.delete"]
publish = ["audit"]
subscribe = ["audit", "orders.*"]

[roles.lan]
allow = ["lan.?et"]
cidrs = ["192.168.0.0/16", "fd00::/8"]

[nodes.kv-node]
services = ["kv"]

[nodes.tools]
services = ["echo", "fs-*"]
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE)
    return load_policy(path)


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(data)
    return [str(p) for p in caught.value.problems]


# Commands


def test_a_role_allows_its_patterns(policy: Policy) -> None:
    """Exact patterns and `service.*` allow; the reason names role and pattern."""
    assert policy.decide(["reader"], "kv", "get", "127.0.0.1") == Decision(True, "role reader allows kv.get (kv.get)")
    assert policy.decide(["reader"], "echo", "anything", "10.1.2.3").allowed
    assert policy.decide(["lan"], "lan", "get", "192.168.1.1").allowed  # ? is one character
    assert not policy.decide(["lan"], "lan", "gets", "192.168.1.1").allowed


def test_deny_by_default(policy: Policy) -> None:
    """A command no role allows is refused, as are unknown roles and no roles at all."""
    assert policy.decide(["reader"], "kv", "put", "127.0.0.1") == Decision(False, "no role allows kv.put")
    assert not policy.decide(["ghost"], "kv", "get", "127.0.0.1").allowed
    assert not policy.decide([], "kv", "get", "127.0.0.1").allowed
    assert not policy.decide(["reader"], "kvx", "get", "127.0.0.1").allowed  # no prefix matching


def test_star_alone_allows_everything(policy: Policy) -> None:
    """`allow = ["*"]` covers every service and action (but not mesh.renew, below)."""
    assert policy.decide(["admin"], "kv", "delete", None).allowed
    assert policy.decide(["admin"], "any-service", "any_action", None).allowed


def test_deny_wins_over_allow_in_the_same_role(policy: Policy) -> None:
    """reader denies kv.delete even though it is a reader's service."""
    decision = policy.decide(["reader"], "kv", "delete", "127.0.0.1")
    assert decision == Decision(False, "role reader denies kv.delete (kv.delete)")


def test_deny_wins_over_allow_across_roles(policy: Policy) -> None:
    """An applicable role's deny beats another role's allow, whatever the order."""
    for roles in (["admin", "reader"], ["reader", "admin"]):
        assert not policy.decide(roles, "kv", "delete", "127.0.0.1").allowed
    assert not policy.decide(["writer", "auditor"], "kv", "delete", None).allowed  # *.delete
    assert policy.decide(["writer", "auditor"], "kv", "put", None).allowed


def test_a_role_applies_only_from_its_networks(policy: Policy) -> None:
    """Outside its cidrs a role neither allows nor denies; the reason says why."""
    outside = policy.decide(["reader"], "kv", "get", "192.168.1.1")
    assert outside == Decision(False, "no role allows kv.get (role reader does not apply from 192.168.1.1)")
    # reader's deny does not apply from outside either, so admin's allow stands.
    assert policy.decide(["admin", "reader"], "kv", "delete", "192.168.1.1").allowed
    assert policy.decide(["lan"], "lan", "get", "fd00::1").allowed


def test_a_role_with_networks_needs_a_known_address(policy: Policy) -> None:
    """No address (ipc://) or a malformed one: roles with cidrs do not apply."""
    assert not policy.decide(["reader"], "kv", "get", None).allowed
    assert not policy.decide(["reader"], "kv", "get", "").allowed
    assert not policy.decide(["reader"], "kv", "get", "not-an-ip").allowed
    assert "unknown address" in policy.decide(["reader"], "kv", "get", None).reason


def test_ipv4_mapped_ipv6_addresses_count_as_ipv4(policy: Policy) -> None:
    """`::ffff:10.1.2.3` is 10.1.2.3 for the cidrs check."""
    assert policy.decide(["reader"], "kv", "get", "::ffff:10.1.2.3").allowed
    assert not policy.decide(["reader"], "kv", "get", "::ffff:192.168.0.1").allowed


def test_roles_may_be_any_collection(policy: Policy) -> None:
    """Lists, tuples, sets and frozensets of role names give the same answers."""
    for roles in (["reader"], ("reader",), {"reader"}, frozenset({"reader"})):
        assert policy.decide(roles, "kv", "get", "127.0.0.1").allowed


# Renewal


def test_renew_needs_the_flag(policy: Policy) -> None:
    """Only a role with renew = true may renew, and only where it applies."""
    assert policy.may_renew(["reader"], "127.0.0.1") == Decision(True, "role reader may renew")
    assert not policy.may_renew(["reader"], "192.168.0.1").allowed
    assert not policy.may_renew(["writer"]).allowed


def test_allow_star_does_not_grant_renewal(policy: Policy) -> None:
    """decide() on mesh.renew follows the renew flag, not allow patterns."""
    assert not policy.decide(["admin"], "mesh", "renew", None).allowed
    assert policy.decide(["reader"], "mesh", "renew", "127.0.0.1").allowed


def test_deny_also_blocks_renewal() -> None:
    """A matching deny in an applicable role wins over another role's renew flag."""
    p = parse_policy({"roles": {"a": {"renew": True}, "b": {"deny": ["mesh.*"]}}})
    assert p.may_renew(["a"]).allowed
    assert not p.may_renew(["a", "b"]).allowed


# Events


def test_publish_patterns(policy: Policy) -> None:
    """`orders.*` covers topics below orders, not orders itself; `audit` covers itself and below."""
    assert policy.may_publish(["reader"], "orders.new", "127.0.0.1").allowed
    assert policy.may_publish(["reader"], "orders.eu.new", "127.0.0.1").allowed
    assert not policy.may_publish(["reader"], "orders", "127.0.0.1").allowed
    assert not policy.may_publish(["reader"], "ordersx.new", "127.0.0.1").allowed
    assert policy.may_publish(["auditor"], "audit").allowed
    assert policy.may_publish(["auditor"], "audit.login").allowed
    assert not policy.may_publish(["auditor"], "auditx").allowed
    assert not policy.may_publish(["writer"], "orders.new").allowed  # no publish list


def test_publish_follows_networks(policy: Policy) -> None:
    """reader's publish rights do not apply from outside its networks."""
    assert not policy.may_publish(["reader"], "orders.new", "192.168.0.1").allowed
    assert not policy.may_publish(["reader"], "orders.new").allowed


def test_subscribe_patterns(policy: Policy) -> None:
    """A subscription must be covered whole; '' (everything) needs `*`."""
    assert policy.may_subscribe(["reader"], "", "127.0.0.1").allowed
    assert policy.may_subscribe(["reader"], "anything.at.all", "127.0.0.1").allowed
    assert policy.may_subscribe(["auditor"], "audit").allowed
    assert policy.may_subscribe(["auditor"], "orders.new").allowed
    assert not policy.may_subscribe(["auditor"], "orders").allowed  # would include `orders` itself
    assert not policy.may_subscribe(["auditor"], "").allowed
    assert not policy.may_subscribe(["writer"], "audit").allowed


# Registration


def test_only_listed_nodes_register_their_services(policy: Policy) -> None:
    """A node may register the services its patterns match, and nothing else."""
    assert policy.may_register("kv-node", "kv") == Decision(True, "node kv-node may register kv (kv)")
    assert not policy.may_register("kv-node", "kv2").allowed
    assert policy.may_register("tools", "fs-home").allowed
    assert not policy.may_register("tools", "kv").allowed


def test_a_rogue_node_cannot_take_over_a_service(policy: Policy) -> None:
    """Unknown identities and unauthenticated nodes register nothing."""
    assert not policy.may_register("rogue", "kv").allowed
    assert not policy.may_register(None, "kv").allowed
    assert not policy.may_register("", "echo").allowed


# Refusals and the cache


def test_cache_is_bounded_and_answers_stay_right(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CACHE_SIZE questions the oldest answers go; repeated answers are the same object."""
    monkeypatch.setattr(policy_module, "CACHE_SIZE", 8)
    first = policy.decide(("reader",), "kv", "get", "127.0.0.1")
    assert policy.decide(("reader",), "kv", "get", "127.0.0.1") is first
    for i in range(20):
        assert not policy.decide(("reader",), "kv", f"a{i}", "127.0.0.1").allowed
        assert policy.may_publish(("reader",), f"orders.t{i}", "127.0.0.1").allowed
    assert len(policy._commands) <= 8 and len(policy._topic_cache) <= 8
    assert policy.decide(("reader",), "kv", "get", "127.0.0.1") == first


# Files and their problems


def test_an_empty_policy_refuses_everything() -> None:
    """No roles, no nodes: a valid policy that denies every question."""
    p = parse_policy({})
    assert not p.decide(["admin"], "kv", "get", None).allowed
    assert not p.may_register("kv-node", "kv").allowed


def test_every_problem_is_listed_with_its_key() -> None:
    """One pass names every bad key, so a file is fixed at once."""
    found = problems_of(
        {
            "role": {},
            "roles": {
                "bad name": {},
                "notatable": 3,
                "r": {
                    "allow": ["kv", "kv.get.x", "mesh.renew", 5, "k v.get", "kv.get"],
                    "deny": "kv.delete",
                    "cidrs": ["10.0.0.1/8", "10.0.0.0/33", "localhost"],
                    "renew": "yes",
                    "publish": ["orders.", "*.x", "orders.*"],
                    "subscribe": [".."],
                    "extra": 1,
                },
                "nowhere": {"cidrs": []},
            },
            "nodes": {"n": {"services": ["kv.get", "fs-*"], "service": ["kv"]}, "m": {"services": "kv"}},
        }
    )
    expected_keys = [
        "role",
        "roles.bad name",
        "roles.notatable",
        "roles.r.extra",
        "roles.r.allow[0]",
        "roles.r.allow[1]",
        "roles.r.allow[2]",
        "roles.r.allow[3]",
        "roles.r.allow[4]",
        "roles.r.deny",
        "roles.r.cidrs[0]",
        "roles.r.cidrs[1]",
        "roles.r.cidrs[2]",
        "roles.r.renew",
        "roles.r.publish[0]",
        "roles.r.publish[1]",
        "roles.r.subscribe[0]",
        "roles.nowhere.cidrs",
        "nodes.n.service",
        "nodes.n.services[0]",
        "nodes.m.services",
    ]
    assert [p.split(": ", 1)[0] for p in found] == expected_keys
    text = "\n".join(found)
    assert "mesh.renew is granted by renew = true" in text
    assert "host bits set" in text
    assert "applies nowhere" in text


def test_top_level_tables_must_be_tables() -> None:
    """`roles = 3` and `nodes = "x"` are reported, not crashed on."""
    assert problems_of({"roles": 3, "nodes": "x"}) == ["roles: must be a table", "nodes: must be a table"]


def test_policy_error_is_a_configuration_error(tmp_path: Path) -> None:
    """The error carries code 3001, a reason and the list of problems."""
    path = tmp_path / "p.toml"
    path.write_text('[roles.r]\nallow = ["nope"]\n')
    with pytest.raises(ConfigurationError) as caught:
        load_policy(path)
    err = caught.value
    assert err.code == ErrorCode.CONFIGURATION
    assert err.details["reason"] == f"{path}: 1 problem(s)"
    assert err.details["problems"] == ["roles.r.allow[0]: 'nope' is not service.action (wildcards * and ?) or *"]


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    """A missing file and broken TOML are policy errors that say so."""
    with pytest.raises(PolicyError) as missing:
        load_policy(tmp_path / "absent.toml")
    assert "cannot read" in str(missing.value)
    broken = tmp_path / "broken.toml"
    broken.write_text("[roles.r\nallow = 1\n")
    with pytest.raises(PolicyError) as bad:
        load_policy(broken)
    assert "not valid TOML" in str(bad.value)


def test_policy_module_is_not_imported_with_zmq() -> None:
    """Importing the policy alone must not import zmq (it may already be loaded by others)."""
    import subprocess

    code = "import sys, mesh.security.policy; print('zmq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "False"
