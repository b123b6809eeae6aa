"""CurveZMQ links with real sockets in one process: who the broker admits, and how fast a
refused client learns it.

A ROUTER stands in for the broker (CURVE server with `CurveAuthenticator`), DEALERs for
clients; every socket closes with linger=0 and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from mesh.protocol import AuthenticationFailedError, ConfigurationError
from mesh.security.curve import (
    REFUSED,
    CurveAuthenticator,
    HandshakeWatch,
    create_keypair,
    load_public_key,
    load_secret_key,
    secure_client,
    secure_server,
)
from mesh.sockets import frame_peer

pytestmark = pytest.mark.timeout(30)

PROMPT = 2.0  # seconds a refused client may take to learn it


class Keys:
    """Key pairs in `tmp_path/keys`; the allowed client keys in `tmp_path/allowed`."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "keys"
        self.allowed = root / "allowed"
        self.allowed.mkdir()
        for name in ("broker", "alice", "bob", "mallory"):
            create_keypair(self.dir, name)
        self.admit("alice")

    def public(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def secret(self, name: str) -> Path:
        return self.dir / f"{name}.key_secret"

    def admit(self, name: str) -> None:
        shutil.copy(self.public(name), self.allowed)


class Mesh:
    """A context with one CURVE ROUTER; makes clients and authenticators that it cleans up."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.watches: list[HandshakeWatch] = []
        self.auth: CurveAuthenticator | None = None
        self.server: zmq.Socket | None = None
        self.endpoint = ""

    def start(self, **lists: list[str]) -> CurveAuthenticator:
        self.auth = CurveAuthenticator(self.ctx, self.keys.allowed, **lists)
        self.auth.start()
        self.server = self.socket(zmq.ROUTER)
        secure_server(self.server, self.keys.secret("broker"))
        port = self.server.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        return self.auth

    def socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        self.sockets.append(sock)
        return sock

    def client(self, name: str | None, server_key: str = "broker") -> tuple[zmq.Socket, HandshakeWatch]:
        """A connected DEALER with key `name` (None: no CURVE) and its watch."""
        sock = self.socket(zmq.DEALER)
        if name is not None:
            secure_client(sock, self.keys.secret(name), self.keys.public(server_key))
        watch = HandshakeWatch(sock)
        self.watches.append(watch)
        sock.connect(self.endpoint)
        return sock, watch

    def received(self, timeout: float = 0.5) -> list[zmq.Frame] | None:
        assert self.server is not None
        if not self.server.poll(int(timeout * 1000)):
            return None
        return self.server.recv_multipart(copy=False)

    def close(self) -> None:
        for watch in self.watches:
            watch.close()
        for sock in self.sockets:
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def mesh(keys: Keys) -> Iterator[Mesh]:
    m = Mesh(keys)
    yield m
    m.close()


def refused_within(watch: HandshakeWatch, seconds: float) -> tuple[AuthenticationFailedError, float]:
    start = time.monotonic()
    with pytest.raises(AuthenticationFailedError) as caught:
        watch.wait(seconds)
    return caught.value, time.monotonic() - start


def test_allowed_key_connects_and_messages_carry_its_name(mesh: Mesh) -> None:
    """An admitted client's messages carry User-Id = its key file's name, and its address."""
    mesh.start()
    sock, watch = mesh.client("alice")
    assert watch.wait(PROMPT) is True
    sock.send(b"hello")
    frames = mesh.received(PROMPT)
    assert frames is not None and frames[1].bytes == b"hello"
    assert frame_peer(frames[1]) == ("alice", "127.0.0.1")
    assert mesh.auth is not None and mesh.auth.names == {"alice"}


def test_unknown_key_is_refused_promptly(mesh: Mesh) -> None:
    """A key not in the allowed directory: the client's watch raises within 2 s."""
    mesh.start()
    sock, watch = mesh.client("mallory")
    sock.send(b"let me in")
    error, elapsed = refused_within(watch, PROMPT)
    assert elapsed < PROMPT
    assert error.details["reason"] == REFUSED and error.details["status"] == 400
    assert mesh.received(0.2) is None


def test_denied_ip_is_refused_promptly(mesh: Mesh) -> None:
    """deny("127.0.0.1") refuses even an admitted key, the same way."""
    mesh.start(deny=["127.0.0.1"])
    sock, watch = mesh.client("alice")
    sock.send(b"hello")
    error, elapsed = refused_within(watch, PROMPT)
    assert elapsed < PROMPT and error.details["reason"] == REFUSED
    assert mesh.received(0.2) is None


def test_allow_list_admits_only_listed_addresses(mesh: Mesh) -> None:
    """An allow list without 127.0.0.1 refuses a known key from there."""
    auth = mesh.start(allow=["10.9.9.9"])
    _, watch = mesh.client("alice")
    refused_within(watch, PROMPT)
    auth.allow("127.0.0.1")
    _, again = mesh.client("alice")
    assert again.wait(PROMPT) is True


def test_allow_and_deny_lists_do_not_mix(mesh: Mesh) -> None:
    """pyzmq takes one list or the other; asking for both is a configuration error."""
    with pytest.raises(ConfigurationError):
        CurveAuthenticator(mesh.ctx, mesh.keys.allowed, allow=["127.0.0.1"], deny=["10.0.0.1"])
    auth = mesh.start(deny=["10.0.0.1"])
    with pytest.raises(ConfigurationError):
        auth.allow("127.0.0.1")


def test_plain_client_is_refused(mesh: Mesh) -> None:
    """A client without CURVE fails the handshake (mechanism mismatch) and learns it."""
    mesh.start()
    sock, watch = mesh.client(None)
    sock.send(b"hello")
    error, elapsed = refused_within(watch, PROMPT)
    assert elapsed < PROMPT
    assert "CURVE" in error.details["reason"] and "protocol_error" in error.details
    assert mesh.received(0.2) is None


def test_wrong_server_key_is_reported_after_silent_failures(mesh: Mesh) -> None:
    """With the wrong server key the broker just hangs up; after 3 such tries the watch says so."""
    mesh.start()
    sock, watch = mesh.client("alice", server_key="bob")
    sock.send(b"hello")
    error, elapsed = refused_within(watch, PROMPT)
    assert elapsed < PROMPT
    assert "broker's public key" in error.details["reason"]
    assert mesh.received(0.2) is None


def test_other_zap_domain_is_refused(mesh: Mesh) -> None:
    """The authenticator answers only for domain "mesh": another CURVE server admits nobody."""
    mesh.start()
    other = mesh.socket(zmq.ROUTER)
    secure_server(other, mesh.keys.secret("broker"))
    other.zap_domain = b"other"
    port = other.bind_to_random_port("tcp://127.0.0.1")
    mesh.endpoint = f"tcp://127.0.0.1:{port}"
    _, watch = mesh.client("alice")
    refused_within(watch, PROMPT)


def test_reload_admits_a_key_added_later(mesh: Mesh) -> None:
    """After reload(), a new connection with a newly added key gets in, named."""
    auth = mesh.start()
    _, refused = mesh.client("bob")
    refused_within(refused, PROMPT)
    mesh.keys.admit("bob")
    assert auth.reload() == 2
    sock, watch = mesh.client("bob")
    assert watch.wait(PROMPT) is True
    sock.send(b"hi")
    frames = mesh.received(PROMPT)
    assert frames is not None and frame_peer(frames[1])[0] == "bob"


def test_reload_with_a_bad_directory_keeps_the_previous_keys(mesh: Mesh) -> None:
    """A broken file makes reload() raise and changes nothing: alice still gets in."""
    auth = mesh.start()
    (mesh.keys.allowed / "broken.key").write_text("not a certificate\n")
    with pytest.raises(ConfigurationError) as caught:
        auth.reload()
    assert "broken.key" in str(caught.value)
    assert auth.names == {"alice"}
    _, watch = mesh.client("alice")
    assert watch.wait(PROMPT) is True


def test_allowed_directory_problems_are_all_listed(keys: Keys) -> None:
    """Every bad file in the allowed directory is named at once."""
    shutil.copy(keys.secret("bob"), keys.allowed / "bob.key")  # a secret where publics go
    shutil.copy(keys.public("alice"), keys.allowed / "alice2.key")  # the same key twice
    shutil.copy(keys.public("mallory"), keys.allowed / "bad name.key")
    (keys.allowed / "junk.key").write_text('curve\n    public-key = "tooshort"\n')
    ctx = zmq.Context()
    try:
        with pytest.raises(ConfigurationError) as caught:
            CurveAuthenticator(ctx, keys.allowed)
        with pytest.raises(ConfigurationError):
            CurveAuthenticator(ctx, keys.allowed / "missing")
    finally:
        ctx.term()
    problems = caught.value.details["problems"]
    assert len(problems) == 4
    for name in ("bob.key", "alice2.key", "bad name.key", "junk.key"):
        assert any(p.startswith(name) for p in problems), name


def test_one_authenticator_per_context(mesh: Mesh) -> None:
    """A second ZAP handler in the same context is a configuration error, not a ZMQError."""
    mesh.start()
    second = CurveAuthenticator(mesh.ctx, mesh.keys.allowed)
    with pytest.raises(ConfigurationError):
        second.start()


def test_key_files_are_standard_and_the_secret_is_private(keys: Keys) -> None:
    """Files load with zmq.auth.load_certificate; the secret file is 0600."""
    public_file, secret_file = create_keypair(keys.dir / "new", "carol")
    assert (public_file.name, secret_file.name) == ("carol.key", "carol.key_secret")
    public, no_secret = zmq.auth.load_certificate(public_file)
    same_public, secret = zmq.auth.load_certificate(secret_file)
    assert no_secret is None and secret is not None and public == same_public
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_file.stat().st_mode) == 0o644
    assert sorted(p.name for p in public_file.parent.iterdir()) == ["carol.key", "carol.key_secret"]  # no staging left
    assert load_public_key(secret_file) == public
    assert load_secret_key(secret_file) == (public, secret)


def test_keys_are_never_overwritten_and_names_are_checked(keys: Keys) -> None:
    """create_keypair refuses an existing name and a name that cannot be a User-Id."""
    before = keys.secret("alice").read_bytes()
    with pytest.raises(ConfigurationError):
        create_keypair(keys.dir, "alice")
    assert keys.secret("alice").read_bytes() == before
    with pytest.raises(ConfigurationError):
        create_keypair(keys.dir, "../evil")


def test_bad_key_files_are_configuration_errors(keys: Keys, tmp_path: Path) -> None:
    """Missing files, public files given as secrets and loose permissions are refused."""
    with pytest.raises(ConfigurationError):
        load_public_key(tmp_path / "missing.key")
    with pytest.raises(ConfigurationError):
        load_secret_key(keys.public("alice"))
    keys.secret("bob").chmod(0o644)
    with pytest.raises(ConfigurationError) as caught:
        load_secret_key(keys.secret("bob"))
    assert "chmod 600" in caught.value.details["reason"]


def test_curve_options_must_come_before_bind(mesh: Mesh) -> None:
    """Options set after bind would not apply to that endpoint: refuse instead."""
    sock = mesh.socket(zmq.ROUTER)
    sock.bind_to_random_port("tcp://127.0.0.1")
    with pytest.raises(ConfigurationError):
        secure_server(sock, mesh.keys.secret("broker"))


def test_refusals_and_logs_hold_no_key_material(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """Neither errors nor log lines (at debug) show any public or secret key."""
    caplog.set_level(logging.DEBUG)
    mesh.start()
    _, watch = mesh.client("mallory")
    error, _ = refused_within(watch, PROMPT)
    _, ok = mesh.client("alice")
    assert ok.wait(PROMPT)
    keys = {k for name in ("mallory", "alice", "broker") for k in load_secret_key(mesh.keys.secret(name))}
    said = " ".join([str(error), repr(error.details), caplog.text])
    assert not [k for k in keys if k.decode() in said]


def test_watch_fd_wakes_an_asyncio_loop(mesh: Mesh) -> None:
    """An asyncio loop can wait on the watch's fd and learn of a refusal from check()."""
    mesh.start()

    async def learn(make: Callable[[], tuple[zmq.Socket, HandshakeWatch]]) -> object:
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[object] = loop.create_future()
        _, watch = make()

        def wake() -> None:
            try:
                if watch.check() and not outcome.done():
                    outcome.set_result("ready")
            except AuthenticationFailedError as exc:
                if not outcome.done():
                    outcome.set_result(exc)

        loop.add_reader(watch.fd, wake)
        try:
            wake()  # the fd is edge-triggered: read what came before add_reader
            return await asyncio.wait_for(outcome, PROMPT)
        finally:
            loop.remove_reader(watch.fd)

    assert isinstance(asyncio.run(learn(lambda: mesh.client("mallory"))), AuthenticationFailedError)
    assert asyncio.run(learn(lambda: mesh.client("alice"))) == "ready"
