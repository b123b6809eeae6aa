"""The monitor of a real broker process: documented JSON, Prometheus text, tokens, the page."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import fastjsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.client import Client
from mesh.monitor.metrics import METRICS
from mesh.protocol import HandlerNotFoundError
from mesh.testing import BrokerProcess, free_ports, run_broker, run_node

DOC = Path(__file__).parents[2] / "docs" / "monitoring.md"
ENDPOINTS = ("/healthz", "/varz", "/nodes", "/services", "/clients", "/cluster", "/events", "/errors", "/snapshot")


def documented_schemas() -> dict[str, dict]:
    """Every JSON Schema block of docs/monitoring.md, by its `$id` (the endpoint's path)."""
    blocks = (json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", DOC.read_text(), re.S))
    return {b["$id"]: b for b in blocks if isinstance(b, dict) and "$id" in b}



def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_for_snapshot(base: str, token: str | None = None, *, nodes: int = 1) -> dict:
    """The first snapshot showing `nodes` nodes and a chart point (waits up to 15 s, polling)."""
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        status, body = get(base + "/snapshot", token)
        if status == 200:
            snap = json.loads(body)
            if len(snap["nodes"]["nodes"]) >= nodes and snap["history"]:
                return snap
        time.sleep(0.1)
    raise AssertionError(f"no snapshot with {nodes} node(s) from {base}")


@pytest.fixture(scope="module")
def monitored() -> Iterator[tuple[BrokerProcess, str]]:
    """A broker with its monitor on a free loopback port, an echo node, and some calls made;
    shared by the module's tests, which only read its pages (GETs change no figure they check)."""
    port = free_ports()[0]
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--monitor", f"127.0.0.1:{port}") as broker:
        base = broker.process.wait_for(r"monitor (http://\S+)").group(1)
        assert base == f"http://127.0.0.1:{port}"
        with run_node("echo", broker):
            client = Client(broker.clients, timeout=10.0)
            try:
                for i in range(20):
                    assert client.call("echo", "echo", {"i": i}) == {"i": i}
                with pytest.raises(HandlerNotFoundError):
                    client.call("nosuch", "thing", {})
            finally:
                client.close()
            wait_for_snapshot(base)
            # The pages show the broker's last snapshot: wait (15 s at most) for one taken
            # after every call, the refused one included; one taken mid-way read 1 of 20.
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline:
                done = json.loads(get(base + "/varz")[1])["commands"]["finished"]["completed"] >= 20
                if done and json.loads(get(base + "/errors")[1])["by_category"]["protocol"] >= 1:
                    break
                time.sleep(0.1)
            yield broker, base


def test_every_endpoint_answers_json_that_matches_its_documented_schema(monitored):
    """Each JSON endpoint validates against the schema block of the same `$id` in docs/monitoring.md."""
    _, base = monitored
    schemas = documented_schemas()
    assert set(ENDPOINTS) <= set(schemas)
    for path in ENDPOINTS:
        status, body = get(base + path)
        assert status == 200, path
        fastjsonschema.compile(schemas[path])(json.loads(body))
    varz = json.loads(get(base + "/varz")[1])
    assert varz["commands"]["finished"]["completed"] >= 20
    assert varz["latency_ms"]["samples"] >= 1
    nodes = json.loads(get(base + "/nodes")[1])["nodes"]
    assert [(n["name"], n["state"]) for n in nodes] == [("echo", "up")]
    errors = json.loads(get(base + "/errors")[1])
    assert errors["by_category"]["protocol"] >= 1  # the call to a service nobody offers


def test_metrics_parse_with_prometheus_own_parser_and_have_the_documented_names(monitored):
    """/metrics is valid exposition text holding every family of METRICS, each listed in the doc."""
    _, base = monitored
    status, body = get(base + "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    doc = DOC.read_text()
    for name in METRICS:
        assert name in families, name
        assert f"`{name}" in doc, name
    completed = [s.value for s in families["mesh_commands_finished"].samples if s.labels["outcome"] == "completed"]
    assert completed and completed[0] >= 20


def test_the_dashboard_page_is_one_self_contained_html_file(monitored):
    """/ serves HTML with inline CSS and JS and no external asset, so it works offline."""
    _, base = monitored
    status, body = get(base + "/")
    page = body.decode()
    assert status == 200 and page.startswith("<!doctype html>")
    assert "/snapshot" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_a_token_file_makes_the_monitor_require_a_bearer_token(tmp_path: Path):
    """With --monitor-token-file, data endpoints answer 401 without the token and 200 with it; the page stays open."""
    token = "s3cret-token-for-tests"
    token_file = tmp_path / "monitor.token"
    token_file.write_text(token + "\n")
    port = free_ports()[0]
    with run_broker(
        "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--monitor", f"127.0.0.1:{port}", "--monitor-token-file", str(token_file)
    ) as broker:
        base = broker.process.wait_for(r"monitor (http://\S+)").group(1)
        wait_for_snapshot(base, token, nodes=0)
        for path in ("/healthz", "/varz", "/metrics", "/snapshot"):
            assert get(base + path)[0] == 401, path
            assert get(base + path, "wrong")[0] == 401, path
            assert get(base + path, token)[0] == 200, path
        assert get(base + "/")[0] == 200
        assert token not in get(base + "/snapshot", token)[1].decode()


def test_a_monitor_off_loopback_without_a_token_is_refused():
    """`--monitor 0.0.0.0:PORT` with no token file stops the broker with a usage error, before it serves."""
    from mesh.testing import spawn

    with spawn(["broker", "--clients", "tcp://127.0.0.1:*", "--nodes", "tcp://127.0.0.1:*", "--events",
                "tcp://127.0.0.1:*", "--monitor", "0.0.0.0:0"]) as proc:
        assert proc.popen.wait(30) == 2
        assert "monitor-token-file" in proc.output()
