"""The `[cluster]` table and per-broker `peer`: what a cluster topology must say, and each
mistake reported at its key with what to do about it."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.topology import ClusterSpec, TopologyError, load, parse


def cluster(brokers: int = 3, **table: Any) -> dict[str, Any]:
    """A cluster topology of `brokers` brokers on distinct loopback ports, one echo node."""
    return {
        "cluster": {"data": "var/c", **table},
        "brokers": {
            f"b{i}": {
                "clients": f"tcp://127.0.0.1:{7000 + 10 * i}",
                "nodes": f"tcp://127.0.0.1:{7001 + 10 * i}",
                "peer": f"tcp://127.0.0.1:{7002 + 10 * i}",
            }
            for i in range(1, brokers + 1)
        },
        "nodes": {"echo": {"use": "echo", "heartbeat_interval": 0.5}},
    }


def problems(data: dict[str, Any]) -> dict[str, str]:
    """key -> message of every problem `parse` reports."""
    with pytest.raises(TopologyError) as info:
        parse(data)
    return {p.key: p.message for p in info.value.problems}


def test_a_cluster_topology_is_read_with_its_peers_and_settings():
    """[cluster] with three brokers yields a ClusterSpec and each broker's peer endpoint."""
    topo = parse(cluster(learners=["b3"], election_ticks=20) | {"brokers": cluster(4)["brokers"]})
    assert topo.cluster == ClusterSpec(data="var/c", learners=("b3",), election_ticks=20)
    assert topo.brokers["b2"].peer == "tcp://127.0.0.1:7022"
    assert topo.nodes["echo"].heartbeat_interval == 0.5


def test_without_a_cluster_table_nothing_changes():
    """A single-broker topology has no cluster and no peer, as before."""
    data = cluster(1)
    del data["cluster"], data["brokers"]["b1"]["peer"]
    topo = parse(data)
    assert topo.cluster is None and topo.brokers["b1"].peer is None
    assert topo.nodes["echo"].broker == "b1"


def test_cluster_defaults():
    """An empty [cluster] keeps logs under var/cluster, no learners, the broker's election timing."""
    data = cluster()
    data["cluster"] = {}
    assert parse(data).cluster == ClusterSpec(data="var/cluster", learners=(), election_ticks=None)


@pytest.mark.parametrize("brokers, learners", [(1, []), (2, []), (4, []), (3, ["b1"]), (4, ["b1", "b2"])])
def test_a_cluster_needs_an_odd_number_of_at_least_three_voters(brokers: int, learners: list[str]):
    """1, 2 or 4 voters are refused with the reason: a majority must survive a lost broker."""
    found = problems(cluster(brokers, learners=learners))
    assert "needs an odd number of at least 3 voting brokers" in found["cluster"]
    assert "survive the loss of a broker" in found["cluster"]


def test_every_broker_of_a_cluster_needs_a_peer_endpoint():
    """A broker without `peer` is named, with the key to add."""
    data = cluster()
    del data["brokers"]["b2"]["peer"]
    found = problems(data)
    assert list(found) == ["brokers.b2.peer"]
    assert "broker b2 needs the endpoint its peers dial" in found["brokers.b2.peer"]


def test_a_peer_without_a_cluster_table_is_refused():
    """`peer` alone would be ignored silently; it asks for [cluster] instead."""
    data = cluster()
    del data["cluster"]
    assert "needs a [cluster] table" in problems(data)["brokers.b1.peer"]


def test_peer_endpoints_are_checked_like_the_others():
    """Duplicate, malformed and wildcard-port peer endpoints are each reported at their key."""
    data = cluster()
    data["brokers"]["b2"]["peer"] = data["brokers"]["b1"]["peer"]
    data["brokers"]["b3"]["peer"] = "tcp//127.0.0.1:7032"
    found = problems(data)
    assert found["brokers.b2.peer"] == "tcp://127.0.0.1:7012 is already used by brokers.b1.peer"
    assert "is not a ZeroMQ endpoint" in found["brokers.b3.peer"]
    data = cluster()
    data["brokers"]["b3"]["peer"] = "tcp://127.0.0.1:*"
    assert problems(data) == {"brokers.b3.peer": "needs a fixed port: the other brokers dial it"}
    data = cluster()
    data["brokers"]["b3"]["peer"] = data["brokers"]["b1"]["clients"]
    assert "already used by brokers.b1.clients" in problems(data)["brokers.b3.peer"]


def test_learners_must_be_brokers_and_listed_once():
    """An unknown or repeated learner is named (with the brokers there are)."""
    with pytest.raises(TopologyError) as info:
        parse(cluster(5, learners=["b4", "b9", "b4"]))
    assert {p.message for p in info.value.problems if p.key == "cluster.learners"} == {
        "no broker named 'b9' (brokers: b1, b2, b3, b4, b5)",
        "'b4' is listed twice",
    }


@pytest.mark.parametrize(
    "table, key, message",
    [
        ({"election_ticks": 2}, "cluster.election_ticks", "must be 3 or more, got 2"),
        ({"election_ticks": 1.5}, "cluster.election_ticks", "must be an integer"),
        ({"data": ""}, "cluster.data", "must name a directory"),
        ({"learners": "b1"}, "cluster.learners", "must be a list"),
        ({"peers": 3}, "cluster.peers", "unknown key"),
    ],
)
def test_bad_cluster_settings_are_reported_at_their_key(table: dict[str, Any], key: str, message: str):
    """Each bad [cluster] value names its key."""
    assert message in problems(cluster(**table))[key]


def test_a_cluster_table_must_be_a_table():
    """`cluster = 3` is reported, not a traceback."""
    data = cluster()
    data["cluster"] = 3
    assert problems(data)["cluster"] == "must be a table"


def test_a_node_of_a_cluster_has_no_broker_key():
    """Nodes serve every broker of a cluster, so pinning one to a broker is refused."""
    data = cluster()
    data["nodes"]["echo"]["broker"] = "b1"
    assert "serves every broker" in problems(data)["nodes.echo.broker"]


@pytest.mark.parametrize("value, message", [(0, "greater than 0"), (-1.0, "greater than 0"), ("1", "must be a number")])
def test_heartbeat_interval_must_be_a_positive_number(value: Any, message: str):
    """`heartbeat_interval` is seconds, more than zero."""
    data = cluster()
    data["nodes"]["echo"]["heartbeat_interval"] = value
    assert message in problems(data)["nodes.echo.heartbeat_interval"]


def test_the_shipped_cluster_topology_is_valid():
    """topologies/cluster.toml: three voters, security on, every node beating every 0.5 s."""
    topo = load("topologies/cluster.toml")
    assert topo.cluster is not None and list(topo.brokers) == ["b1", "b2", "b3"]
    assert topo.security is not None and topo.security.state == "var/cluster-mesh"
    assert {n.heartbeat_interval for n in topo.nodes.values()} == {0.5}
