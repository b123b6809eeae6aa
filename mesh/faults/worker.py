"""A client group of the fault suite: `python -m mesh.faults.worker`, run inside a client namespace.

Rules of this module:

* Each client is a thread with its own `Client` (its own connection, every broker's
  endpoint in its list, rotated so clients start on different brokers) and its own
  history file, `OUT/NAME.jsonl`; one operation at a time, so a client's records are in
  its order.
* Before a call the client writes its `invoke` record (command id, operation, key, budget,
  monotonic and wall time), after it the completion: `ok` with the value, `fail` with the
  code when the code proves the command never ran on any broker, `info` with the code
  otherwise (a timeout, a lost node, an error after a failover resend: it may have run).
  Every line is flushed as it is written, so a killed worker leaves a readable history.
* Roles: `own` clients increment a key of their own, `shared` clients increment one key
  together, `reader` clients read the shared key. Keys carry the run's prefix.
* SIGTERM (or SIGINT) stops the group: each client finishes the call it is in, then the
  process exits 0.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import IO, Any, Final

import click

from ..client import Client
from ..protocol import ErrorCode, MeshError, new_id
from ..security.credentials import load_credentials

__all__ = ["NEVER_RAN", "ROLES", "client_loop"]

# Codes the broker or node answers before a command can run, the same on every broker, so a
# failover resend cannot have left a first copy running elsewhere.
NEVER_RAN: Final = frozenset({
    ErrorCode.BAD_FORMAT, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.VALIDATION_FAILED, ErrorCode.MESSAGE_TOO_LARGE,
    ErrorCode.AUTHENTICATION_FAILED, ErrorCode.TOKEN_EXPIRED, ErrorCode.ACCESS_DENIED, ErrorCode.ENCRYPTION_FAILED,
    ErrorCode.SIGNATURE_INVALID, ErrorCode.TOKEN_REVOKED, ErrorCode.SECURITY_LEVEL_TOO_LOW,
})  # fmt: skip
ROLES: Final = ("own", "shared", "reader")
HEARTBEAT_S: Final = 0.5  # the clients' heartbeat: a silent broker is dead after 3 of them
LIVENESS: Final = 3
ERROR_PAUSE_S: Final = 0.05


class History:
    """One client's history file: a JSON object per line, flushed per line."""

    def __init__(self, path: Path, process: str) -> None:
        self.process = process
        self._file: IO[str] = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({"process": self.process, **record}, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


def client_loop(client: Client, history: History, role: str, key: str, budget: float, stop: threading.Event) -> None:
    """Call until `stop`, recording every call (see the module docstring)."""
    f = "read" if role == "reader" else "incr"
    index = 0
    while not stop.is_set():
        index += 1
        cid = new_id()
        history.write({"type": "invoke", "op": index, "f": f, "key": key, "id": cid, "budget": budget,
                       "mono": time.monotonic(), "wall": time.time()})  # fmt: skip
        record: dict[str, Any]
        try:
            if f == "incr":
                value = client.call("kv", "incr", {"key": key, "by": 1}, timeout=budget, command_id=cid)["value"]
            else:
                value = client.call("kv", "get", {"key": key}, timeout=budget, command_id=cid)["value"] or 0
            record = {"type": "ok", "value": value}
        except MeshError as err:
            record = {"type": "fail" if err.code in NEVER_RAN else "info", "code": int(err.code), "error": str(err)[:200]}
        except Exception as err:  # noqa: BLE001 - recorded without a code: the checker counts it as uncoded
            record = {"type": "info", "code": None, "error": repr(err)[:200]}
        history.write({**record, "op": index, "f": f, "key": key, "id": cid, "mono": time.monotonic(), "wall": time.time()})
        if record["type"] != "ok":
            stop.wait(ERROR_PAUSE_S)  # as a real client would, rather than spin on a fast refusal


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--group", required=True, help="Name of the group (the clients are GROUP-ROLE-N).")
@click.option("--brokers", required=True, help="Every broker's client endpoint, comma-separated.")
@click.option("--credentials", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory of the history files.")
@click.option("--prefix", required=True, help="Prefix of every key (one per run).")
@click.option("--own", default=2, show_default=True, type=click.IntRange(0, 64), help="Clients incrementing their own key.")
@click.option("--shared", default=2, show_default=True, type=click.IntRange(0, 64), help="Clients incrementing the shared key.")
@click.option("--readers", default=1, show_default=True, type=click.IntRange(0, 64), help="Clients reading the shared key.")
@click.option("--budget", default=5.0, show_default=True, type=click.FloatRange(min=0.5), help="Seconds per call.")
def main(group: str, brokers: str, credentials: str, out: str, prefix: str, own: int, shared: int, readers: int,
         budget: float) -> None:  # fmt: skip
    """Run a group of recording clients until SIGTERM."""
    endpoints = brokers.split(",")
    creds = load_credentials(credentials)
    Path(out).mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads, closers = [], []
    plan = [("own", i) for i in range(own)] + [("shared", i) for i in range(shared)] + [("reader", i) for i in range(readers)]
    for n, (role, i) in enumerate(plan):
        name = f"{group}-{role}-{i}"
        key = f"{prefix}-{name}" if role == "own" else f"{prefix}-shared"
        first = n % len(endpoints)
        client = Client(endpoints[first:] + endpoints[:first], timeout=budget, credentials=creds,
                        heartbeat_interval=HEARTBEAT_S, liveness=LIVENESS)  # fmt: skip
        history = History(Path(out) / f"{name}.jsonl", name)
        closers.append((client, history))
        threads.append(threading.Thread(target=client_loop, args=(client, history, role, key, budget, stop), name=name))
    for t in threads:
        t.start()
    click.echo(f"group {group} ready clients={len(threads)}", err=True)
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.2)
    for client, history in closers:
        client.close()
        history.close()


if __name__ == "__main__":
    main()
