"""Credentials files: portable with their state directory, old ones still read, found in a set order."""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from mesh.security.credentials import ENV, Found, find_credentials, load_credentials, record_broker, save_credentials
from mesh.security.curve import load_secret_key
from mesh.security.payload import KeyRing
from mesh.security.signing import load_signing_key
from mesh.security.state import StateLayout, ensure_state

NOW = 1_700_000_000.0
_PATH_KEYS = ("broker_key", "key", "keyring", "signing_key", "signers")


@pytest.fixture
def made(tmp_path: Path) -> StateLayout:
    return ensure_state(tmp_path / "made" / "var" / "mesh", nodes={"echo": ["echo"]}, clients=("dev",), now=NOW)


def _assert_usable(creds_file: Path, root: Path) -> None:
    """Every path of the file (a node has no signing key) is under `root` and exists, and the key loads."""
    creds = load_credentials(creds_file)
    for key in _PATH_KEYS:
        value = getattr(creds, key)
        if key == "signing_key" and creds.token is None:
            assert value is None
            continue
        assert value is not None and value.exists() and value.is_relative_to(root.resolve()), key
    load_secret_key(creds.key)


def test_new_credentials_name_their_keys_relative_to_themselves(made: StateLayout) -> None:
    """A generated file holds no absolute path: `../curve/broker.key` and so on."""
    data = tomllib.loads(made.credentials("dev").read_text())
    assert {k: data[k] for k in _PATH_KEYS} == {
        "broker_key": "../curve/broker.key",
        "key": "../curve/private/dev.key_secret",
        "keyring": "../keyring.json",
        "signing_key": "../signing/dev.key",
        "signers": "../signing/trusted",
    }


def test_a_moved_state_directory_loads_from_its_new_place(made: StateLayout, tmp_path: Path) -> None:
    """Moved under another home, with the old place gone, every credentials file still loads."""
    moved = tmp_path / "home" / "other" / "state"
    moved.parent.mkdir(parents=True)
    shutil.move(made.root, moved)
    for name in ("dev", "echo"):
        _assert_usable(StateLayout.at(moved).credentials(name), moved)


def test_old_files_with_absolute_paths_keep_working_after_a_move(made: StateLayout, tmp_path: Path) -> None:
    """A file written with absolute paths (before they were relative) loads in place and,
    once its state directory has moved, finds the same files under the new place."""
    old = made.credentials("dev")
    save_credentials(old, load_credentials(old))  # no root: every path absolute, as files used to be
    assert all(Path(v).is_absolute() for k, v in tomllib.loads(old.read_text()).items() if k in _PATH_KEYS)
    _assert_usable(old, made.root)
    moved = tmp_path / "elsewhere" / "mesh"
    shutil.copytree(made.root, moved)
    shutil.rmtree(made.root)
    _assert_usable(StateLayout.at(moved).credentials("dev"), moved)


def test_an_absolute_path_outside_a_state_directory_is_used_as_written(tmp_path: Path, made: StateLayout) -> None:
    """Only a file in a state directory's credentials/ folder is looked for under its new
    place; elsewhere a missing path stays as written (loading the key names it)."""
    lone = tmp_path / "lone.toml"
    save_credentials(lone, load_credentials(made.credentials("dev")))
    missing = tmp_path / "gone" / "broker.key"
    lone.write_text(lone.read_text().replace(str(made.broker_public.resolve()), str(missing)))
    assert load_credentials(lone).broker_key == missing


def test_paths_outside_the_root_stay_absolute(made: StateLayout, tmp_path: Path) -> None:
    """`root` makes relative only what travels with the file."""
    creds = load_credentials(made.credentials("dev"))
    outside = tmp_path / "trusted-elsewhere"
    target = made.root / "credentials" / "mixed.toml"
    save_credentials(target, replace(creds, require_signers=outside), root=made.root)
    data = tomllib.loads(target.read_text())
    assert data["require_signers"] == str(outside.resolve())
    assert data["key"] == "../curve/private/dev.key_secret"


def test_lookup_order_is_given_then_environment_then_state(tmp_path: Path, made: StateLayout) -> None:
    """--credentials beats MESH_CREDENTIALS, which beats the state directory's file; an empty
    MESH_CREDENTIALS counts as unset."""
    state = made.root
    env = {ENV: "/from/env.toml"}
    assert find_credentials("given.toml", environ=env, state=state) == Found(Path("given.toml"), "given")
    assert find_credentials(None, environ=env, state=state) == Found(Path("/from/env.toml"), "env")
    assert find_credentials(None, environ={ENV: ""}, state=state) == Found(state / "credentials/dev.toml", "state")
    assert find_credentials(None, environ={}, state=tmp_path / "nothing") == Found(None, "none")


def test_the_state_directory_file_is_for_the_brokers_it_records(made: StateLayout) -> None:
    """A broker recorded at tcp port 6555 (as bound, any host) makes the state's file the
    choice for that port under any host name; another port gets none, and says which file
    it left unused."""
    record_broker(made.root, "tcp://0.0.0.0:6555")
    for address in ("tcp://127.0.0.1:6555", "tcp://localhost:6555", "tcp://[::1]:6555"):
        assert find_credentials(brokers=[address], environ={}, state=made.root).source == "state", address
    other = find_credentials(brokers=["tcp://127.0.0.1:6556"], environ={}, state=made.root)
    assert other == Found(None, "none", unused=made.root / "credentials/dev.toml")
    record_broker(made.root, "ipc:///run/mesh/clients.sock")
    assert find_credentials(brokers=["ipc:///run/mesh/clients.sock"], environ={}, state=made.root).source == "state"
    assert find_credentials(brokers=["ipc:///run/other.sock"], environ={}, state=made.root).path is None


def test_lookup_takes_the_first_named_client_the_state_has(made: StateLayout) -> None:
    """The MCP bridge looks for bridge.toml, then dev.toml."""
    found = find_credentials(None, names=("bridge", "dev"), environ={}, state=made.root)
    assert found == Found(made.root / "credentials/dev.toml", "state")


SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def _doc_blocks(heading: str) -> list[str]:
    """The fenced code blocks of the docs/security.md section that starts with `heading`."""
    text = SECURITY_DOC.read_text(encoding="utf-8")
    section = text.split(f"\n{heading}", 1)[1].split("\n##", 1)[0]
    return [block.split("\n", 1)[1] for block in section.split("```")[1::2]]


def test_the_documented_formats_are_what_the_code_writes(made: StateLayout, tmp_path: Path) -> None:
    """docs/security.md's examples under "Files and formats" are real: the node's credentials
    and the policy are byte for byte what `ensure_state` writes, the client's credentials have
    the same keys and paths, and the key ring and signing keys load and pair up."""
    client, node = _doc_blocks("### credentials/NAME.toml")
    assert node == made.credentials("echo").read_text()
    written = tomllib.loads(made.credentials("dev").read_text())
    documented = tomllib.loads(client)
    assert {k: v for k, v in documented.items() if k != "token"} == {k: v for k, v in written.items() if k != "token"}
    (policy,) = _doc_blocks("### policy.toml")
    assert policy == made.policy.read_text()
    (ring,) = _doc_blocks("### keyring.json")
    (tmp_path / "keyring.json").write_text(ring)
    assert KeyRing.load(tmp_path / "keyring.json").active_kid == json.loads(ring)["active"]
    (keys,) = _doc_blocks("### signing/NAME.key")
    private, public = (line for line in keys.splitlines() if not line.startswith("$"))
    (tmp_path / "doc.key").write_text(private + "\n")
    assert bytes(load_signing_key(tmp_path / "doc.key").verify_key).hex() == public
