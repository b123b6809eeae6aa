"""Conformance: a client built from the documents alone (tests/conformance/rawclient.py:
raw pyzmq, msgpack, AES-GCM and ed25519, nothing of the SDK) against real brokers and the
ready nodes, at every security level.

The secure mesh is started the way users start it, `mesh up` of a topology, so this
module needs nothing of `mesh.security` either: the kit reads the state directory's
files (credentials TOML, CURVE certificates, keyring.json, signing keys) as
docs/security.md describes them.
"""

from __future__ import annotations

import ast
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import zmq
from nacl.signing import SigningKey
from zmq.utils.monitor import recv_monitor_message

from mesh.testing import run_broker, run_node, spawn

KIT = Path(__file__).parents[1] / "conformance"
sys.path.insert(0, str(KIT))

from rawclient import (  # noqa: E402 - the kit lives outside the test packages' path
    Credentials,
    RawClient,
    RawSubscriber,
    WireError,
    load_credentials,
    pack,
    signing_bytes,
    trusted_keys,
    verify_signature,
)

TOPOLOGY = """
[mesh]
name = "conformance"

[brokers.main]
clients = "ipc://{work}/c.sock"
nodes = "ipc://{work}/n.sock"
events = "ipc://{work}/e.sock"

[nodes.echo]
use = "echo"

[nodes.kv]
use = "kv"
config = {{ path = "{work}/kv.sqlite3" }}

[nodes.sqlite]
use = "sqlite"
config = {{ database = "{work}/fruit.db" }}

[security]
state = "{work}/state"
clients = ["dev", "viewer"]
service_levels = {{ kv = 2 }}
"""


@dataclass(frozen=True)
class Mesh:
    clients: str
    events: str
    state: Path

    def creds(self, name: str) -> Credentials:
        return load_credentials(self.state / "credentials" / f"{name}.toml")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """`mesh up`: one broker with security on (kv at level 2), echo, kv and sqlite."""
    work = tmp_path_factory.mktemp("conform")
    with sqlite3.connect(work / "fruit.db") as db:
        db.execute("CREATE TABLE fruit (name TEXT, colour TEXT)")
        db.executemany("INSERT INTO fruit VALUES (?, ?)", [("apple", "red"), ("banana", "yellow")])
    (work / "mesh.toml").write_text(TOPOLOGY.format(work=work))
    with spawn(["up", str(work / "mesh.toml")]) as up:
        for name in ("echo", "kv", "sqlite"):
            up.wait_for(rf"\[node:{name}\] node .* ready", timeout=30)
        m = Mesh(f"ipc://{work}/c.sock", f"ipc://{work}/e.sock", work / "state")
        yield m


@pytest.fixture
def dev(mesh: Mesh) -> Iterator[RawClient]:
    with RawClient(mesh.clients, mesh.creds("dev")) as c:
        yield c


def test_the_kit_uses_nothing_of_the_mesh_package():
    """The kit imports no `mesh` module, and this file only `mesh.testing` (to start processes)."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import rawclient; "
             "print(sorted(m for m in sys.modules if m == 'mesh' or m.startswith('mesh.')))")
    done = subprocess.run([sys.executable, "-c", probe, str(KIT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    tree = ast.parse(Path(__file__).read_text())
    used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in used if m.split(".")[0] == "mesh"} == {"mesh.testing"}


def test_level_0_security_off(tmp_path: Path):
    """Security off: a plain command is answered; unreadable or unknown messages come back as
    error replies whose codes and details are those of protocol.md 3.3/8 and errors.md."""
    with run_broker() as b, run_node("echo", b), RawClient(b.clients) as c:
        assert c.call("echo", "echo", {"text": "hi", "n": 1.5, "raw": b"\x00\xff"}) == {"text": "hi", "n": 1.5, "raw": b"\x00\xff"}
        assert c.call("echo", "reverse", {"text": "abc"}) == {"text": "cba"}
        pong = c.call("mesh", "ping")
        assert pong["pong"] is True and isinstance(pong["time"], float)

        with pytest.raises(WireError) as missing:
            c.call("nosuch", "thing", {})
        assert (missing.value.code, missing.value.retryable) == (1003, False)
        assert missing.value.details == {"service": "nosuch", "action": "thing", "missing": "service"}

        header = {"v": 2, "type": "command", "id": "conf-v2", "ts": 1.0, "service": "echo", "action": "echo"}
        c.send([pack(header), pack(None)])
        with pytest.raises(WireError) as version:
            c.open(*c.receive("conf-v2"))
        assert version.value.code == 1001 and version.value.details == {"field": "v", "supported": [1]}

        header = {"v": 1, "type": "command", "id": "conf-extra", "ts": 1.0, "service": "echo", "action": "echo",
                  "colour": "red"}
        c.send([pack(header), pack(None)])
        with pytest.raises(WireError) as unknown:
            c.open(*c.receive("conf-extra"))
        assert unknown.value.code == 1002 and unknown.value.details["field"] == "colour"


def test_curve_refuses_a_stranger_in_the_handshake(mesh: Mesh):
    """ZAP admits only keys in curve/allowed/: a fresh key pair fails the CURVE handshake,
    and the admitted dev key completes it."""
    public, secret = zmq.curve_keypair()
    for keys, expected in (({"curve_public": public, "curve_secret": secret}, zmq.EVENT_HANDSHAKE_FAILED_AUTH),
                           ({}, zmq.EVENT_HANDSHAKE_SUCCEEDED)):
        with RawClient(mesh.clients, mesh.creds("dev"), connect=False, **keys) as c:
            monitor = c.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
            try:
                c.sock.connect(mesh.clients)
                assert monitor.poll(10_000), "no handshake outcome"
                assert recv_monitor_message(monitor)["event"] == expected
            finally:
                c.sock.disable_monitor()
                monitor.close(linger=0)


def test_level_1_token(mesh: Mesh, dev: RawClient):
    """Level 1: the token in `security.token` is required and checked, and so is `ts` (replay
    window); the ready nodes answer."""
    assert dev.call("echo", "echo", {"text": "hi"}, level=1) == {"text": "hi"}
    assert dev.call("sqlite", "query", {"sql": "SELECT name FROM fruit ORDER BY name"}, level=1) == {
        "columns": ["name"], "rows": [{"name": "apple"}, {"name": "banana"}], "truncated": False}
    tables = dev.call("sqlite", "tables", {}, level=1)["tables"]
    assert tables == [{"name": "fruit", "type": "table",
                       "columns": [{"name": "name", "type": "TEXT"}, {"name": "colour", "type": "TEXT"}]}]

    forged = dev.creds.token.rsplit(".", 1)[0] + "." + "A" * 43  # HS256: a 32-byte MAC, base64url
    for token, reason in ((None, "missing token"), (forged, "bad signature")):
        header = dev.header("command", service="echo", action="echo")
        frames = list(dev.seal(header, {}, 1, token=token or ""))
        dev.send(frames)
        with pytest.raises(WireError) as refused:
            dev.open(*dev.receive(header["id"]))
        assert refused.value.code == 2000 and refused.value.details.get("reason") == reason

    stale = dev.header("command", service="echo", action="echo")
    stale["ts"] -= 60.0  # the broker's window is 10 s either side of its clock
    dev.send(list(dev.seal(stale, {}, 1)))
    with pytest.raises(WireError) as replayed:
        dev.open(*dev.receive(stale["id"]))
    assert replayed.value.code == 2006 and replayed.value.details.get("reason") == "clock skew"


def test_levels_are_enforced_per_service_and_roles_per_action(mesh: Mesh, dev: RawClient):
    """kv needs level 2 (SECURITY_LEVEL_TOO_LOW with `required`); a reader role may not put (ACCESS_DENIED)."""
    with pytest.raises(WireError) as low:
        dev.call("kv", "get", {"key": "a"}, level=1)
    assert low.value.code == 2007 and low.value.details == {"required": 2, "level": 1}
    with RawClient(mesh.clients, mesh.creds("viewer")) as viewer:
        with pytest.raises(WireError) as denied:
            viewer.call("kv", "put", {"key": "a", "value": 1}, level=2)
        assert denied.value.code == 2002
        assert viewer.call("echo", "reverse", {"text": "ok"}, level=1) == {"text": "ko"}


def test_level_2_encrypted_payloads(mesh: Mesh, dev: RawClient):
    """Level 2: AES-256-GCM with the documented associated data; the node answers encrypted,
    and a relabelled message (associated data of another header) is ENCRYPTION_FAILED."""
    put = dev.header("command", service="kv", action="put")
    dev.send(list(dev.seal(put, {"key": "conf", "value": {"n": [1, 2]}}, 2)))
    reply, frame = dev.receive(put["id"])
    assert reply["type"] == "response" and reply["security"]["encryption"]["alg"] == "A256GCM"
    assert len(reply["security"]["encryption"]["nonce"]) == 12
    result = dev.open(reply, frame)
    assert result in ({"key": "conf", "created": True}, {"key": "conf", "created": False})
    assert len(frame) == len(pack(result)) + 16  # the frame is ciphertext and tag, not a MessagePack value
    assert dev.call("kv", "get", {"key": "conf"}, level=2) == {"key": "conf", "found": True, "value": {"n": [1, 2]}}
    assert dev.call("kv", "incr", {"key": "conf-n", "by": 2}, level=2)["value"] >= 2
    assert dev.call("kv", "list", {"prefix": "conf"}, level=2)["keys"][:1] == ["conf"]
    with pytest.raises(WireError) as invalid:
        dev.call("kv", "get", {"key": ""}, level=2)
    assert invalid.value.code == 1002 and invalid.value.details == {"field": "key", "rule": "minLength"}

    header = dev.header("command", service="kv", action="get")
    dev.send(list(dev.seal(header, {"key": "conf"}, 2, aad_header={**header, "action": "delete"})))
    with pytest.raises(WireError) as tampered:
        dev.open(*dev.receive(header["id"]))
    assert tampered.value.code == 2003 and tampered.value.details["reason"] == "tampered or wrong key"


def test_level_3_signatures_and_a_bad_one_refused(mesh: Mesh, dev: RawClient):
    """Level 3: an ed25519 signature over the documented signing bytes is accepted; a flipped
    byte, another key's signature or a truncated one is SIGNATURE_INVALID with its reason."""
    assert dev.call("echo", "echo", {"text": "signed"}, level=3) == {"text": "signed"}
    # Keys out of order at two depths and floats: the signing bytes sort and keep float 64.
    metadata = {"trace": "t-1", "attempt": 2, "budget": {"share": 0.5, "cpu": 1.0}}
    assert dev.call("echo", "echo", {"text": "meta"}, level=3, deadline=time.time() + 30.0, metadata=metadata) == {"text": "meta"}

    def refused(mangle) -> WireError:
        header = dev.header("command", service="echo", action="echo")
        head, payload = dev.seal(header, {"text": "forged"}, 3)
        header["security"]["signature"] = mangle(header["security"]["signature"], header, payload)
        dev.send([pack(header), payload])
        with pytest.raises(WireError) as err:
            dev.open(*dev.receive(header["id"]))
        return err.value

    flipped = refused(lambda sig, h, p: bytes([sig[0] ^ 1]) + sig[1:])
    stranger = SigningKey.generate()
    foreign = refused(lambda sig, h, p: stranger.sign(signing_bytes(h, p)).signature)
    short = refused(lambda sig, h, p: sig[:63])
    assert [e.code for e in (flipped, foreign, short)] == [2004, 2004, 2004]
    assert [e.details["reason"] for e in (flipped, foreign, short)] == ["does not verify", "does not verify", "malformed"]


def test_events_live_signed_and_replayed(mesh: Mesh, dev: RawClient):
    """Events: a subscriber that showed its token and synced receives each event as
    [topic + ".", stamped header, the publisher's payload frame], numbered per topic, with
    the publisher's name in `sender`; a signed event verifies with the trust store; mesh.replay
    from a seq returns the same header and payload bytes."""
    assert dev.call("mesh", "ping", level=1)["events"] == mesh.events
    with RawSubscriber(mesh.events, dev.creds) as sub:
        marker = sub.subscribe("conf")
        assert set(marker) >= {"broker", "epoch"} and "refused" not in marker
        first = dev.publish("conf.plain", {"n": 1}, level=1)
        second = dev.publish("conf.plain", {"n": 2}, level=3)
        assert second == first + 1
        live = [sub.next_event(), sub.next_event()]

    assert [e.prefix for e in live] == [b"conf.plain.", b"conf.plain."]
    assert [e.header["seq"] for e in live] == [first, second]
    assert list(live[1].header) == ["v", "type", "id", "ts", "topic", "seq", "security", "sender"]
    assert live[1].header["sender"] == "dev" and "token" not in live[1].header["security"]
    assert msgpack.unpackb(live[0].payload_frame) == {"n": 1}
    assert live[1].header["security"]["encryption"]["alg"] == "A256GCM"  # level 3 includes level 2
    assert dev.decrypt(live[1].header, live[1].payload_frame) == {"n": 2}
    trusted = trusted_keys(mesh.state / "signing" / "trusted")
    assert verify_signature(trusted, live[1].header, live[1].payload_frame, live[1].header["sender"]) == "ok"
    assert verify_signature(trusted, live[1].header, live[1].payload_frame[:-1] + b"\x03", "dev") == "does not verify"

    page = dev.call("mesh", "replay", {"prefix": "conf", "after": first - 1}, level=1)
    assert page["more"] is False and page["gaps"] == []
    assert page["events"] == [[e.header_frame, e.payload_frame] for e in live]
    later = dev.call("mesh", "replay", {"prefix": "conf", "positions": {"conf.plain": first}}, level=1)
    assert later["events"] == [[live[1].header_frame, live[1].payload_frame]]
