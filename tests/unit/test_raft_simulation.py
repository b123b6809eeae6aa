"""The core under the seeded fault simulator: thousands of seeds stay safe and live; broken rules are caught."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from mesh.cluster import sim
from mesh.cluster.sim import Bug, Property, Simulation, run_seeds

CHUNKS = 4
SEEDS_PER_CHUNK = 250  # 1 000 seeds in the normal run (the suite's time budget); `make sim` runs 20 000


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_a_thousand_seeds_keep_every_safety_property(chunk: int) -> None:
    """No seed violates election safety, log matching, leader completeness or state machine safety."""
    summary = run_seeds(range(chunk * SEEDS_PER_CHUNK, (chunk + 1) * SEEDS_PER_CHUNK))
    assert summary.violations == []
    assert summary.not_live == [], "after healing, these seeds elected no leader or committed nothing"
    assert summary.committed > 0 and summary.leaders >= SEEDS_PER_CHUNK


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_twenty_thousand_seeds_keep_every_safety_property() -> None:
    """The long run of `make sim`, as a soak test."""
    summary = run_seeds(range(20_000))
    assert summary.violations == [] and summary.not_live == []


def test_a_seed_replays_exactly() -> None:
    """The same seed gives the same run, so a failing seed is a reproducible bug report."""
    first, second, other = Simulation(1234).run(), Simulation(1234).run(), Simulation(1235).run()
    assert first == second
    assert (first.leaders, first.committed, first.messages) != (other.leaders, other.committed, other.messages)


@pytest.mark.parametrize(
    "bug, caught_as",
    [
        (Bug.DOUBLE_VOTE, {Property.ELECTION_SAFETY, Property.CORE_INVARIANT}),
        (Bug.STALE_VOTE, {Property.LEADER_COMPLETENESS, Property.STATE_MACHINE_SAFETY, Property.LOG_MATCHING}),
    ],
    ids=["double-vote", "stale-vote"],
)
def test_a_broken_rule_is_caught_within_a_few_hundred_seeds(bug: Bug, caught_as: set[Property]) -> None:
    """Injecting a known Raft bug makes the simulator report a violation of the property it breaks."""
    summary = run_seeds(range(300), bugs=[bug])
    assert summary.violations, f"{bug.value} went unnoticed in 300 seeds"
    assert {v.property for v in summary.violations} <= caught_as
    first = summary.violations[0]
    replay = Simulation(first.seed, bugs=[bug]).run()
    assert replay.violation == first


def test_the_command_line_exits_1_naming_the_seed_and_property(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m mesh.cluster.sim` prints seeds, violations and timing; a violation exits 1 with a replay line."""
    assert sim.main(["--seeds", "20"]) == 0
    out = capsys.readouterr().out
    assert "seeds 0..19 (20)" in out and "violations: 0" in out and "seeds/s" in out
    assert sim.main(["--seeds", "30", "--bug", "double-vote"]) == 1
    out = capsys.readouterr().out
    found = re.search(r"VIOLATION seed (\d+), step \d+: election safety violated", out)
    assert found is not None, out
    assert f"replay: python -m mesh.cluster.sim --start {found[1]} --seeds 1 --steps 150 --bug double-vote" in out


SANS_IO = ["raft.py", "log.py", "messages.py"]
FORBIDDEN = {"zmq", "asyncio", "sqlite3", "time", "random", "socket", "threading", "os"}


@pytest.mark.parametrize("module", SANS_IO)
def test_the_consensus_core_does_no_io(module: str) -> None:
    """The core imports no sockets, event loop, database or clock (random only for the Random type)."""
    source = (Path(sim.__file__).parent / module).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    allowed = {"random"} if module == "raft.py" else set()
    assert imported & FORBIDDEN <= allowed
