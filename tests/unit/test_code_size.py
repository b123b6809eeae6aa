"""The size rule of issue 19: no module over 600 lines, no function over 80, under mesh/.

A module or function may be longer only with its reason written where it is: a comment
line `# size: <why>` among a module's first ten lines, or directly above the `def` (its
decorators included). The test lists every breach at once, with its place, so a change
that grows a module learns it in `make test`, seconds in.
"""

from __future__ import annotations

import ast
from pathlib import Path

MESH = Path(__file__).resolve().parents[2] / "mesh"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
REASON = "# size:"


def _module_reason(lines: list[str]) -> bool:
    return any(line.strip().startswith(REASON) for line in lines[:10])


def _function_reason(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return first >= 2 and lines[first - 2].strip().startswith(REASON)


def breaches(root: Path = MESH) -> list[str]:
    """Every module and function over its limit without a written reason."""
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        where = path.relative_to(root.parent)
        if len(lines) > MAX_MODULE_LINES and not _module_reason(lines):
            out.append(f"{where}: {len(lines)} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not _function_reason(lines, node):
                    out.append(f"{where}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    return out


def test_no_module_or_function_is_over_its_size_without_a_reason() -> None:
    """Invariant: every breach of the size rule under mesh/ carries its reason in the code."""
    assert breaches() == []


def test_the_rule_sees_a_long_function_and_accepts_a_written_reason(tmp_path: Path) -> None:
    """The check itself: a long function breaks it; the same with `# size:` above it does not."""
    pkg = tmp_path / "mesh"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "long.py").write_text(f"def f():\n{body}\n")
    assert [b.split(" ")[1] for b in breaches(pkg)] == ["f:"]
    (pkg / "long.py").write_text(f"# size: a table of constants, read as one\ndef f():\n{body}\n")
    assert breaches(pkg) == []
