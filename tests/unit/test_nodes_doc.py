"""docs/nodes.md cannot drift from the ready nodes: every action they register is there with
its parameters, its result fields, its declared result schema, and an example whose printed
output is what the node really returns on the quickstart's sample data."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mesh.node import Action
from mesh.nodes import sample
from mesh.plugins import load_node

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "nodes.md"
# What each ready node is given in the quickstart (topologies/quickstart.toml), under var/.
CONFIGS = {
    "echo": lambda var: {},
    "kv": lambda var: {"path": str(var / "kv.sqlite3")},
    "sqlite": lambda var: {"database": str(var / "sample.db")},
    "fs": lambda var: {"root": str(var / "files")},
}
SECTION = re.compile(r"^### `([\w-]+)\.([\w-]+)`\n(.*?)(?=^##|\Z)", re.M | re.S)
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def ready_nodes() -> list[str]:
    """The ready nodes: the `mesh.nodes` entry points the package declares."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(project["project"]["entry-points"]["mesh.nodes"])


@pytest.fixture(scope="module")
def actions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Action]:
    """Every ready node's actions by `service.action`, built on fresh sample data."""
    var = tmp_path_factory.mktemp("nodes") / "var"
    sample.prepare(var)
    missing = sorted(set(ready_nodes()) - set(CONFIGS))
    assert not missing, f"give the test a config for the ready node(s) {missing}"
    return {f"{svc}.{act}": spec for name in ready_nodes()
            for (svc, act), spec in load_node(name, CONFIGS[name](var)).actions.items()}


def sections() -> dict[str, str]:
    found = [(f"{m[1]}.{m[2]}", m[3]) for m in SECTION.finditer(DOC.read_text())]
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), "an action is documented twice"
    return dict(found)


def table(text: str, first_header: str) -> list[str]:
    """The backticked names in the first column of the table whose header starts with `first_header`."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |")), None)
    if start is None:
        return []
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip().strip("`"))
    return rows


def test_every_ready_action_is_documented_with_its_declared_result_schema(actions: dict[str, Action]):
    """The page lists exactly the ready nodes' actions, each with a result schema block equal
    to its `result_schema` and tables naming exactly its parameters and result fields."""
    documented = sections()
    assert sorted(documented) == sorted(actions)
    for name, act in actions.items():
        text = documented[name]
        blocks = [body for lang, body in BLOCK.findall(text) if lang == "json"]
        assert act.result_schema is not None, f"{name} declares no result_schema"
        assert json.loads(blocks[-1]) == act.result_schema, f"{name}: the result schema differs"
        assert table(text, "Parameter") == list(act.schema.get("properties", {})), name
        assert table(text, "Result field") == list(act.result_schema.get("properties", {})), name


def test_every_example_prints_what_the_node_returns(actions: dict[str, Action]):
    """Each example's payload is valid, and the output shown is the node's result, run in the
    page's order on the sample data (as pasted into a fresh quickstart)."""
    for name, text in sections().items():
        blocks = BLOCK.findall(text)
        command = next(body for lang, body in blocks if lang == "sh").strip()
        argv = shlex.split(command)
        assert argv[:2] == [".venv/bin/mesh", "call"] and argv[2] == name and len(argv) == 4, command
        shown = json.loads([body for lang, body in blocks if lang == "json"][0])
        assert run(actions[name], json.loads(argv[3])) == shown, command


def run(act: Action, payload: Any) -> Any:
    """What the node does with a command: validate, run the handler, check the result."""
    act.validate(payload)
    result = act.handler(payload)
    result = asyncio.run(result) if act.is_async else result
    assert act.check_result is not None
    act.check_result(result)
    return json.loads(json.dumps(result))
