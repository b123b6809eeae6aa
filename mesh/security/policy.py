"""The access policy: which roles may call, publish, subscribe and renew, which nodes may
register which services. A sans-IO core: no sockets, no clock; the broker asks, the
policy answers with a `Decision`.

Rules of this module:

* Deny by default. A command is allowed only when an applicable role allows it, and
  refused when any applicable role denies it (deny wins over allow, across roles too).
* A role with `cidrs` applies only to a peer whose IP address is in one of them; with
  no known address (ipc://, or a bad string) such a role does not apply. IPv4-mapped
  IPv6 addresses (`::ffff:10.1.2.3`) count as their IPv4 address.
* `mesh.renew` is governed by the role's `renew` flag (and its `deny`), never by
  `allow` patterns, so `allow = ["*"]` does not hand out token renewal.
* Command patterns are `service.action` with `*` and `?` wildcards, or `*` alone.
  Topic patterns are a topic (it and every topic below it), `topic.*` (only below
  it), or `*` (every topic), matched segment by segment as the event bus does.
* `load_policy()` and `parse_policy()` collect every problem, each with its dotted key,
  before raising one `PolicyError`, so a file is fixed in one pass.
* Decisions on commands are cached (bounded, first in first out): the broker asks the
  same question for every message of a client.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from ..problems import Checker, Problem, ProblemsError
from ..protocol import NAME_PATTERN, TOPIC_PATTERN

__all__ = [
    "CACHE_SIZE",
    "Decision",
    "NodeRule",
    "Policy",
    "PolicyError",
    "Problem",
    "Role",
    "load_policy",
    "parse_policy",
]

CACHE_SIZE: Final = 4096
_NAME: Final = re.compile(NAME_PATTERN)
_GLOB: Final = r"[A-Za-z0-9_*?-]{1,64}"
_COMMAND_PATTERN: Final = re.compile(rf"\*|{_GLOB}\.{_GLOB}")
_SERVICE_PATTERN: Final = re.compile(_GLOB)
_TOPIC_PATTERN: Final = re.compile(rf"\*|{TOPIC_PATTERN}(\.\*)?")
_RENEW: Final = "mesh.renew"
_RENEW_BY_FLAG: Final = MappingProxyType({_RENEW: "mesh.renew is granted by renew = true, not by allow"})
_ROLE_KEYS: Final = frozenset({"allow", "deny", "cidrs", "renew", "publish", "subscribe"})
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Decision:
    """An answer of the policy; `reason` is for a person and holds no secrets.

    The broker's gate (mesh.security.gate) turns a refusal into `AccessDeniedError`.
    """

    allowed: bool
    reason: str


class _Patterns:
    """Glob patterns compiled into one regular expression; `match` names the pattern hit."""

    __slots__ = ("_regex", "patterns")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        # One capturing group per pattern and no other groups, so `lastindex` says which.
        alternatives = "|".join(f"({_translate(p)})" for p in patterns)
        self._regex = re.compile(alternatives) if patterns else None

    def match(self, text: str) -> str | None:
        found = self._regex.fullmatch(text) if self._regex else None
        return self.patterns[found.lastindex - 1] if found and found.lastindex else None


def _translate(pattern: str) -> str:
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)


def _covers(pattern: str, topic: str) -> bool:
    """Whether a topic pattern covers `topic` ('' stands for every topic)."""
    if pattern == "*":
        return True
    if not topic:
        return False
    if pattern.endswith(".*"):
        return topic.startswith(pattern[:-1])
    return topic == pattern or topic.startswith(pattern + ".")


@dataclass(frozen=True, slots=True)
class Role:
    """One `[roles.NAME]` table; `cidrs` empty means from anywhere."""

    name: str
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    cidrs: tuple[_Network, ...] = ()
    renew: bool = False
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    _allow: _Patterns = field(init=False, repr=False, compare=False)
    _deny: _Patterns = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allow", _Patterns(self.allow))
        object.__setattr__(self, "_deny", _Patterns(self.deny))

    def applies(self, address: _Address | None) -> bool:
        """Whether the role counts for a peer at `address` (None: unknown)."""
        if not self.cidrs:
            return True
        return address is not None and any(address in net for net in self.cidrs)


@dataclass(frozen=True, slots=True)
class NodeRule:
    """One `[nodes.NAME]` table: the services that node identity may register, and the
    event topics it may publish."""

    name: str
    services: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    _services: _Patterns = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_services", _Patterns(self.services))


def _address(peer_ip: str | None) -> _Address | None:
    if not peer_ip:
        return None
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Policy:
    """A checked policy. Thread-safe to read; the decision cache tolerates races.

    Args:
        roles: the roles by name.
        nodes: the node identities by name.
        source: where the policy came from, for messages.
    """

    def __init__(
        self, roles: Mapping[str, Role], nodes: Mapping[str, NodeRule], source: str = "<policy>"
    ) -> None:
        self.roles: Mapping[str, Role] = dict(roles)
        self.nodes: Mapping[str, NodeRule] = dict(nodes)
        self.source = source
        self.text: str | None = None  # the TOML it was read from (`policy_from_text`)
        self._commands: dict[tuple[Any, ...], Decision] = {}
        self._topic_cache: dict[tuple[Any, ...], Decision] = {}

    def _applicable(self, roles: Collection[str], peer_ip: str | None) -> tuple[list[Role], list[str]]:
        """The roles that count here, and the names of those whose networks exclude the peer."""
        address = _address(peer_ip)
        applicable: list[Role] = []
        elsewhere: list[str] = []
        for name in roles:
            role = self.roles.get(name)
            if role is None:
                continue
            if role.applies(address):
                applicable.append(role)
            else:
                elsewhere.append(name)
        return applicable, elsewhere

    def decide(self, roles: Collection[str], service: str, action: str, peer_ip: str | None) -> Decision:
        """May a holder of `roles`, calling from `peer_ip`, run `service.action`?

        Args:
            roles: the role names of the caller's token; unknown names grant nothing.
            service: the service name of the command.
            action: the action name of the command.
            peer_ip: the caller's IP address (ZeroMQ's Peer-Address), None when unknown.

        Returns:
            The decision; refused unless an applicable role allows and none denies.
        """
        key = (roles if isinstance(roles, (tuple, frozenset)) else tuple(roles), service, action, peer_ip)
        return self._commands.get(key) or _remember(
            self._commands, key, self._decide(key[0], f"{service}.{action}", peer_ip)
        )

    def _decide(self, roles: Collection[str], command: str, peer_ip: str | None) -> Decision:
        applicable, elsewhere = self._applicable(roles, peer_ip)
        for role in applicable:
            pattern = role._deny.match(command)
            if pattern is not None:
                return Decision(False, f"role {role.name} denies {command} ({pattern})")
        if command == _RENEW:
            return self._renew(applicable, elsewhere, peer_ip)
        for role in applicable:
            pattern = role._allow.match(command)
            if pattern is not None:
                return Decision(True, f"role {role.name} allows {command} ({pattern})")
        return Decision(False, _nobody(f"no role allows {command}", elsewhere, peer_ip))

    def may_renew(self, roles: Collection[str], peer_ip: str | None = None) -> Decision:
        """May a holder of `roles` renew its token (call `mesh.renew`)?

        Args:
            roles: the role names of the caller's token.
            peer_ip: the caller's IP address, None when unknown.

        Returns:
            Allowed when an applicable role has `renew = true` and none denies `mesh.renew`.
        """
        return self.decide(roles, "mesh", "renew", peer_ip)

    def _renew(self, applicable: list[Role], elsewhere: list[str], peer_ip: str | None) -> Decision:
        for role in applicable:
            if role.renew:
                return Decision(True, f"role {role.name} may renew")
        return Decision(False, _nobody("no role may renew", elsewhere, peer_ip))

    def may_publish(self, roles: Collection[str], topic: str, peer_ip: str | None = None) -> Decision:
        """May a holder of `roles` publish an event on `topic`?

        Args:
            roles: the role names of the publisher's token.
            topic: the event topic.
            peer_ip: the publisher's IP address, None when unknown.

        Returns:
            Allowed when an applicable role's `publish` patterns cover the topic.
        """
        return self._topics(roles, topic, peer_ip, "publish")

    def may_subscribe(self, roles: Collection[str], prefix: str, peer_ip: str | None = None) -> Decision:
        """May a holder of `roles` subscribe to (or replay) events under `prefix`?

        Args:
            roles: the role names of the subscriber's token.
            prefix: the topic prefix; '' (every topic) needs a `*` pattern.
            peer_ip: the subscriber's IP address, None when unknown.

        Returns:
            Allowed when an applicable role's `subscribe` patterns cover the whole prefix.
        """
        return self._topics(roles, prefix, peer_ip, "subscribe")

    def _topics(self, roles: Collection[str], topic: str, peer_ip: str | None, verb: str) -> Decision:
        key = (roles if isinstance(roles, (tuple, frozenset)) else tuple(roles), verb, topic, peer_ip)
        return self._topic_cache.get(key) or _remember(
            self._topic_cache, key, self._decide_topic(key[0], topic, peer_ip, verb)
        )

    def _decide_topic(self, roles: Collection[str], topic: str, peer_ip: str | None, verb: str) -> Decision:
        applicable, elsewhere = self._applicable(roles, peer_ip)
        for role in applicable:
            for pattern in getattr(role, verb):
                if _covers(pattern, topic):
                    return Decision(True, f"role {role.name} may {verb} {topic or '*'} ({pattern})")
        return Decision(False, _nobody(f"no role may {verb} {topic or '*'}", elsewhere, peer_ip))

    def may_register(self, identity: str | None, service: str) -> Decision:
        """May the node authenticated as `identity` register `service`?

        Only identities listed under `[nodes]` with a matching pattern may, so a rogue
        node cannot take over a service by registering it first.

        Args:
            identity: the node's CURVE key name or token subject; None when unauthenticated.
            service: the service it offers.

        Returns:
            The decision.
        """
        node = self.nodes.get(identity) if identity else None
        if node is None:
            return Decision(False, f"{identity or 'an unauthenticated node'} may not register services")
        pattern = node._services.match(service)
        if pattern is None:
            return Decision(False, f"node {identity} may not register {service}")
        return Decision(True, f"node {identity} may register {service} ({pattern})")


    def may_node_publish(self, identity: str | None, topic: str) -> Decision:
        """May the node authenticated as `identity` publish an event on `topic`?

        Nodes carry no token, so no role: their `[nodes.NAME]` rule's `publish` patterns
        decide, deny by default.
        """
        node = self.nodes.get(identity) if identity else None
        if node is None:
            return Decision(False, f"{identity or 'an unauthenticated node'} may not publish events")
        for pattern in node.publish:
            if _covers(pattern, topic):
                return Decision(True, f"node {identity} may publish {topic} ({pattern})")
        return Decision(False, f"node {identity} may not publish {topic}")


def _remember(cache: dict[tuple[Any, ...], Decision], key: tuple[Any, ...], decision: Decision) -> Decision:
    """Keep at most CACHE_SIZE decisions: a flood of distinct questions evicts the oldest."""
    if len(cache) >= CACHE_SIZE:
        del cache[next(iter(cache))]
    cache[key] = decision
    return decision


def _nobody(reason: str, elsewhere: list[str], peer_ip: str | None) -> str:
    if not elsewhere:
        return reason
    where = f"from {peer_ip}" if peer_ip else "from an unknown address"
    return f"{reason} (role {', '.join(elsewhere)} does not apply {where})"


class PolicyError(ProblemsError):
    """A policy file with one or more problems; `problems` lists them all."""


def load_policy(path: str | Path) -> Policy:
    """Read and check a TOML policy file.

    Args:
        path: the file.

    Returns:
        The policy.

    Raises:
        PolicyError: the file cannot be read or parsed, or has problems (all listed).
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(source, [Problem("(file)", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise PolicyError(source, [Problem("(file)", "not UTF-8 text")]) from None
    return policy_from_text(text, source)


def policy_from_text(text: str, source: str = "<policy>") -> Policy:
    """Check a policy given as TOML text (a file's, or one committed in a cluster's log).

    Raises:
        PolicyError: the text is not TOML or has problems (all listed).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(source, [Problem("(file)", f"not valid TOML: {exc}")]) from None
    except RecursionError:  # tomllib recurses per nested array; the text may come from a peer
        raise PolicyError(source, [Problem("(file)", "arrays or tables nest too deep")]) from None
    policy = parse_policy(data, source)
    policy.text = text
    return policy


def parse_policy(data: Mapping[str, Any], source: str = "<policy>") -> Policy:
    """Check a policy already read from TOML.

    Args:
        data: the TOML document.
        source: where it came from, for messages.

    Returns:
        The policy.

    Raises:
        PolicyError: listing every problem found.
    """
    c = _Checker()
    c.unknown(data, {"roles", "nodes"}, "")
    roles = {name: _role(c, name, raw) for name, raw in c.tables(data, "roles")}
    nodes = {name: _node(c, name, raw) for name, raw in c.tables(data, "nodes")}
    if c.problems:
        raise PolicyError(source, c.problems)
    return Policy(roles, nodes, source)


def _role(c: _Checker, name: str, raw: Mapping[str, Any]) -> Role:
    where = f"roles.{name}"
    c.unknown(raw, _ROLE_KEYS, where)
    commands = "service.action (wildcards * and ?) or *"
    allow = c.patterns(raw, "allow", where, _COMMAND_PATTERN, commands, _RENEW_BY_FLAG)
    deny = c.patterns(raw, "deny", where, _COMMAND_PATTERN, commands)
    cidrs = tuple(ipaddress.ip_network(text) for text in c.strings(raw, "cidrs", where, _network_problem))
    if raw.get("cidrs") == []:
        c.bad(f"{where}.cidrs", "is empty, so the role applies nowhere (leave it out to apply from anywhere)")
    renew = raw.get("renew", False)
    if not isinstance(renew, bool):
        c.bad(f"{where}.renew", f"must be true or false, got {renew!r}")
    topics = "a topic, topic.* or *"
    return Role(
        name=name,
        allow=allow,
        deny=deny,
        cidrs=cidrs,
        renew=renew is True,
        publish=c.patterns(raw, "publish", where, _TOPIC_PATTERN, topics),
        subscribe=c.patterns(raw, "subscribe", where, _TOPIC_PATTERN, topics),
    )


def _network_problem(text: str) -> str | None:
    try:
        ipaddress.ip_network(text)
    except ValueError as exc:
        return f"is not a network: {exc}"
    return None


def _node(c: _Checker, name: str, raw: Mapping[str, Any]) -> NodeRule:
    where = f"nodes.{name}"
    c.unknown(raw, {"services", "publish"}, where)
    services = c.patterns(raw, "services", where, _SERVICE_PATTERN, "a service name (wildcards * and ?)")
    publish = c.patterns(raw, "publish", where, _TOPIC_PATTERN, "a topic, topic.* or *")
    return NodeRule(name=name, services=services, publish=publish)


class _Checker(Checker):
    def tables(self, data: Mapping[str, Any], key: str) -> list[tuple[str, Mapping[str, Any]]]:
        """The named sub-tables of `[key]`, each with a good name and a table value."""
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.bad(key, "must be a table")
            return []
        found: list[tuple[str, Mapping[str, Any]]] = []
        for name, raw in value.items():
            if not _NAME.fullmatch(name):
                self.bad(f"{key}.{name}", "name must be letters, digits, '_' or '-'")
            if not isinstance(raw, dict):
                self.bad(f"{key}.{name}", "must be a table")
                continue
            found.append((name, raw))
        return found

    def strings(
        self, data: Mapping[str, Any], key: str, where: str, problem: Callable[[str], str | None]
    ) -> list[str]:
        """The distinct strings of array `key` for which `problem` finds nothing to say."""
        value = data.get(key, [])
        if not isinstance(value, list):
            self.bad(f"{where}.{key}", f"must be an array of strings, got {value!r}")
            return []
        good = []
        for i, item in enumerate(value):
            said = problem(item) if isinstance(item, str) else f"must be a string, got {item!r}"
            if said:
                self.bad(f"{where}.{key}[{i}]", said)
            else:
                good.append(item)
        return list(dict.fromkeys(good))

    def patterns(
        self,
        data: Mapping[str, Any],
        key: str,
        where: str,
        shape: re.Pattern[str],
        words: str,
        refused: Mapping[str, str] = MappingProxyType({}),
    ) -> tuple[str, ...]:
        """The distinct patterns of array `key` that have `shape` (described by `words`)."""

        def problem(item: str) -> str | None:
            return refused.get(item) if shape.fullmatch(item) else f"{item!r} is not {words}"

        return tuple(self.strings(data, key, where, problem))
