"""The end-to-end fuzz run: attackers on every port of a real `mesh up`, a victim calling.

Rules of this module:

* The mesh is started the way users start it: a topology with security on (one broker,
  two echo nodes, a kv node; clients dev, victim and fuzzer) in a temporary directory,
  run by `mesh up`, whose output is read for the broker's endpoints and pid, its exits,
  restarts and tracebacks.
* The attackers run in this process, on one thread, from one seed (`attacks.shot`); each
  sends at its own steady rate. The victim, an SDK `Client` with admitted credentials,
  calls echo.echo in a loop in its own process, so it shares no interpreter lock with them.
* After `duration` seconds the attack stops, replies are read for `grace` seconds, then
  the ledger's figures, the broker's and the victim's are put together and checked
  against `Bounds`. Every socket is closed with linger 0 and `mesh up` is always stopped.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq

from ..security.credentials import load_credentials
from ..security.curve import load_public_key
from ..sockets import recv_frames
from ..testing import free_ports
from .attacks import Limits, Shot, Via, Who, answer, shot
from .ledger import Bounds, Ledger, percentile

__all__ = ["Rates", "FuzzRun", "TOPOLOGY", "run"]

TIMEOUT_S: Final = 5.0  # the broker's deadline for commands that carry none
READY_S: Final = 60.0
TOPOLOGY: Final = """# The mesh `python -m mesh.fuzz` attacks (docs/fuzzing.md).
[mesh]
name = "fuzz"

[brokers.main]
clients = "tcp://127.0.0.1:{clients}"
nodes = "tcp://127.0.0.1:{nodes}"
events = "tcp://127.0.0.1:{events}"
timeout = {timeout}

[nodes.echo]
use = "echo"
replicas = 2
capacity = 8

[nodes.kv]
use = "kv"
config = {{ path = "var/kv.sqlite3" }}

[security]
state = "var/mesh"
clients = ["dev", "victim", "fuzzer"]
"""
_READY = re.compile(r"^\[broker:main\] broker main ready clients=(\S+) nodes=(\S+) events=(\S+) pid=(\d+)")
_NODE_READY = re.compile(r"^\[node:\S+\] node \S+ ready ")
_EXITED = re.compile(r"^broker:main exited with")
_RESTART = re.compile(r"^restarting broker:main")
_TRACEBACK = re.compile(r"^\[broker:main\] Traceback \(most recent call last\)")


@dataclass(frozen=True, slots=True)
class Rates:
    """Messages per second of each attacker (the victim calls at `victim`)."""

    client: float = 120.0
    deaf: float = 20.0
    node: float = 40.0
    events: float = 10.0
    stranger: float = 20.0
    victim: float = 100.0

    def of(self, who: Who) -> float:
        return float(getattr(self, who.value))


@dataclass
class _Mesh:
    """`mesh up` and what its output says."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    endpoints: tuple[str, str, str] | None = None
    pids: list[int] = field(default_factory=list)
    nodes_ready: int = 0
    exits: int = 0
    restarts: int = 0
    tracebacks: int = 0
    ready: threading.Event = field(default_factory=threading.Event)

    def pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            m = _READY.match(line)
            if m:
                self.endpoints = (m.group(1), m.group(2), m.group(3))
                self.pids.append(int(m.group(4)))
            self.nodes_ready += bool(_NODE_READY.match(line))
            self.exits += bool(_EXITED.match(line))
            self.restarts += bool(_RESTART.match(line))
            self.tracebacks += bool(_TRACEBACK.match(line))
            if self.endpoints is not None and self.nodes_ready >= 3:
                self.ready.set()
        self.ready.set()

    def rss_mb(self) -> float:
        """The broker's resident memory now (0 when it is not running)."""
        if not self.pids:
            return 0.0
        try:
            status = Path(f"/proc/{self.pids[-1]}/status").read_text()
        except OSError:
            return 0.0
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(m.group(1)) / 1024.0 if m else 0.0


def _victim(endpoint: str, credentials: str, rate: float, stop_at: float, out: Any) -> None:
    """The victim process: echo.echo at `rate` per second until `stop_at`; sends its results."""
    from ..client import Client
    from ..protocol import MeshError

    latencies: list[float] = []
    failures: dict[str, int] = {}
    with Client(endpoint, credentials=load_credentials(credentials), timeout=TIMEOUT_S) as client:
        next_at = time.monotonic()
        while time.time() < stop_at:
            start = time.perf_counter()
            try:
                client.call("echo", "echo", {"n": len(latencies)})
                latencies.append((time.perf_counter() - start) * 1000.0)
            except MeshError as err:
                failures[f"{int(err.code)} {type(err).__name__}"] = failures.get(f"{int(err.code)} {type(err).__name__}", 0) + 1
            next_at = max(next_at + 1.0 / rate, time.monotonic())
            time.sleep(max(0.0, next_at - time.monotonic()))
    out.send({"latencies": latencies, "failures": failures})
    out.close()


class _Attack:
    """The attackers' sockets and schedule, on this thread."""

    def __init__(self, seed: int, mesh: _Mesh, state: Path, rates: Rates, ledger: Ledger, limits: Limits) -> None:
        assert mesh.endpoints is not None
        self.seed, self.rates, self.ledger, self.limits = seed, rates, ledger, limits
        self.clients, self.nodes, self.events = mesh.endpoints
        self.ctx = zmq.Context()
        self.fuzzer = load_credentials(state / "credentials" / "fuzzer.toml")
        self.kv = load_credentials(state / "credentials" / "kv.toml")
        self.seal = self.fuzzer.sealer().seal
        self.sockets: dict[Via, zmq.Socket] = {}
        self.answers = 0
        self.blocked = 0
        for via in Via:
            self._open(via)

    def _open(self, via: Via) -> None:
        old = self.sockets.pop(via, None)
        if old is not None:
            old.close(linger=0)
        kind = zmq.XSUB if via in (Via.EVENTS, Via.PLAIN_EVENTS) else zmq.DEALER
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 100_000
        if via in (Via.CLIENT, Via.DEAF, Via.EVENTS):
            self.fuzzer.secure(sock)
        elif via is Via.NODE:
            self.kv.secure(sock)
        elif via in (Via.UNKNOWN_KEY_CLIENTS, Via.UNKNOWN_KEY_NODES):
            public, secret = zmq.curve_keypair()
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = load_public_key(self.fuzzer.broker_key)
        endpoint = {Via.NODE: self.nodes, Via.PLAIN_NODES: self.nodes, Via.UNKNOWN_KEY_NODES: self.nodes,
                    Via.EVENTS: self.events, Via.PLAIN_EVENTS: self.events}.get(via, self.clients)
        sock.connect(endpoint)
        self.sockets[via] = sock

    def send(self, s: Shot, now: float) -> None:
        if s.reconnect:
            self._open(s.via)
        try:
            self.sockets[s.via].send_multipart(s.frames, zmq.NOBLOCK)
        except zmq.Again:
            self.blocked += 1
            return
        self.ledger.on_sent(s, now)

    def drain(self, now: float) -> None:
        for via, sock in self.sockets.items():
            if via is Via.DEAF:
                continue  # never read: its replies pile up in the broker
            for _ in range(1000):
                try:
                    frames = recv_frames(sock)
                except zmq.Again:
                    break
                if via is Via.NODE:
                    if frames and frames[0]:  # a command dispatched to the attacker node
                        self.answers += 1
                        for reply in answer(self.seed, self.answers, frames, time.time()):
                            try:
                                sock.send_multipart(reply, zmq.NOBLOCK)
                            except zmq.Again:
                                self.blocked += 1
                        continue
                    frames = frames[1:]
                if via is not Via.EVENTS:
                    self.ledger.on_received(via, frames, now)

    def poll(self, timeout_s: float) -> None:
        poller = zmq.Poller()
        for via, sock in self.sockets.items():
            if via is not Via.DEAF:
                poller.register(sock, zmq.POLLIN)
        poller.poll(math.ceil(max(0.0, timeout_s) * 1000))  # rounded down, a wait under 1 ms spins

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.ctx.term()


@dataclass
class FuzzRun:
    """What one run measured; `figures()` is its summary, `broken()` what it broke."""

    seed: int
    duration: float
    ledger: Ledger
    mesh: _Mesh
    max_rss_mb: float
    victim: dict[str, Any]
    blocked: int
    bounds: Bounds = field(default_factory=Bounds)

    def figures(self) -> dict[str, Any]:
        lat = self.victim.get("latencies", [])
        return {
            "seed": self.seed,
            "duration_s": self.duration,
            **self.ledger.figures(),
            "sends_refused_full": self.blocked,
            "crashes": self.mesh.exits,
            "restarts": self.mesh.restarts,
            "tracebacks": self.mesh.tracebacks,
            "broker_pids": self.mesh.pids,
            "max_rss_mb": round(self.max_rss_mb, 1),
            "victim_calls": len(lat),
            "victim_failures": sum(self.victim.get("failures", {}).values()),
            "victim_failure_kinds": self.victim.get("failures", {}),
            "victim_p50_ms": _round(percentile(lat, 0.5)),
            "victim_p99_ms": _round(percentile(lat, 0.99)),
            "victim_max_ms": _round(max(lat) if lat else None),
        }

    def broken(self) -> list[str]:
        return self.bounds.broken(self.figures())


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def run(seed: int, duration: float, *, rates: Rates = Rates(), grace: float = TIMEOUT_S + 2.0,
        limits: Limits = Limits(), workdir: str | None = None) -> FuzzRun:  # fmt: skip
    """Start the fuzz mesh, attack it for `duration` seconds, read replies for `grace`.

    Raises:
        RuntimeError: the mesh did not come up (its output is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="mesh-fuzz-", dir=workdir) as tmp:
        root = Path(tmp)
        (root / "var").mkdir()
        clients, nodes, events = free_ports(3)
        (root / "fuzz.toml").write_text(TOPOLOGY.format(clients=clients, nodes=nodes, events=events, timeout=TIMEOUT_S))
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "up", "fuzz.toml"], cwd=root, text=True, bufsize=1,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        mesh = _Mesh(proc)
        threading.Thread(target=mesh.pump, daemon=True).start()
        try:
            if not mesh.ready.wait(READY_S) or mesh.endpoints is None or mesh.nodes_ready < 3:
                raise RuntimeError("the fuzz mesh did not come up:\n" + "\n".join(mesh.lines[-40:]))
            return _attack(seed, duration, rates, grace, limits, mesh, root / "var" / "mesh")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _attack(seed: int, duration: float, rates: Rates, grace: float, limits: Limits, mesh: _Mesh, state: Path) -> FuzzRun:
    start = time.time()
    stop_at = start + duration
    ledger = Ledger(answer_by=stop_at + grace - 1.0, limit=limits.message)
    assert mesh.endpoints is not None
    spawn = multiprocessing.get_context("spawn")
    mine, theirs = spawn.Pipe(duplex=False)
    victim = spawn.Process(target=_victim, args=(mesh.endpoints[0], str(state / "credentials" / "victim.toml"),
                                                 rates.victim, stop_at, theirs), daemon=True)  # fmt: skip
    victim.start()
    attack = _Attack(seed, mesh, state, rates, ledger, limits)
    counts = dict.fromkeys(Who, 0)
    max_rss = mesh.rss_mb()
    next_rss = start
    try:
        while (now := time.time()) < stop_at + grace:
            attacking = now < stop_at
            if attacking:
                for who in Who:
                    due = int((now - start) * rates.of(who)) + 1
                    while counts[who] < due:
                        attack.send(shot(seed, who, counts[who], now, attack.seal, limits), now)
                        counts[who] += 1
            attack.drain(now)
            if now >= next_rss:
                next_rss = now + 0.25
                max_rss = max(max_rss, mesh.rss_mb())
            if not attacking and ledger.owed == 0 and not victim.is_alive():
                break
            attack.poll(0.005 if attacking else 0.05)
        victim_result = mine.recv() if mine.poll(TIMEOUT_S + 10.0) else {"failures": {"victim gave no result": 1}}
    finally:
        attack.close()
        victim.join(5)
        if victim.is_alive():
            victim.kill()
    return FuzzRun(seed, duration, ledger, mesh, max_rss, victim_result, attack.blocked)
