"""Shared settings and a secure broker core for the property-based fuzz tests (test_fuzz_*.py).

`make test` runs each property with a modest number of seeds; `make fuzz` sets
HYPOTHESIS_PROFILE=fuzz and runs every one with FUZZ_EXAMPLES seeds (docs/fuzzing.md).
Each example is one integer seed: the generators in `mesh.fuzz` draw everything from
`random.Random(seed)`, so a failure printed as `seed=N` is reproduced from N alone.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mesh.broker import Broker
from mesh.broker.config import BrokerConfig
from mesh.broker.core import BrokerSecurity
from mesh.broker.secure import broker_security
from mesh.fuzz.attacks import Limits
from mesh.protocol import MeshError
from mesh.security.credentials import load_credentials
from mesh.security.gate import Peer
from mesh.security.state import ensure_state

FUZZ: Final = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
FUZZ_EXAMPLES: Final = int(os.environ.get("FUZZ_EXAMPLES", "20000"))
SEEDS: Final = st.integers(min_value=0, max_value=2**64 - 1)
# Python's default recursion limit, which the broker runs with, and how deep its loop's
# stack already is when it calls the core (measured from `mesh broker`: about 15 frames).
DEFAULT_RECURSION_LIMIT: Final = 1000
BROKER_STACK: Final = 20
# Small enough that the million-empty-maps attacks stay fast in `make test`.
LIMITS: Final = Limits(message=64 * 1024, filter=4096)


def examples(fast: int) -> settings:
    """`fast` examples in `make test`, FUZZ_EXAMPLES under HYPOTHESIS_PROFILE=fuzz."""
    return settings(
        max_examples=FUZZ_EXAMPLES if FUZZ else fast,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        deadline=None,
    )


@contextmanager
def broker_stack() -> Iterator[None]:
    """Run the block with the stack room the broker has.

    Hypothesis raises the recursion limit while a test runs, to leave itself room; with
    that, input nested 1,000 deep passes here and crashes the real broker. So the code
    under test gets the default limit, as if called from the broker loop.
    """
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + DEFAULT_RECURSION_LIMIT - BROKER_STACK)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def only_mesh_errors(fn: Any, *args: Any) -> None:
    """Call `fn(*args)` with the broker's stack room; a MeshError is fine, anything else
    fails the test with the input's bytes (the first 512, as hex) for the report."""
    try:
        with broker_stack():
            fn(*args)
    except MeshError:
        pass
    except Exception as exc:
        shown = [a[:512].hex() if isinstance(a, bytes) else repr(a)[:512] for a in args]
        raise AssertionError(f"{fn.__qualname__} raised {type(exc).__name__}: {exc!s:.200} on {shown}") from exc


@dataclass
class SecureCore:
    """What a secure broker core needs to be fed like the real loop feeds it."""

    security: BrokerSecurity
    seal: Any  # the fuzzer client's Sealer.seal: adds its valid reader token
    now: float
    client: Peer = Peer("fuzzer", "127.0.0.1")
    node: Peer = Peer("kv", "127.0.0.1")
    echo: Peer = Peer("echo", "127.0.0.1")

    def broker(self) -> Broker:
        """A fresh core with this security, the limits of `LIMITS` and a short default timeout."""
        return Broker(BrokerConfig(max_message_bytes=LIMITS.message, default_timeout=5.0), self.security)


def secure_core(root: Path) -> SecureCore:
    """A state directory made as `mesh up` makes it (nodes echo and kv, clients dev and
    fuzzer), and the broker security and client sealer read from it."""
    now = time.time()
    state = root / "state"
    ensure_state(state, nodes={"echo": ["echo"], "kv": ["kv"]}, clients=["dev", "fuzzer"], now=now)
    setup = broker_security(state)
    creds = load_credentials(state / "credentials" / "fuzzer.toml")
    sealer = creds.sealer()
    return SecureCore(setup.security, sealer.seal, now)
