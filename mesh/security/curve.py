"""CurveZMQ links: key files, socket options, the broker's ZAP authenticator, handshake watch.

Rules of this module:

* Keys live in ZeroMQ's standard certificate files (`NAME.key` public, `NAME.key_secret`
  secret), so czmq, zcert and pyzmq tools read them too. A secret file is created 0600
  inside a private directory and only then moved into place: it is never readable by
  others, not even for a moment. Existing files are never overwritten.
* The broker admits a client only if its public key is in a directory of public
  certificates; the file's stem (`alice` for `alice.key`) becomes the ZAP User-Id that
  libzmq attaches to every message of that link (`frame.get("User-Id")`).
* Key material never appears in an exception, its details or a log line: pyzmq's
  `Authenticator` logs client keys at debug level, so it is given a log that drops them.
* `zmq.ZMQError` (and pyzmq's `ValueError`/`OSError` on bad files) become
  `ConfigurationError`, `NetworkError` or `AuthenticationFailedError` here.
* libzmq gives up on an endpoint after a ZAP refusal (status 400) or a security
  mismatch: a refused client must open a new connection after the broker admits it.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import struct
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Self

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ..protocol import (
    NAME_PATTERN,
    AuthenticationFailedError,
    ConfigurationError,
    NetworkError,
)

__all__ = [
    "REFUSED",
    "ZAP_DOMAIN",
    "CurveAuthenticator",
    "HandshakeWatch",
    "create_keypair",
    "load_public_key",
    "load_secret_key",
    "secure_client",
    "secure_server",
]

ZAP_DOMAIN: Final = "mesh"
REFUSED: Final = "the broker refused this client's CURVE key or address"
_MISMATCH: Final = "the broker and this client do not agree on security (is CURVE on at both ends?)"
_SILENT: Final = "the broker dropped the CURVE handshake without a reason (is the broker's public key right?)"
_NAME: Final = re.compile(NAME_PATTERN)
_KEY_CHARS: Final = 40  # a 32-byte key in Z85
_log = logging.getLogger(__name__)


def _config_error(reason: str, **facts: str) -> ConfigurationError:
    return ConfigurationError(reason, details={"reason": reason, **facts})


def create_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Create `NAME.key` (public) and `NAME.key_secret` (secret, mode 0600) in `directory`.

    Args:
        directory: where the files go; created (mode 0700) when missing.
        name: the identity the key stands for; the broker reports it as the User-Id.

    Returns:
        The public and the secret file.

    Raises:
        ConfigurationError: a bad name, a file that exists already, or a directory that
            cannot be written.
    """
    if not _NAME.fullmatch(name):
        raise _config_error(f"key name {name!r} must match {NAME_PATTERN}")
    folder = Path(directory)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise _config_error(f"{path} exists already; remove it to make a new key", file=str(path))
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdtemp makes a 0700 directory, so the secret file is private from its first byte.
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
        try:
            made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(staging, name))
            made_secret.chmod(0o600)
            made_public.chmod(0o644)
            os.replace(made_secret, secret)
            os.replace(made_public, public)
        finally:
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
    except OSError as exc:
        raise _config_error(f"cannot write keys in {folder}: {exc.strerror}", file=str(folder)) from None
    return public, secret


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError):
        raise _config_error(f"{path} is not a readable ZeroMQ certificate", file=str(path)) from None
    for key in (public, secret):
        if key is not None and (len(key) != _KEY_CHARS or _z85_invalid(key)):
            raise _config_error(f"{path} holds a malformed key", file=str(path))
    return public, secret


def _z85_invalid(key: bytes) -> bool:
    try:
        z85.decode(key)
    except (ValueError, KeyError, struct.error):
        return True
    return False


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key of a certificate file (public or secret).

    Raises:
        ConfigurationError: the file is missing or holds no valid key.
    """
    return _load(path)[0]


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """The Z85 (public, secret) keys of a `.key_secret` file.

    Refuses a file that group or others may read, as ssh does: such a key may have
    leaked, and the operator should know before the mesh trusts it.

    Raises:
        ConfigurationError: the file is missing, has no secret key, or is readable by others.
    """
    public, secret = _load(path)
    if secret is None:
        raise _config_error(f"{path} holds no secret key", file=str(path))
    if os.name == "posix" and os.stat(path).st_mode & 0o077:
        raise _config_error(f"{path} is readable by other users; run chmod 600 on it", file=str(path))
    return public, secret


def _before_attach(sock: zmq.Socket) -> None:
    # libzmq reads the security options when a connection starts: set after bind or
    # connect, they would silently not apply to that endpoint.
    if sock.getsockopt(zmq.LAST_ENDPOINT):
        raise _config_error("CURVE options must be set before the socket binds or connects")
    if not zmq.has("curve"):
        raise _config_error("this libzmq was built without CURVE support")


def secure_server(sock: zmq.Socket, secret_file: str | os.PathLike[str]) -> None:
    """Make `sock` a CURVE server whose clients are checked by ZAP domain `mesh`.

    Args:
        sock: a socket that has not bound or connected yet.
        secret_file: the server's `.key_secret` file.

    Raises:
        ConfigurationError: a bad key file, or a socket already bound or connected.
    """
    _before_attach(sock)
    public, secret = load_secret_key(secret_file)
    try:
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.zap_domain = ZAP_DOMAIN.encode()
    except zmq.ZMQError as exc:
        raise _config_error(f"cannot make the socket a CURVE server: {exc.strerror}") from None


def secure_client(
    sock: zmq.Socket, secret_file: str | os.PathLike[str], server_public_file: str | os.PathLike[str]
) -> None:
    """Make `sock` a CURVE client of the server whose public certificate is given.

    Args:
        sock: a socket that has not bound or connected yet.
        secret_file: this client's `.key_secret` file.
        server_public_file: the server's `.key` file (its `.key_secret` works too).

    Raises:
        ConfigurationError: a bad key file, or a socket already bound or connected.
    """
    _before_attach(sock)
    public, secret = load_secret_key(secret_file)
    server = load_public_key(server_public_file)
    try:
        sock.curve_serverkey = server
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    except zmq.ZMQError as exc:
        raise _config_error(f"cannot make the socket a CURVE client: {exc.strerror}") from None


def _read_allowed(directory: Path) -> dict[bytes, str]:
    """Z85 public key -> name for every `*.key` in `directory`; every problem at once."""
    if not directory.is_dir():
        raise _config_error(f"{directory} is not a directory of public keys", file=str(directory))
    names: dict[bytes, str] = {}
    problems: list[str] = []
    for path in sorted(directory.glob("*.key")):
        if not _NAME.fullmatch(path.stem):
            problems.append(f"{path.name}: the name must match {NAME_PATTERN}")
            continue
        try:
            public, secret = _load(path)
        except ConfigurationError as exc:
            problems.append(f"{path.name}: {exc.details['reason']}")
            continue
        if secret is not None:
            problems.append(f"{path.name}: holds a secret key; this directory is for public keys only")
        elif public in names:
            problems.append(f"{path.name}: the same key as {names[public]}.key")
        else:
            names[public] = path.stem
    if problems:
        reason = f"{directory}: {len(problems)} problem(s) with the allowed keys"
        raise ConfigurationError(
            reason + "\n" + "\n".join(f"  {p}" for p in problems),
            details={"reason": reason, "problems": problems},
        )
    return names


class _KeylessLog:
    """pyzmq's Authenticator logs client keys at debug level: drop those lines, and keep
    only the first clause of its error lines, which name the problem but not the frames."""

    def debug(self, msg: str, *args: Any) -> None:
        pass

    def error(self, msg: str, *args: Any) -> None:
        _log.error("ZAP authenticator: %s", msg.partition(":")[0])


class CurveAuthenticator(ThreadAuthenticator):
    """The broker's ZAP handler: admits known client keys and names each link.

    pyzmq's `Authenticator` holds the decision (`(allowed, reason)` per request) and
    its thread answers libzmq; this class only supplies the key set and the names.
    One authenticator serves every CURVE socket of its context whose ZAP domain is
    `mesh`; a socket with another domain is refused ("Unknown domain").

    Args:
        context: the context of the broker's sockets (ZAP is per context).
        allowed_dir: a directory of public certificates `NAME.key`.
        allow: if given, only these IP addresses may connect (then authenticate).
        deny: if given, these IP addresses may not connect. Not with `allow`.

    Raises:
        ConfigurationError: both `allow` and `deny`, or a problem in `allowed_dir`.
    """

    def __init__(
        self,
        context: zmq.Context,
        allowed_dir: str | os.PathLike[str],
        *,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
    ) -> None:
        super().__init__(context=context, log=_KeylessLog())
        self.allowed_dir = Path(allowed_dir)
        # reload() (any thread) replaces `_latest`; the ZAP thread pins it per request.
        self._latest: dict[bytes, str] = {}
        self._names = self._latest
        self._seen: int | None = None
        self.reload()
        if allow:
            self.allow(*allow)
        if deny:
            self.deny(*deny)

    def allow(self, *addresses: str) -> None:
        """Admit only these IP addresses (they still need a known key).

        Raises:
            ConfigurationError: a deny list is set already.
        """
        if self._denied:
            raise _config_error("use an allow list or a deny list of addresses, not both")
        super().allow(*addresses)

    def deny(self, *addresses: str) -> None:
        """Refuse these IP addresses whatever their key.

        Raises:
            ConfigurationError: an allow list is set already.
        """
        if self._allowed:
            raise _config_error("use an allow list or a deny list of addresses, not both")
        super().deny(*addresses)

    def start(self) -> None:
        """Start answering ZAP requests in a background thread.

        Raises:
            ConfigurationError: another ZAP handler runs in this context already.
        """
        try:
            super().start()
        except zmq.ZMQError as exc:
            self.stop()
            raise _config_error(f"cannot start the ZAP handler: {exc.strerror}") from None

    def reload(self) -> int:
        """Read the allowed-keys directory again; new connections see the new set.

        Established links stay up: removing a key does not cut a connected client.

        Returns:
            How many keys are admitted now.

        Raises:
            ConfigurationError: listing every problem; the previous key set stays in use.
        """
        stamp = self._stamp()
        names = _read_allowed(self.allowed_dir)
        self._latest = names
        self._seen = stamp
        return len(names)

    def reload_if_changed(self) -> bool:
        """`reload()` when a key file was added, removed or replaced since the last one.

        One `stat` of the directory: cheap enough for the broker to call every second.
        A directory with problems keeps the previous key set and is tried again later.

        Returns:
            Whether the key set was read again.
        """
        if self._stamp() == self._seen:
            return False
        try:
            self.reload()
        except ConfigurationError:
            self._seen = self._stamp()  # do not re-read a broken directory every second
            return False
        return True

    def _stamp(self) -> int | None:
        try:
            return os.stat(self.allowed_dir).st_mtime_ns
        except OSError:
            return None

    @property
    def names(self) -> frozenset[str]:
        """The names of the admitted keys."""
        return frozenset(self._latest.values())

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # One key set for the whole request, so the admit check and the User-Id agree
        # even when reload() swaps the set in between.
        self._names = self._latest
        self.certs[ZAP_DOMAIN] = self._names
        await super().handle_zap_message(msg)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names[z85.encode(client_public_key)]


_WATCHED: Final = (
    zmq.EVENT_CONNECT_DELAYED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_CONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_MONITOR_STOPPED
)
_EVENT: Final = struct.Struct("=HI")
_POLLIN: Final = int(zmq.POLLIN)
_WATCHES: Final = itertools.count()  # numbers the monitor endpoints of this process


class HandshakeWatch:
    """Tells a CURVE client promptly that the broker refused it, instead of a silent hang.

    Create it before `connect()`. It reads the socket's monitor events:

    * `HANDSHAKE_FAILED_AUTH` (the broker's ZAP answered 400: unknown key or address):
      a refusal. libzmq does not retry that endpoint.
    * `HANDSHAKE_FAILED_PROTOCOL` (e.g. a plain client and a CURVE broker): a refusal.
    * `HANDSHAKE_FAILED_NO_DETAIL`: the broker closed the link mid-handshake, which is
      what a wrong server public key looks like from the client (the broker cannot
      decrypt the HELLO and sends nothing back). libzmq retries; after `silent_limit`
      such failures in a row the watch reports a refusal too.
    * `HANDSHAKE_SUCCEEDED` clears that endpoint's failure; `DISCONNECTED` its readiness.
    * `CONNECTED` (TCP is up) until the handshake ends either way or the connection
      drops: `handshaking`, a broker that is there but has not answered yet. So is a
      connection still being made (`CONNECT_DELAYED`, until it connects or fails with
      `CONNECT_RETRIED`): a broker whose backlog is full answers a SYN only later,
      while one that is gone refuses it at once.

    An asyncio loop can `loop.add_reader(watch.fd, ...)` and call `check()` on wake-up;
    the fd is edge-triggered (ZeroMQ's rule), so `check()` drains every pending event.

    Args:
        sock: the client socket, not connected yet.
        silent_limit: wordless handshake failures in a row that count as a refusal.

    Raises:
        NetworkError: the monitor cannot be attached.
    """

    def __init__(self, sock: zmq.Socket, *, silent_limit: int = 3) -> None:
        self.silent_limit = silent_limit
        self._ready: set[str] = set()
        self._connected: set[str] = set()  # TCP being made or up, handshake not finished
        self._failed: dict[str, dict[str, Any]] = {}  # endpoint -> details of its refusal
        self._silent: dict[str, int] = {}
        self.drops = 0  # connections closed after a completed handshake
        self._sock = sock
        try:
            # A name of its own: libzmq's default names the socket's descriptor, which a
            # socket opened in the same context after this one closed may get again.
            self.socket: zmq.Socket = sock.get_monitor_socket(_WATCHED, f"inproc://mesh.watch.{next(_WATCHES)}")
            self.socket.linger = 0
        except zmq.ZMQError as exc:
            raise NetworkError(f"cannot watch the socket's handshakes: {exc.strerror}") from None

    @property
    def handshaking(self) -> bool:
        """Whether a connection is being made or up and its handshake not finished (as of the last `check`)."""
        return bool(self._connected)

    @property
    def fd(self) -> int:
        """The monitor socket's file descriptor, for `loop.add_reader` (edge-triggered)."""
        return int(self.socket.getsockopt(zmq.FD))

    def check(self) -> bool:
        """Read the pending events without blocking.

        Returns:
            Whether some endpoint of the socket has a completed handshake now.

        Raises:
            AuthenticationFailedError: an endpoint was refused (and has not succeeded since);
                `details` holds `reason`, `endpoint` and, for a ZAP refusal, `status`.
            NetworkError: the monitor failed.
        """
        sock = self.socket
        try:
            # Asking EVENTS first is several times cheaper than a receive that raises Again,
            # and a busy client checks ten times a second.
            while not sock.closed and int(sock.getsockopt(zmq.EVENTS)) & _POLLIN:
                self._event(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.ZMQError as exc:
            raise NetworkError(f"the handshake monitor failed: {exc.strerror}") from None
        for endpoint, details in self._failed.items():
            raise AuthenticationFailedError(f"{endpoint}: {details['reason']}", details=dict(details))
        return bool(self._ready)

    def wait(self, timeout: float) -> bool:
        """Block until a handshake succeeds or fails, at most `timeout` seconds.

        Returns:
            True when a handshake succeeded, False when the time ran out first.

        Raises:
            AuthenticationFailedError: the broker refused the client.
            NetworkError: the monitor failed.
        """
        deadline = time.monotonic() + timeout
        while not self.check():
            left = deadline - time.monotonic()
            if left <= 0 or self.socket.closed:
                return False
            try:
                self.socket.poll(max(1, int(left * 1000)))
            except zmq.ZMQError as exc:
                raise NetworkError(f"the handshake monitor failed: {exc.strerror}") from None
        return True

    def close(self) -> None:
        """Stop watching; the client socket itself stays open."""
        if self.socket.closed:
            return
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the client socket is closed already, which stopped the monitor
        self.socket.close(linger=0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _event(self, frames: list[bytes]) -> None:
        if len(frames) != 2 or len(frames[0]) != _EVENT.size:
            return  # not a libzmq monitor event; nothing else writes to this socket
        event, value = _EVENT.unpack(frames[0])
        endpoint = frames[1].decode(errors="replace")
        if event in (zmq.EVENT_CONNECT_DELAYED, zmq.EVENT_CONNECTED):
            self._connected.add(endpoint)
            return
        self._connected.discard(endpoint)  # every other event ends the handshake or the connection
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._ready.add(endpoint)
            self._failed.pop(endpoint, None)
            self._silent.pop(endpoint, None)
        elif event == zmq.EVENT_DISCONNECTED:
            if endpoint in self._ready:
                self.drops += 1
            self._ready.discard(endpoint)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason = REFUSED if value == 400 else f"the broker's authenticator answered {value}"
            self._fail(endpoint, reason, status=value)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self._fail(endpoint, _MISMATCH, protocol_error=hex(value))
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._silent[endpoint] = self._silent.get(endpoint, 0) + 1
            if self._silent[endpoint] >= self.silent_limit:
                self._fail(endpoint, _SILENT)
        elif event == zmq.EVENT_MONITOR_STOPPED:
            self.socket.close(linger=0)

    def _fail(self, endpoint: str, reason: str, **facts: Any) -> None:
        self._failed[endpoint] = {"reason": reason, "endpoint": endpoint, **facts}
