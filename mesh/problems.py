"""Checking a configuration file and reporting every problem at once, each at its key.

Topology files and policy files are both checked this way: a checker collects
`Problem`s while it reads the whole file, then one `ProblemsError` lists them all, so
a user fixes a file in one pass instead of one error at a time.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from .protocol import ConfigurationError

__all__ = ["Problem", "ProblemsError", "Checker"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem, at a dotted key such as `brokers.main.clients`."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ProblemsError(ConfigurationError):
    """A file with one or more problems; `problems` lists them all."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        reason = f"{source}: {len(problems)} problem(s)"
        super().__init__(
            reason + "\n" + "\n".join(f"  {p}" for p in problems),
            details={"reason": reason, "problems": [str(p) for p in problems]},
        )
        self.problems = problems


class Checker:
    """Collects problems; subclasses add the readers their file format needs."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def bad(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message))

    def unknown(self, data: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
        """A problem for each key of `data` not in `allowed` (a typo would pass silently)."""
        for k in sorted(set(data) - set(allowed)):
            self.bad(f"{where}.{k}" if where else k, f"unknown key (expected one of {', '.join(sorted(allowed))})")
