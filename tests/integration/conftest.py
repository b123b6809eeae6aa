"""Fixtures that run real brokers and nodes as processes over ipc:// and tcp://127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.client import Client
from mesh.testing import BrokerProcess, run_broker

HERE = Path(__file__).parent
# So that `mesh node testnodes:node` processes can import the test nodes.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))


@pytest.fixture(params=["tcp", "ipc"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker process listening on loopback TCP or on ipc:// sockets in tmp_path."""
    if request.param == "tcp":
        endpoints = ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    else:
        endpoints = tuple(f"ipc://{tmp_path}/{side}.sock" for side in ("clients", "nodes", "events"))
    with run_broker(endpoints[0], endpoints[1], events=endpoints[2]) as b:
        yield b


@pytest.fixture
def tcp_broker() -> Iterator[BrokerProcess]:
    with run_broker() as b:
        yield b


@pytest.fixture
def client_of() -> Iterator:
    """Make clients of a broker; all are closed at the end of the test."""
    made: list[Client] = []

    def make(b: BrokerProcess, **kwargs) -> Client:
        c = Client(b.clients, **{"timeout": 10.0, **kwargs})
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
