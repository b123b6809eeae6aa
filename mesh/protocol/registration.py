"""What a node may declare about an action when it registers, checked the same at both ends.

The node checks its own declarations before it registers (a mistake fails at start, in
its own process); the broker checks every registration it receives, since any admitted
key may send one. Both use these rules, so neither can accept what the other refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from .errors import ValidationFailedError

__all__ = ["MAX_DESCRIPTION", "HINTS", "check_hints"]

MAX_DESCRIPTION: Final = 4096  # characters of an action's description


# What an action may say it does to the world, each optional: `read_only` (changes
# nothing), `destructive` (may delete or overwrite what was there), `open_world` (reaches
# beyond the node's own state: the network, other services). Undeclared means unknown.
HINTS: Final = ("read_only", "destructive", "open_world")


def check_hints(spec: Mapping[str, Any], where: str) -> dict[str, bool]:
    """The declared hints of one action's registration entry, checked.

    Args:
        spec: the action's entry (`read_only`, `destructive`, `open_world`, each optional).
        where: the entry's field path, for the error.

    Returns:
        The hints present in `spec` (absent ones stay unknown).

    Raises:
        ValidationFailedError: a hint that is not a boolean, or an action declared both
            read-only and destructive (`details.field` names the hint).
    """
    hints: dict[str, bool] = {}
    for hint in HINTS:
        value = spec.get(hint)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise _field(f"{where}.{hint}", "must be a boolean")
        hints[hint] = value
    if hints.get("read_only") and hints.get("destructive"):
        raise _field(f"{where}.destructive", "a read-only action cannot be destructive")
    return hints


def _field(field_name: str, problem: str) -> ValidationFailedError:
    return ValidationFailedError(f"{field_name}: {problem}", details={"field": field_name})
