"""The fault suite's network: one Linux network namespace per host, joined by a bridge.

Rules of this module:

* Every object it makes is named with `PREFIX` (`mf-`): namespaces `mf-NAME`, the root
  side of each veth pair `mf-NAME`, the bridge `mf-br`. `cleanup()` removes every such
  object, so a run that crashed (or was SIGKILLed) is cleaned up by the next one; `Net`
  is a context manager that cleans up on every way out of its block.
* Addresses come from `SUBNET` (10.77.0.0/24), inside the namespaces only; the bridge
  holds `ROOT_ADDRESS` so the suite (in the root namespace) reaches every host, e.g. the
  brokers' monitors. Each namespace has its own loopback and ports.
* Faults on the network: partitions and packet loss are nftables rules in the hosts'
  namespaces (table `inet mf`, dropped silently, as a cut cable or a lossy link drops),
  healed by flushing them; latency and jitter are `tc netem` on the host's veth, when the
  kernel has `sch_netem`. Every command has a timeout: nothing here waits unbounded.
* At most `MAX_HOSTS` namespaces, and one `Net` at a time on the machine: it holds an
  exclusive lock on `LOCK` (the names are fixed, so a second run would remove the first's).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["PREFIX", "SUBNET", "ROOT_ADDRESS", "Host", "Net", "NetError", "unavailable", "cleanup"]

PREFIX: Final = "mf-"
BRIDGE: Final = f"{PREFIX}br"
SUBNET: Final = "10.77.0"
ROOT_ADDRESS: Final = f"{SUBNET}.254"
MAX_HOSTS: Final = 16
COMMAND_TIMEOUT_S: Final = 10.0
LOCK: Final = "/run/lock/mesh-faults.lock"
_TABLE: Final = (
    "table inet mf {\n"
    "  chain input { type filter hook input priority 0; policy accept; }\n"
    "  chain output { type filter hook output priority 0; policy accept; }\n"
    "}\n"
)


class NetError(RuntimeError):
    """A namespace, link or rule could not be made (the message says which command failed)."""


@dataclass(frozen=True, slots=True)
class Host:
    """One namespace: its short name (`h1`), namespace, address and root-side veth."""

    name: str
    address: str

    @property
    def netns(self) -> str:
        return f"{PREFIX}{self.name}"

    @property
    def veth(self) -> str:
        return f"{PREFIX}{self.name}"

    def exec(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NetError(f"{' '.join(argv)}: {err}") from None
    if check and done.returncode != 0:
        raise NetError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can (root, `ip`, `nft`)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 nftables)"
    probe = f"{PREFIX}probe"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "netns", "exec", probe, "nft", "-f", "-"], check=False)
    except NetError as err:
        return f"cannot make a network namespace: {err}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def cleanup() -> list[str]:
    """Remove every namespace and link named with `PREFIX`; returns what it removed."""
    removed = []
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(f"netns {name}")
    for m in re.finditer(r"^\d+: ([^:@\s]+)[@:]", _run(["ip", "-o", "link", "show"], check=False).stdout, re.M):
        if m.group(1).startswith(PREFIX):
            _run(["ip", "link", "del", m.group(1)], check=False)
            removed.append(f"link {m.group(1)}")
    return removed


class Net:
    """The namespaces of `hosts`, made on entering the `with` block, removed on leaving it.

    Args:
        hosts: short names (`h1`, ...), in address order: the n-th gets SUBNET.n+1 unless
            `addresses` names it.
        addresses: short name -> last octet, for hosts that need a fixed one.
    """

    def __init__(self, hosts: Iterable[str], addresses: dict[str, int] | None = None) -> None:
        names = list(hosts)
        if not 0 < len(names) <= MAX_HOSTS:
            raise ValueError(f"between 1 and {MAX_HOSTS} hosts")
        fixed = addresses or {}
        self.hosts = {n: Host(n, f"{SUBNET}.{fixed.get(n, i + 1)}") for i, n in enumerate(names)}
        self.netem = False  # whether `tc netem` works on this kernel (known after `up`)
        self._lock: int | None = None

    def __enter__(self) -> Net:
        Path(LOCK).parent.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise NetError(f"another fault run holds {LOCK}; one at a time") from None
        try:
            self.up()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            cleanup()
        finally:
            if self._lock is not None:
                os.close(self._lock)  # releases the lock
                self._lock = None

    def up(self) -> None:
        """Make the bridge, a namespace and veth pair per host, and each host's empty rule table."""
        cleanup()
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "addr", "add", f"{ROOT_ADDRESS}/24", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        for h in self.hosts.values():
            _run(["ip", "netns", "add", h.netns])
            _run(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns])
            _run(["ip", "link", "set", h.veth, "master", BRIDGE, "up"])
            _run(h.exec(["ip", "addr", "add", f"{h.address}/24", "dev", "eth0"]))
            _run(h.exec(["ip", "link", "set", "eth0", "up"]))
            _run(h.exec(["ip", "link", "set", "lo", "up"]))
            self._nft(h, _TABLE)
        h = next(iter(self.hosts.values()))
        self.netem = _run(["tc", "qdisc", "add", "dev", h.veth, "root", "netem", "delay", "1ms"], check=False).returncode == 0
        _run(["tc", "qdisc", "del", "dev", h.veth, "root"], check=False)

    @staticmethod
    def _nft(h: Host, script: str) -> None:
        try:
            done = subprocess.run(h.exec(["nft", "-f", "-"]), input=script, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NetError(f"nft in {h.netns}: {err}") from None
        if done.returncode != 0:
            raise NetError(f"nft in {h.netns}: {done.stderr.strip()}")

    def inode(self, host: str) -> int:
        """The namespace's inode: a process is in it when /proc/PID/ns/net names it."""
        return os.stat(f"/run/netns/{self.hosts[host].netns}").st_ino

    def partition(self, *sides: Iterable[str]) -> None:
        """Cut every host of one side from every host of another (hosts in no side keep
        every link). Traffic is dropped both ways, silently."""
        groups = [list(s) for s in sides]
        for i, a_side in enumerate(groups):
            for b_side in groups[i + 1 :]:
                for a in a_side:
                    for b in b_side:
                        self.cut(a, b)

    def cut(self, a: str, b: str) -> None:
        """Drop all traffic between hosts `a` and `b`, both ways."""
        for x, y in ((a, b), (b, a)):
            addr = self.hosts[y].address
            self._nft(self.hosts[x], f"add rule inet mf input ip saddr {addr} drop\nadd rule inet mf output ip daddr {addr} drop\n")

    def loss(self, hosts: Iterable[str], per_mille: int) -> None:
        """Drop `per_mille`/1000 of the packets each of `hosts` sends and receives, at random."""
        for name in hosts:
            rule = f"numgen random mod 1000 < {int(per_mille)} drop"
            self._nft(self.hosts[name], f"add rule inet mf input {rule}\nadd rule inet mf output {rule}\n")

    def delay(self, hosts: Iterable[str], delay_ms: int, jitter_ms: int) -> None:
        """Delay every packet each of `hosts` receives by `delay_ms` +- `jitter_ms` (tc netem).

        Raises:
            NetError: the kernel has no `sch_netem` (see `netem`).
        """
        for name in hosts:
            _run(["tc", "qdisc", "replace", "dev", self.hosts[name].veth, "root", "netem",
                  "delay", f"{delay_ms}ms", f"{jitter_ms}ms"])  # fmt: skip

    def heal(self) -> None:
        """Undo every partition, loss and delay."""
        for h in self.hosts.values():
            self._nft(h, "flush chain inet mf input\nflush chain inet mf output\n")
            if self.netem:
                _run(["tc", "qdisc", "del", "dev", h.veth, "root"], check=False)
