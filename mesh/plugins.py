"""Finding handler nodes by name: the `mesh.nodes` entry-point group or `module:attribute`.

A node plugin is either a `Node` object or a factory called with the node's config
table as keyword arguments that returns one. Other packages add nodes by declaring
`[project.entry-points."mesh.nodes"] name = "package.module:attribute"`.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any

from .node import Node
from .protocol import ConfigurationError, MeshError

__all__ = ["ENTRY_POINT_GROUP", "available_nodes", "load_node", "plugin_problem"]

ENTRY_POINT_GROUP = "mesh.nodes"


def available_nodes() -> dict[str, str]:
    """Installed node plugins: name -> `module:attribute`."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _resolve(use: str) -> Any:
    target = available_nodes().get(use, use)
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ConfigurationError(
            f"unknown node {use!r}: not an installed node ({', '.join(sorted(available_nodes()))})"
            " and not module:attribute",
            details={"use": use},
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot load node {target}: {exc}", details={"use": use}) from None
    return obj


def load_node(use: str, config: dict[str, Any] | None = None) -> Node:
    """The `Node` that `use` names, built with `config`.

    Raises:
        ConfigurationError: the name does not resolve, or the factory refuses the config.
    """
    obj = _resolve(use)
    if isinstance(obj, Node):
        if config:
            raise ConfigurationError(f"{use} is a ready Node and takes no config", details={"use": use})
        return obj
    if not callable(obj):
        raise ConfigurationError(f"{use} is neither a Node nor a factory of one", details={"use": use})
    try:
        node = obj(**(config or {}))
    except MeshError:
        raise
    except Exception as exc:  # noqa: BLE001 - a factory's own failure, reported as this node's configuration
        raise ConfigurationError(f"{use}: cannot build the node: {type(exc).__name__}: {exc}", details={"use": use}) from None
    if not isinstance(node, Node):
        raise ConfigurationError(f"{use} returned {type(node).__name__}, not a Node", details={"use": use})
    return node


def plugin_problem(use: str, config: dict[str, Any]) -> str | None:
    """Why `use` with `config` could not start, found without starting it (None if it can).

    Imports the plugin's module and matches the config keys against the factory's
    parameters, so a misspelt node name or config key is caught by `mesh topology check`
    rather than by a node that restarts forever.
    """
    try:
        obj = _resolve(use)
    except ConfigurationError as err:
        return err.message
    if isinstance(obj, Node):
        return f"{use} is a ready Node and takes no config" if config else None
    if not callable(obj):
        return f"{use} is neither a Node nor a factory of one"
    try:
        inspect.signature(obj).bind(**config)
    except TypeError as exc:
        return f"config does not fit {use}: {exc}"
    except ValueError:  # no signature to check (a builtin): leave it to the node
        return None
    return None
