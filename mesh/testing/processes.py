"""Real mesh processes for tests: brokers and nodes started the way users start them.

Rules of this module:

* Brokers and nodes run as real `mesh broker` / `mesh node` processes (never forked from
  the test process) and are always stopped: SIGTERM, then SIGKILL after a grace period.
* Listening on `tcp://127.0.0.1:*` lets the broker pick free ports; the real endpoints
  are read from its ready line, so parallel tests never collide.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..launcher import BROKER_READY, NODE_READY

__all__ = ["MeshProcess", "BrokerProcess", "spawn", "run_broker", "run_node", "free_ports", "alive"]



class MeshProcess:
    """A running `mesh ...` command whose output is collected line by line."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "mesh", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _collect(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match[str]:
        """The first output line from index `start` on that matches `pattern`.

        Raises:
            TimeoutError: no such line in time (the output so far is in the message).
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._changed.wait(0.2)):
                    output = "\n".join(self.lines[-40:])
                    raise TimeoutError(f"no line matching {pattern!r} from mesh {' '.join(self.args)}:\n{output}")
                self._changed.wait(min(left, 0.2))

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


@dataclass(frozen=True, slots=True)
class BrokerProcess:
    process: MeshProcess
    name: str
    clients: str
    nodes: str
    events: str


@contextmanager
def spawn(args: list[str], **kwargs: Any) -> Iterator[MeshProcess]:
    """Run `mesh ARGS...` for the duration of a `with` block."""
    proc = MeshProcess(args, **kwargs)
    try:
        yield proc
    finally:
        proc.stop()


@contextmanager
def run_broker(
    clients: str = "tcp://127.0.0.1:*",
    nodes: str = "tcp://127.0.0.1:*",
    *extra: str,
    events: str = "tcp://127.0.0.1:*",
) -> Iterator[BrokerProcess]:
    """A `mesh broker` process, ready to serve, with its real endpoints."""
    with spawn(["broker", "--clients", clients, "--nodes", nodes, "--events", events, *extra]) as proc:
        m = proc.wait_for(BROKER_READY.pattern)
        yield BrokerProcess(proc, m.group("name"), m.group("clients"), m.group("nodes"), m.group("events"))


@contextmanager
def run_node(use: str, broker: BrokerProcess | str, *extra: str, config: str = "{}") -> Iterator[MeshProcess]:
    """A `mesh node` process registered with `broker` (its node endpoint)."""
    endpoint = broker.nodes if isinstance(broker, BrokerProcess) else broker
    with spawn(["node", use, "--broker", endpoint, "--config", config, *extra]) as proc:
        proc.wait_for(NODE_READY.pattern)
        yield proc


def free_ports(count: int = 1) -> list[int]:
    """TCP ports free on 127.0.0.1 right now, for listeners that need a fixed port.

    All are held open together while they are picked, so they differ from each other.
    """
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def alive(pid: int) -> bool:
    """Whether process `pid` still runs: a zombie (exited, not yet reaped by its parent)
    counts as gone, which `os.kill(pid, 0)` cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
