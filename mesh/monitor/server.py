"""The monitor's HTTP side: endpoints that serve the latest snapshot, in a daemon thread.

Rules of this module:

* The HTTP thread never touches the broker core. The loop publishes a snapshot with
  `publish()` (one attribute assignment, atomic in Python) and every request reads the
  one it finds there, so a response is consistent within itself.
* Off unless asked for. Bound to loopback it may run open; bound anywhere else, or with
  security on, it needs a bearer token (`Authorization: Bearer TOKEN`), compared in
  constant time. With security on and no token file given, `monitor_settings()` makes
  one in the state directory (0600), like the other secrets there. The dashboard page itself holds no data and is served to anyone; it
  sends the token it finds after `#token=` in its address (never sent to the server).
* `/healthz` answers 200 while the loop publishes snapshots (live) and 503 once they
  stop coming; `/healthz/ready` answers 503 as well while the broker drains.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..protocol import ConfigurationError
from ..security.files import write_file_atomic
from .dashboard import PAGE
from .metrics import metrics_registry

__all__ = ["MonitorServer", "MonitorSettings", "TOKEN_FILE", "is_loopback", "monitor_settings", "parse_address"]

log = logging.getLogger("mesh.monitor")

STALE_S: Final = 5.0  # no snapshot for this long: the loop is stuck, the broker is not live
SECTIONS: Final = ("varz", "nodes", "services", "clients", "cluster", "events", "errors")
TOKEN_FILE: Final = "monitor.token"  # in the security state directory


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """Where the monitor listens, and the token it requires (None: open, loopback only)."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None


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


def monitor_settings(address: str, token_file: str | None = None, state_dir: str | None = None) -> MonitorSettings:
    """The monitor's settings from `--monitor`, `--monitor-token-file` and `--state`.

    Raises:
        ConfigurationError: a bad address, an unreadable or empty token file, or a
            non-loopback address with no token.
    """
    host, port = parse_address(address)
    path = Path(token_file) if token_file is not None else None
    if path is None and state_dir is not None:
        path = Path(state_dir) / TOKEN_FILE
        if not path.exists():
            write_file_atomic(path, secrets.token_urlsafe(32).encode() + b"\n")
    if path is None:
        if not is_loopback(host):
            raise ConfigurationError(f"monitor: {host} is reachable from other machines; give a --monitor-token-file")
        return MonitorSettings(host, port)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"monitor: cannot read the token file {path}: {exc}") from None
    if not token:
        raise ConfigurationError(f"monitor: the token file {path} is empty")
    return MonitorSettings(host, port, token)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (so the monitor may run without a token)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MonitorServer:
    """Serves the snapshots a broker loop publishes.

    Binds in the constructor (so a taken port fails before the broker says it is
    ready); `start()` serves from a daemon thread; `close()` stops.

    Raises:
        ConfigurationError: the address cannot be bound.
    """

    def __init__(self, settings: MonitorSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._snapshot: dict[str, Any] | None = None
        self._registry = metrics_registry(lambda: self._snapshot, clock)
        try:
            self._httpd = ThreadingHTTPServer((settings.host, settings.port), _handler(self))
        except OSError as exc:  # taken, or not an address of this machine
            raise ConfigurationError(
                f"monitor: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from None
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def publish(self, snapshot: dict[str, Any]) -> None:
        """Hand over a new snapshot (from the loop's thread; it must not change afterwards)."""
        self._snapshot = snapshot

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mesh-monitor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()

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


def _handler(server: MonitorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "mesh-monitor"

        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            try:
                status, ctype, body = server.respond(self.path, self.headers.get("Authorization"))
            except Exception:  # a bug here must not kill the thread serving others
                log.exception("monitor request %s failed", self.path)
                status, ctype, body = 500, "application/json", _json({"error": "internal"})
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="mesh monitor"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
            log.debug("%s " + format, self.address_string(), *args)

    return Handler
