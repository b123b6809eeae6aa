"""The broker's Gate without sockets: replay window, token binding, levels, policy, audit."""

from __future__ import annotations

import pytest

from mesh.protocol import (
    AccessDeniedError,
    AuthenticationFailedError,
    ReplayDetectedError,
    SecurityLevelTooLowError,
    SignatureInvalidError,
    encode_command_header,
    unpack_header,
)
from mesh.security import gate as gate_module
from mesh.security.gate import Gate, GateSettings, Peer
from mesh.security.policy import parse_policy
from mesh.security.tokens import TokenIssuer, TokenSettings, TokenVerifier

NOW = 1_700_000_000.0
SECRET = b"k" * 32
SETTINGS = TokenSettings("HS256", "mesh", "mesh")
POLICY = parse_policy({"roles": {"reader": {"allow": ["echo.echo", "mesh.ping"]}}, "nodes": {"echo": {"services": ["echo"]}}})
ALICE = Peer("alice", "127.0.0.1")


def make(**settings: object) -> Gate:
    return Gate(GateSettings(**settings), TokenVerifier(SETTINGS, SECRET), POLICY)  # type: ignore[arg-type]


def token(subject: str = "alice") -> str:
    return TokenIssuer(SETTINGS, SECRET).issue(subject, ["reader"], 600, NOW)


def header(service: str = "echo", action: str = "echo", *, id: str = "c1", ts: float = NOW, **security: object) -> dict:
    h = unpack_header(encode_command_header(service, action, id=id, now=ts))
    h["security"] = {"level": 1, "token": token(), **security}
    return h


def test_an_allowed_command_is_admitted_with_its_identity() -> None:
    """A fresh, bound, allowed command returns who sent it."""
    identity = make().admit_command(header(), ALICE, NOW)
    assert identity.subject == "alice" and identity.roles == {"reader"}


def test_clock_skew_and_repeats_are_replays() -> None:
    """Too old or too new is refused; the same (sender, id, ts) twice is refused; a retry (new ts) is not."""
    g = make(max_skew=10.0)
    with pytest.raises(ReplayDetectedError):
        g.admit_command(header(ts=NOW - 11), ALICE, NOW)
    with pytest.raises(ReplayDetectedError):
        g.admit_command(header(ts=NOW + 11), ALICE, NOW)
    g.admit_command(header(), ALICE, NOW)
    with pytest.raises(ReplayDetectedError) as info:
        g.admit_command(header(), ALICE, NOW + 1)
    assert info.value.details["reason"] == "repeated id"
    g.admit_command(header(ts=NOW + 0.5), ALICE, NOW + 1)  # the client's retry: same id, new time


def test_the_replay_window_forgets_after_twice_the_skew_and_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries leave after 2 x skew; past MAX_REMEMBERED the oldest go first, counted."""
    g = make(max_skew=10.0)
    for i in range(5):
        g.admit_command(header(id=f"c{i}"), ALICE, NOW)
    assert g.stats()["replay_window"] == 5
    g.admit_command(header(id="late", ts=NOW + 25), ALICE, NOW + 25)
    assert g.stats()["replay_window"] == 1
    monkeypatch.setattr(gate_module, "MAX_REMEMBERED", 3)
    for i in range(6):
        g.admit_command(header(id=f"d{i}", ts=NOW + 26), ALICE, NOW + 26)
    assert g.stats()["replay_window"] <= 4 and g.counters["replay_window_full"] >= 2


def test_a_token_only_counts_on_its_own_key() -> None:
    """A valid token whose subject is not the CURVE key's name is refused."""
    h = header()
    h["security"]["token"] = token("bob")
    with pytest.raises(AuthenticationFailedError) as info:
        make().admit_command(h, ALICE, NOW)
    assert info.value.details["reason"] == "token not bound to this key"


def test_levels_are_checked_against_the_service_and_what_the_message_carries() -> None:
    """Below the service's level, claiming encryption without it, claiming a signature without one."""
    g = make(service_levels={"echo": 2})
    with pytest.raises(SecurityLevelTooLowError):
        g.admit_command(header(id="a"), ALICE, NOW)
    with pytest.raises(SecurityLevelTooLowError):
        g.admit_command(header(id="b", level=2), ALICE, NOW)
    with pytest.raises(SignatureInvalidError):
        g.admit_command(header(id="c", level=3, encryption={"alg": "A256GCM"}), ALICE, NOW)


def test_a_level_without_its_encryption_names_what_is_missing() -> None:
    """A message whose level is high enough but that lacks the encryption it claims is told what it
    lacks (`missing`), not a `required` level below the one it sent; below the level, `required`."""
    g = make(service_levels={"echo": 2})
    with pytest.raises(SecurityLevelTooLowError) as below:
        g.admit_command(header(id="a"), ALICE, NOW)
    assert below.value.details == {"level": 1, "required": 2}
    for id, level in (("b", 2), ("c", 3)):
        with pytest.raises(SecurityLevelTooLowError) as unencrypted:
            g.admit_command(header(id=id, level=level), ALICE, NOW)
        assert unencrypted.value.details == {"level": level, "missing": "encryption"}


def test_refusals_are_audited_without_secrets() -> None:
    """A denied action is counted and recorded with who, what, code and reason, never the token."""
    g = make()
    h = header("echo", "reverse")
    with pytest.raises(AccessDeniedError):
        g.admit_command(h, ALICE, NOW)
    [record] = g.stats()["audit"]
    assert (record["who"], record["what"], record["code"]) == ("alice", "echo.reverse", 2002)
    assert h["security"]["token"] not in repr(g.stats())
    assert g.counters["refused_2002"] == 1


def test_registration_needs_a_curve_identity_the_policy_names() -> None:
    """A node may register only its own services; a link without a key name is refused."""
    g = make()
    g.admit_registration(["echo"], Peer("echo"), NOW)
    with pytest.raises(AccessDeniedError):
        g.admit_registration(["echo", "kv"], Peer("echo"), NOW)
    with pytest.raises(AuthenticationFailedError):
        g.admit_registration(["echo"], Peer(), NOW)


def test_mesh_commands_need_level_1_at_most() -> None:
    """The broker reads mesh.* payloads itself and holds no payload key: a minimum of level 2
    (or a service level set for `mesh`) cannot require them encrypted; other services still can."""
    g = make(min_level=2, service_levels={"mesh": 3})
    assert g.admit_command(header("mesh", "ping", id="p"), ALICE, NOW).subject == "alice"
    with pytest.raises(SecurityLevelTooLowError):
        g.admit_command(header(id="e"), ALICE, NOW)
