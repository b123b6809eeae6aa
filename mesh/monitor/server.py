"""The monitor's HTTP side: endpoints that serve the latest snapshot, from one daemon thread.

Rules of this module:

* The HTTP thread never touches the broker core. The loop publishes a snapshot with
  `publish()` (one attribute assignment, atomic in Python) and every request reads the
  one it finds there, so a response is consistent within itself.
* Off unless asked for. Bound to loopback it may run open; bound anywhere else, or with
  security on, it needs a bearer token (`Authorization: Bearer TOKEN`), compared in
  constant time. With security on and no token file given, `monitor_settings()` makes
  one in the state directory (0600), like the other secrets there. The dashboard page itself holds no data and is served to anyone; it
  sends the token it finds after `#token=` in its address (never sent to the server).
* TLS when given a certificate and key (PEM): TLS 1.3 only, so a TLS 1.2 client fails
  its handshake; `tls_context` builds the context for the MCP bridge's HTTP too.
* `/healthz` answers 200 while the loop publishes snapshots (live) and 503 once they
  stop coming; `/healthz/ready` answers 503 as well while the broker drains.
* Bounded whatever peers do: one thread runs an asyncio loop for every connection (no
  thread per connection), at most `MonitorLimits.max_connections` are open, and each
  phase has a deadline (request head, body, taking the response). A peer past a limit is
  answered (408, 431, 503, ...) and closed, never waited on; `http_wire` reads requests.
* A peer's failure (timeout, reset, bad request, refused at the cap) is counted in
  `mesh_monitor_connection_errors_total` and logged as one line, never a traceback;
  nothing a peer sends (its token above all) reaches a log line.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..protocol import ConfigurationError
from ..security.files import write_file_atomic
from .dashboard import PAGE
from .http_wire import MAX_HEAD_BYTES, HeadReader, Refusal, Request, encode_response, refusal_response
from .metrics import metrics_registry

__all__ = ["ERROR_KINDS", "MonitorConnections", "MonitorLimits", "MonitorServer", "MonitorSettings", "TOKEN_FILE",
           "is_loopback", "monitor_settings", "parse_address", "tls_context"]

log = logging.getLogger("mesh.monitor")

STALE_S: Final = 5.0  # no snapshot for this long: the loop is stuck, the broker is not live
SECTIONS: Final = ("varz", "nodes", "services", "clients", "cluster", "events", "errors")
TOKEN_FILE: Final = "monitor.token"  # in the security state directory
BACKLOG: Final = 128  # connections the kernel holds until the loop accepts them
ERROR_KINDS: Final = ("timeout", "reset", "bad_request", "refused")  # how a peer ended or spoiled a connection
LINGER_S: Final = 2.0  # a refused peer's time to read its answer before the connection is dropped
WARN_EVERY_S: Final = 60.0  # at most one warning line per this long about mistreated connections
CONNECTION_METRICS: Final = {
    "mesh_monitor_connection_errors": "Monitor connections ended by the peer's doing, by kind "
                                      "(timeout, reset, bad_request, refused).",
    "mesh_monitor_connections": "HTTP connections open to the monitor.",
}


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """Where the monitor listens, the token it requires (None: open, loopback only), and TLS (None: plain HTTP)."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    tls: ssl.SSLContext | None = None


def parse_address(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6; port 0 picks a free one).

    Raises:
        ConfigurationError: anything else.
    """
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigurationError(f"monitor: {value!r} is not HOST:PORT (a port from 0 to 65535)")
    return host, int(port)


def monitor_settings(address: str, token_file: str | None = None, state_dir: str | None = None, *,
                     tls_cert: str | None = None, tls_key: str | None = None) -> MonitorSettings:
    """The monitor's settings from `--monitor`, `--monitor-token-file`, `--state` and the TLS files.

    Raises:
        ConfigurationError: a bad address, an unreadable or empty token file, a
            non-loopback address with no token, or a TLS file missing or unusable.
    """
    host, port = parse_address(address)
    tls = tls_context(tls_cert, tls_key, options=("--monitor-tls-cert", "--monitor-tls-key"))
    path = Path(token_file) if token_file is not None else None
    if path is None and state_dir is not None:
        path = Path(state_dir) / TOKEN_FILE
        if not path.exists():
            write_file_atomic(path, secrets.token_urlsafe(32).encode() + b"\n")
    if path is None:
        if not is_loopback(host):
            raise ConfigurationError(f"monitor: {host} is reachable from other machines; give a --monitor-token-file")
        return MonitorSettings(host, port, tls=tls)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"monitor: cannot read the token file {path}: {exc}") from None
    if not token:
        raise ConfigurationError(f"monitor: the token file {path} is empty")
    return MonitorSettings(host, port, token, tls)


def tls_context(cert: str | None, key: str | None, *,
                options: tuple[str, str] = ("--tls-cert", "--tls-key")) -> ssl.SSLContext | None:
    """A server's TLS context from a PEM certificate (chain) and its PEM key: TLS 1.3 minimum.

    Args:
        cert: the certificate file (the chain after it, if any); None with `key` None: no TLS.
        key: the private key file (unencrypted).
        options: the command-line names of the two files, for the error messages.

    Returns:
        The context, or None when neither file is given.

    Raises:
        ConfigurationError: only one file given, a file missing or unreadable, not PEM,
            an encrypted key, or a key that does not belong to the certificate.
    """
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigurationError(f"TLS needs both {options[0]} and {options[1]}", details={"missing": options[cert is not None]})
    for option, path in zip(options, (cert, key), strict=True):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigurationError(f"{option}: cannot read {path}: {exc.strerror or exc}",
                                     details={"option": option, "path": path}) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        # An encrypted key would make OpenSSL prompt on the terminal; the empty password refuses it instead.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(
            f"{options[0]} {cert} and {options[1]} {key}: not a PEM certificate and its unencrypted key "
            f"({getattr(exc, 'reason', None) or exc})", details={"cert": cert, "key": key}) from None
    return context


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (so the monitor may run without a token)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class MonitorLimits:
    """What one monitor gives its peers (the HTTP side's limits; the request's own are in `http_wire`).

    Attributes:
        max_connections: connections open at once; past it a new one takes the place of
            the connection that has waited longest for a request (if that one has waited
            `evict_after_s`), or else is answered 503 and closed.
        header_timeout_s: for the request line and headers, from the moment the server
            waits for them (also how long an idle keep-alive connection stays open).
        body_timeout_s: for a body announced by Content-Length.
        write_timeout_s: for the peer to take a response.
        evict_after_s: how long a connection must have waited for its request before a
            newcomer may take its place (so a fresh request is never pushed out unread).
    """

    max_connections: int = 128
    header_timeout_s: float = 5.0
    body_timeout_s: float = 5.0
    write_timeout_s: float = 10.0
    evict_after_s: float = 1.0


class MonitorServer:
    """Serves the snapshots a broker loop publishes.

    Binds in the constructor (so a taken port fails before the broker says it is
    ready); `start()` serves from one daemon thread running an asyncio loop; `close()`
    stops. The loop's connection handling is in `MonitorConnections`.

    Args:
        settings: address and token.
        clock: wall clock, for the snapshot's age.
        limits: what peers get (the defaults are what `mesh broker --monitor` runs with).

    Raises:
        ConfigurationError: the address cannot be bound.
    """

    def __init__(
        self, settings: MonitorSettings, clock: Callable[[], float] = time.time, limits: MonitorLimits = MonitorLimits()
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._snapshot: dict[str, Any] | None = None
        self._registry = metrics_registry(lambda: self._snapshot, clock)
        try:
            family, _, _, _, address = socket.getaddrinfo(
                settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            self._sock = socket.create_server(address, family=family, backlog=BACKLOG)
        except OSError as exc:  # taken, or not an address of this machine
            raise ConfigurationError(
                f"monitor: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from None
        self.connections = MonitorConnections(self, limits)
        self._registry.register(_ConnectionCollector(lambda: self._snapshot, self.connections))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"{'https' if self.settings.tls else 'http'}://{host}:{port}"

    def publish(self, snapshot: dict[str, Any]) -> None:
        """Hand over a new snapshot (from the loop's thread; it must not change afterwards)."""
        self._snapshot = snapshot

    def start(self) -> None:
        """Serve from a daemon thread (its own asyncio loop; the broker's thread never waits on it)."""
        self._thread = threading.Thread(target=self.connections.run, args=(self._sock,), name="mesh-monitor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving: close every connection and the listening socket."""
        if self._thread is not None:
            self.connections.stop()
            self._thread.join(5)
        self._sock.close()

    # --------------------------------------------------------------- requests

    def authorised(self, header: str | None) -> bool:
        token = self.settings.token
        if token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def respond(self, path: str, authorization: str | None) -> tuple[int, str, bytes]:
        """Status, content type and body for a GET of `path`."""
        path = urlsplit(path).path.rstrip("/") or "/"
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", PAGE.encode()
        if not self.authorised(authorization):
            return 401, "application/json", _json({"error": "unauthorised", "hint": "Authorization: Bearer TOKEN"})
        snap = self._snapshot
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path in ("/healthz", "/healthz/ready"):
            return self._health(snap, ready=path.endswith("ready"))
        if snap is None:
            return 503, "application/json", _json({"error": "starting", "hint": "no snapshot yet"})
        if path == "/snapshot":
            return 200, "application/json", _json(snap)
        if path.lstrip("/") in SECTIONS:
            return 200, "application/json", _json(snap[path.lstrip("/")])
        return 404, "application/json", _json({"error": "not found", "endpoints": ["/", "/snapshot", "/healthz",
                                               "/healthz/ready", "/metrics", *(f"/{s}" for s in SECTIONS)]})

    def _health(self, snap: dict[str, Any] | None, *, ready: bool) -> tuple[int, str, bytes]:
        age = None if snap is None else max(0.0, self._clock() - snap["time"])
        live = age is not None and age < STALE_S
        body = {
            "broker": None if snap is None else snap["broker"],
            "status": "ok" if live and snap["healthz"]["ready"] else "draining" if live else "stale",  # type: ignore[index]
            "live": live,
            "ready": live and bool(snap["healthz"]["ready"]),  # type: ignore[index]
            "snapshot_age_s": None if age is None else round(age, 3),
        }
        ok = body["ready"] if ready else live
        return (200 if ok else 503), "application/json", _json(body)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class _Connection:
    """One accepted connection: its writer, the task serving it, and who it is (for log lines)."""

    __slots__ = ("writer", "task", "peer")

    def __init__(self, writer: asyncio.StreamWriter, task: asyncio.Task[None], peer: str) -> None:
        self.writer, self.task, self.peer = writer, task, peer


class MonitorConnections:
    """The monitor's thread: an asyncio loop that admits, reads, answers and closes connections.

    Every attribute but the two `stop()` sets is used from that thread only; `/metrics`,
    which reads the counters, is answered there too. `errors` counts connections that ended by the peer's doing,
    by kind (`ERROR_KINDS`); each is logged as one debug line, and at most one warning a
    minute says the monitor is being mistreated. Nothing a peer sends is logged.
    """

    def __init__(self, server: MonitorServer, limits: MonitorLimits) -> None:
        self.errors: Counter[str] = Counter(dict.fromkeys(ERROR_KINDS, 0))
        self.open: set[_Connection] = set()
        self._parting: set[_Connection] = set()  # answered a refusal, reading what the peer still sends
        self._server = server
        self._limits = limits
        self._waiting: dict[_Connection, float] = {}  # waiting for a request, since; oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._quiet_until = float("-inf")  # no warning line before this loop time

    def run(self, sock: socket.socket) -> None:
        """Serve `sock` (listening) until `stop()`; the body of the monitor's thread."""
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_loop_error)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock))
        finally:
            loop.close()

    def stop(self) -> None:
        """Ask the loop to close every connection and stop (from any thread)."""
        self._stopping = True  # set before reading _loop; run() sets _loop before reading this
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _serve(self, sock: socket.socket) -> None:
        server = await asyncio.start_server(self._connected, sock=sock, limit=MAX_HEAD_BYTES,
                                            **_tls_options(self._server.settings.tls, self._limits))
        try:
            if not self._stopping:
                await self._stop.wait()
        finally:
            server.close()
            everyone = {*self.open, *self._parting}
            for conn in everyone:
                conn.writer.transport.abort()
                conn.task.cancel()
            await asyncio.gather(*(conn.task for conn in everyone), return_exceptions=True)
            await server.wait_closed()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # asyncio runs this callback as a task
        peername = writer.get_extra_info("peername")
        conn = _Connection(writer, task, f"{peername[0]}:{peername[1]}" if peername else "?")
        try:
            if self._admit(conn):
                await self._converse(conn, reader)
            else:
                self._note("refused", conn, "the monitor is serving as many connections as it may")
                await self._part(conn, reader, Refusal(503, f"the monitor is serving as many connections as it may "
                                                            f"({self._limits.max_connections}); retry"))
        except asyncio.CancelledError:
            pass  # evicted, or the monitor stops; ending cancelled would make asyncio 3.11 log a traceback
        except OSError as exc:  # reset, broken pipe, unreachable: the peer's doing, not ours
            self._note("reset", conn, exc.strerror or str(exc) or type(exc).__name__)
        except Exception:  # a bug here must not stop the monitor serving others
            log.exception("monitor: serving %s failed", conn.peer)
        finally:
            self._close(conn)

    def _admit(self, conn: _Connection) -> bool:
        """Whether `conn` gets a place; at the cap it takes the longest-waiting one's, if any has waited enough."""
        if len(self.open) >= self._limits.max_connections:
            victim = next(iter(self._waiting), None)
            if victim is None or self._now() - self._waiting[victim] < self._limits.evict_after_s:
                return False
            why = "this connection waited longest for a request and its place was needed"
            self._note("refused", victim, why)
            self._farewell(victim, Refusal(503, f"{why}; retry"))
            self._close(victim)  # what it sent was read: closing does not reset it over the answer
            victim.task.cancel()
        self.open.add(conn)
        return True

    async def _converse(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        """Serve requests on `conn` until it closes, fails a limit or asks to close."""
        served = False
        while True:
            head = HeadReader()
            self._waiting[conn] = self._now()
            try:
                async with asyncio.timeout(self._limits.header_timeout_s):
                    outcome = None
                    while outcome is None:
                        line = await reader.readline()
                        if not line:
                            if head.started:
                                self._note("reset", conn, "closed in the middle of a request")
                            return
                        outcome = head.add_line(line)
            except TimeoutError:
                if served and not head.started:
                    return  # an idle keep-alive connection: closed quietly
                limit = self._limits.header_timeout_s
                self._note("timeout", conn, f"no request line and headers within {limit:g} s")
                self._farewell(conn, Refusal(408, f"the request line and headers must arrive within {limit:g} s"))
                return
            except ValueError:  # StreamReader.readline: a line longer than its limit
                outcome = Refusal(431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")
            finally:
                self._waiting.pop(conn, None)
            if isinstance(outcome, Refusal):
                self._note("bad_request", conn, outcome.reason)
                await self._part(conn, reader, outcome)
                return
            if not await self._skip_body(conn, reader, outcome) or not await self._answer(conn, outcome):
                return
            served = True
            if not outcome.keep_alive:
                return

    async def _skip_body(self, conn: _Connection, reader: asyncio.StreamReader, request: Request) -> bool:
        """Read and drop the request's body; False if the connection ended instead."""
        if not request.body_length:
            return True
        if request.expect_continue:
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        limit = self._limits.body_timeout_s
        try:
            async with asyncio.timeout(limit):
                await reader.readexactly(request.body_length)
        except TimeoutError:
            self._note("timeout", conn, f"no complete body within {limit:g} s")
            self._farewell(conn, Refusal(408, f"the body must arrive within {limit:g} s"))
            return False
        except asyncio.IncompleteReadError:
            self._note("reset", conn, "closed in the middle of a body")
            return False
        return True

    async def _answer(self, conn: _Connection, request: Request) -> bool:
        """Send the response to `request`; False if the peer did not take it in time."""
        try:
            status, ctype, body = self._server.respond(request.target, request.headers.get("authorization"))
        except Exception:  # a bug here must not stop the monitor serving others
            log.exception("monitor: answering GET %.200r failed", request.target)
            status, ctype, body = 500, "application/json", _json({"error": "internal"})
        extra = [("WWW-Authenticate", 'Bearer realm="mesh monitor"')] if status == 401 else []
        conn.writer.write(encode_response(status, ctype, body, keep_alive=request.keep_alive, date=_date(), extra=extra))
        limit = self._limits.write_timeout_s
        try:
            async with asyncio.timeout(limit):
                await conn.writer.drain()
        except TimeoutError:
            self._note("timeout", conn, f"did not take a response within {limit:g} s")
            conn.writer.transport.abort()
            return False
        return True

    async def _part(self, conn: _Connection, reader: asyncio.StreamReader, refusal: Refusal) -> None:
        """Answer `refusal` so that the peer can read it, with what it sent maybe still unread.

        Closing a socket with unread input resets the connection, and the reset can destroy
        the answer before the peer reads it. So: the answer, then FIN, then what the peer
        still sends is read and dropped until it closes, for `LINGER_S` at most. Connections
        doing so outside the cap are themselves capped; past that they are just closed.
        """
        self._farewell(conn, refusal)
        if conn not in self.open and len(self._parting) >= self._limits.max_connections:
            return
        self._parting.add(conn)
        try:
            conn.writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                while await reader.read(MAX_HEAD_BYTES):
                    pass
        except (TimeoutError, OSError):
            pass  # the peer took its time or reset: it had its chance to read the answer
        finally:
            self._parting.discard(conn)

    def _farewell(self, conn: _Connection, refusal: Refusal) -> None:
        if not conn.writer.transport.is_closing():
            conn.writer.write(refusal_response(refusal, date=_date()))

    def _close(self, conn: _Connection) -> None:
        """Forget `conn` and close it; abort if the peer has not taken what was sent (never wait on it)."""
        self.open.discard(conn)
        self._waiting.pop(conn, None)
        transport = conn.writer.transport
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def _note(self, kind: str, conn: _Connection, detail: str) -> None:
        """Count a connection the peer ended or spoiled; one debug line, a warning at most every minute."""
        self.errors[kind] += 1
        log.debug("monitor: %s from %s: %s", kind, conn.peer, detail)
        now = self._now()
        if now >= self._quiet_until:
            self._quiet_until = now + WARN_EVERY_S
            log.warning("monitor: %s from %s: %s (counted in mesh_monitor_connection_errors_total; "
                        "the next %g s of these are counted, not logged)", kind, conn.peer, detail, WARN_EVERY_S)

    def _now(self) -> float:
        assert self._loop is not None  # only called from the running loop
        return self._loop.time()


class _ConnectionCollector(Collector):
    """`/metrics` families of the monitor's own connections (labelled like the snapshot's)."""

    def __init__(self, latest: Callable[[], dict[str, Any] | None], connections: MonitorConnections) -> None:
        self._latest = latest
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        snap = self._latest()
        if snap is None:
            return
        errors = CounterMetricFamily("mesh_monitor_connection_errors", CONNECTION_METRICS["mesh_monitor_connection_errors"],
                                     labels=["broker", "kind"])
        for kind in ERROR_KINDS:
            errors.add_metric([snap["broker"], kind], self._connections.errors[kind])
        yield errors
        open_now = GaugeMetricFamily("mesh_monitor_connections", CONNECTION_METRICS["mesh_monitor_connections"],
                                     labels=["broker"])
        open_now.add_metric([snap["broker"]], len(self._connections.open))
        yield open_now


def _tls_options(tls: ssl.SSLContext | None, limits: MonitorLimits) -> dict[str, Any]:
    """`start_server`'s TLS arguments: the handshake has the request head's deadline."""
    return {} if tls is None else {"ssl": tls, "ssl_handshake_timeout": limits.header_timeout_s}


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's last resort: a peer's network error is one line; anything else is a bug, with its traceback."""
    exc = context.get("exception")
    if isinstance(exc, OSError):
        log.debug("monitor: %s: %s", context.get("message"), exc.strerror or type(exc).__name__)
    else:
        log.error("monitor: %s", context.get("message"), exc_info=exc)


def _date() -> str:
    return formatdate(usegmt=True)
