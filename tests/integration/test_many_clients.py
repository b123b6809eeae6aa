"""Many clients per broker: the broker's listen queue and I/O threads are what its settings
say, and the SDK's clients in one process share one ZeroMQ context."""

from __future__ import annotations

import os
import subprocess

from mesh.testing import run_broker


def listen_backlog(endpoint: str) -> int:
    """The accept queue the kernel gives the socket listening at `endpoint` (`ss`'s Send-Q)."""
    port = endpoint.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_the_broker_listens_with_its_backlog_and_runs_its_io_threads():
    """Invariant: `--backlog` reaches the kernel's accept queue of every listening socket (not
    libzmq's 100, which overflows when thousands of clients reconnect at once), and
    `--io-threads N` runs N libzmq I/O threads, the default one."""
    with run_broker() as default, run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--backlog", "777",
                                             "--io-threads", "3") as tuned:
        assert [listen_backlog(ep) for ep in (default.clients, default.nodes, default.events)] == [4096] * 3
        assert [listen_backlog(ep) for ep in (tuned.clients, tuned.nodes, tuned.events)] == [777] * 3
        assert threads(tuned.process.pid) - threads(default.process.pid) == 2
