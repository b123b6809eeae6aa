"""The suite runs the hot path as Python source, and every module that a wheel compiles
is one mypy checks strictly (what mypyc compiles from)."""

from __future__ import annotations

import fnmatch
import importlib
import tomllib
from pathlib import Path

from mesh.compiled import HOT_PATH, compiled_modules

ROOT = Path(__file__).resolve().parents[2]


def test_the_hot_path_runs_from_its_python_source_here() -> None:
    """Invariant: no compiled module shadows a `.py` in the tree the tests run, so the tests
    exercise the pure-Python path and an edit to a `.py` is what they run (a stale `.so`
    beside its source, e.g. from `build_ext --inplace`, fails this)."""
    assert compiled_modules() == []
    for name in HOT_PATH:
        assert (importlib.import_module(name).__file__ or "").endswith(".py"), name


def test_every_compiled_module_is_checked_strictly_by_mypy() -> None:
    """Invariant: each module of `HOT_PATH` exists and falls under the strict mypy overrides
    of pyproject.toml, so mypyc compiles fully typed code."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    strict = [
        pattern
        for override in config["tool"]["mypy"]["overrides"]
        if override.get("disallow_untyped_defs")
        for pattern in override["module"]
    ]
    for name in HOT_PATH:
        assert (ROOT / (name.replace(".", "/") + ".py")).is_file(), name
        assert any(fnmatch.fnmatchcase(name, p) for p in strict), f"{name} is not under mypy's strict overrides"
