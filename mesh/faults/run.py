"""One fault run: namespaces, the mesh across them, recording clients, a schedule of faults,
then the checker's verdict and the stalls.

Rules of this module:

* The mesh is `topologies/faults.toml`, started as users start a multi-host mesh: one
  `mesh up FILE --host NAME` per host namespace, all from one directory. Its output is
  read for readiness, exits (with their status) and restarts.
* Client groups (`worker.py`) run in namespaces of their own and write the histories;
  the nemesis runs here, in the root namespace, and finds the processes to signal by
  their command line and network namespace in /proc.
* Every way out of `run` resumes what it paused, heals the network, stops the clients
  and every `mesh up`, and removes the namespaces. Every wait is bounded.
* After the last round: the clients stop, the cluster must agree on one leader and term,
  the final value of every key is read (twice, `FINAL_GAP_S` apart, so that a command
  still waiting somewhere lands before the second), and every process must be alive.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..client import Client
from ..protocol import MeshError
from ..security.credentials import load_credentials
from . import checker
from .nemesis import BROKER_ROLES, Round, Step, schedule
from .netns import Net

__all__ = ["TOPOLOGY", "Skip", "RunResult", "run"]

TOPOLOGY: Final = Path(__file__).parents[2] / "topologies" / "faults.toml"
CREDENTIALS: Final = "var/faults-mesh/credentials/dev.toml"
TOKEN: Final = "var/faults-mesh/monitor.token"
CLIENT_HOSTS: Final = {"c1": 11, "c2": 12}
READY_S: Final = 60.0
RECOVER_S: Final = 45.0
SETTLE_S: Final = 2.0
FINAL_GAP_S: Final = 3.0
BUDGET_S: Final = 5.0
_EXIT: Final = re.compile(r"^((?:broker|node):\S+) exited with (-?\d+)")


class Skip(RuntimeError):
    """The run cannot happen here (no namespaces); the message says why."""


class _Proc:
    """A command whose output lines are collected (stdout and stderr together)."""

    def __init__(self, argv: list[str], cwd: Path, log: Path) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self._log = log.open("a", buffering=1)
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)  # fmt: skip
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._log.write(line)
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        rx, deadline = re.compile(pattern), time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if m := rx.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.lines[-30:])
                    raise TimeoutError(f"no line matching {pattern!r} from {' '.join(self.argv)}:\n{tail}")
                self._changed.wait(min(left, 0.2))

    def stop(self, grace: float) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            return self.popen.wait()


@dataclass
class RunResult:
    """What one run measured (see `figures`)."""

    seed: int
    nemeses: list[str]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    verdict: checker.Verdict = field(default_factory=checker.Verdict)
    stalls: dict[str, list[float]] = field(default_factory=dict)
    exits: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # disagreement, dead processes
    skipped: list[str] = field(default_factory=list)  # nemeses this machine cannot run, and why
    work: str = ""

    def figures(self) -> dict[str, Any]:
        stall = {n: {"p50_s": round(checker.percentile(v, 0.5), 3), "p99_s": round(checker.percentile(v, 0.99), 3),
                     "max_s": round(max(v), 3) if v else None, "samples": len(v)} for n, v in self.stalls.items()}  # fmt: skip
        return {"seed": self.seed, "nemeses": self.nemeses, "rounds": len(self.rounds), **self.verdict.figures(),
                **self.exits, "stalls": stall, "problems": self.problems, "skipped": self.skipped, "work": self.work,
                "schedule": self.rounds}  # fmt: skip

    def broken(self) -> list[str]:
        v = self.verdict
        out = [f"{kind}: {n}" for kind, n in sorted(v.counts.items())]
        out += [f"aborts: {self.exits.get('aborts', 0)}"] if self.exits.get("aborts") else []
        out += [f"unexpected exits: {self.exits.get('unexpected', 0)}"] if self.exits.get("unexpected") else []
        return out + self.problems


class _Mesh:
    """The running mesh: its hosts' `mesh up` processes, the network, and how to reach it."""

    def __init__(self, net: Net, work: Path, topology: Path) -> None:
        self.net, self.work = net, work
        topo = tomllib.loads(topology.read_text())
        self.broker_host = {name: b["host"] for name, b in topo["brokers"].items()}
        self.clients = [b["clients"] for b in topo["brokers"].values()]
        self.monitors = {name: f"http://{b['monitor']}" for name, b in topo["brokers"].items()}
        self.node_host = {name: n["host"] for name, n in topo["nodes"].items()}
        self.ups: dict[str, _Proc] = {}
        self.token = ""

    def start(self, file: str) -> None:
        # One `mesh up FILE --host hN` per namespace, all at once, as operators start them
        # on their machines: the first to take the state directory's lock makes the keys.
        for host in sorted(set(self.broker_host.values()) | set(self.node_host.values())):
            argv = self.net.hosts[host].exec([sys.executable, "-m", "mesh", "up", file, "--host", host])
            self.ups[host] = _Proc(argv, self.work, self.work / f"up-{host}.log")
        for name, host in self.broker_host.items():
            self.ups[host].wait_for(rf"\[broker:{name}\] broker {name} ready", READY_S)
        for name, host in self.node_host.items():
            self.ups[host].wait_for(rf"\[node:{name}\S*\] node .* ready", READY_S)
        self.token = (self.work / TOKEN).read_text().strip()

    def page(self, broker: str) -> dict[str, Any] | None:
        request = urllib.request.Request(f"{self.monitors[broker]}/cluster", headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return json.load(response)
        except (OSError, ValueError):
            return None

    def pages(self) -> dict[str, dict[str, Any] | None]:
        return {b: self.page(b) for b in self.monitors}

    def agreed(self, timeout: float) -> dict[str, Any] | None:
        """The brokers' pages once they agree (see `checker.agreement`), None if not in time."""
        deadline = time.monotonic() + timeout
        while True:
            pages = self.pages()
            if not checker.agreement(pages):
                return pages
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)

    def roles(self) -> dict[str, str]:
        """role (`leader`, `follower-a`, `follower-b`) -> broker name, from agreed pages."""
        pages = self.agreed(RECOVER_S)
        if pages is None:
            raise RuntimeError(f"the brokers do not agree on a leader: {self.pages()}")
        leader = next(b for b, p in pages.items() if p and p["role"] == "leader")
        followers = sorted(b for b in pages if b != leader)
        return dict(zip(BROKER_ROLES, [leader, *followers], strict=True))

    def pid(self, process: str) -> int | None:
        """The pid of `broker:NAME` or `node:NAME` in its host's namespace (None if not running)."""
        kind, name = process.split(":")
        host = self.broker_host[name] if kind == "broker" else self.node_host[name]
        want = f"net:[{self.net.inode(host)}]"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/net") != want:
                    continue
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ours = b"mesh" in argv and kind.encode() in argv and b"--name" in argv and name.encode() in argv
            if ours and (kind == "broker" or argv[argv.index(b"--name") + 1] == name.encode()):
                return int(entry)
        return None

    def exits(self) -> list[tuple[str, int]]:
        return [(m.group(1), int(m.group(2))) for up in self.ups.values() for line in up.lines if (m := _EXIT.match(line))]

    def stop(self) -> None:
        for up in self.ups.values():
            up.stop(30.0)


class _Nemesis:
    """Carries out rounds against a `_Mesh`; remembers what it paused and killed."""

    def __init__(self, mesh: _Mesh) -> None:
        self.mesh = mesh
        self.paused: set[int] = set()
        self.killed: Counter[str] = Counter()
        self._stutter_stop = threading.Event()
        self._stutters: list[tuple[threading.Thread, int]] = []

    def _process(self, target: str, roles: dict[str, str]) -> str:
        return f"broker:{roles[target]}" if target in roles else f"node:{target}"

    def _hosts(self, side: str, roles: dict[str, str]) -> list[str]:
        out = []
        for part in side.split("+"):
            if part in roles:
                out.append(self.mesh.broker_host[roles[part]])
            elif part == "nodes":
                out.extend(sorted(set(self.mesh.node_host.values())))
            else:
                out.append(part)
        return out

    def do(self, step: Step, roles: dict[str, str]) -> str:
        """Carry out one step; returns what it did (for the schedule log)."""
        net = self.mesh.net
        if step.action in ("kill", "stop", "cont"):
            done = []
            for t in step.targets:
                process = self._process(t, roles)
                pid = self.mesh.pid(process)
                if pid is None:
                    done.append(f"{process}: not running")
                    continue
                sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}[step.action]
                os.kill(pid, sig)
                if step.action == "kill":
                    self.killed[process] += 1
                elif step.action == "stop":
                    self.paused.add(pid)
                else:
                    self.paused.discard(pid)
                done.append(f"{process} pid {pid}")
            return f"{step.action} {', '.join(done)}"
        if step.action == "partition":
            sides = [self._hosts(s, roles) for s in step.targets]
            net.partition(*sides)
            return "partition " + " | ".join("+".join(s) for s in sides)
        if step.action == "delay":
            if net.netem:
                net.delay(self._hosts("+".join(step.targets), roles), step.arg, step.arg2)
                return f"delay {step.arg}ms +-{step.arg2}ms"
            processes = [self._process(t, roles) for t in step.targets if t in roles] + [
                f"node:{n}" for t in step.targets if t == "nodes" for n in self.mesh.node_host]
            self._stutter(processes, step.arg, step.arg2)
            return f"stutter {', '.join(processes)} {step.arg}ms +-{step.arg2}ms"
        if step.action == "loss":
            net.loss(self._hosts("+".join(step.targets), roles), step.arg)
            return f"loss {step.arg / 10:.1f}%"
        if step.action == "heal":
            net.heal()
            return "heal"
        raise ValueError(f"unknown step {step.action!r}")

    def _stutter(self, processes: list[str], delay_ms: int, jitter_ms: int) -> None:
        """Latency and jitter where the kernel has no netem: each process is stopped for
        `delay_ms` +- `jitter_ms`, runs for twice that, and again, until `release`. Every
        message it sends or receives waits up to that long, as on a host with CPU steal."""
        stop = self._stutter_stop = threading.Event()
        rng = random.Random(delay_ms * 1000 + jitter_ms)
        for process in processes:
            pid = self.mesh.pid(process)
            if pid is None:
                continue
            phase = rng.uniform(0, 2 * delay_ms) / 1000

            def cycle(pid: int = pid, phase: float = phase, seed: int = rng.randrange(1 << 30)) -> None:
                r = random.Random(seed)
                stop.wait(phase)
                while not stop.is_set():
                    try:
                        os.kill(pid, signal.SIGSTOP)
                        time.sleep(max(0.0, r.uniform(delay_ms - jitter_ms, delay_ms + jitter_ms)) / 1000)
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        return
                    stop.wait(2 * delay_ms / 1000)

            thread = threading.Thread(target=cycle, name=f"stutter-{process}", daemon=True)
            self._stutters.append((thread, pid))
            thread.start()

    def release(self) -> None:
        """Resume everything paused and heal the network (safe to call twice)."""
        self._stutter_stop.set()
        for thread, pid in self._stutters:
            thread.join(5.0)
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._stutters.clear()
        for pid in list(self.paused):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.paused.clear()
        self.mesh.net.heal()

    def play(self, rnd: Round, log: list[dict[str, Any]]) -> None:
        """One round: its steps at their offsets, then wait until the cluster agrees again."""
        roles = self.mesh.roles()
        start = time.monotonic()
        entry: dict[str, Any] = {"nemesis": rnd.nemesis, "index": rnd.index, "plan": rnd.describe(),
                                 "roles": roles, "start": start, "wall": time.time(), "done": []}  # fmt: skip
        log.append(entry)
        try:
            for step in rnd.steps:
                time.sleep(max(0.0, start + step.at - time.monotonic()))
                entry["done"].append(f"+{time.monotonic() - start:.2f}s {self.do(step, roles)}")
        finally:
            self.release()
        if rnd.nemesis == "kill":
            process = self._process(rnd.steps[0].targets[0], roles)
            host = self.mesh.broker_host[roles[rnd.steps[0].targets[0]]]
            up = self.mesh.ups[host]
            mark = max(0, len(up.lines) - 50)
            up.wait_for(rf"\[{process}\] .* ready .*pid=", RECOVER_S, start=mark)
        entry["recovered"] = self.mesh.agreed(RECOVER_S) is not None
        time.sleep(SETTLE_S)
        entry["end"] = time.monotonic()


def _workers(mesh: _Mesh, work: Path, prefix: str, budget: float) -> list[_Proc]:
    out = []
    for group in CLIENT_HOSTS:
        argv = mesh.net.hosts[group].exec([
            sys.executable, "-m", "mesh.faults.worker", "--group", group, "--brokers", ",".join(mesh.clients),
            "--credentials", str(work / CREDENTIALS), "--out", str(work / "history"), "--prefix", prefix,
            "--budget", str(budget),
        ])  # fmt: skip
        out.append(_Proc(argv, work, work / f"worker-{group}.log"))
    for p in out:
        p.wait_for(r"group \S+ ready", READY_S)
    return out


def _finals(mesh: _Mesh, work: Path, keys: set[str]) -> dict[str, int]:
    """Each key's value, read until it answers, twice `FINAL_GAP_S` apart (the second counts)."""
    out: dict[str, int] = {}
    with Client(mesh.clients, timeout=BUDGET_S, credentials=load_credentials(work / CREDENTIALS)) as client:
        for _ in range(2):
            time.sleep(FINAL_GAP_S)
            for key in sorted(keys):
                for _attempt in range(10):
                    try:
                        out[key] = client.call("kv", "get", {"key": key})["value"] or 0
                        break
                    except MeshError:
                        time.sleep(1.0)
    return out


def _histories(work: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((work / "history").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def _exercise(mesh: _Mesh, net: Net, work: Path, plan: list[Round], result: RunResult, seed: int, nemeses: list[str],
              warmup: float, budget: float, echo: Any) -> tuple[list[checker.Op], dict[str, int]]:  # fmt: skip
    """Start the mesh and the clients, play the schedule, and read what the checker needs."""
    nemesis = _Nemesis(mesh)
    workers: list[_Proc] = []
    try:
        mesh.start("faults.toml")
        mesh.roles()
        workers = _workers(mesh, work, f"s{seed}", budget)
        time.sleep(warmup)
        if not net.netem and "latency" in nemeses:
            result.skipped.append("latency as network delay: this kernel has no sch_netem (tc netem); the processes stutter instead")
        for i, rnd in enumerate(plan):
            echo(f"round {i + 1}/{len(plan)}: {rnd.nemesis} {rnd.describe()}")
            nemesis.play(rnd, result.rounds)
    finally:
        nemesis.release()
        for w in workers:
            w.stop(budget + 10.0)
    pages = mesh.agreed(RECOVER_S) or mesh.pages()
    result.problems += checker.agreement(pages)
    records = _histories(work)
    ops = checker.pair(records)
    finals = _finals(mesh, work, {o.key for o in ops})
    for process in [f"broker:{b}" for b in mesh.broker_host] + [f"node:{n}" for n in mesh.node_host]:
        if mesh.pid(process) is None:
            result.problems.append(f"{process} is not running at the end")
    result.exits = checker.exits(mesh.exits(), nemesis.killed)
    return ops, finals


def run(seed: int, nemeses: list[str], rounds: int, *, work: Path | None = None, warmup: float = 3.0,
        budget: float = BUDGET_S, echo: Any = print) -> RunResult:  # fmt: skip
    """Run `rounds` rounds of each of `nemeses` against a fresh mesh and check the history.

    Args:
        work: directory for the mesh's state, the histories and logs (a new one if None).
        echo: where progress lines go.

    Raises:
        Skip: namespaces cannot be made here.
        RuntimeError: the mesh did not start or never agreed on a leader.
    """
    from .netns import unavailable

    reason = unavailable()
    if reason is not None:
        raise Skip(reason)
    work = Path(work or tempfile.mkdtemp(prefix="mesh-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "faults.toml").write_text(TOPOLOGY.read_text())
    plan = schedule(seed, nemeses, rounds)
    result = RunResult(seed, list(nemeses), work=str(work))
    hosts = ["h1", "h2", "h3", "h4", *CLIENT_HOSTS]
    with Net(hosts, addresses={**{f"h{i}": i for i in range(1, 5)}, **CLIENT_HOSTS}) as net:
        mesh = _Mesh(net, work, TOPOLOGY)
        try:
            ops, finals = _exercise(mesh, net, work, plan, result, seed, nemeses, warmup, budget, echo)
        finally:
            mesh.stop()
    result.verdict = checker.check(ops, finals)
    processes = sorted({o.process for o in ops})
    by_nemesis: dict[str, list[float]] = defaultdict(list)
    for r in result.rounds:
        by_nemesis[r["nemesis"]] += checker.stalls(ops, [r["start"]], processes)
    result.stalls = dict(by_nemesis)
    (work / "figures.json").write_text(json.dumps(result.figures(), indent=2, default=str))
    return result
