"""One description of each broker setting: the topology and the flags of `mesh broker` agree.

Nothing here starts a broker: the command fails, or is only parsed, before any socket.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from mesh.broker.settings import BROKER_TABLE, LIMITS, SETTINGS, BrokerSettings
from mesh.cli import main
from mesh.cli.broker import _flag_settings, _topology_settings, broker
from mesh.topology import load

# Every setting a topology holds, none at its default: b1 of a cluster (three voters, a learner) with security.
TOPOLOGY = """
[security]
state = "var/s"
min_level = 2
service_levels = { kv = 3 }
allow_ips = ["127.0.0.1"]

[cluster]
data = "var/c"
learners = ["b4"]
election_ticks = 12

[brokers.b1]
clients = "tcp://127.0.0.1:7101"
nodes = "tcp://127.0.0.1:7102"
events = "tcp://127.0.0.1:7103"
peer = "tcp://127.0.0.1:7104"
queue_limit = 7
timeout = 2.5
max_message_bytes = 4096
event_hwm = 9
max_topics = 11
max_retained_bytes = 5000
monitor = "127.0.0.1:7105"
monitor_token_file = "var/token"
backlog = 512
io_threads = 2
retention = [{ prefix = "a.b", max_events = 3, max_bytes = 300 }, { prefix = "", max_events = 1, max_bytes = 100 }]

[brokers.b2]
clients = "tcp://127.0.0.1:7201"
nodes = "tcp://127.0.0.1:7202"
peer = "tcp://0.0.0.0:7204"

[brokers.b3]
clients = "tcp://127.0.0.1:7301"
nodes = "tcp://127.0.0.1:7302"
peer = "tcp://127.0.0.1:7304"

[brokers.b4]
clients = "tcp://127.0.0.1:7401"
nodes = "tcp://127.0.0.1:7402"
peer = "tcp://127.0.0.1:7404"

[nodes.echo]
use = "echo"
"""


@pytest.fixture
def topology_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.toml"
    path.write_text(TOPOLOGY)
    return path


def as_flags(settings: BrokerSettings) -> list[str]:
    """The flags that describe `settings`, made from the one table of settings."""
    argv = ["--name", settings.name]
    for s in SETTINGS:
        value = getattr(settings.limits, s.core) if s.core else getattr(settings, s.key)
        if s.key == "retention":
            value = [f"{r.prefix}:{r.max_events}:{r.max_bytes}" for r in value]
        elif isinstance(value, dict):
            value = [f"{k}={v}" for k, v in value.items()]
        if value is None:
            continue
        argv += [a for v in value for a in (s.option, str(v))] if s.repeat else [s.option, str(value)]
    return argv


def from_flags(argv: list[str]) -> BrokerSettings:
    """What `mesh broker ARGV` (no topology) runs with."""
    params = dict(broker.make_context("broker", argv).params)
    for key in ("topology_file", "log_level", "log_format"):
        del params[key]
    return _flag_settings(params.pop("name"), params)


def test_every_key_of_a_broker_table_is_a_setting_with_a_flag(topology_file: Path):
    """Invariant: the keys a `[brokers.NAME]` table accepts are the settings' own keys (plus
    `peer` and `host`, which place the broker): a setting added to the table is in both."""
    keys = {s.key for s in BROKER_TABLE}
    assert {s.key for s in LIMITS} | {"clients", "nodes", "events", "retention", "monitor"} <= keys
    options = {p.name for p in broker.params}
    assert {s.key for s in SETTINGS} <= options


def test_the_topology_and_the_flags_describe_a_broker_the_same_way(topology_file: Path):
    """Invariant: for every broker of a topology, the flags of the same settings give the same
    `BrokerSettings`: one meaning per setting, whichever way it is written."""
    topology = load(topology_file)
    for name in topology.brokers:
        settings = topology.broker_settings(name)
        assert from_flags(as_flags(settings)) == settings, name
    b1 = topology.broker_settings("b1")
    assert (b1.limits.queue_limit, b1.limits.default_timeout, b1.min_level, b1.election_ticks) == (7, 2.5, 2, 12)
    assert b1.members == {f"b{i}": f"tcp://127.0.0.1:7{i}04" for i in range(1, 5)}  # b2's wildcard, as dialled
    assert (b1.data, b1.learners, b1.state) == (str(Path("var/c/b1")), ("b4",), "var/s")
    assert (b1.backlog, b1.io_threads) == (512, 2)


@pytest.mark.parametrize(
    "flags",
    [["--queue-limit", "5"], ["--clients", "tcp://127.0.0.1:9"], ["--state", "var/x"], ["--backlog", "9"],
     ["--member", "b1=tcp://127.0.0.1:1"], ["--learner", "b2"], ["--monitor", "127.0.0.1:9"],
     ["--retention", ":1:1"], ["--min-level", "1"]],
)
def test_a_flag_for_a_setting_the_topology_holds_is_refused(topology_file: Path, flags: list[str]):
    """With --topology the file is the one source of what it holds: a flag for such a setting is a
    usage error naming it (even one equal to the default), not a silent override."""
    result = CliRunner().invoke(main, ["broker", "--topology", str(topology_file), "--name", "b1", *flags])
    assert result.exit_code == 2, result.output
    assert f"{flags[0]}: {topology_file} holds this setting" in result.output


@pytest.mark.parametrize(("name", "said"), [(None, ""), ("b9", " ('b9' is not one)")])
def test_topology_needs_the_name_of_one_of_its_brokers(topology_file: Path, name: str | None, said: str):
    """`--topology` without `--name`, or with a name it does not have, lists its brokers."""
    args = ["broker", "--topology", str(topology_file)] + (["--name", name] if name else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert f"--topology needs --name NAME, one of its brokers: b1, b2, b3, b4{said}" in result.output


def test_a_bad_topology_is_a_usage_error_listing_its_problems(tmp_path: Path):
    """`mesh broker --topology` reports a bad file as `mesh topology check` does."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[brokers.b1]\nclients = "tcp://127.0.0.1:1"\nnodes = "tcp://127.0.0.1:2"\nqueue_limit = 0\n')
    result = CliRunner().invoke(main, ["broker", "--topology", str(bad), "--name", "b1"])
    assert result.exit_code == 2 and "brokers.b1.queue_limit: must be greater than 0" in result.output


@pytest.mark.parametrize(("line", "said"), [("backlog = 0", "brokers.b1.backlog: must be from 1 to 65535, got 0"),
                                            ("io_threads = 17", "brokers.b1.io_threads: must be from 1 to 16, got 17"),
                                            ("io_threads = 1.5", "brokers.b1.io_threads: must be")])
def test_the_socket_settings_of_a_topology_are_checked(tmp_path: Path, line: str, said: str):
    """Invariant: a backlog or an I/O thread count out of its range is refused with the key
    named, never passed on to libzmq (which would take 0 as "the kernel's minimum")."""
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[brokers.b1]\nclients = "tcp://127.0.0.1:1"\nnodes = "tcp://127.0.0.1:2"\n{line}\n')
    result = CliRunner().invoke(main, ["broker", "--topology", str(bad), "--name", "b1"])
    assert result.exit_code == 2 and said in result.output, result.output


def test_flags_the_topology_has_no_key_for_still_apply(topology_file: Path):
    """The token algorithm, the key and the monitor's TLS files are flags with or without a topology."""
    args = ["--topology", str(topology_file), "--name", "b2", "--token-algorithm", "EdDSA", "--token-key", "k.pem",
            "--monitor-tls-cert", "c.pem", "--monitor-tls-key", "k.pem", "--log-level", "debug"]
    ctx = broker.make_context("broker", args)
    settings = _topology_settings(ctx, str(topology_file), "b2", dict(ctx.params))
    assert settings == replace(load(topology_file).broker_settings("b2"), token_algorithm="EdDSA", token_key="k.pem",
                               monitor_tls_cert="c.pem", monitor_tls_key="k.pem")
