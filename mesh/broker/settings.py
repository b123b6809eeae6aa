"""Every setting of `mesh broker`, described once, and the settings one broker runs with.

Rules of this module:

* `SETTINGS` is the one description of each setting: its name, type, default, help, and
  where a topology file holds it. The `mesh broker` flags are made from it (mesh.cli.broker) and
  so are the keys of a topology's `[brokers.NAME]` table (mesh.topology); nothing else
  lists them again. The core's limits keep their defaults in `BrokerConfig` (the sans-IO
  core is usable without this module); their entries here point at its fields.
* `BrokerSettings` is what one broker process runs with, however it was described:
  `Topology.broker_settings(NAME)` (what `mesh broker --topology FILE --name NAME` and
  `mesh up` use) and the flags of a broker run without a topology both end in one.
* A setting with a `topology` place comes from the topology when one is given; a flag for
  it next to `--topology` is refused (docs/operations.md says why). One without (the
  token algorithm, the monitor's TLS files, logging) is a flag in both cases.
* No I/O and no ZeroMQ here: turning settings into sockets is the caller's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ..protocol import ValidationFailedError, check_topic
from .config import BrokerConfig
from .events import RetentionRule

__all__ = ["BACKLOG", "BROKER_TABLE", "IO_THREADS", "LIMITS", "SETTINGS", "BrokerSettings", "Setting", "parse_retention"]

_CORE: Final = BrokerConfig()
# Connections the kernel holds on each listening socket until libzmq accepts them. libzmq's
# own default, 100, overflows when thousands of clients (re)connect at once (a broker
# restart under them): each overflowed SYN waits 1, 3, 7, 15 or 31 s for its retry. The
# kernel caps it at net.core.somaxconn (4096 on Linux since 5.4).
BACKLOG: Final = 4096
# libzmq I/O threads of the broker's context. Idle links cost them nothing; a second one
# shortened 2,000 CURVE clients connecting at once by a third on 2 cores (docs/performance.md,
# "Many idle clients"), but the hot path has not been measured with it, so one by default.
IO_THREADS: Final = 1


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting of `mesh broker`.

    Attributes:
        key: its field in `BrokerSettings`, and the key in its topology table.
        kind: the type of one value (`int`, `float`, `str`).
        help: the flag's help, in the words `mesh broker --help` shows.
        default: the flag's default (None: unset, the feature is off).
        topology: the topology table holding it (`brokers` for `[brokers.NAME]`, `security`,
            `cluster`, or `brokers.peer` for what each broker's `peer` key gives), or None
            for a setting only a flag gives.
        flag: the flag's name when it is not `--` + `key` with dashes.
        positive: a number that must be greater than 0.
        minimum: the least value a flag accepts (an int).
        maximum: the greatest value a flag accepts (an int).
        repeat: a flag given once per value; a list in the topology.
        choices: the only values accepted.
        path: a flag naming a `file` or a `dir`.
        metavar: how `--help` shows the value.
        core: the `BrokerConfig` field it sets (the core's limits).
    """

    key: str
    kind: type
    help: str
    default: Any = None
    topology: str | None = "brokers"
    flag: str | None = None
    positive: bool = False
    minimum: int | None = None
    maximum: int | None = None
    repeat: bool = False
    choices: tuple[str, ...] = ()
    path: Literal["file", "dir"] | None = None
    metavar: str | None = None
    core: str | None = None

    @property
    def option(self) -> str:
        """The command-line flag, e.g. `--queue-limit`."""
        return self.flag or "--" + self.key.replace("_", "-")


def _limit(key: str, kind: type, text: str, core: str | None = None) -> Setting:
    """A limit of the core: a positive number whose default `BrokerConfig` holds."""
    core = core or key
    return Setting(key, kind, text, getattr(_CORE, core), positive=True, core=core)


LIMITS: Final = (
    _limit("queue_limit", int, "Commands waiting for a free node before RESOURCE_EXHAUSTED."),
    _limit("timeout", float, "Deadline in seconds for commands that carry none.", core="default_timeout"),
    _limit("max_message_bytes", int, "Largest message accepted."),
    _limit("event_hwm", int, "Events queued per subscriber before it misses some."),
    _limit("max_topics", int, "Topics tracked before a new one is refused."),
    _limit("max_retained_bytes", int, "Bound on all retained events together."),
)

SETTINGS: Final = (
    Setting("clients", str, "Endpoint for AI-tool clients.", "tcp://127.0.0.1:5555"),
    Setting("nodes", str, "Endpoint for handler nodes.", "tcp://127.0.0.1:5556"),
    Setting("events", str, "Endpoint for event subscribers.", "tcp://127.0.0.1:5557"),
    *LIMITS,
    Setting("retention", str, "PREFIX:MAX_EVENTS:MAX_BYTES, repeatable; the longest matching prefix wins "
            "(default ':1000:1048576').", (), repeat=True, core="retention"),
    Setting("state", str, "Security on: the state directory with the keys, token secret and policy "
            "(`mesh up` fills it).", topology="security", path="dir"),
    Setting("min_level", int, "With --state: least security level of any message (1 token, 2 encrypted, "
            "3 signed).", 1, topology="security", minimum=0, maximum=3),
    Setting("service_levels", str, "With --state: a higher level for one service (repeatable).", (),
            topology="security", flag="--service-level", repeat=True, metavar="SERVICE=LEVEL"),
    Setting("allow_ips", str, "With --state: only these addresses may connect (repeatable).", (),
            topology="security", flag="--allow-ip", repeat=True),
    Setting("deny_ips", str, "With --state: these addresses may not connect (repeatable).", (),
            topology="security", flag="--deny-ip", repeat=True),
    Setting("token_algorithm", str, "With --state: how tokens are signed.", "HS256", topology=None,
            choices=("HS256", "EdDSA", "RS256")),
    Setting("token_key", str, "With EdDSA/RS256: the issuer's public key (PEM) or a JWKS file (.json).",
            topology=None, path="file"),
    Setting("members", str, "Cluster on: every broker of the cluster and its peer endpoint, this one (--name) "
            "included (repeatable). docs/operations.md.", (), topology="brokers.peer", flag="--member",
            repeat=True, metavar="NAME=ENDPOINT"),
    Setting("learners", str, "With --member: a member that gets the log but does not vote (repeatable).", (),
            topology="cluster", flag="--learner", repeat=True, metavar="NAME"),
    Setting("data", str, "With --member: this broker's cluster data directory (its replicated log, in SQLite).",
            topology="cluster", path="dir"),
    Setting("election_ticks", int, "With --member: 50 ms ticks without a leader before an election (failover "
            "takes 1 to 2 times this; default: the cluster's, 10).", topology="cluster", minimum=3),
    Setting("backlog", int, "Connections the kernel queues on each listening socket until the broker accepts "
            "them (capped by net.core.somaxconn).", BACKLOG, minimum=1, maximum=65535),
    Setting("io_threads", int, "libzmq I/O threads of the broker (framing and CURVE encryption of every link).",
            IO_THREADS, minimum=1, maximum=16),
    Setting("monitor", str, "Serve the monitor (dashboard, /varz, /metrics, ...) here; off by default. "
            "docs/monitoring.md.", metavar="HOST:PORT"),
    Setting("monitor_token_file", str, "The monitor's bearer token (required off loopback; with --state, "
            "default STATE/monitor.token, made if missing).", path="file"),
    Setting("monitor_tls_cert", str, "Serve the monitor over HTTPS (TLS 1.3 minimum): its certificate (PEM, "
            "the chain after it). Needs --monitor-tls-key.", topology=None, path="file"),
    Setting("monitor_tls_key", str, "The monitor certificate's private key (PEM, unencrypted).",
            topology=None, path="file"),
)

BROKER_TABLE: Final = tuple(s for s in SETTINGS if s.topology == "brokers")  # the [brokers.NAME] keys


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Everything one broker process runs with (each field is described in `SETTINGS`).

    Security is on when `state` is set; the broker is a cluster member when `members`
    (broker name -> peer endpoint, this one included) is not empty.
    """

    limits: BrokerConfig  # its name and the core's limits
    clients: str
    nodes: str
    events: str
    state: str | None = None
    min_level: int = 1
    service_levels: Mapping[str, int] = field(default_factory=dict)
    allow_ips: tuple[str, ...] = ()
    deny_ips: tuple[str, ...] = ()
    token_algorithm: str = "HS256"
    token_key: str | None = None
    members: Mapping[str, str] = field(default_factory=dict)
    learners: tuple[str, ...] = ()
    data: str | None = None
    election_ticks: int | None = None  # None: the cluster's default
    backlog: int = BACKLOG
    io_threads: int = IO_THREADS
    monitor: str | None = None
    monitor_token_file: str | None = None
    monitor_tls_cert: str | None = None
    monitor_tls_key: str | None = None

    @property
    def name(self) -> str:
        """The broker's name (in the registry, the logs and its cluster)."""
        return self.limits.name


def parse_retention(value: str) -> RetentionRule:
    """One `--retention PREFIX:MAX_EVENTS:MAX_BYTES` value (the topology's form is a table).

    Raises:
        ValueError: with a message for the user, naming the value.
    """
    try:
        prefix, events, size = value.split(":")
        if prefix:
            check_topic(prefix, "prefix")
        rule = RetentionRule(prefix, int(events), int(size))
    except (ValueError, ValidationFailedError):
        raise ValueError(f"{value!r} is not PREFIX:MAX_EVENTS:MAX_BYTES (PREFIX may be empty)") from None
    if rule.max_events < 0 or rule.max_bytes < 0:
        raise ValueError(f"{value!r}: the bounds must be 0 or more")
    return rule
