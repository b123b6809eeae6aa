"""Security with real processes and sockets: every refusal gets its own code, and nothing leaks."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import zmq
from joserfc import jwt as jose_jwt
from joserfc.jwk import OctKey

from mesh.client import Client
from mesh.protocol import (
    AccessDeniedError,
    AuthenticationFailedError,
    EncryptionFailedError,
    ErrorCode,
    MeshError,
    SecurityLevelTooLowError,
    SignatureInvalidError,
    TokenExpiredError,
    TokenRevokedError,
    encode_command_header,
    encode_payload,
    unpack_header,
)
from mesh.security.credentials import Credentials, load_credentials, save_credentials
from mesh.security.curve import create_keypair, secure_client
from mesh.security.payload import KeyRing
from mesh.security.signing import generate_signing_key
from mesh.security.token_keys import generate_private_key, generate_secret, load_private_key, load_secret
from mesh.security.tokens import TokenIssuer, TokenSettings
from mesh.testing import run_broker, run_node

SECRET_TEXT = "s3cr3t-payload-text"
POLICY = """
[roles.admin]
allow = ["*"]
renew = true
publish = ["*"]
subscribe = ["*"]

[roles.reader]
allow = ["mesh.ping", "echo.echo", "beta.whoami"]

[nodes.echo]
services = ["echo"]

[nodes.beta]
services = ["beta"]

[nodes.rogue]
services = ["other"]
"""


class State:
    """A state directory like `mesh up` makes, plus keys the broker does not know."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("curve/allowed", "curve/private", "curve/strangers", "tokens", "credentials", "signing/trusted"):
            (root / d).mkdir(parents=True)
        create_keypair(root / "curve", "broker")
        for name in ("dev", "reader", "echo", "beta", "rogue"):
            public, _ = create_keypair(root / "curve/private", name)
            shutil.copy(public, root / "curve/allowed" / public.name)
        create_keypair(root / "curve/strangers", "dev")  # same name, unknown key
        generate_secret(root / "tokens/secret")
        KeyRing.generate().save(root / "keyring.json")
        KeyRing.generate().save(root / "other-keyring.json")
        (root / "policy.toml").write_text(POLICY)
        generate_signing_key(root / "signing/dev.key")
        shutil.copy(root / "signing/dev.pub", root / "signing/trusted/dev.pub")
        generate_signing_key(root / "signing/mallory.key")
        self.settings = TokenSettings("HS256", "mesh", "mesh")
        self.issuer = TokenIssuer(self.settings, load_secret(root / "tokens/secret"))
        for name in ("echo", "rogue"):
            self.save(name, token=None)
        self.save("beta", token=None, require_signers=root / "signing/trusted")

    def creds(self, name: str, *, token: str | None = "issue", roles: tuple[str, ...] = ("admin",), level: int = 1,
              key: Path | None = None, **extra: object) -> Credentials:
        if token == "issue":
            token = self.issuer.issue(name, roles, 3600, time.time())
        return Credentials(
            broker_key=self.root / "curve/broker.key",
            key=key or self.root / f"curve/private/{name}.key_secret",
            token=token,
            level=level,
            keyring=extra.pop("keyring", self.root / "keyring.json"),  # type: ignore[arg-type]
            **extra,  # type: ignore[arg-type]
        )

    def save(self, name: str, **kwargs: object) -> Path:
        path = self.root / f"credentials/{name}.toml"
        save_credentials(path, self.creds(name, **kwargs))  # type: ignore[arg-type]
        return path


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> State:
    return State(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def mesh(state: State):
    """A secure broker (vault needs level 2) with the echo node and a node that requires signatures."""
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--state", str(state.root), "--service-level", "vault=2") as b:
        with run_node("echo", b, "--credentials", str(state.root / "credentials/echo.toml")) as echo, run_node(
            "testnodes:node", b, "--credentials", str(state.root / "credentials/beta.toml"),
            config='{"name": "beta", "services": ["beta"]}',
        ) as beta:
            yield b, echo, beta


def call(b, creds: Credentials, service: str = "echo", action: str = "echo", payload: object = None, timeout: float = 5):
    with Client(b.clients, timeout=timeout, retries=0, credentials=creds) as c:
        return c.call(service, action, {"text": SECRET_TEXT} if payload is None else payload)


def refused(b, creds: Credentials, error: type[MeshError], *args: object) -> MeshError:
    with pytest.raises(error) as info:
        call(b, creds, *args)  # type: ignore[arg-type]
    return info.value


def test_a_secure_call_works_at_each_level(mesh, state):
    """Token (level 1), encrypted payloads (2) and signed messages (3) all reach the node and back."""
    b, _, _ = mesh
    for level in (1, 2):
        assert call(b, state.creds("dev", level=level)) == {"text": SECRET_TEXT}
    signed = state.creds("dev", level=3, signing_key=state.root / "signing/dev.key")
    assert call(b, signed, "beta", "whoami", {})["node"] == "beta"


def test_unknown_curve_key_is_refused_promptly(mesh, state):
    """A key the broker does not know is refused in the handshake; the client says so at once."""
    b, _, _ = mesh
    stranger = state.creds("dev", key=state.root / "curve/strangers/dev.key_secret")
    started = time.monotonic()
    err = refused(b, stranger, AuthenticationFailedError)
    assert time.monotonic() - started < 4
    assert err.code == ErrorCode.AUTHENTICATION_FAILED


def test_disallowed_ip_is_refused(state):
    """A broker that denies 127.0.0.1 refuses the handshake of a client with a good key."""
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--state", str(state.root), "--deny-ip", "127.0.0.1") as b:
        refused(b, state.creds("dev"), AuthenticationFailedError)


def _forged(state: State, **changes: object) -> str:
    """An HS256 token made by hand (so it can be wrong in any one way)."""
    now = int(time.time())
    claims = {"sub": "dev", "roles": ["admin"], "iat": now, "nbf": now, "exp": now + 600, "jti": f"j{now}",
              "iss": "mesh", "aud": "mesh", **changes}
    key = OctKey.import_key(load_secret(state.root / "tokens/secret"))
    return jose_jwt.encode({"alg": "HS256"}, claims, key)


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("case", "error", "reason"),
    [
        ("missing", AuthenticationFailedError, "missing token"),
        ("expired", TokenExpiredError, "expired"),
        ("not yet valid", AuthenticationFailedError, "not yet valid"),
        ("tampered", AuthenticationFailedError, "bad signature"),
        ("wrong audience", AuthenticationFailedError, "wrong audience"),
        ("wrong issuer", AuthenticationFailedError, "wrong issuer"),
        ("alg none", AuthenticationFailedError, "algorithm not allowed"),
        # An RSA public key used as the HMAC secret: this broker's own secret does not
        # verify it (verifiers configured for RS256 refuse the algorithm itself: unit tests).
        ("HS/RS confusion", AuthenticationFailedError, "bad signature"),
        ("another key's token", AuthenticationFailedError, "token not bound to this key"),
    ],
)
def test_bad_tokens_are_refused_each_with_its_reason(mesh, state, tmp_path, case, error, reason):
    """Each kind of bad token gets its own code and reason, and the reply holds no token."""
    b, _, _ = mesh
    now = int(time.time())
    good = _forged(state)
    if case == "missing":
        token = None
    elif case == "expired":
        token = _forged(state, exp=now - 600, iat=now - 1200, nbf=now - 1200)
    elif case == "not yet valid":
        token = _forged(state, nbf=now + 600)
    elif case == "tampered":
        head, body, sig = good.split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=="))
        token = f"{head}.{_b64({**claims, 'roles': ['admin', 'root']})}.{sig}"
    elif case == "wrong audience":
        token = _forged(state, aud="elsewhere")
    elif case == "wrong issuer":
        token = _forged(state, iss="elsewhere")
    elif case == "alg none":
        token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{good.split('.')[1]}."
    elif case == "HS/RS confusion":
        generate_private_key(tmp_path / "rsa.key", "RS256")
        pem = (tmp_path / "rsa.pub").read_bytes()
        token = jose_jwt.encode({"alg": "RS256"}, json.loads(base64.urlsafe_b64decode(good.split(".")[1] + "==")), OctKey.import_key(pem)) if False else _rs_confused(pem, good)
    else:
        token = state.issuer.issue("reader", ["admin"], 600, time.time())  # a token of another key's name
    err = refused(b, state.creds("dev", token=token), error)
    assert err.details.get("reason") == reason
    if token:
        assert token not in err.message and token not in json.dumps(err.details)


def _rs_confused(public_pem: bytes, good: str) -> str:
    """An HS256-signed token whose HMAC secret is an RSA public key (the classic confusion)."""
    import hashlib
    import hmac

    head = _b64({"alg": "HS256", "typ": "JWT"})
    body = good.split(".")[1]
    sig = base64.urlsafe_b64encode(hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    return f"{head}.{body}.{sig}"


def test_tokens_from_another_jwt_library_are_accepted(mesh, state):
    """An HS256 token made by joserfc with the mesh's secret works like one from PyJWT."""
    b, _, _ = mesh
    assert call(b, state.creds("dev", token=_forged(state))) == {"text": SECRET_TEXT}


def test_a_revoked_token_is_refused(mesh, state):
    """mesh.revoke by jti: the token stops working at once, and the revocation is persisted."""
    b, _, _ = mesh
    token = state.issuer.issue("dev", ["admin"], 600, time.time())
    import jwt as pyjwt

    jti = pyjwt.decode(token, options={"verify_signature": False})["jti"]
    assert call(b, state.creds("dev", token=token)) == {"text": SECRET_TEXT}
    with Client(b.clients, timeout=5, credentials=state.creds("dev")) as admin:
        assert admin.call("mesh", "revoke", {"jti": jti}) == {"revoked": jti}
    refused(b, state.creds("dev", token=token), TokenRevokedError)


def test_renewal_gives_a_working_token(mesh, state):
    """mesh.renew returns a fresh token the client then uses."""
    b, _, _ = mesh
    with Client(b.clients, timeout=5, credentials=state.creds("dev")) as c:
        assert c.renew() > time.time()
        assert c.call("echo", "echo", {"text": "after renew"}) == {"text": "after renew"}
    with Client(b.clients, timeout=5, retries=0, credentials=state.creds("reader", roles=("reader",))) as c:
        with pytest.raises(AccessDeniedError):
            c.renew()


def test_a_role_without_permission_is_denied_and_audited(mesh, state):
    """The reader may echo but not reverse; the refusal is counted and audited without secrets."""
    b, _, _ = mesh
    reader = state.creds("reader", roles=("reader",))
    assert call(b, reader) == {"text": SECRET_TEXT}
    refused(b, reader, AccessDeniedError, "echo", "reverse")
    with Client(b.clients, timeout=5, credentials=state.creds("dev")) as admin:
        audit = admin.call("mesh", "stats")["security"]["audit"]
    assert any(r["who"] == "reader" and r["what"] == "echo.reverse" and r["code"] == 2002 for r in audit)
    assert SECRET_TEXT not in json.dumps(audit)


def test_a_rogue_node_cannot_take_over_a_service(mesh, state):
    """A node whose key the policy does not give `echo` is refused when it registers it."""
    b, _, _ = mesh
    with pytest.raises(TimeoutError):
        with run_node("echo", b, "--credentials", str(state.root / "credentials/rogue.toml")):
            pass
    with Client(b.clients, timeout=5, credentials=state.creds("dev")) as admin:
        services = admin.call("mesh", "services")
        audit = admin.call("mesh", "stats")["security"]["audit"]
    assert services["echo"]["nodes"] == 1
    assert any(r["who"] == "rogue" and r["code"] == 2002 for r in audit)


def _raw_exchange(b, state: State, frames_list: list[list[bytes]]) -> list[dict]:
    """Send hand-made frames over a CURVE DEALER with dev's key; return the reply headers."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        secure_client(sock, state.root / "curve/private/dev.key_secret", state.root / "curve/broker.key")
        sock.connect(b.clients)
        out = []
        for frames in frames_list:
            sock.send_multipart(frames)
            assert sock.poll(5000), "no answer"
            out.append(unpack_header(sock.recv_multipart()[0]))
        return out
    finally:
        sock.close(0)
        ctx.term()


def _sealed(state: State, level: int = 2, **creds: object) -> list[bytes]:
    c = state.creds("dev", level=level, **creds)
    header = unpack_header(encode_command_header("echo", "echo", id=f"raw-{time.time_ns()}", now=time.time()))
    return list(c.sealer().seal(header, encode_payload({"text": SECRET_TEXT}), time.time()))


def test_an_encrypted_command_gets_an_encrypted_reply(mesh, state):
    """The node (at level 1 itself) answers a level-2 command with an encrypted payload."""
    b, _, _ = mesh
    [reply] = _raw_exchange(b, state, [_sealed(state)])
    assert reply["type"] == "response" and reply["security"]["encryption"]["alg"] == "A256GCM"


def test_tampered_ciphertext_is_refused_by_the_node(mesh, state):
    """Flip one bit of an encrypted payload: the node answers ENCRYPTION_FAILED."""
    b, _, _ = mesh
    header, payload = _sealed(state)
    tampered = payload[:-1] + bytes([payload[-1] ^ 1])
    [reply] = _raw_exchange(b, state, [[header, tampered]])
    assert reply["error"]["code"] == ErrorCode.ENCRYPTION_FAILED
    assert reply["error"]["details"]["reason"] == "tampered or wrong key"


def test_an_unknown_key_id_is_refused(mesh, state):
    """A payload encrypted with a ring the node does not have: ENCRYPTION_FAILED, unknown key id."""
    b, _, _ = mesh
    err = refused(b, state.creds("dev", level=2, keyring=state.root / "other-keyring.json"), EncryptionFailedError)
    assert err.details["reason"] == "unknown key id"


def test_a_bad_signature_is_refused(mesh, state):
    """The beta node requires signatures from dev: mallory's signature and a missing one are refused."""
    b, _, _ = mesh
    mallory = state.creds("dev", level=3, signing_key=state.root / "signing/mallory.key")
    err = refused(b, mallory, SignatureInvalidError, "beta", "whoami", {})
    assert err.details["reason"] == "does not verify"
    err = refused(b, state.creds("dev", level=1), SignatureInvalidError, "beta", "whoami", {})
    assert err.details["reason"] == "missing"


def test_a_replayed_message_is_refused(mesh, state):
    """The same frames sent twice: the second copy is REPLAY_DETECTED."""
    b, _, _ = mesh
    frames = _sealed(state, level=1)
    first, second = _raw_exchange(b, state, [frames, frames])
    assert first["type"] == "response"
    assert second["error"]["code"] == ErrorCode.REPLAY_DETECTED


def test_below_the_services_level_is_refused(mesh, state):
    """vault requires level 2: a level-1 command is refused before routing."""
    b, _, _ = mesh
    err = refused(b, state.creds("dev", level=1), SecurityLevelTooLowError, "vault", "open", {})
    assert err.details == {"required": 2, "level": 1}


def test_key_rotation_under_load_fails_no_command(mesh, state):
    """Rotate the payload keys while a client sends encrypted commands without pause: none fails."""
    b, _, _ = mesh
    errors: list[BaseException] = []
    done = threading.Event()
    count = 0

    def send() -> None:
        nonlocal count
        with Client(b.clients, timeout=10, credentials=state.creds("dev", level=2)) as c:
            while not done.is_set():
                try:
                    assert c.call("echo", "echo", {"n": count}) == {"n": count}
                    count += 1
                except BaseException as exc:  # noqa: BLE001 - the test reports every failure
                    errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    time.sleep(1.0)
    ring = KeyRing.load(state.root / "keyring.json")
    old = ring.active_kid
    ring.rotate(time.time(), grace=30.0, delay=2.5)
    ring.save(state.root / "keyring.json")
    time.sleep(5.0)
    done.set()
    t.join(15)
    assert errors == [] and count > 20
    assert KeyRing.load(state.root / "keyring.json").active_kid == old  # promotion happens in readers
    assert ring.promote(time.time()) != old


def test_nothing_secret_reaches_the_logs(mesh, state):
    """After all of the above, no token, key or payload text is in the broker's or nodes' output."""
    b, echo, beta = mesh
    logs = b.process.output() + echo.output() + beta.output()
    dev = load_credentials(state.root / "credentials/echo.toml")
    assert SECRET_TEXT not in logs
    assert "eyJ" not in logs  # no JWT
    assert dev.key.read_text().split('secret-key = "')[1][:20] not in logs


def test_a_key_added_while_the_broker_runs_is_admitted(mesh, state):
    """Copying a public key into curve/allowed admits it within a second or so, without a restart."""
    b, _, _ = mesh
    public, _ = create_keypair(state.root / "curve/private", "late")
    refused(b, state.creds("late"), AuthenticationFailedError)
    shutil.copy(public, state.root / "curve/allowed" / public.name)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert call(b, state.creds("late")) == {"text": SECRET_TEXT}
            break
        except AuthenticationFailedError:
            assert time.monotonic() < deadline, "the new key was never admitted"
            time.sleep(0.3)


def test_a_broker_verifying_eddsa_tokens_with_a_public_key(state, tmp_path):
    """--token-algorithm EdDSA --token-key PUB: EdDSA tokens pass; an HS256 token keyed with that PEM is refused."""
    generate_private_key(tmp_path / "issuer.key", "EdDSA")
    issuer = TokenIssuer(TokenSettings("EdDSA", "mesh", "mesh"), load_private_key(tmp_path / "issuer.key"))
    args = ["--state", str(state.root), "--token-algorithm", "EdDSA", "--token-key", str(tmp_path / "issuer.pub")]
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", *args) as b:
        with Client(b.clients, timeout=5, credentials=state.creds("dev", token=issuer.issue("dev", ["admin"], 600, time.time()))) as c:
            assert c.call("mesh", "ping")["pong"] is True
        confused = _rs_confused((tmp_path / "issuer.pub").read_bytes(), issuer.issue("dev", ["admin"], 600, time.time()))
        err = refused(b, state.creds("dev", token=confused), AuthenticationFailedError, "mesh", "ping", {})
        assert err.details["reason"] == "algorithm not allowed"
