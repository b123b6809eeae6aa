"""A short seeded end-to-end fuzz run against a real `mesh up` (docs/fuzzing.md).

Attackers on every port (an unauthenticated peer, an admitted client with its token, a
link that never reads, the kv node's key, the events port) while a victim client calls
echo.echo; `make fuzz` runs the same for ten minutes.
"""

from __future__ import annotations

import os

import pytest

from mesh.fuzz.run import run

SEED = int(os.environ.get("FUZZ_SEED", "1"))
SECONDS = float(os.environ.get("FUZZ_SHORT_SECONDS", "20"))


@pytest.mark.fuzz
@pytest.mark.timeout(180)
def test_short_fuzz_run_keeps_every_bound() -> None:
    """Under seeded attack the broker never crashes, restarts or logs a traceback, answers
    every message it can name, stays under 256 MB, and the victim sees no failure and a
    p99 of at most 50 ms (bounds of mesh.fuzz.ledger.Bounds, issue 15's done-when)."""
    result = run(SEED, SECONDS)
    figures = result.figures()
    assert figures["victim_calls"] > 0
    assert not result.broken(), f"seed {SEED}: {result.broken()}; unanswered: {figures['unanswered_examples'][:3]}"
