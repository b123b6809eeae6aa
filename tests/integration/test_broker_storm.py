"""A storm of departures around a real broker leaves it holding nothing (real processes).

The invariant: once the storm is over, the broker has no command in flight or queued,
every node slot is free again, and nothing it received made an internal error, whatever
left in the middle of a command: clients killed by SIGKILL, calls cancelled or timed
out by the client, a node killed under its commands and started again, raw peers that
send a command and close their socket before the answer.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from mesh.client import AsyncClient, Client
from mesh.protocol import CancelledError, MeshError, new_id
from mesh.security.credentials import Credentials, load_credentials
from mesh.security.state import ensure_state
from mesh.testing import BrokerProcess, run_broker, run_node

STORM_S = 6.0
CAPACITY = 4  # per node

# A client process that calls until it is killed (argv: broker, credentials file or "").
CALLER = """
import sys
from mesh.client import Client
from mesh.security.credentials import load_credentials
creds = load_credentials(sys.argv[2]) if sys.argv[2] else None
with Client(sys.argv[1], timeout=10, credentials=creds) as c:
    while True:
        c.call("st", "work", {"sleep": 0.05})
"""


@dataclass(frozen=True)
class StormMesh:
    """A broker and how to reach it: with security, every peer holds an admitted key."""

    broker: BrokerProcess
    state: Path | None

    def node_args(self, name: str) -> list[str]:
        creds = [] if self.state is None else ["--credentials", str(self.state / "credentials" / f"{name}.toml")]
        return [*creds, "--config", json.dumps({"name": name, "services": ["st"], "capacity": CAPACITY})]

    @property
    def creds_file(self) -> str:
        return "" if self.state is None else str(self.state / "credentials" / "dev.toml")

    @cached_property
    def creds(self) -> Credentials | None:
        """Read once: the storm's clients, deserters and polls of `mesh.stats` all use it."""
        return load_credentials(self.creds_file) if self.state is not None else None


@contextmanager
def storm_mesh(secure: bool, tmp_path: Path) -> Iterator[StormMesh]:
    if not secure:
        with run_broker() as broker:
            yield StormMesh(broker, None)
        return
    state = tmp_path / "state"
    ensure_state(state, nodes={"a": ["st"], "b": ["st"]}, clients={"dev": ["admin"]}, now=time.time())
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--state", str(state)) as broker:
        yield StormMesh(broker, state)


def stats(mesh: StormMesh) -> dict[str, Any]:
    with Client(mesh.broker.clients, timeout=5, credentials=mesh.creds) as c:
        return c.call("mesh", "stats")


async def caller(mesh: StormMesh, seed: int, until: float, outcomes: Counter[str]) -> None:
    """Calls that the client itself abandons: cancelled after a moment, or past a short deadline."""
    rng = random.Random(seed)
    async with AsyncClient(mesh.broker.clients, timeout=10, credentials=mesh.creds) as c:
        while time.monotonic() < until:
            kind = rng.choice(("whole", "cancelled", "deadline"))
            call = c.call("st", "nap", {"sleep": rng.uniform(0.02, 0.3)},
                          timeout=0.05 if kind == "deadline" else 10)
            task = asyncio.ensure_future(call)
            try:
                if kind == "cancelled":
                    await asyncio.sleep(rng.uniform(0.0, 0.1))
                    task.cancel()
                await task
                outcomes["answered"] += 1
            except (asyncio.CancelledError, CancelledError):
                outcomes["cancelled"] += 1
            except MeshError as err:
                outcomes[f"error {err.code}"] += 1


def deserter(mesh: StormMesh, until: float, sent: list[int]) -> None:
    """Raw DEALERs that each send one valid command and close before its answer (with the admitted key and token)."""
    ctx = zmq.Context()
    creds = mesh.creds
    try:
        while time.monotonic() < until:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            if creds is not None:
                creds.secure(sock)
            sock.connect(mesh.broker.clients)
            header: dict[str, Any] = {"v": 1, "type": "command", "id": new_id(), "ts": time.time(), "service": "st",
                                      "action": "work"}
            if creds is not None:
                header["security"] = {"level": 1, "token": creds.token}
            sock.send_multipart([msgpack.packb(header), msgpack.packb({"sleep": 0.1})])
            time.sleep(0.02)
            sock.close()
            sent[0] += 1
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_a_storm_of_departures_leaves_the_broker_holding_nothing(secure: bool, tmp_path: Path) -> None:
    """Kill, cancel, time out and desert commands for 6 s: afterwards no command is held and every slot is free."""
    with storm_mesh(secure, tmp_path) as mesh, run_node("testnodes:node", mesh.broker, *mesh.node_args("a")):
        broker = mesh.broker
        node_b = subprocess.Popen([sys.executable, "-m", "mesh", "node", "testnodes:node", "--broker", broker.nodes,
                                   *mesh.node_args("b")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        callers: list[subprocess.Popen[bytes]] = []
        try:
            until = time.monotonic() + STORM_S
            outcomes: Counter[str] = Counter()
            deserted = [0]
            raw = threading.Thread(target=deserter, args=(mesh, until, deserted))
            raw.start()

            async def storm() -> None:
                tasks = [asyncio.create_task(caller(mesh, seed, until, outcomes)) for seed in range(4)]
                rng = random.Random(99)
                killed_b = False
                while time.monotonic() < until:
                    # Client processes come and go, each killed in the middle of its calls.
                    callers.append(subprocess.Popen([sys.executable, "-c", CALLER, broker.clients, mesh.creds_file],
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    await asyncio.sleep(rng.uniform(0.3, 0.7))
                    callers[rng.randrange(len(callers))].send_signal(signal.SIGKILL)
                    if not killed_b and time.monotonic() > until - STORM_S / 2:
                        node_b.send_signal(signal.SIGKILL)  # under its commands
                        killed_b = True
                await asyncio.gather(*tasks)

            asyncio.run(storm())
            raw.join()
            for proc in callers:
                proc.kill()
            node_b.wait()
            # node b again, as an operator restarts it
            with run_node("testnodes:node", broker, *mesh.node_args("b")):
                deadline = time.monotonic() + 15
                while (now := stats(mesh))["in_flight"] or now["queued"]:
                    assert time.monotonic() < deadline, f"still held after the storm: {now}"
                    time.sleep(0.2)

                # Every slot free: twice the capacity of both nodes at once, each answered.
                async def burst() -> list[Any]:
                    async with AsyncClient(broker.clients, timeout=10, credentials=mesh.creds) as c:
                        return await asyncio.gather(*(c.call("st", "work", {"sleep": 0.2}) for _ in range(4 * CAPACITY)))

                answered = asyncio.run(burst())
                final = stats(mesh)
        finally:
            for proc in callers:
                proc.kill()
                proc.wait()
            node_b.kill()
            node_b.wait()
    print(f"\nstorm: {dict(outcomes)}, {deserted[0]} deserted commands, {len(callers)} client processes killed; "
          f"broker: {final['counters']}")
    assert len(answered) == 4 * CAPACITY and {r["node"] for r in answered} == {"a", "b"}
    assert outcomes["answered"] > 0 and outcomes["cancelled"] > 0 and deserted[0] > 20 and len(callers) >= 6
    assert final["in_flight"] == 0 and final["queued"] == 0 and final["nodes"] == 2
    assert final["counters"].get("internal_errors", 0) == 0
    assert final["counters"].get("undeliverable", 0) > 0  # answers did go to peers that had left
