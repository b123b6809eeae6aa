"""The broker's monitor: snapshots of the core, HTTP endpoints, Prometheus metrics, the dashboard.

`snapshot.py` builds what is shown (sans-IO, in the broker loop's thread);
`server.py` serves it from a daemon thread; `metrics.py` turns it into Prometheus
families at scrape time; `dashboard.py` is the page. docs/monitoring.md has the schemas.

Only the snapshot is imported here: the broker loop needs it, and a broker with the
monitor off should not load the HTTP server or prometheus_client.
"""

from .snapshot import Monitor, node_state, process_usage, reply_latency

__all__ = ["Monitor", "node_state", "process_usage", "reply_latency"]
