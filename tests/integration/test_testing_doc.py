"""docs/testing.md cannot drift from `mesh.testing`: every Python example on the page runs as printed
(the first against a real broker and node, the others against the sans-IO cores)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).parents[2] / "docs" / "testing.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_page_has_its_three_examples():
    """Processes, the broker core and the consensus core each have an example (a lost fence would hide one)."""
    assert len(EXAMPLES) == 3


@pytest.mark.parametrize("code", EXAMPLES, ids=["processes", "broker-core", "raft"])
def test_each_example_runs_as_printed(code: str):
    """The example's own asserts hold when it is run as a script."""
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_testing"})
