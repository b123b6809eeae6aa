"""The security state directory: made once, completed for newcomers, never overwritten."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq.auth

from mesh.protocol import ConfigurationError
from mesh.security.credentials import load_credentials
from mesh.security.curve import load_public_key, load_secret_key
from mesh.security.payload import KeyRing
from mesh.security.policy import load_policy
from mesh.security.signing import TrustedKeys, load_signing_key, load_verify_key
from mesh.security.state import StateLayout, ensure_state, issue_token, token_settings
from mesh.security.token_keys import load_secret
from mesh.security.tokens import TokenVerifier

NOW = 1_700_000_000.0
NODES = {"echo": ["echo"], "kv": ["kv", "kv-admin"]}

SECRET_FILES = [
    "curve/broker.key_secret",
    "curve/broker-peer.key_secret",
    "curve/private/dev.key_secret",
    "curve/private/echo.key_secret",
    "curve/private/kv.key_secret",
    "tokens/secret",
    "keyring.json",
    "signing/dev.key",
    "credentials/dev.toml",
    "credentials/echo.toml",
    "credentials/kv.toml",
]
PUBLIC_FILES = [
    "curve/broker.key",
    "curve/broker-peer.key",
    "curve/allowed/broker-peer.key",
    "curve/allowed/dev.key",
    "curve/allowed/echo.key",
    "curve/allowed/kv.key",
    "curve/private/dev.key",
    "curve/private/echo.key",
    "curve/private/kv.key",
    "policy.toml",
    "signing/dev.pub",
    "signing/trusted/dev.pub",
]
DIRECTORIES = [
    "",
    "curve",
    "curve/allowed",
    "curve/private",
    "tokens",
    "signing",
    "signing/trusted",
    "credentials",
]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> StateLayout:
    return ensure_state(tmp_path_factory.mktemp("made") / "state", nodes=NODES, now=NOW)


def test_first_call_makes_the_whole_layout_with_owner_only_secrets(state: StateLayout) -> None:
    """Every file of the layout exists: secrets 0600, public files 0644, directories 0700."""
    root = state.root
    assert sorted(state.created) == sorted(SECRET_FILES + PUBLIC_FILES)
    assert sorted(snapshot(root)) == sorted(SECRET_FILES + PUBLIC_FILES)
    for name in SECRET_FILES:
        assert mode(root / name) == 0o600, name
    for name in PUBLIC_FILES:
        assert mode(root / name) == 0o644, name
    for name in DIRECTORIES:
        assert mode(root / name) == 0o700, name or "."
    assert not state.revocations.exists()  # the broker creates it on open
    assert state.policy_missing_nodes == []


def test_layout_paths_are_the_documented_ones(state: StateLayout) -> None:
    """The layout's fields point where mesh.broker.secure.broker_security looks."""
    root = state.root
    assert state.broker_secret == root / "curve" / "broker.key_secret"
    assert state.broker_public == root / "curve" / "broker.key"
    assert state.allowed_dir == root / "curve" / "allowed"
    assert state.token_secret == root / "tokens" / "secret"
    assert state.revocations == root / "revocations.sqlite3"
    assert state.policy == root / "policy.toml"
    assert state.keyring == root / "keyring.json"
    assert state.trusted_signers == root / "signing" / "trusted"
    assert state.credentials("dev") == root / "credentials" / "dev.toml"
    assert StateLayout.at(root) == StateLayout.at(str(root))


def test_second_call_creates_nothing_and_changes_nothing(tmp_path: Path) -> None:
    """Running again, later, leaves every file as it was (tokens are not reissued)."""
    ensure_state(tmp_path, nodes=NODES, now=NOW)
    before = snapshot(tmp_path)
    again = ensure_state(tmp_path, nodes=NODES, now=NOW + 3600)
    assert again.created == []
    assert again.policy_missing_nodes == []
    assert snapshot(tmp_path) == before


def test_new_node_and_client_get_keys_and_are_reported_missing_from_policy(tmp_path: Path) -> None:
    """A later call adds a newcomer's keys and credentials but leaves the policy alone."""
    ensure_state(tmp_path, nodes={"echo": ["echo"]}, now=NOW)
    policy_before = (tmp_path / "policy.toml").read_bytes()
    later = ensure_state(tmp_path, nodes={"echo": ["echo"], "kv": ["kv"]}, clients=["dev", "dash"], now=NOW)
    assert sorted(later.created) == sorted([
        "curve/private/kv.key", "curve/private/kv.key_secret", "curve/allowed/kv.key", "credentials/kv.toml",
        "curve/private/dash.key", "curve/private/dash.key_secret", "curve/allowed/dash.key",
        "signing/dash.key", "signing/dash.pub", "signing/trusted/dash.pub", "credentials/dash.toml",
    ])  # fmt: skip
    assert later.policy_missing_nodes == ["kv"]
    assert (tmp_path / "policy.toml").read_bytes() == policy_before
    dash = load_credentials(later.credentials("dash"))
    verifier = TokenVerifier(token_settings(), load_secret(later.token_secret))
    assert verifier.verify(dash.token, NOW).roles == {"reader"}


def test_node_offering_a_service_its_table_lacks_is_reported(tmp_path: Path) -> None:
    """A node listed in the policy but with a new service still needs the operator."""
    ensure_state(tmp_path, nodes={"echo": ["echo"]}, now=NOW)
    later = ensure_state(tmp_path, nodes={"echo": ["echo", "echo2"]}, now=NOW)
    assert later.created == []
    assert later.policy_missing_nodes == ["echo"]


def test_generated_policy_grants_admin_all_reader_reads_nodes_their_services(state: StateLayout) -> None:
    """The generated policy.toml loads and says what its comments say."""
    text = state.policy.read_text()
    assert text.startswith("#")
    policy = load_policy(state.policy)
    admin, reader = {"admin"}, {"reader"}
    for service, action in [("kv", "put"), ("kv", "get"), ("mesh", "revoke"), ("fs", "write")]:
        assert policy.decide(admin, service, action, None).allowed
    assert policy.may_renew(admin).allowed
    assert policy.may_publish(admin, "any.topic").allowed
    assert policy.may_subscribe(admin, "").allowed
    for service, action in [("kv", "get"), ("kv", "list"), ("sqlite", "query"), ("fs", "read"),
                            ("docs", "search"), ("echo", "say"), ("mesh", "ping"),
                            ("mesh", "services"), ("mesh", "replay")]:  # fmt: skip
        assert policy.decide(reader, service, action, None).allowed, (service, action)
    for service, action in [("kv", "put"), ("kv", "delete"), ("fs", "write"), ("mesh", "revoke")]:
        assert not policy.decide(reader, service, action, None).allowed, (service, action)
    assert not policy.may_renew(reader).allowed
    assert not policy.may_publish(reader, "any.topic").allowed
    assert policy.may_subscribe(reader, "").allowed
    assert policy.may_register("echo", "echo").allowed
    assert policy.may_register("kv", "kv").allowed
    assert policy.may_register("kv", "kv-admin").allowed
    assert not policy.may_register("echo", "kv").allowed
    assert not policy.may_register("kv", "echo").allowed
    assert not policy.may_register("dev", "echo").allowed


def test_policy_without_nodes_still_loads(tmp_path: Path) -> None:
    """A topology with no nodes yet gets a policy with roles only."""
    layout = ensure_state(tmp_path, nodes={}, now=NOW)
    assert dict(load_policy(layout.policy).nodes) == {}


def test_dev_credentials_load_and_hold_an_admin_token(state: StateLayout) -> None:
    """dev's credentials name the state's files and carry a token the broker accepts."""
    creds = load_credentials(state.credentials("dev"))
    assert creds.broker_key == state.broker_public.resolve()
    assert creds.key == (state.root / "curve" / "private" / "dev.key_secret").resolve()
    assert creds.keyring == state.keyring.resolve()
    assert creds.signing_key == (state.root / "signing" / "dev.key").resolve()
    assert creds.level == 1
    assert creds.require_signers is None
    verifier = TokenVerifier(token_settings("mesh", "mesh"), load_secret(state.token_secret))
    identity = verifier.verify(creds.token, NOW + 10)
    assert identity.subject == "dev"
    assert identity.roles == {"admin"}
    assert identity.expires == NOW + 30 * 86400
    # the signing key pairs with the trusted copy, and the ring loads
    key = load_signing_key(creds.signing_key)
    assert bytes(key.verify_key) == bytes(load_verify_key(state.trusted_signers / "dev.pub"))
    assert list(TrustedKeys.load(state.trusted_signers)) == ["dev"]
    assert len(KeyRing.load(creds.keyring)) == 1


def test_node_credentials_have_no_token_and_no_signing_key(state: StateLayout) -> None:
    """A node's credentials hold its CURVE key and the ring, nothing to sign with."""
    creds = load_credentials(state.credentials("kv"))
    assert creds.token is None
    assert creds.signing_key is None
    assert creds.require_signers is None
    assert creds.level == 1
    assert creds.key == (state.root / "curve" / "private" / "kv.key_secret").resolve()
    assert creds.keyring == state.keyring.resolve()


def test_curve_files_are_zeromq_certificates_and_allowed_copies_match(state: StateLayout) -> None:
    """pyzmq reads every CURVE file; allowed/ holds the public half of each peer's pair."""
    public, secret = zmq.auth.load_certificate(state.broker_secret)
    assert secret is not None
    assert zmq.auth.load_certificate(state.broker_public) == (public, None)
    for name in ("dev", "echo", "kv"):
        peer_public, peer_secret = zmq.auth.load_certificate(state.root / "curve" / "private" / f"{name}.key_secret")
        assert peer_secret is not None
        assert zmq.auth.load_certificate(state.allowed_dir / f"{name}.key") == (peer_public, None)
        assert load_secret_key(state.root / "curve" / "private" / f"{name}.key_secret")[0] == peer_public
    assert sorted(p.name for p in state.allowed_dir.iterdir()) == ["broker-peer.key", "dev.key", "echo.key", "kv.key"]
    peer_public, _ = zmq.auth.load_certificate(state.peer_secret)
    assert zmq.auth.load_certificate(state.allowed_dir / "broker-peer.key") == (peer_public, None)
    assert load_public_key(state.broker_public) != load_public_key(state.allowed_dir / "dev.key")


def test_issue_token_signs_with_the_state_secret(state: StateLayout) -> None:
    """`mesh token issue` tokens verify like the generated ones."""
    token = issue_token(state.root, "alice", ["reader"], 60, NOW)
    identity = TokenVerifier(token_settings(), load_secret(state.token_secret)).verify(token, NOW)
    assert (identity.subject, identity.roles, identity.expires) == ("alice", {"reader"}, NOW + 60)


def test_token_settings_defaults() -> None:
    """HS256, issuer and audience "mesh", five seconds of leeway."""
    settings = token_settings()
    assert (settings.algorithm, settings.issuer, settings.audience, settings.leeway) == ("HS256", "mesh", "mesh", 5.0)


def test_existing_files_are_kept_even_when_edited(tmp_path: Path) -> None:
    """An operator's edits survive; a deleted allowed copy is put back from the pair."""
    layout = ensure_state(tmp_path, nodes={"echo": ["echo"]}, now=NOW)
    layout.policy.write_text('[roles.admin]\nallow = ["*"]\n')
    (layout.allowed_dir / "echo.key").unlink()
    again = ensure_state(tmp_path, nodes={"echo": ["echo"]}, now=NOW)
    assert again.created == ["curve/allowed/echo.key"]
    assert layout.policy.read_text() == '[roles.admin]\nallow = ["*"]\n'
    assert again.policy_missing_nodes == ["echo"]


def test_half_a_key_pair_is_refused(tmp_path: Path) -> None:
    """A public certificate without its secret is reported, not replaced."""
    layout = ensure_state(tmp_path, nodes={}, now=NOW)
    layout.broker_secret.unlink()
    with pytest.raises(ConfigurationError, match="broker.key exists without"):
        ensure_state(tmp_path, nodes={}, now=NOW)


@pytest.mark.parametrize(
    ("nodes", "clients"),
    [({"bad name": []}, ["dev"]), ({}, ["../dev"]), ({"dev": ["x"]}, ["dev"]), ({}, "dev")],
)
def test_bad_names_are_refused_before_anything_is_written(
    tmp_path: Path, nodes: dict[str, list[str]], clients: object
) -> None:
    """Names must be key names, and a name is a client or a node, not both."""
    with pytest.raises(ConfigurationError):
        ensure_state(tmp_path / "state", nodes=nodes, clients=clients, now=NOW)  # type: ignore[arg-type]
    assert not (tmp_path / "state").exists()


def test_every_client_and_node_is_given_the_trust_store(state: StateLayout) -> None:
    """Clients and nodes alike check signatures with the clients' public keys in signing/trusted."""
    for name in ("dev", "kv"):
        creds = load_credentials(state.credentials(name))
        assert creds.signers == state.trusted_signers
        assert "dev" in creds.opener().signers.current(NOW)  # type: ignore[union-attr]


def test_credentials_written_before_the_trust_store_still_find_it(state: StateLayout, tmp_path: Path) -> None:
    """An old file without `signers` loads, and uses its state directory's trust store; one
    outside a state directory has none (and so refuses every signature)."""
    old = state.credentials("old")
    lines = [line for line in state.credentials("kv").read_text().splitlines() if not line.startswith("signers")]
    old.write_text("\n".join(lines) + "\n")
    try:
        assert load_credentials(old).signers == state.trusted_signers
        elsewhere = tmp_path / "old.toml"
        elsewhere.write_text("\n".join(lines) + "\n")
        assert load_credentials(elsewhere).signers is None
    finally:
        old.unlink()
