"""`mesh bench --security`: command throughput with each security layer on, as a ratio of security off.

Rules of this module:

* One invocation runs five rows with the same shape as the command benchmark
  (`mesh.bench.common`): one broker process, one echo node process and `clients` AsyncClient
  processes each keeping `inflight` commands outstanding. Every row runs the same code
  below; only the credentials and the broker's security differ:

  ===========  =============================================================  =====
  row          broker                                                         level
  ===========  =============================================================  =====
  off          plain sockets, no gate                                         none
  curve        CURVE sockets and the ZAP authenticator, no gate (no tokens)  0
  tokens       CURVE + the gate (token, replay, policy), min level 1         1
  encrypted    + AES-256-GCM payloads both ways, min level 2                 2
  signed       + ed25519 signatures, checked by the node, min level 3        3
  ===========  =============================================================  =====

* The keys, token secret, policy and key ring come from one throw-away state
  directory made by `security.state.ensure_state`, as `mesh up` makes it. The node runs
  at the row's level so that an encrypted command gets an encrypted reply; in the
  signed row it checks every command's signature with the key of the client the broker
  names (one ed25519 check, from the state's trust store), as every node does.
* `ratio` is a row's throughput over the "off" row's, measured in the same invocation,
  so the figures stay comparable on a noisy machine. With a peer (`nats`), NATS request-
  reply is measured once in the same shape and run (`mesh/bench/nats.py`, plain as the
  command benchmark runs it) and every row also gets `ratio_nats`.
* Processes are spawned (never forked) and stopped by `common.measure`, the runner every
  command benchmark shares.
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

from ..process import tune_for_serving
from ..security.credentials import Credentials, load_credentials
from .common import (
    STARTUP_S,
    BenchSettings,
    Run,
    machine,
    measure,
    mesh_client,
    mesh_node,
    ratio,
    stop_when_set,
    wait_for_service,
)

__all__ = ["MODES", "format_security_report", "run_security_bench"]

CLIENT: Final = "bench"  # the client's name in the state directory (its CURVE key and token subject)
NODE: Final = "echo"  # the node's name: its CURVE key, and the policy lets it offer "echo"
TOKEN_TTL: Final = 3600.0


@dataclass(frozen=True, slots=True)
class Mode:
    """One row: its name, a label for people, and the security level (None: security off)."""

    name: str
    label: str
    level: int | None
    gate: bool  # the broker checks tokens, levels and the policy


MODES: Final = (
    Mode("off", "security off", None, gate=False),
    Mode("curve", "CURVE", 0, gate=False),
    Mode("tokens", "CURVE + tokens", 1, gate=True),
    Mode("encrypted", "+ encryption", 2, gate=True),
    Mode("signed", "+ signatures", 3, gate=True),
)


@dataclass(frozen=True, slots=True)
class _Peers:
    """What the processes of one row are given: the broker's state and both peers' credentials."""

    state: str | None
    client: Credentials | None
    node: Credentials | None


def _peers(mode: Mode, state: Path) -> _Peers:
    """The credentials of the client and node for `mode`, from a state directory."""
    if mode.level is None:
        return _Peers(None, None, None)
    client = load_credentials(state / "credentials" / f"{CLIENT}.toml")
    node = load_credentials(state / "credentials" / f"{NODE}.toml")
    if mode.level == 0:  # CURVE only: no token, nothing sealed
        client = replace(client, token=None, level=0, keyring=None, signing_key=None)
        node = replace(node, level=0, keyring=None)
    else:
        client = replace(client, level=mode.level)
        node = replace(node, level=mode.level)
    return _Peers(str(state), client, node)


# ----------------------------------------------------------------- processes


def _broker(clients_ep: str, nodes_ep: str, ready: Any, stop: Any, mode: Mode, state: str | None) -> None:
    import threading

    from ..broker.loop import BrokerServer, Endpoints

    secured: dict[str, Any] = {}
    if state is not None:
        from ..broker.secure import broker_security

        setup = broker_security(state, min_level=max(1, mode.level or 0))
        secured = {"secure": setup.secure, "zap": setup.zap}
        if mode.gate:
            secured["security"] = setup.security
    server = BrokerServer(Endpoints(clients_ep, nodes_ep), **secured)
    tune_for_serving()  # as `mesh broker` does
    ready.put((server.endpoints.clients, server.endpoints.nodes))
    threading.Thread(target=stop_when_set, args=(stop, server.stop), daemon=True).start()
    server.run()


def _run(mode: Mode, peers: _Peers) -> Run:
    """The command benchmark's processes, with `mode`'s broker and credentials."""
    return Run(
        _broker, mesh_node, mesh_client,
        serving=functools.partial(wait_for_service, timeout=STARTUP_S, creds=peers.client),
        broker_args=(mode, peers.state), worker_args=(peers.node,), client_args=(peers.client,),
    )


def run_security_bench(settings: BenchSettings, peer: str | None = None) -> dict[str, Any]:
    """Run every row of `MODES` with the same settings, in order; return the report.

    The state directory (keys, token secret, policy, key ring) is made for this run
    and removed after it. With `peer` (`nats`), NATS is measured first, and each row
    also carries its throughput as a ratio of NATS's.

    Raises:
        ValueError: an unknown peer (before anything runs).
    """
    from ..security.state import ensure_state

    if peer not in (None, "nats"):
        raise ValueError(f"no such peer: {peer!r}")
    report: dict[str, Any] = {"settings": asdict(settings), "machine": machine()}
    if peer:
        from .nats import measure_nats, versions

        report |= {"peer": peer, peer: measure_nats(settings)}
        report["machine"] |= versions()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-state-") as tmp:
        state = Path(tmp) / "state"
        ensure_state(state, nodes={NODE: [NODE]}, clients={CLIENT: ["admin"]}, token_ttl=TOKEN_TTL, now=time.time())
        for mode in MODES:
            figures = measure(_run(mode, _peers(mode, state)), settings)
            rows.append({"mode": mode.name, "label": mode.label, "level": mode.level, **figures})
    off = rows[0]["throughput"]
    for row in rows:
        row["ratio"] = ratio(row["throughput"], off)
        if peer:
            row[f"ratio_{peer}"] = ratio(row["throughput"], report[peer]["throughput"])
    return report | {"rows": rows}


def format_security_report(report: dict[str, Any]) -> str:
    """The report as a small table for people, one row per security layer (and NATS's, with a peer)."""
    s = report["settings"]
    peer = report.get("peer")
    row = "{:>15} {:>11} {:>9} {:>9} {:>14}" + (" {:>14}" if peer else "")
    lines = [
        (
            f"security: {s['clients']} clients x {s['inflight']} in flight, {s['payload']}-byte payloads, "
            f"{s['transport']}, {s['duration']:g}s per run, {report['machine']['cpus']} CPUs"
        ),
        row.format("", "commands/s", "p50 ms", "p99 ms", "ratio to off", *([f"ratio to {peer.upper()}"] if peer else [])),
    ]
    if peer:
        other = report[peer]
        lat = other["latency_ms"]
        lines.append(row.format(f"{peer.upper()} (plain)", f"{other['throughput']:,.0f}", f"{lat['p50']:.2f}",
                                f"{lat['p99']:.2f}", "", ""))
    for r in report["rows"]:
        lat = r["latency_ms"]
        extra = [f"{r[f'ratio_{peer}']:.2f}"] if peer else []
        lines.append(row.format(r["label"], f"{r['throughput']:,.0f}", f"{lat['p50']:.2f}", f"{lat['p99']:.2f}",
                                f"{r['ratio']:.2f}", *extra))
    return "\n".join(lines)
