"""Placement: which host runs each broker and node of a topology, and whether they reach each other.

Rules of this module (docs/topologies.md, "Several machines"):

* A topology with a `[hosts]` table places every broker and node on a named host
  (`host = "NAME"`); each host has the `address` the other hosts reach it at. Without
  `[hosts]` the whole mesh runs on one machine, as it always did.
* An endpoint of an entry on host H is written with H's address (reachable from every
  host), with a wildcard address (`tcp://*:PORT` or `tcp://0.0.0.0:PORT`: the process
  listens on every interface and the others dial H's address, see `dial`), or as
  local-only (a loopback address, `localhost`, `ipc://`): reachable on H's machine only.
  Any other address is a problem: H could not listen on it.
* Two hosts are one machine when they are the same host, have the same address, or both
  have loopback addresses (tests on one machine use 127.0.0.1, 127.0.0.2, ...).
* Who dials whom, inside a topology: a node dials the `nodes` endpoint of every broker it
  serves (every broker, in a cluster); a broker of a cluster dials every other broker's
  `peer`. A local-only endpoint dialled from another machine, and a port `*` dialled from
  another host (that host's launcher cannot learn the port chosen), are problems at the
  endpoint's key. Clients, subscribers and monitor readers are outside the topology; their
  endpoints are checked for the host's address only.
* Pure: no sockets, no name resolution.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .problems import Checker
from .protocol import NAME_PATTERN

if TYPE_CHECKING:
    from .topology import BrokerSpec, NodeSpec

__all__ = ["LOCAL_ADDRESS", "WILDCARDS", "HostSpec", "check_placement", "dial", "entry_host", "parse_hosts"]

WILDCARDS: Final = frozenset({"*", "0.0.0.0"})
LOCAL_ADDRESS: Final = "127.0.0.1"  # what a wildcard is dialled at when the mesh has no [hosts]
_TCP: Final = re.compile(r"tcp://(?P<address>[^\s:]+):(?P<port>\d{1,5}|\*)")
_NAME: Final = re.compile(NAME_PATTERN)
_ADDRESS: Final = re.compile(r"[^\s:/\[\]]+")  # an IPv4 address or a DNS name, as a tcp:// endpoint holds it


@dataclass(frozen=True, slots=True)
class HostSpec:
    """One `[hosts.NAME]` table: `address` is where the other hosts reach this one."""

    name: str
    address: str


def dial(endpoint: str, address: str) -> str:
    """The endpoint other processes connect to: a wildcard address replaced by `address`.

    Args:
        endpoint: an endpoint as a broker listens on it (`tcp://*:5656`, `tcp://0.0.0.0:5656`,
            `tcp://10.77.0.1:5656`, `ipc://...`).
        address: the address of the host the broker runs on.

    Returns:
        `endpoint`, with `address` in place of a wildcard address.
    """
    m = _TCP.fullmatch(endpoint)
    if m is not None and m["address"] in WILDCARDS:
        return f"tcp://{address}:{m['port']}"
    return endpoint


def _loopback(address: str) -> bool:
    from .monitor.server import is_loopback

    return is_loopback(address)


def _same_machine(a: HostSpec, b: HostSpec) -> bool:
    return a.name == b.name or a.address == b.address or (_loopback(a.address) and _loopback(b.address))


def parse_hosts(c: Checker, raw: Any) -> dict[str, HostSpec]:
    """The `[hosts]` table: each host's name and address."""
    if not isinstance(raw, dict) or not raw:
        c.bad("hosts", "must be a table with one [hosts.NAME] table per machine, each with an address")
        return {}
    hosts: dict[str, HostSpec] = {}
    for name, table in raw.items():
        where = f"hosts.{name}"
        if not _NAME.fullmatch(name):
            c.bad(where, "name must be letters, digits, '_' or '-'")
        if not isinstance(table, dict):
            c.bad(where, 'must be a table (address = "10.0.0.1")')
            continue
        c.unknown(table, {"address"}, where)
        address = table.get("address")
        if address is None:
            c.bad(f"{where}.address", f"is required: the address the other hosts reach {name} at")
        elif not isinstance(address, str) or not _ADDRESS.fullmatch(address):
            c.bad(f"{where}.address", f"must be an IPv4 address or a host name, got {address!r}")
        elif address in WILDCARDS:
            c.bad(f"{where}.address", f"{address!r} is a wildcard; give the address the other hosts reach {name} at")
        else:
            hosts[name] = HostSpec(name, address)
    return hosts


def entry_host(c: Checker, raw: Mapping[str, Any], where: str, hosts: Collection[str] | None) -> str | None:
    """The `host` of a broker or node table.

    Args:
        c: collects the problems.
        raw: the broker's or node's table.
        where: its dotted key.
        hosts: the names of the `[hosts]` table (even those with a bad address, reported
            there), or None when the topology has none.
    """
    if hosts is None:
        if "host" in raw:
            c.bad(f"{where}.host", 'needs a [hosts] table naming the host and its address ([hosts.NAME] address = "...")')
        return None
    host = raw.get("host")
    names = ", ".join(hosts) or "none"
    if host is None:
        c.bad(f"{where}.host", f"is required: the file has [hosts], so every broker and node names where it runs (hosts: {names})")
    elif not isinstance(host, str):
        c.bad(f"{where}.host", f"must be a string, got {host!r}")
    elif host not in hosts:
        c.bad(f"{where}.host", f"no host named {host!r} (hosts: {names})")
    else:
        return host
    return None


def check_placement(
    c: Checker, hosts: Mapping[str, HostSpec], brokers: Mapping[str, BrokerSpec], nodes: Mapping[str, NodeSpec],
    *, clustered: bool,
) -> None:  # fmt: skip
    """Each endpoint's address against its host's, then every link between hosts (module rules)."""
    for b in brokers.values():
        if b.host is not None and b.host in hosts:
            _check_addresses(c, f"brokers.{b.name}", hosts[b.host], b)
    dialers: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (broker, side) -> [(who, host)]
    for n in nodes.values():
        for served in brokers if clustered else [n.broker]:
            if n.host is not None and served in brokers:
                dialers.setdefault((served, "nodes"), []).append((f"node {n.name}", n.host))
    if clustered:
        for b in brokers.values():
            for other in brokers.values():
                if other.name != b.name and other.host is not None:
                    dialers.setdefault((b.name, "peer"), []).append((f"broker {other.name}", other.host))
    for (bname, side), who in dialers.items():
        b = brokers[bname]
        if b.host is not None and b.host in hosts:
            _check_reach(c, f"brokers.{bname}.{side}", getattr(b, side), hosts[b.host], who, hosts)


def _check_addresses(c: Checker, where: str, host: HostSpec, b: BrokerSpec) -> None:
    """An endpoint's address is its host's, a wildcard or local-only: the host can listen on it."""
    for side in ("clients", "nodes", "events", "peer"):
        m = _TCP.fullmatch(getattr(b, side) or "")
        if m is not None and not _listenable(m["address"], host):
            port = m["port"]
            c.bad(
                f"{where}.{side}",
                f"{m.group(0)} is not host {host.name}'s address ({host.address}): "
                f"write tcp://{host.address}:{port}, or tcp://*:{port} to listen on every interface",
            )
    if b.monitor is not None:
        address, _, port = b.monitor.rpartition(":")
        address = address.removeprefix("[").removesuffix("]")
        if address and not _listenable(address, host):
            c.bad(
                f"{where}.monitor",
                f"{b.monitor} is not host {host.name}'s address ({host.address}): "
                f"write {host.address}:{port}, or 0.0.0.0:{port} to listen on every interface",
            )


def _listenable(address: str, host: HostSpec) -> bool:
    return address in WILDCARDS or address == host.address or _loopback(address)


def _check_reach(
    c: Checker, key: str, endpoint: str, host: HostSpec, dialers: Iterable[tuple[str, str]], hosts: Mapping[str, HostSpec],
) -> None:  # fmt: skip
    """`endpoint` of a broker on `host` is dialled by `dialers` (who, host): can each reach it?"""
    others = [(who, h) for who, h in dialers if h != host.name and h in hosts]
    m = _TCP.fullmatch(endpoint)
    if m is not None and m["port"] == "*" and others:
        c.bad(key, f"needs a fixed port: {_names(others)} {_dial(others)} it from another host, whose mesh up cannot learn a port chosen on {host.name}")
        return
    far = [(who, h) for who, h in others if not _same_machine(host, hosts[h])]
    if not far:
        return
    if m is None:
        c.bad(key, f"{endpoint} can be reached on host {host.name}'s machine only, but {_names(far)} {_dial(far)} it from another machine; use tcp://{host.address}:PORT")
        return
    address = host.address if m["address"] in WILDCARDS else m["address"]
    if not _loopback(address):
        return
    if address == host.address:
        c.bad(key, f"host {host.name}'s address {address} is a loopback address, which {_names(far)} cannot reach from another machine: give hosts.{host.name}.address the address the other machines reach it at")
    else:
        c.bad(key, f"{endpoint} is a loopback address, reachable on host {host.name}'s machine only, but {_names(far)} {_dial(far)} it from another machine; write tcp://{host.address}:{m['port']} or tcp://*:{m['port']}")


def _names(dialers: list[tuple[str, str]]) -> str:
    return ", ".join(f"{who} on {h}" for who, h in dialers)


def _dial(dialers: list[tuple[str, str]]) -> str:
    return "dials" if len(dialers) == 1 else "dial"
