"""The fault suite's short schedule (`make test`; the full one is `make faults`).

The cluster of topologies/faults.toml runs over network namespaces, one `mesh up --host`
per host, with two client groups in namespaces of their own recording every call. One
run of about a minute: one round each of a kill, a pause, a leader isolated by a
partition and the kv node paused past its liveness window, shuffled from one seed. The checker then holds the
history to the counter rules (mesh/faults/checker.py): no acknowledged increment lost,
none applied twice, no value acknowledged twice, no stale or backward read, every call
answered or timed out with its code; every broker agrees on one leader and term at the
end, every process is alive and none aborted.

Skipped, with the reason, where network namespaces cannot be made (not root, no `ip` or
`nft`). The existing tests/integration/test_cluster_faults.py (kills only, on loopback)
stays in `make soak`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.faults.netns import unavailable
from mesh.faults.run import run

pytestmark = pytest.mark.timeout(600)

SEED = 16
NEMESES = ["kill", "pause", "isolate-leader", "node-pause"]


def test_short_fault_schedule_keeps_every_acknowledged_write_once(tmp_path: Path) -> None:
    """Invariant: under kill, pause, partition and node pause, the history passes every
    check of the checker and the cluster ends whole (agreement, no abort, all alive)."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    result = run(SEED, NEMESES, 1, work=tmp_path, warmup=2.0)
    figures = result.figures()
    print(json.dumps({k: v for k, v in figures.items() if k != "schedule"}, indent=2, default=str))
    assert len(result.rounds) == len(NEMESES)
    assert result.verdict.ok > 0 and result.verdict.keys, "the clients did no work"
    assert not result.broken(), (result.broken(), result.verdict.anomalies, tmp_path)
