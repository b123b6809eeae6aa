"""The nemeses' schedule: which fault, on what, when; all drawn from one seed. Sans-IO.

Rules of this module (docs/operations.md, "What each fault does", describes them for users):

* A schedule is a list of rounds; a round is one nemesis's steps, each at an offset in
  seconds from the round's start. The same seed, nemeses and round count give the same
  schedule; rounds of several nemeses are shuffled together.
* Brokers are named by role, resolved when the round starts: `leader`, and the followers
  `follower-a` and `follower-b` (in name order). `kv` is the kv node, `c1`/`c2` the client
  groups' hosts, `nodes` the nodes' host.
* Pauses last longer than every timeout that matters: the clients' liveness window
  (1.5 s), the nodes' (1.5 s) and the brokers' election timeout (0.5 s); the composite
  `pause-quorum` schedule is the one issue 16 describes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

__all__ = ["NEMESES", "BROKER_ROLES", "Step", "Round", "schedule"]

BROKER_ROLES: Final = ("leader", "follower-a", "follower-b")
NEMESES: Final = (
    "kill", "pause", "pause-quorum", "isolate-leader", "split", "bridge", "latency", "loss", "node-pause",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Step:
    """One action: `kill`/`stop`/`cont` a process (targets: roles or `kv`), `partition`
    (targets: sides joined by `|`, hosts by `+`), `delay` (arg: ms, arg2: jitter ms),
    `loss` (arg: per mille) on `targets` hosts, or `heal` every network fault."""

    at: float
    action: str
    targets: tuple[str, ...] = ()
    arg: int = 0
    arg2: int = 0


@dataclass(frozen=True, slots=True)
class Round:
    nemesis: str
    index: int
    steps: tuple[Step, ...]

    @property
    def length(self) -> float:
        """Seconds from the round's start to its last step."""
        return max(s.at for s in self.steps)

    def describe(self) -> str:
        return "; ".join(
            f"+{s.at:.1f}s {s.action} {(' | ' if s.action == 'partition' else ',').join(s.targets)}{f' {s.arg}' if s.arg else ''}"
            for s in self.steps
        )


def _round(nemesis: str, index: int, rng: random.Random) -> Round:
    role = rng.choice(BROKER_ROLES)
    d = round(rng.uniform(4.0, 8.0), 1)
    steps: tuple[Step, ...]
    if nemesis == "kill":
        steps = (Step(0.0, "kill", (role,)),)
    elif nemesis == "pause":
        steps = (Step(0.0, "stop", (role,)), Step(d, "cont", (role,)))
    elif nemesis == "pause-quorum":
        # Pause two (quorum lost) while commands on the third wait for their claims; 1 s later
        # pause the third; resume the first two; keep the third paused 22 s; resume it.
        pair = tuple(r for r in BROKER_ROLES if r != role)
        back = round(rng.uniform(1.5, 3.0), 1)
        steps = (Step(0.0, "stop", pair), Step(1.0, "stop", (role,)), Step(back, "cont", pair), Step(23.0, "cont", (role,)))
    elif nemesis == "isolate-leader":
        steps = (Step(0.0, "partition", ("leader", "follower-a+follower-b+nodes+c1+c2")), Step(d, "heal"))
    elif nemesis == "split":
        # One broker and one client group on the minority side, the rest with the nodes.
        others = "+".join(r for r in BROKER_ROLES if r != role)
        steps = (Step(0.0, "partition", (f"{role}+c1", f"{others}+nodes+c2")), Step(d, "heal"))
    elif nemesis == "bridge":
        # The two ends each see the middle broker, not each other.
        a, b = (r for r in BROKER_ROLES if r != role)
        steps = (Step(0.0, "partition", (a, b)), Step(d, "heal"))
    elif nemesis == "latency":
        ms = rng.choice((20, 50, 100))
        steps = (Step(0.0, "delay", ("leader", "follower-a", "follower-b", "nodes"), ms, ms // 2), Step(d, "heal"))
    elif nemesis == "loss":
        steps = (Step(0.0, "loss", ("leader", "follower-a", "follower-b", "nodes"), rng.choice((20, 50, 100))), Step(d, "heal"))
    elif nemesis == "node-pause":
        pause = round(rng.uniform(2.5, 5.0), 1)
        steps = (Step(0.0, "stop", ("kv",)), Step(pause, "cont", ("kv",)))
    else:
        raise ValueError(f"unknown nemesis {nemesis!r} (expected one of {', '.join(NEMESES)})")
    return Round(nemesis, index, steps)


def schedule(seed: int, nemeses: tuple[str, ...] | list[str], rounds: int) -> list[Round]:
    """`rounds` rounds of each nemesis, shuffled, from `seed`.

    Raises:
        ValueError: an unknown nemesis.
    """
    rng = random.Random(seed)
    out = [_round(n, i, rng) for n in nemeses for i in range(rounds)]
    rng.shuffle(out)
    return out
