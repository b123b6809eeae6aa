"""Prometheus metrics read from the latest snapshot, at scrape time.

Rules of this module:

* Nothing is updated per message: `SnapshotCollector.collect()` turns the snapshot the
  loop last published into metric families when Prometheus scrapes, in the HTTP thread.
* Every family carries a `broker` label, so one Prometheus sees several brokers apart.
* `METRICS` names every family (docs/monitoring.md lists them; a test checks both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .snapshot import STATES

__all__ = ["METRICS", "SnapshotCollector", "metrics_registry"]

# Family name -> help. Counters are exposed with a `_total` suffix on their samples.
METRICS: Final = {
    "mesh_up": "1 while the broker loop publishes snapshots.",
    "mesh_snapshot_age_seconds": "Seconds since the broker loop published the snapshot served.",
    "mesh_uptime_seconds": "Seconds since the broker started.",
    "mesh_messages_in": "Messages received from clients and nodes.",
    "mesh_messages_out": "Messages sent to clients and nodes.",
    "mesh_commands_received": "Commands received from clients.",
    "mesh_commands_finished": "Commands answered, by outcome (completed, failed, timed_out, abandoned).",
    "mesh_commands_in_flight": "Commands accepted and not answered yet, by state.",
    "mesh_command_throughput": "Commands answered per second over the last snapshot interval.",
    "mesh_command_latency_seconds": "Broker round trip of sampled commands, by quantile (0.5, 0.95, 0.99).",
    "mesh_errors": "Errors answered, by code and category.",
    "mesh_nodes": "Handler nodes known to the page, by state (up, suspect, dead).",
    "mesh_node_load": "In-flight commands over capacity, per registered node.",
    "mesh_node_in_flight": "In-flight commands per registered node.",
    "mesh_clients": "Clients the broker tracks.",
    "mesh_event_topics": "Event topics with retained history.",
    "mesh_event_retained_bytes": "Bytes of retained events.",
    "mesh_event_subscribers": "Subscribers that reported to the broker.",
    "mesh_event_missed": "Events subscribers reported missing (dropped at their queue).",
}


class SnapshotCollector(Collector):
    """Reads `latest()` (a snapshot or None) and yields the `METRICS` families.

    Args:
        latest: returns the latest snapshot; called once per scrape.
        clock: wall clock, for the snapshot's age.
    """

    def __init__(self, latest: Callable[[], dict[str, Any] | None], clock: Callable[[], float]) -> None:
        self._latest = latest
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        snap = self._latest()
        if snap is None:
            return
        broker = snap["broker"]
        varz = snap["varz"]

        def gauge(name: str, value: float | None, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
            labels = labels or {}
            fam = GaugeMetricFamily(name, METRICS[name], labels=["broker", *labels])
            if value is not None:
                fam.add_metric([broker, *labels.values()], value)
            return fam

        def counter(name: str, value: float) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, METRICS[name], labels=["broker"])
            fam.add_metric([broker], value)
            return fam

        yield gauge("mesh_up", 1)
        yield gauge("mesh_snapshot_age_seconds", max(0.0, self._clock() - snap["time"]))
        yield gauge("mesh_uptime_seconds", varz["uptime_s"])
        yield counter("mesh_messages_in", varz["messages"]["in"])
        yield counter("mesh_messages_out", varz["messages"]["out"])
        yield counter("mesh_commands_received", varz["commands"]["received"])
        finished = CounterMetricFamily("mesh_commands_finished", METRICS["mesh_commands_finished"], labels=["broker", "outcome"])
        for outcome, n in varz["commands"]["finished"].items():
            finished.add_metric([broker, outcome], n)
        yield finished
        in_flight = GaugeMetricFamily("mesh_commands_in_flight", METRICS["mesh_commands_in_flight"], labels=["broker", "state"])
        for state, n in varz["commands"]["in_flight"].items():
            in_flight.add_metric([broker, state], n)
        yield in_flight
        yield gauge("mesh_command_throughput", varz["throughput"]["commands_per_s"])
        latency = GaugeMetricFamily("mesh_command_latency_seconds", METRICS["mesh_command_latency_seconds"], labels=["broker", "quantile"])
        for key, quantile in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
            ms = varz["latency_ms"][key]
            if ms is not None:
                latency.add_metric([broker, quantile], ms / 1000)
        yield latency
        errors = CounterMetricFamily("mesh_errors", METRICS["mesh_errors"], labels=["broker", "code", "name", "category"])
        for e in snap["errors"]["by_code"]:
            errors.add_metric([broker, str(e["code"]), e["name"], e["category"]], e["count"])
        yield errors
        nodes = GaugeMetricFamily("mesh_nodes", METRICS["mesh_nodes"], labels=["broker", "state"])
        counts = dict.fromkeys(STATES, 0)  # every state listed, even at 0
        for n in snap["nodes"]["nodes"]:
            counts[n["state"]] = counts.get(n["state"], 0) + 1
        for state, n in counts.items():
            nodes.add_metric([broker, state], n)
        yield nodes
        load = GaugeMetricFamily("mesh_node_load", METRICS["mesh_node_load"], labels=["broker", "node", "id"])
        busy = GaugeMetricFamily("mesh_node_in_flight", METRICS["mesh_node_in_flight"], labels=["broker", "node", "id"])
        for n in snap["nodes"]["nodes"]:
            if n["state"] != "dead":
                load.add_metric([broker, n["name"], n["id"]], n["load"])
                busy.add_metric([broker, n["name"], n["id"]], n["in_flight"])
        yield load
        yield busy
        yield gauge("mesh_clients", snap["clients"]["total"])
        events = snap["events"]
        yield gauge("mesh_event_topics", events["topics"])
        yield gauge("mesh_event_retained_bytes", events["retained_bytes"])
        yield gauge("mesh_event_subscribers", events["subscribers"])
        yield counter("mesh_event_missed", events["missed"])


def metrics_registry(latest: Callable[[], dict[str, Any] | None], clock: Callable[[], float]) -> CollectorRegistry:
    """A registry of the snapshot's metrics and the standard `process_*` ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(latest, clock))
    ProcessCollector(registry=registry)
    return registry
