"""The Prometheus collector turns the latest snapshot into the documented families, at scrape time."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.broker import Broker
from mesh.monitor.metrics import METRICS, metrics_registry
from mesh.monitor.snapshot import Monitor
from mesh.testing.frames import CLIENT, NODE_A, command_frames, node_system, registration


def scrape(snapshot):
    text = generate_latest(metrics_registry(lambda: snapshot, lambda: 11.0)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_documented_family_is_exposed_with_a_broker_label():
    """All of METRICS appear, each sample labelled with the broker's name."""
    broker = Broker()
    spec = {"description": "", "schema": {}, "idempotent": True}
    broker.node_message(NODE_A, node_system("register", registration({"svc": {"act": spec}}, name="n1"), now=0.0), 0.0)
    broker.client_message(CLIENT, command_frames("nope", "act", id="c1", deadline=99.0), 0.5)
    monitor = Monitor("b1", 0.0)
    monitor.observe(0.002)
    families = scrape(monitor.snapshot(broker, 10.0))
    assert set(METRICS) <= set(families)
    for name in METRICS:
        assert all(s.labels["broker"] == "b1" for s in families[name].samples), name
    errors = {(s.labels["code"], s.labels["category"]): s.value for s in families["mesh_errors"].samples}
    assert errors == {("1003", "protocol"): 1.0}
    assert families["mesh_snapshot_age_seconds"].samples[0].value == 1.0
    quantiles = {s.labels["quantile"]: s.value for s in families["mesh_command_latency_seconds"].samples}
    assert quantiles == {"0.5": 0.002, "0.95": 0.002, "0.99": 0.002}
    assert [s.value for s in families["mesh_node_load"].samples] == [0.0]


def test_before_the_first_snapshot_only_process_metrics_are_served():
    """A scrape before the loop published anything is valid and holds no mesh_ family."""
    families = scrape(None)
    assert not any(name.startswith("mesh_") for name in families)
    assert "process_cpu_seconds" in families
