"""`python -m mesh.faults`: the fault suite (docs/operations.md, "Fault suite").

    python -m mesh.faults --seed 1 --rounds 10                      # every nemesis, one mesh each
    python -m mesh.faults --seed 1 --rounds 2 --nemesis kill --nemesis pause --together
    python -m mesh.faults --seed 1 --rounds 10 --json faults.json   # the figures as JSON too

Exit status: 0 when the checker finds nothing, 1 when it complains, 2 when the mesh could
not be started, 3 when namespaces cannot be made here (the reason is printed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .nemesis import NEMESES
from .run import RunResult, Skip, run

COLUMNS = ("rounds", "ops", "ok", "fail", "info", "lost", "doubled", "duplicate_values", "stale", "backward",
           "unanswered", "aborts", "unexpected")  # fmt: skip


def _row(name: str, r: RunResult) -> dict[str, Any]:
    f = r.figures()
    stalls = [s for n, s in f["stalls"].items() if n == name or name == "together"]
    row = {c: f.get(c, 0) for c in COLUMNS}
    row["rounds"] = len(r.rounds)
    row["stall_p50_s"] = stalls[0]["p50_s"] if len(stalls) == 1 else None
    row["stall_p99_s"] = stalls[0]["p99_s"] if len(stalls) == 1 else None
    return row


def _table(rows: dict[str, dict[str, Any]]) -> str:
    cols = [*COLUMNS, "stall_p50_s", "stall_p99_s"]
    heads = ["nemesis", *cols]
    lines = [[name, *(str(row[c]) for c in cols)] for name, row in rows.items()]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(heads)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*heads), *(fmt.format(*line) for line in lines)])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--seed", default=1, show_default=True, type=int, help="Seed of the schedule (targets, durations, order).")
@click.option("--rounds", default=10, show_default=True, type=click.IntRange(1), help="Rounds of each nemesis.")
@click.option("--nemesis", "nemeses", multiple=True, type=click.Choice(NEMESES), help="Only these (repeatable).")
@click.option("--together", is_flag=True, help="All nemeses' rounds shuffled into one run on one mesh.")
@click.option("--work", type=click.Path(file_okay=False), help="Directory for state, histories and logs.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the figures here as JSON.")
def main(seed: int, rounds: int, nemeses: tuple[str, ...], together: bool, work: str | None, json_out: str | None) -> None:
    """Run the fault suite and print its figures per nemesis."""
    chosen = list(nemeses or NEMESES)
    groups = [("together", chosen)] if together else [(n, [n]) for n in chosen]
    results: dict[str, RunResult] = {}
    try:
        for i, (name, group) in enumerate(groups):
            click.echo(f"== {name} (seed {seed + i})")
            where = Path(work) / name if work else None
            results[name] = run(seed + i, group, rounds, work=where, echo=click.echo)
            for b in results[name].broken():
                click.echo(f"  BROKEN {b}")
    except Skip as err:
        click.echo(f"fault suite skipped: {err}", err=True)
        sys.exit(3)
    except (RuntimeError, TimeoutError) as err:
        click.echo(f"fault suite: the mesh did not run: {err}", err=True)
        sys.exit(2)
    rows = {name: _row(name, r) for name, r in results.items()}
    click.echo(_table(rows))
    for name, r in results.items():
        for s in r.skipped:
            click.echo(f"skipped {s}")
        for a in r.verdict.anomalies[:5]:
            click.echo(f"{name}: {a.kind} on {a.key}: {a.detail} ({', '.join(a.ops)}) in {r.work}/history")
    if json_out:
        Path(json_out).write_text(json.dumps({"seed": seed, "rows": rows, "runs": {n: r.figures() for n, r in results.items()}},
                                             indent=2, default=str))  # fmt: skip
    sys.exit(1 if any(r.broken() for r in results.values()) else 0)


if __name__ == "__main__":
    main()
