"""The one topology schema: which brokers and nodes a mesh runs, read from TOML.

Rules of this module:

* `load()` reads a file and `parse()` checks a dict; both collect every problem (with the
  dotted key it is at) before raising one `TopologyError`, so a user fixes a file in one
  pass.
* Relative paths in node configs stay as written: every process runs in the directory
  `mesh up` was started in, which is what users expect of paths they type.
* With a `[hosts]` table every broker and node names the host it runs on
  (`mesh.placement` holds those rules; docs/topologies.md, "Several machines").
* With a `[cluster]` table the brokers are one cluster (docs/topologies.md, "Clusters"):
  every broker names its `peer` endpoint, and every node serves every broker, so a node
  table has no `broker` key. Without it, brokers are independent, as they always were.
* The keys of a `[brokers.NAME]` table are the broker settings of `mesh.broker.settings`;
  `Topology.broker_settings(NAME)` gives one broker everything it runs with, which is how
  `mesh broker --topology FILE --name NAME` (and so `mesh up`) starts it.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from .broker.config import BrokerConfig
from .broker.events import DEFAULT_RULE, RetentionRule
from .broker.settings import BACKLOG, BROKER_TABLE, IO_THREADS, LIMITS, SETTINGS, BrokerSettings, Setting
from .placement import LOCAL_ADDRESS, HostSpec, check_placement, dial, entry_host, parse_hosts
from .plugins import plugin_problem
from .problems import Checker, Problem, ProblemsError
from .protocol import NAME_PATTERN, TOPIC_PATTERN, MeshError

__all__ = [
    "BrokerSpec",
    "ClusterSpec",
    "HostSpec",
    "NodeSpec",
    "Problem",
    "SecuritySpec",
    "Topology",
    "TopologyError",
    "load",
    "parse",
]

_NAME: Final = re.compile(NAME_PATTERN)
_BROKER: Final = BrokerConfig()  # the defaults a topology does not repeat
_BROKER_KEYS: Final = frozenset(s.key for s in BROKER_TABLE) | {"peer", "host"}
_ENDPOINT: Final = re.compile(r"(tcp://[^\s:]+:(\d{1,5}|\*)|ipc://\S+)")
_SPEC: Final = re.compile(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?")
_TOPIC: Final = re.compile(TOPIC_PATTERN)
DEFAULT_EVENTS: Final = "tcp://127.0.0.1:*"
DEFAULT_CLUSTER_DATA: Final = "var/cluster"
MIN_ELECTION_TICKS: Final = next(s.minimum for s in SETTINGS if s.key == "election_ticks")
_SOCKET_SETTINGS: Final = tuple(s for s in BROKER_TABLE if s.key in ("backlog", "io_threads"))


class TopologyError(ProblemsError):
    """A topology file with one or more problems; `problems` lists them all."""


@dataclass(frozen=True, slots=True)
class BrokerSpec:
    """One `[brokers.NAME]` table; `limits` holds its name and the core's limits (`LIMITS`, `retention`)."""

    name: str
    clients: str
    nodes: str
    limits: BrokerConfig = _BROKER
    events: str = DEFAULT_EVENTS
    monitor: str | None = None  # HOST:PORT of the HTTP monitor; None: off
    monitor_token_file: str | None = None
    peer: str | None = None  # the cluster peer endpoint; set exactly when the topology has [cluster]
    host: str | None = None  # where it runs; set exactly when the topology has [hosts]
    backlog: int = BACKLOG
    io_threads: int = IO_THREADS


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One `[nodes.NAME]` table: `capacity` and `heartbeat_interval` None keep the node's own.

    In a cluster `broker` is the first broker's name, but the node serves every broker.
    """

    name: str
    use: str
    broker: str
    replicas: int = 1
    capacity: int | None = None
    heartbeat_interval: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dedupe: bool = True  # False: the node keeps no resend table (tests of exactly-once only)
    host: str | None = None  # where it runs; set exactly when the topology has [hosts]


@dataclass(frozen=True, slots=True)
class SecuritySpec:
    """The `[security]` table: on when present with `enabled = true` (docs/security.md)."""

    state: str = "var/mesh"
    min_level: int = 1
    service_levels: dict[str, int] = field(default_factory=dict)
    clients: tuple[str, ...] = ("dev",)
    allow_ips: tuple[str, ...] = ()
    deny_ips: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The `[cluster]` table: the brokers form one cluster, each keeps its log in `data`/NAME.

    `election_ticks` None keeps the broker's default.
    """

    data: str = DEFAULT_CLUSTER_DATA
    learners: tuple[str, ...] = ()
    election_ticks: int | None = None


@dataclass(frozen=True, slots=True)
class Topology:
    """A checked topology file (`security` None: security off; `cluster` None: no cluster;
    `hosts` empty: no `[hosts]`, everything runs on one machine)."""

    name: str
    brokers: dict[str, BrokerSpec]
    nodes: dict[str, NodeSpec]
    source: str = "<topology>"
    security: SecuritySpec | None = None
    cluster: ClusterSpec | None = None
    hosts: dict[str, HostSpec] = field(default_factory=dict)
    text: str = ""  # the TOML it was read from, for `mesh up` to start brokers from ("" from `parse`)

    def dial(self, endpoint: str, broker: str) -> str:
        """Where other processes connect to `endpoint` of `broker`: a wildcard address
        (`tcp://*:PORT`) becomes the address of the broker's host (127.0.0.1 without `[hosts]`)."""
        host = self.brokers[broker].host
        return dial(endpoint, self.hosts[host].address if host is not None else LOCAL_ADDRESS)

    def broker_settings(self, name: str) -> BrokerSettings:
        """Everything broker `name` runs with: its table, `[security]` and `[cluster]`.

        A cluster member gets every member's peer endpoint: its own as written (it listens
        there), the others' as dialled; and its log directory is `[cluster] data`/NAME.

        Raises:
            KeyError: the topology has no broker `name`.
        """
        b = self.brokers[name]
        settings = BrokerSettings(
            b.limits, b.clients, b.nodes, b.events, monitor=b.monitor, monitor_token_file=b.monitor_token_file,
            backlog=b.backlog, io_threads=b.io_threads,
        )
        if self.security is not None:
            sec = self.security
            settings = replace(settings, state=sec.state, min_level=sec.min_level, service_levels=sec.service_levels,
                               allow_ips=sec.allow_ips, deny_ips=sec.deny_ips)
        if self.cluster is not None:
            peers = {m.name: m.peer or "" for m in self.brokers.values()}  # each member names one (checked)
            members = {n: peer if n == name else self.dial(peer, n) for n, peer in peers.items()}
            settings = replace(settings, members=members, data=str(Path(self.cluster.data) / name),
                               learners=self.cluster.learners, election_ticks=self.cluster.election_ticks)
        return settings


class _Checker(Checker):
    def table(self, data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.bad(f"{where}{key}", "must be a table")
            return {}
        return value

    def get(self, data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any, *, required: bool = False) -> Any:
        if key not in data:
            if required:
                self.bad(f"{where}.{key}", "is required")
            return default
        value = data[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.bad(f"{where}.{key}", f"must be {_TYPE_WORDS.get(names, names)}, got {value!r}")
            return default
        return value


_TYPE_WORDS: Final = {"str": "a string", "int": "an integer", "int or float": "a number", "dict": "a table", "list": "a list"}


def _bounded(c: _Checker, raw: dict[str, Any], s: Setting, where: str) -> int:
    """An int setting of a `[brokers.NAME]` table within its `minimum` and `maximum`."""
    value: int = c.get(raw, s.key, int, where, s.default)  # a wrong type is reported and gives the default
    if not s.minimum <= value <= s.maximum:  # type: ignore[operator]
        c.bad(f"{where}.{s.key}", f"must be from {s.minimum} to {s.maximum}, got {value}")
        return int(s.default)
    return value


def _positive(c: _Checker, value: float, key: str) -> None:
    if value <= 0:
        c.bad(key, f"must be greater than 0, got {value}")


def parse(data: dict[str, Any], source: str = "<topology>") -> Topology:
    """Check a topology already read from TOML.

    Raises:
        TopologyError: listing every problem found.
    """
    c = _Checker()
    c.unknown(data, {"mesh", "brokers", "nodes", "security", "cluster", "hosts"}, "")
    clustered = "cluster" in data
    hosts = parse_hosts(c, data["hosts"]) if "hosts" in data else None
    host_names = (list(data["hosts"]) if isinstance(data["hosts"], dict) else []) if "hosts" in data else None
    mesh = c.table(data, "mesh", "")
    c.unknown(mesh, {"name"}, "mesh")
    name = c.get(mesh, "name", str, "mesh", "mesh")

    brokers: dict[str, BrokerSpec] = {}
    endpoints: dict[tuple[str | None, str], str] = {}  # (host, endpoint) -> its key: one per host
    raw_brokers = c.table(data, "brokers", "")
    if not raw_brokers:
        c.bad("brokers", "at least one broker is required ([brokers.NAME])")
    for bname, raw in raw_brokers.items():
        spec = _broker(c, bname, raw, clustered, host_names, endpoints, data.get("security"))
        if spec is not None:
            brokers[bname] = spec
    nodes: dict[str, NodeSpec] = {}
    for nname, raw in c.table(data, "nodes", "").items():
        spec_n = _node(c, nname, raw, clustered, host_names, list(raw_brokers), next(iter(brokers), ""))
        if spec_n is not None:
            nodes[nname] = spec_n

    security = _security(c, data.get("security"), set(nodes))
    cluster = _cluster(c, data["cluster"], list(raw_brokers)) if clustered else None
    if hosts:
        check_placement(c, hosts, brokers, nodes, clustered=clustered)
    if c.problems:
        raise TopologyError(source, c.problems)
    return Topology(
        name=name, brokers=brokers, nodes=nodes, source=source, security=security, cluster=cluster, hosts=hosts or {}
    )


def _broker(
    c: _Checker, bname: str, raw: Any, clustered: bool, host_names: list[str] | None,
    endpoints: dict[tuple[str | None, str], str], security: Any,
) -> BrokerSpec | None:  # fmt: skip
    """One `[brokers.NAME]` table; `endpoints` collects every endpoint per host, to refuse one used twice."""
    where = f"brokers.{bname}"
    if not _NAME.fullmatch(bname):
        c.bad(where, "name must be letters, digits, '_' or '-'")
    if not isinstance(raw, dict):
        c.bad(where, "must be a table")
        return None
    c.unknown(raw, set(_BROKER_KEYS), where)
    if "peer" in raw and not clustered:
        c.bad(f"{where}.peer", "needs a [cluster] table (a peer endpoint is for a cluster of brokers)")
    elif clustered and "peer" not in raw:
        c.bad(f"{where}.peer", f"is required in a cluster: broker {bname} needs the endpoint its peers dial (peer = \"tcp://HOST:PORT\")")
    host = entry_host(c, raw, where, host_names)
    eps = {}
    for side in ("clients", "nodes", "events", "peer"):
        ep = c.get(raw, side, str, where, "", required=side in ("clients", "nodes"))
        m = _ENDPOINT.fullmatch(ep) if ep else None
        if ep and (m is None or (m.group(2) not in (None, "*") and not 0 < int(m.group(2)) < 65536)):
            c.bad(f"{where}.{side}", f"{ep!r} is not a ZeroMQ endpoint (tcp://HOST:PORT with a port from 1 to 65535, or ipc://PATH)")
        elif side == "peer" and m is not None and m.group(2) == "*":
            c.bad(f"{where}.peer", "needs a fixed port: the other brokers dial it")
        elif ep and (host, ep) in endpoints:
            c.bad(f"{where}.{side}", f"{ep} is already used by {endpoints[host, ep]}")
        elif ep:
            endpoints[host, ep] = f"{where}.{side}"
        eps[side] = ep
    spec = BrokerSpec(
        name=bname,
        clients=eps["clients"],
        nodes=eps["nodes"],
        limits=_limits(c, raw, bname, where),
        events=eps["events"] or DEFAULT_EVENTS,
        monitor=c.get(raw, "monitor", str, where, None),
        monitor_token_file=c.get(raw, "monitor_token_file", str, where, None),
        peer=eps["peer"] or None,
        host=host,
        **{s.key: _bounded(c, raw, s, where) for s in _SOCKET_SETTINGS},
    )
    _monitor(c, spec, where, security)
    return spec


def _node(
    c: _Checker, nname: str, raw: Any, clustered: bool, host_names: list[str] | None,
    broker_names: list[str], default_broker: str,
) -> NodeSpec | None:  # fmt: skip
    """One `[nodes.NAME]` table; its plugin is loaded to check `use` and `config`."""
    where = f"nodes.{nname}"
    if not _NAME.fullmatch(nname):
        c.bad(where, "name must be letters, digits, '_' or '-'")
    if not isinstance(raw, dict):
        c.bad(where, "must be a table")
        return None
    c.unknown(raw, {"use", "broker", "replicas", "capacity", "heartbeat_interval", "config", "dedupe", "host"}, where)
    use = c.get(raw, "use", str, where, "", required=True)
    if use and not _SPEC.fullmatch(use):
        c.bad(f"{where}.use", f"{use!r} is neither a node name (echo) nor module:attribute")
    broker = c.get(raw, "broker", str, where, default_broker)
    if "broker" in raw and clustered:
        c.bad(f"{where}.broker", "a node of a cluster serves every broker; remove this key")
    elif "broker" in raw and isinstance(broker, str) and broker not in broker_names:
        c.bad(f"{where}.broker", f"no broker named {broker!r} (brokers: {', '.join(broker_names) or 'none'})")
    spec = NodeSpec(
        name=nname,
        use=use,
        broker=broker,
        replicas=c.get(raw, "replicas", int, where, 1),
        capacity=c.get(raw, "capacity", int, where, None),
        heartbeat_interval=_float_or_none(c.get(raw, "heartbeat_interval", (int, float), where, None)),
        config=c.get(raw, "config", dict, where, {}),
        dedupe=c.get(raw, "dedupe", bool, where, True),
        host=entry_host(c, raw, where, host_names),
    )
    _positive(c, spec.replicas, f"{where}.replicas")
    for key in ("capacity", "heartbeat_interval"):
        if getattr(spec, key) is not None:
            _positive(c, getattr(spec, key), f"{where}.{key}")
    _check_config(c, spec.config, f"{where}.config")
    if use and _SPEC.fullmatch(use):
        problem = plugin_problem(use, spec.config)
        if problem:
            c.bad(f"{where}.use", problem)
    return spec


def _limits(c: _Checker, raw: dict[str, Any], name: str, where: str) -> BrokerConfig:
    """The core's limits from a `[brokers.NAME]` table: each a positive number (`LIMITS`)."""
    values: dict[str, Any] = {}
    for s in LIMITS:
        value = c.get(raw, s.key, (int, float) if s.kind is float else s.kind, where, s.default)
        values[s.core or s.key] = s.kind(value)
        _positive(c, value, f"{where}.{s.key}")
    return BrokerConfig(name=name, retention=_retention(c, raw.get("retention"), f"{where}.retention"), **values)


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _cluster(c: _Checker, raw: Any, broker_names: list[str]) -> ClusterSpec | None:
    """`[cluster]`: an odd number of at least 3 voters, so a majority survives a lost broker."""
    if not isinstance(raw, dict):
        c.bad("cluster", "must be a table")
        return None
    where = "cluster"
    c.unknown(raw, {"data", "learners", "election_ticks"}, where)
    data = c.get(raw, "data", str, where, DEFAULT_CLUSTER_DATA)
    if not data:
        c.bad(f"{where}.data", "must name a directory (each broker keeps its log in DATA/NAME)")
    learners = _strings(c, raw, "learners", where, [])
    for learner in sorted(set(learners)):
        if learner not in broker_names:
            c.bad(f"{where}.learners", f"no broker named {learner!r} (brokers: {', '.join(broker_names) or 'none'})")
        if learners.count(learner) > 1:
            c.bad(f"{where}.learners", f"{learner!r} is listed twice")
    voters = [b for b in broker_names if b not in learners]
    if len(voters) < 3 or len(voters) % 2 == 0:
        c.bad(
            where,
            f"needs an odd number of at least 3 voting brokers, has {len(voters)} ({', '.join(voters) or 'none'}): "
            "a majority must survive the loss of a broker, and an even count adds a broker without adding safety",
        )
    ticks = c.get(raw, "election_ticks", int, where, None)
    if ticks is not None and ticks < MIN_ELECTION_TICKS:
        c.bad(f"{where}.election_ticks", f"must be {MIN_ELECTION_TICKS} or more, got {ticks}")
    return ClusterSpec(data=data, learners=tuple(dict.fromkeys(learners)), election_ticks=ticks)


def _security(c: _Checker, raw: Any, node_names: set[str]) -> SecuritySpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        c.bad("security", "must be a table")
        return None
    where = "security"
    c.unknown(raw, {"enabled", "state", "min_level", "service_levels", "clients", "allow_ips", "deny_ips"}, where)
    if not c.get(raw, "enabled", bool, where, True):
        return None
    levels = c.get(raw, "service_levels", dict, where, {})
    for svc, level in levels.items():
        if not _NAME.fullmatch(svc):
            c.bad(f"{where}.service_levels.{svc}", "is not a service name")
        if isinstance(level, bool) or level not in (0, 1, 2, 3):
            c.bad(f"{where}.service_levels.{svc}", f"must be a level from 0 to 3, got {level!r}")
    min_level = c.get(raw, "min_level", int, where, 1)
    if not 1 <= min_level <= 3:
        c.bad(f"{where}.min_level", f"must be 1 (tokens), 2 (encrypted) or 3 (signed), got {min_level}")
    clients = tuple(_strings(c, raw, "clients", where, ["dev"]))
    for client in clients:
        if not _NAME.fullmatch(client):
            c.bad(f"{where}.clients", f"{client!r} is not a name")
        elif client in node_names:
            c.bad(f"{where}.clients", f"{client!r} is also a node's name; keys are per name")
    allow, deny = _strings(c, raw, "allow_ips", where, []), _strings(c, raw, "deny_ips", where, [])
    if allow and deny:
        c.bad(f"{where}.deny_ips", "use allow_ips or deny_ips, not both")
    return SecuritySpec(
        state=c.get(raw, "state", str, where, "var/mesh"),
        min_level=min_level,
        service_levels=dict(levels),
        clients=clients,
        allow_ips=tuple(allow),
        deny_ips=tuple(deny),
    )


def _monitor(c: _Checker, spec: BrokerSpec, where: str, security: Any) -> None:
    """A monitor address is HOST:PORT; off loopback it needs a token file (docs/monitoring.md)."""
    if spec.monitor is None:
        if spec.monitor_token_file is not None:
            c.bad(f"{where}.monitor_token_file", "needs a monitor address (monitor = \"127.0.0.1:PORT\")")
        return
    from .monitor.server import is_loopback, parse_address

    try:
        host, _ = parse_address(spec.monitor)
    except MeshError as err:
        c.bad(f"{where}.monitor", err.message.removeprefix("monitor: "))
        return
    secured = isinstance(security, dict) and security.get("enabled", True) is not False
    if spec.monitor_token_file is None and not is_loopback(host) and not secured:
        c.bad(f"{where}.monitor_token_file", f"is required: {host} is reachable from other machines")


def _strings(c: _Checker, raw: dict[str, Any], key: str, where: str, default: list[str]) -> list[str]:
    value = c.get(raw, key, list, where, default)
    if not all(isinstance(v, str) for v in value):
        c.bad(f"{where}.{key}", "must be a list of strings")
        return default
    return value


def _retention(c: _Checker, raw: Any, key: str) -> tuple[RetentionRule, ...]:
    """`[[brokers.NAME.retention]]` tables: prefix, max_events, max_bytes."""
    if raw is None:
        return _BROKER.retention
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        c.bad(key, "must be an array of tables ([[brokers.NAME.retention]])")
        return _BROKER.retention
    rules: list[RetentionRule] = []
    prefixes: set[str] = set()
    for i, r in enumerate(raw):
        where = f"{key}[{i}]"
        c.unknown(r, {"prefix", "max_events", "max_bytes"}, where)
        prefix = c.get(r, "prefix", str, where, "")
        if prefix and not _TOPIC.fullmatch(prefix):
            c.bad(f"{where}.prefix", f"{prefix!r} is not a topic ('' covers every topic)")
        elif prefix in prefixes:
            c.bad(f"{where}.prefix", f"{prefix!r} has a rule already")
        prefixes.add(prefix)
        rule = RetentionRule(
            prefix,
            c.get(r, "max_events", int, where, DEFAULT_RULE.max_events),
            c.get(r, "max_bytes", int, where, DEFAULT_RULE.max_bytes),
        )
        for name in ("max_events", "max_bytes"):
            if getattr(rule, name) < 0:
                c.bad(f"{where}.{name}", f"must be 0 (keep none) or more, got {getattr(rule, name)}")
        rules.append(rule)
    return tuple(rules)


def _check_config(c: _Checker, value: Any, key: str) -> None:
    """Node configs travel as JSON: refuse what JSON cannot carry (TOML dates, times)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_config(c, v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_config(c, v, f"{key}[{i}]")
    elif not isinstance(value, (str, int, float, bool)):
        c.bad(key, f"a {type(value).__name__} cannot be passed to a node; use a string")


def load(path: str | Path) -> Topology:
    """Read and check a topology file.

    Raises:
        TopologyError: the file is missing, not TOML, or has problems (all listed).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise TopologyError(str(p), [Problem("file", exc.strerror or str(exc))]) from None
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(str(p), [Problem("syntax", str(exc))]) from None
    except RecursionError:
        raise TopologyError(str(p), [Problem("syntax", "arrays or tables nest too deep")]) from None
    return replace(parse(data, str(p)), text=text)
