"""`mesh up`: start every broker and node of a topology as its own process and keep them up.

Rules of this module:

* Each broker and node replica is a real `mesh broker` / `mesh node` process, started in
  its own session so that Ctrl-C reaches the launcher only and shutdown is orderly:
  nodes first (they finish their commands), then brokers (they drain), then SIGKILL for
  anything still alive after the grace period. On Linux every child also gets SIGTERM
  from the kernel if the launcher itself dies, so no process is ever orphaned.
* A process that exits while the mesh is up (a broker of a cluster too: it catches up
  from its peers) is restarted after a backoff that doubles from 0.5 s to 10 s, and
  resets once the process has stayed up for 10 s. One that fails `GIVE_UP_AFTER` times in
  a row, each time within 10 s of its start, cannot start (a bad config, a taken port):
  the launcher says so and stops restarting it, the rest of the mesh stays up, and
  `mesh up` exits with status 1 at the end. Nothing is restarted once shutdown began.
* A broker is started as `mesh broker --topology COPY --name NAME`: it reads its settings
  from the topology itself (`Topology.broker_settings`, the one parse), so nothing is
  turned back into flags. COPY is the file as `mesh up` read it, kept in a private
  temporary directory for the launcher's life: a broker restarted after the file was
  edited runs what the rest of the mesh runs. Nodes get every broker's node endpoint,
  in topology order; every endpoint a process dials has a wildcard address replaced by
  its host's (`Topology.dial`).
* With `host`, only that host's brokers and nodes run here (`mesh up FILE --host NAME`);
  the nodes still dial every broker they serve, wherever it runs. Launchers on several
  hosts share nothing but the topology file and the security state directory; the state
  is made under an exclusive lock on `STATE/up.lock`, so launchers started together on
  one filesystem make it once.
* Child output is passed through line by line, prefixed with the process name.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from .protocol import ConfigurationError
from .topology import NodeSpec, Topology

__all__ = ["BROKER_READY", "NODE_READY", "Launcher"]

BACKOFF_START: Final = 0.5
BACKOFF_MAX: Final = 10.0
STABLE_AFTER: Final = 10.0
GIVE_UP_AFTER: Final = 5  # quick failures in a row: 0.5 + 1 + 2 + 4 s of backoff, then no more
STOP_GRACE: Final = 12.0
READY_TIMEOUT: Final = 15.0
STATE_LOCK: Final = "up.lock"  # in the security state directory (module rules)
TOPOLOGY_COPY: Final = "topology.toml"  # in the launcher's private temporary directory (module rules)
# The lines `mesh broker` and `mesh node` print once they serve (see mesh/cli/).
BROKER_READY: Final = re.compile(
    r"^broker (?P<name>\S+) ready clients=(?P<clients>\S+) nodes=(?P<nodes>\S+) events=(?P<events>\S+)"
)
NODE_READY: Final = re.compile(r"^node \S+ ready ")


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once here: loading a library between fork and exec, with other threads
# running (the output pumps), could deadlock on the loader's lock.
_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG: Final = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


@dataclass(slots=True)
class _Process:
    name: str
    argv: list[str]
    brokers: tuple[str, ...]  # the brokers' names, for a node; its own name, for a broker
    is_broker: bool
    env: dict[str, str] = field(default_factory=dict)
    spec: str = ""  # a node's name in the topology (its replicas share its keys)
    popen: subprocess.Popen[str] | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_START
    restart_at: float | None = None
    restarts: int = 0
    quick_failures: int = 0  # exits in a row within STABLE_AFTER of the start
    given_up: bool = False
    ready: threading.Event = field(default_factory=threading.Event)


class Launcher:
    """Runs a topology until `stop()`.

    Args:
        topology: a checked topology.
        echo: where status lines go (the CLI passes click.echo).
        host: run only the brokers and nodes placed on this host of the topology's
            `[hosts]`; None runs all of them.

    Raises:
        ConfigurationError: `host` is given but the topology has no `[hosts]`, does not
            name it, or places nothing on it.
    """

    def __init__(self, topology: Topology, echo: Callable[[str], None] = print, host: str | None = None) -> None:
        self.topology = topology
        self.echo = echo
        self.host = host
        self._stopping = threading.Event()
        # broker name -> where nodes dial it; a broker started here updates its entry
        # from its ready line (a topology may ask for port `*`).
        self.node_endpoints = {b.name: topology.dial(b.nodes, b.name) for b in topology.brokers.values()}
        self.state: Path | None = None
        self._copy: Path | None = None  # the topology the brokers read, made by run()
        _check_host(topology, host)
        here = [b.name for b in topology.brokers.values() if host is None or b.host == host]
        self.processes: list[_Process] = [
            _Process(f"broker:{b}", [sys.executable, "-m", "mesh", "broker", "--name", b], (b,), True) for b in here
        ]
        for spec in topology.nodes.values():
            if host is not None and spec.host != host:
                continue
            served = tuple(topology.brokers) if topology.cluster is not None else (spec.broker,)
            for i in range(spec.replicas):
                self.processes.append(self._node(spec, served, i))

    def prepare_security(self) -> None:
        """With security on: make the keys, tokens and policy that are missing, and give
        every node its credentials (a broker finds the state directory in the topology).

        Raises:
            ConfigurationError: a node cannot be loaded to learn its services, or the
                state directory cannot be written.
        """
        sec = self.topology.security
        if sec is None:
            return
        from .monitor.server import monitor_settings
        from .plugins import load_node
        from .security.state import StateLayout, ensure_state

        # Every host's launcher makes the whole state (it is one for the mesh), under the
        # lock: launchers started together on one filesystem would each make their own keys.
        with _state_lock(Path(sec.state)):
            # A node is loaded (which may open its files) to learn its services only where
            # they matter: for the policy the first start writes, or for this host's nodes,
            # whose services the policy must allow. Another host's node is known by name.
            first = not StateLayout.at(sec.state).policy.exists()
            services = {
                spec.name: sorted({svc for svc, _ in load_node(spec.use, spec.config).actions})
                if first or self.host is None or spec.host == self.host else []
                for spec in self.topology.nodes.values()
            }
            layout = ensure_state(sec.state, nodes=services, clients=sec.clients, now=time.time())
            # The monitor token is made by the first broker that misses it: brokers starting
            # together would each make their own, so make it once here, before any starts.
            for b in self.topology.brokers.values():
                if b.monitor is not None and (self.host is None or b.host == self.host):
                    monitor_settings(b.monitor, b.monitor_token_file, str(layout.root))
        self.state = layout.root
        if layout.created:
            self.echo(f"security: created {len(layout.created)} file(s) in {layout.root}")
            if self.host is not None:
                self.echo(
                    f"security: on separate machines, copy {layout.root} to every other host before "
                    "its mesh up: a host that makes its own has keys the others refuse"
                )
        for name in layout.policy_missing_nodes:
            self.echo(f"security: {layout.policy} gives node {name} no services of its own; add them to [nodes.{name}]")
        for client in sec.clients:
            self.echo(f"security: credentials for {client}: {layout.credentials(client)}")
        for p in self.processes:
            if not p.is_broker:  # a broker reads [security] from the topology
                p.env["MESH_CREDENTIALS"] = str(layout.credentials(p.spec))

    @staticmethod
    def _node(spec: NodeSpec, brokers: tuple[str, ...], index: int) -> _Process:
        name = spec.name if spec.replicas == 1 else f"{spec.name}-{index + 1}"
        argv = [sys.executable, "-m", "mesh", "node", spec.use, "--name", name]
        if spec.capacity is not None:
            argv += ["--capacity", str(spec.capacity)]
        if spec.heartbeat_interval is not None:
            argv += ["--heartbeat-interval", str(spec.heartbeat_interval)]
        if not spec.dedupe:
            argv.append("--no-dedupe")
        # The config goes by environment, not argv: argv is readable by every local user.
        env = {"MESH_NODE_CONFIG": json.dumps(spec.config)}
        return _Process(f"node:{name}", argv, brokers, False, env, spec=spec.name)

    def stop(self) -> None:
        """Begin an orderly shutdown (safe from a signal handler)."""
        self._stopping.set()

    def run(self) -> int:
        """Start everything, supervise until `stop()`, then stop everything; exit status."""
        where = ""
        if self.host is not None:
            where = f" on host {self.host} ({self.topology.hosts[self.host].address})"
        self.echo(f"mesh {self.topology.name}: starting {len(self.processes)} process(es){where}")
        try:
            self._copy = _copy_topology(self.topology)
        except ConfigurationError as err:
            self.echo(f"cannot start: {err.message}")
            return 1
        try:
            brokers = [p for p in self.processes if p.is_broker]
            for p in brokers:
                self._start(p)
            for p in brokers:
                if not self._wait_ready(p):
                    if not self._stopping.is_set():
                        self.echo(f"{p.name} did not become ready; stopping")
                        return 1
                    return 0
            for p in self.processes:
                if not p.is_broker:
                    self._start(p)
            self.echo("mesh is up; Ctrl-C stops it")
            while not self._stopping.wait(0.1):
                self._supervise()
            return 1 if any(p.given_up for p in self.processes) else 0
        finally:
            self._shutdown()

    def _wait_ready(self, p: _Process) -> bool:
        """Wait for `p`'s ready line; False at once if it exits or we are told to stop."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not self._stopping.is_set():
            if p.ready.wait(0.1):
                return True
            if p.popen is not None and p.popen.poll() is not None:
                time.sleep(0.2)  # let the pump print the process's last words
                return False
        return False

    def _start(self, p: _Process) -> None:
        p.ready.clear()
        if p.is_broker:
            argv = [*p.argv, "--topology", str(self._copy)]
        else:
            argv = [*p.argv, "--broker", ",".join(self.node_endpoints[b] for b in p.brokers)]
        p.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,
            env={**os.environ, **p.env},
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
        p.started_at = time.monotonic()
        p.restart_at = None
        assert p.popen.stdout is not None
        threading.Thread(target=self._pump, args=(p, p.popen.stdout), daemon=True).start()

    def _pump(self, p: _Process, stream: IO[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            m = BROKER_READY.match(line)
            if m:
                # Where it really listens (a topology may ask for port `*`).
                self.node_endpoints[p.brokers[0]] = self.topology.dial(m.group("nodes"), p.brokers[0])
            if m or NODE_READY.match(line):
                p.ready.set()
                self.echo(f"[{p.name}] {line} pid={p.popen.pid if p.popen else '?'}")
            else:
                self.echo(f"[{p.name}] {line}")

    def _supervise(self) -> None:
        now = time.monotonic()
        for p in self.processes:
            if p.popen is None or p.given_up:
                continue
            if p.restart_at is not None:
                if now >= p.restart_at and not self._stopping.is_set():
                    p.restarts += 1
                    self.echo(f"restarting {p.name} (restart {p.restarts})")
                    self._start(p)
                continue
            code = p.popen.poll()
            if code is None:
                continue
            if now - p.started_at >= STABLE_AFTER:
                p.backoff, p.quick_failures = BACKOFF_START, 0
            else:
                p.quick_failures += 1
            if p.quick_failures >= GIVE_UP_AFTER:
                p.given_up = True
                self.echo(
                    f"{p.name} exited with {code}: {p.quick_failures} failures in a row, each within "
                    f"{STABLE_AFTER:.0f}s of its start; giving up on it (its output is above). "
                    "The rest of the mesh stays up; fix it and restart mesh up"
                )
                continue
            self.echo(f"{p.name} exited with {code}; restarting in {p.backoff:.1f}s")
            p.restart_at = now + p.backoff
            p.backoff = min(p.backoff * 2, BACKOFF_MAX)

    def _shutdown(self) -> None:
        self.echo("stopping: nodes first, then brokers")
        for group in ([p for p in self.processes if not p.is_broker], [p for p in self.processes if p.is_broker]):
            alive = [p.popen for p in group if p.popen is not None and p.popen.poll() is None]
            for proc in alive:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE
            for proc in alive:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._copy is not None:
            shutil.rmtree(self._copy.parent, ignore_errors=True)
        self.echo("stopped")


def _check_host(topology: Topology, host: str | None) -> None:
    if host is None:
        return
    if not topology.hosts:
        raise ConfigurationError(f"--host {host}: {topology.source} has no [hosts] table; run it without --host")
    if host not in topology.hosts:
        raise ConfigurationError(f"--host {host}: {topology.source} has no host named {host!r} (hosts: {', '.join(topology.hosts)})")
    if host not in {b.host for b in topology.brokers.values()} | {n.host for n in topology.nodes.values()}:
        raise ConfigurationError(f"--host {host}: {topology.source} places no broker or node on {host}")


def _copy_topology(topology: Topology) -> Path:
    """Write the topology as it was read to a new private directory; the brokers start from it.

    Raises:
        ConfigurationError: the topology was not read from a file (`parse`, not `load`),
            or the copy cannot be written.
    """
    if not topology.text:
        raise ConfigurationError(f"{topology.source}: mesh up starts brokers from a topology file; read it with load()")
    try:
        directory = Path(tempfile.mkdtemp(prefix="mesh-up-"))  # 0700: node configs may hold secrets
        copy = directory / TOPOLOGY_COPY
        copy.write_text(topology.text, encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot copy the topology for the brokers: {exc.strerror}") from None
    return copy


@contextmanager
def _state_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ROOT/up.lock, creating ROOT (0700) if it is missing.

    Raises:
        ConfigurationError: the directory or the lock file cannot be made or locked.
    """
    try:
        try:
            root.mkdir(mode=0o700, parents=True)
            root.chmod(0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            pass
        fd = os.open(root / STATE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot lock the state directory {root}: {exc.strerror}", details={"path": str(root)}) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, or when this process dies
        except OSError as exc:
            raise ConfigurationError(f"cannot lock {root / STATE_LOCK}: {exc.strerror}", details={"path": str(root)}) from None
        yield
    finally:
        os.close(fd)
