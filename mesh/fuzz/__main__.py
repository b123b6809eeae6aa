"""`python -m mesh.fuzz`: the end-to-end fuzz run, and `show` to rebuild one of its messages.

    python -m mesh.fuzz --seed 1 --duration 600           # prints the summary table
    python -m mesh.fuzz --seed 1 --duration 30 --json     # the figures as JSON
    python -m mesh.fuzz show --seed 1 --who client --index 41

Exit status: 0 when every bound of docs/fuzzing.md holds, 1 when one is broken, 2 when
the mesh could not be started.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from .attacks import Who, shot
from .run import Rates, run


def _table(figures: dict[str, Any], broken: list[str]) -> str:
    rows = [
        ("seed", figures["seed"]), ("duration s", figures["duration_s"]),
        *((f"sent on {via}", n) for via, n in sorted(figures["sent"].items())),
        *((f"received on {via}", n) for via, n in sorted(figures["received"].items())),
        ("must be answered", sum(figures["must_answer"].values())),
        ("unanswered", figures["unanswered"]), ("duplicate replies", figures["duplicate_replies"]),
        ("replies to strangers", figures["stranger_replies"]), ("sends refused (full)", figures["sends_refused_full"]),
        ("crashes", figures["crashes"]), ("broker restarts", figures["restarts"]),
        ("broker tracebacks", figures["tracebacks"]), ("max broker RSS MB", figures["max_rss_mb"]),
        ("victim calls", figures["victim_calls"]), ("victim failures", figures["victim_failures"]),
        ("victim p50 ms", figures["victim_p50_ms"]), ("victim p99 ms", figures["victim_p99_ms"]),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    out = [f"{name:<{width}}  {value}" for name, value in rows]
    for kind, n in figures["victim_failure_kinds"].items():
        out.append(f"  victim failure {kind}: {n}")
    for ex in figures["unanswered_examples"]:
        out.append(f"  unanswered {ex['who']}#{ex['index']} via {ex['via']} ({ex['kind']}): {' | '.join(ex['frames'])[:300]}")
    out.append("bounds: all hold" if not broken else "bounds broken:\n" + "\n".join(f"  {b}" for b in broken))
    return "\n".join(out)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--seed", default=1, show_default=True, type=int, help="Seed of every random choice of the run.")
@click.option("--duration", default=600.0, show_default=True, type=click.FloatRange(min=1), help="Seconds of attack.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option("--rate-scale", default=1.0, show_default=True, type=click.FloatRange(min=0.01), help="Multiply every attacker's rate.")
@click.pass_context
def main(ctx: click.Context, seed: int, duration: float, as_json: bool, rate_scale: float) -> None:
    """Attack a fresh `mesh up` on every port for DURATION seconds while a victim calls echo.echo."""
    if ctx.invoked_subcommand is not None:
        return
    base = Rates()
    rates = Rates(**{name: getattr(base, name) * (rate_scale if name != "victim" else 1.0) for name in base.__dataclass_fields__})
    try:
        result = run(seed, duration, rates=rates)
    except RuntimeError as err:
        click.echo(str(err), err=True)
        sys.exit(2)
    figures, broken = result.figures(), result.broken()
    click.echo(json.dumps({**figures, "broken": broken}) if as_json else _table(figures, broken))
    sys.exit(1 if broken else 0)


@main.command()
@click.option("--seed", required=True, type=int)
@click.option("--who", required=True, type=click.Choice([w.value for w in Who]))
@click.option("--index", required=True, type=click.IntRange(0))
def show(seed: int, who: str, index: int) -> None:
    """Rebuild message INDEX of attacker WHO in run SEED (with a placeholder token, the time now)."""
    s = shot(seed, Who(who), index, time.time())
    click.echo(f"{s.who}#{s.index} via {s.via} ({s.kind}), {len(s.frames)} frame(s):")
    for i, frame in enumerate(s.hex(4096)):
        click.echo(f"  [{i}] {frame}")


if __name__ == "__main__":
    main()
