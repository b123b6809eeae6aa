"""`[hosts]` and `host = NAME`: where each broker and node runs, each mistake reported at its
key, links another machine cannot make refused, and what `mesh up --host` runs."""

from __future__ import annotations

import re
import shutil
from typing import Any

import pytest
from click.testing import CliRunner

from mesh.cli import main
from mesh.launcher import Launcher
from mesh.placement import dial
from mesh.protocol import ConfigurationError
from mesh.topology import HostSpec, TopologyError, load, parse

ADDRESSES = {"h1": "10.77.0.1", "h2": "10.77.0.2", "h3": "10.77.0.3", "h4": "10.77.0.4"}


def placed(**overrides: Any) -> dict[str, Any]:
    """A three-broker cluster on h1..h3 with the echo node on h4, on 10.77.0.0/24."""
    data: dict[str, Any] = {
        "hosts": {h: {"address": a} for h, a in ADDRESSES.items()},
        "cluster": {"data": "var/c"},
        "brokers": {
            f"b{i}": {
                "host": f"h{i}",
                "clients": f"tcp://10.77.0.{i}:5655",
                "nodes": f"tcp://10.77.0.{i}:5656",
                "peer": f"tcp://10.77.0.{i}:7101",
            }
            for i in (1, 2, 3)
        },
        "nodes": {"echo": {"use": "echo", "host": "h4", "replicas": 2}},
    }
    for path, value in overrides.items():
        *parents, last = path.split("__")
        table = data
        for key in parents:
            table = table[key]
        if value is None:
            del table[last]
        else:
            table[last] = value
    return data


def problems(data: dict[str, Any]) -> dict[str, str]:
    """key -> message of every problem `parse` reports."""
    with pytest.raises(TopologyError) as info:
        parse(data)
    return {p.key: p.message for p in info.value.problems}


def values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_the_shipped_hosts_topology_places_three_brokers_and_the_nodes_on_four_hosts():
    """topologies/hosts.toml: every entry on its host, and `topology check` shows who runs where."""
    topo = load("topologies/hosts.toml")
    assert topo.hosts["h2"] == HostSpec("h2", "127.0.0.2")
    assert {b.name: b.host for b in topo.brokers.values()} == {"b1": "h1", "b2": "h2", "b3": "h3"}
    assert {n.host for n in topo.nodes.values()} == {"h4"}
    result = CliRunner().invoke(main, ["topology", "check", "topologies/hosts.toml"])
    assert result.exit_code == 0, result.output
    assert "(3 broker(s), 3 node process(es) on 4 host(s))" in result.output
    assert "  h4 (127.0.0.4): node echo x2, node kv\n" in result.output


def test_a_topology_without_hosts_is_read_as_before():
    """No [hosts]: no host on any entry, everything on one machine."""
    topo = parse(placed(hosts=None, brokers__b1__host=None, brokers__b2__host=None, brokers__b3__host=None,
                        nodes__echo__host=None))  # fmt: skip
    assert topo.hosts == {} and {b.host for b in topo.brokers.values()} == {None}


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        ({"hosts__h4": {}}, "hosts.h4.address", "is required: the address the other hosts reach h4 at"),
        ({"hosts__h4": {"address": "*"}}, "hosts.h4.address", "'*' is a wildcard"),
        ({"hosts__h4": {"address": 4}}, "hosts.h4.address", "must be an IPv4 address or a host name, got 4"),
        ({"hosts__h4": {"address": "10.77.0.4", "adress": "x"}}, "hosts.h4.adress", "unknown key"),
        ({"hosts": {}}, "hosts", "must be a table with one [hosts.NAME] table per machine"),
        ({"brokers__b2__host": None}, "brokers.b2.host", "is required: the file has [hosts], so every broker and node names where it runs (hosts: h1, h2, h3, h4)"),
        ({"nodes__echo__host": None}, "nodes.echo.host", "is required"),
        ({"nodes__echo__host": "h9"}, "nodes.echo.host", "no host named 'h9' (hosts: h1, h2, h3, h4)"),
        ({"brokers__b1__host": 1}, "brokers.b1.host", "must be a string, got 1"),
        ({"brokers__b1__clients": "tcp://10.77.0.2:5655"}, "brokers.b1.clients",
         "tcp://10.77.0.2:5655 is not host h1's address (10.77.0.1): write tcp://10.77.0.1:5655, or tcp://*:5655 to listen on every interface"),
        ({"brokers__b3__monitor": "10.77.0.1:8231"}, "brokers.b3.monitor",
         "10.77.0.1:8231 is not host h3's address (10.77.0.3): write 10.77.0.3:8231, or 0.0.0.0:8231"),
    ],
)
def test_each_placement_mistake_is_reported_at_its_key(overrides: dict[str, Any], key: str, message: str):
    """Unknown hosts, hosts without address, entries without host, another host's address."""
    found = problems(placed(**overrides))
    assert message in found.get(key, ""), found


def test_host_without_a_hosts_table_is_refused():
    """`host` needs [hosts]: without it the host's address is unknown."""
    data = placed(hosts=None)
    for b in data["brokers"].values():
        b["clients"] = b["clients"].replace("10.77.0.", "127.0.0.")
    found = problems(data)
    assert found["nodes.echo.host"].startswith("needs a [hosts] table")
    assert set(found) == {"brokers.b1.host", "brokers.b2.host", "brokers.b3.host", "nodes.echo.host"}


def test_a_host_with_a_bad_address_is_reported_once_not_at_every_entry_on_it():
    """The entries on a host whose address is missing still name a host that exists."""
    found = problems(placed(hosts__h1={}))
    assert list(found) == ["hosts.h1.address"]


def test_wildcards_and_local_only_endpoints_that_no_other_host_dials_are_accepted():
    """tcp://*:PORT and 0.0.0.0 listen on every interface; loopback and ipc are fine for what
    only the host itself (or a client on it) uses."""
    topo = parse(placed(
        brokers__b1__clients="tcp://*:5655", brokers__b1__nodes="tcp://0.0.0.0:5656",
        brokers__b2__clients="tcp://127.0.0.1:5655", brokers__b2__events="ipc:///run/mesh/events",
        brokers__b3__monitor="127.0.0.1:8231",
    ))  # fmt: skip
    assert topo.brokers["b1"].nodes == "tcp://0.0.0.0:5656"


def test_every_host_may_listen_on_the_same_wildcard_endpoint_but_each_once():
    """Endpoints are distinct per host: `tcp://*:5656` on h1 and on h2 are two listeners."""
    data = placed()
    for b in data["brokers"].values():
        b.update(clients="tcp://*:5655", nodes="tcp://*:5656", peer="tcp://*:7101")
    topo = parse(data)
    assert topo.dial(topo.brokers["b3"].peer or "", "b3") == "tcp://10.77.0.3:7101"
    data["brokers"]["b2"]["events"] = "tcp://*:5656"
    assert problems(data) == {"brokers.b2.events": "tcp://*:5656 is already used by brokers.b2.nodes"}


def test_an_ipc_endpoint_dialled_from_another_machine_is_refused():
    """The nodes on h4 must reach b1's `nodes` endpoint: an ipc:// socket exists on h1 only."""
    found = problems(placed(brokers__b1__nodes="ipc:///run/mesh/nodes"))
    assert found == {
        "brokers.b1.nodes": "ipc:///run/mesh/nodes can be reached on host h1's machine only, but node echo on h4 "
        "dials it from another machine; use tcp://10.77.0.1:PORT"
    }


def test_a_loopback_peer_endpoint_is_refused_with_every_broker_that_dials_it():
    """b2 and b3 dial b1's peer endpoint; 127.0.0.1 on h1 is not reachable from their machines."""
    found = problems(placed(brokers__b1__peer="tcp://127.0.0.1:7101"))
    assert found == {
        "brokers.b1.peer": "tcp://127.0.0.1:7101 is a loopback address, reachable on host h1's machine only, but "
        "broker b2 on h2, broker b3 on h3 dial it from another machine; write tcp://10.77.0.1:7101 or tcp://*:7101"
    }


def test_a_loopback_host_address_is_refused_when_another_host_is_a_different_machine():
    """A host at 127.0.0.1 is this machine: a node on 10.77.0.4 cannot reach its brokers."""
    data = placed(hosts__h1={"address": "127.0.0.1"})
    for side in ("clients", "nodes", "peer"):
        data["brokers"]["b1"][side] = data["brokers"]["b1"][side].replace("10.77.0.1", "127.0.0.1")
    found = problems(data)
    assert set(found) == {"brokers.b1.nodes", "brokers.b1.peer"}
    assert found["brokers.b1.nodes"] == (
        "host h1's address 127.0.0.1 is a loopback address, which node echo on h4 cannot reach from another "
        "machine: give hosts.h1.address the address the other machines reach it at"
    )


def test_hosts_at_loopback_addresses_are_one_machine_where_ipc_and_loopback_reach():
    """127.0.0.1..4 are four hosts of one machine (the tests' setup): ipc and loopback links pass."""
    data = placed(**{f"hosts__h{i}": {"address": f"127.0.0.{i}"} for i in (1, 2, 3, 4)})
    for i, b in enumerate(data["brokers"].values(), 1):
        b.update(clients=f"tcp://127.0.0.{i}:5655", nodes=f"ipc:///tmp/b{i}-nodes", peer=f"tcp://127.0.0.1:710{i}")
    assert parse(data).hosts["h4"].address == "127.0.0.4"


def test_a_port_chosen_at_start_cannot_be_dialled_from_another_host():
    """`*` as port is learnt from the broker's ready line, which only its own host's mesh up reads."""
    found = problems(placed(brokers__b2__nodes="tcp://10.77.0.2:*"))
    assert found["brokers.b2.nodes"].startswith("needs a fixed port: node echo on h4 dials it from another host")
    same_host = placed(brokers__b2__nodes="tcp://10.77.0.2:*", nodes__echo__host="h2")
    parse(same_host)  # the node on h2 reads b2's ready line


def test_a_node_of_a_single_broker_is_checked_against_that_broker_only():
    """Without [cluster] a node dials its own broker only: another broker's ipc endpoint is no concern."""
    data = placed(cluster=None)
    for b in data["brokers"].values():
        del b["peer"]
    data["brokers"]["b2"]["nodes"] = "ipc:///run/mesh/b2-nodes"
    data["nodes"]["echo"]["broker"] = "b1"
    parse(data)
    data["nodes"]["echo"]["broker"] = "b2"
    assert set(problems(data)) == {"brokers.b2.nodes"}


def test_dial_replaces_a_wildcard_address_with_the_hosts():
    """What the others connect to when a broker listens on every interface."""
    assert dial("tcp://*:5656", "10.77.0.1") == "tcp://10.77.0.1:5656"
    assert dial("tcp://0.0.0.0:5656", "10.77.0.1") == "tcp://10.77.0.1:5656"
    assert dial("tcp://10.77.0.2:5656", "10.77.0.1") == "tcp://10.77.0.2:5656"
    assert dial("ipc:///run/x", "10.77.0.1") == "ipc:///run/x"


def test_mesh_up_host_runs_only_that_hosts_part_and_dials_the_rest_at_their_addresses():
    """--host h2: broker b2 alone, listening on its own (wildcard) peer endpoint and dialling the
    others at their hosts' addresses; --host h4: the nodes, dialling every broker."""
    topo = parse(placed(brokers__b1__peer="tcp://*:7101", brokers__b1__nodes="tcp://*:5656",
                        brokers__b2__peer="tcp://0.0.0.0:7101"))  # fmt: skip
    h2 = Launcher(topo, host="h2")
    assert [p.name for p in h2.processes] == ["broker:b2"]
    assert values(h2.processes[0].argv, "--name") == ["b2"]  # it reads the rest from the topology
    assert topo.broker_settings("b2").members == {
        "b1": "tcp://10.77.0.1:7101", "b2": "tcp://0.0.0.0:7101", "b3": "tcp://10.77.0.3:7101",
    }  # fmt: skip
    h1 = Launcher(topo, host="h1")
    assert values(h1.processes[0].argv, "--name") == ["b1"]
    assert topo.broker_settings("b1").members["b1"] == "tcp://*:7101"
    h4 = Launcher(topo, host="h4")
    assert [p.name for p in h4.processes] == ["node:echo-1", "node:echo-2"]
    assert [h4.node_endpoints[b] for b in h4.processes[0].brokers] == [
        "tcp://10.77.0.1:5656", "tcp://10.77.0.2:5656", "tcp://10.77.0.3:5656",
    ]  # fmt: skip
    assert len(Launcher(topo).processes) == 5  # no --host: everything, on this machine


@pytest.mark.parametrize(
    ("data", "host", "message"),
    [
        (placed(), "h9", "has no host named 'h9' (hosts: h1, h2, h3, h4)"),
        (placed(hosts__h5={"address": "10.77.0.5"}), "h5", "places no broker or node on h5"),
    ],
)
def test_mesh_up_host_refuses_a_host_it_has_nothing_for(data: dict[str, Any], host: str, message: str):
    """An unknown host, or one with nothing on it (a clients' machine), is a usage error."""
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Launcher(parse(data), host=host)


def test_mesh_up_host_refuses_a_topology_without_hosts():
    """`--host` on a one-machine topology says so, with exit status 2, before starting anything."""
    result = CliRunner().invoke(main, ["up", "topologies/cluster.toml", "--host", "h1"])
    assert result.exit_code == 2
    assert "--host h1: topologies/cluster.toml has no [hosts] table; run it without --host" in result.output



def test_a_host_loads_only_its_own_nodes_once_the_state_exists(tmp_path: Any) -> None:
    """Invariant: `mesh up --host` on a made state loads (and so opens the files of) only
    the nodes it runs: a node whose database directory exists only on its own machine
    is not touched by another host's start. The first start, which writes the policy, loads all."""
    data = placed()
    data["security"] = {"state": str(tmp_path / "state")}
    data["nodes"]["kv"] = {"use": "kv", "host": "h4", "config": {"path": str(tmp_path / "h4-only" / "kv.sqlite3")}}
    (tmp_path / "h4-only").mkdir()
    Launcher(parse(data), echo=lambda _: None, host="h1").prepare_security()  # first start: loads every node
    shutil.rmtree(tmp_path / "h4-only")  # as on machine h1, where kv's directory does not exist
    Launcher(parse(data), echo=lambda _: None, host="h1").prepare_security()
    assert not (tmp_path / "h4-only").exists()
    Launcher(parse(data), echo=lambda _: None, host="h4").prepare_security()
    assert (tmp_path / "h4-only" / "kv.sqlite3").exists()  # h4 loads its own node (the kv node makes its file)
