"""`fedpeft tune`: a per-method grid over one setting, scored on a validation carve-out, never on test.

The FedLEASE paper picks each method's learning rate from a grid; doing that on the test clients would
flatter every method. Here every grid point of every method runs with `--validation-fraction F` (a
stratified hold-out of each client's own training data replaces the test split), and the pick is the
value with the best last-round validation overall, mean over the seeds given. The suite's test runs
then use the picked value (an entry override in bench/suites.py, with a comment citing the table).

The grid is an ordinary derived suite (`<suite>-tune`, entries `<label>-<key>=<value>`), so finished
points are skipped, stopped ones resumed and edited settings refused exactly as in `fedpeft bench`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics
from pathlib import Path
from typing import Any, Callable

from fedpeft.atomic import atomic_write
from fedpeft.bench.matrix import _say, run_matrix
from fedpeft.bench.runs import is_finished, read_history, run_dir_for
from fedpeft.bench.suites import Entry, Suite
from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError


def parse_values(key: str, values: list[str]) -> list[Any]:
    """The grid values converted to the type of the RunConfig field `key` (float, int, bool or str)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    name = key.replace("-", "_")
    if name not in fields:
        raise FedPeftError(f"--param {key!r} is not a setting: see `fedpeft run --help` for the names")
    if name in ("seed", "output_dir", "validation_fraction", "tasks", "method"):
        raise FedPeftError(f"--param {key} cannot be tuned: it defines the run, not a hyperparameter of it")
    f = fields[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    out = []
    for raw in values:
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                out.append(raw.lower() in ("true", "1"))
            elif isinstance(default, int):
                if not float(raw).is_integer():
                    raise ValueError(raw)
                out.append(int(float(raw)))
            elif isinstance(default, float):
                out.append(float(raw))
            else:
                out.append(raw)
        except ValueError:
            raise FedPeftError(f"--values: {raw!r} is not a valid value for {name}") from None
    if len(set(map(str, out))) != len(out):
        raise FedPeftError("--values lists a value twice")
    return out


def tune_suite(suite: Suite, key: str, values: list[Any], fraction: float,
               labels: list[str] | None = None) -> tuple[Suite, dict[str, tuple[str, Any]]]:
    """The derived grid suite, and for each grid label its (method label, value)."""
    if not 0.0 < fraction < 1.0:
        raise FedPeftError(f"--validation-fraction must be in (0, 1), got {fraction}")
    # validates the labels (seed 0 is a placeholder); by default the main methods, not the ablations,
    # which inherit their method's pick
    entries = [(e, s) for e, s in suite.plan([0], labels) if labels or e.seeds == "all"]
    grid, origin = [], {}
    for entry, _ in entries:
        if key in entry.overrides:
            raise FedPeftError(f"suite entry {entry.label!r} fixes {key} itself: tune another setting or method")
        for v in values:
            label = f"{entry.label}-{key}={v}"
            grid.append(Entry(label, {**entry.overrides, key: v}, "all"))
            origin[label] = (entry.label, v)
    derived = Suite(name=f"{suite.name}-tune", description=f"{suite.description}; grid over {key}, scored on a "
                    f"{fraction:g} validation carve-out of each client's training data",
                    base={**suite.base, "validation_fraction": fraction}, entries=tuple(grid))
    return derived, origin


def tune(suite: Suite, key: str, raw_values: list[str], *, fraction: float = 0.2, seeds: list[int] | None = None,
         out: str | Path = "bench", labels: list[str] | None = None, data_dir: str | None = None,
         threads: int | None = None, report_only: bool = False, backbone=None, runner: Callable | None = None,
         say: Callable[[str], None] = _say, archive: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) the grid, then write tune-<key>.md and .csv; returns {"picks", "md", "csv"}.
    `archive`: also copy every finished grid point's records there, as `fedpeft bench --archive`."""
    values = parse_values(key, raw_values)
    seeds = list(seeds or [1])
    derived, origin = tune_suite(suite, key, values, fraction, labels)
    if not report_only:
        run_matrix(derived, seeds, out, data_dir=data_dir, threads=threads, backbone=backbone,
                   runner=runner, say=say)
    scores: dict[str, dict[Any, list[tuple[int, float]]]] = {}
    pending, finished = [], []
    for entry, seed in derived.plan(seeds):
        run_dir = run_dir_for(Path(out), derived, entry.label, seed)
        label, v = origin[entry.label]
        if not is_finished(run_dir):
            pending.append(f"{entry.label} seed {seed}")
            continue
        finished.append((run_dir, entry.label, seed))
        rounds = [r for r in read_history(run_dir)["rounds"] if r["phase"] != "warmup" and r["overall"] is not None]
        if rounds:
            scores.setdefault(label, {}).setdefault(v, []).append((seed, rounds[-1]["overall"]))
    if pending:
        say(f"tune {suite.name}: not finished, left out: {', '.join(pending)}")
    if not scores:
        raise FedPeftError(f"no finished grid points to report in {Path(out) / derived.name}")
    # max() keeps the first of equal means, i.e. the value listed first
    picks = {label: max((v for v in values if v in by_v), key=lambda v: statistics.fmean(x for _, x in by_v[v]))
             for label, by_v in scores.items()}
    dest = Path(out) / derived.name
    dest.mkdir(parents=True, exist_ok=True)
    # one table per tuned setting: grids over lr and then warmup_rounds share the derived folder
    md, csv_path = dest / f"tune-{key}.md", dest / f"tune-{key}.csv"
    _write(md, csv_path, suite, key, values, fraction, seeds, scores, picks)
    say(f"tune {suite.name}: picks {', '.join(f'{lbl} {key}={v}' for lbl, v in picks.items())}; table in {md}")
    if archive is not None:
        from fedpeft.bench.archive import archive_runs

        copied, kept = archive_runs((d, run_dir_for(Path(archive), derived, label, seed))
                                    for d, label, seed in finished)
        say(f"tune {suite.name}: archived {copied} grid points in {Path(archive) / derived.name}"
            + (f" ({kept} already there)" if kept else ""))
    return {"picks": picks, "md": md, "csv": csv_path}


def _write(md: Path, csv_path: Path, suite: Suite, key: str, values: list[Any], fraction: float,
           seeds: list[int], scores: dict[str, dict[Any, list[tuple[int, float]]]], picks: dict[str, Any]) -> None:
    def cell(pairs: list[tuple[int, float]] | None) -> str:
        if not pairs:
            return "—"
        xs = [x for _, x in pairs]
        mean = 100 * statistics.fmean(xs)
        return f"{mean:.2f}" if len(xs) == 1 else f"{mean:.2f} ± {100 * statistics.stdev(xs):.2f}"

    lines = [f"# fedpeft tune: {suite.name}, grid over {key}", "",
             f"Validation overall × 100 at the last round (mean over seeds {', '.join(map(str, seeds))}): each "
             f"client scores on a stratified {fraction:g} hold-out of its own training data, never on the test "
             "split. The pick is the best mean; ties go to the value listed first.", "",
             f"| method | {' | '.join(f'{key}={v}' for v in values)} | pick |",
             "|---|" + "---|" * (len(values) + 1)]
    rows = []
    for label, by_v in scores.items():
        cells = [f"**{cell(by_v.get(v))}**" if v == picks[label] else cell(by_v.get(v)) for v in values]
        lines.append(f"| {label} | {' | '.join(cells)} | {picks[label]} |")
        for v in values:
            for seed, x in by_v.get(v, []):
                rows.append({"method": label, key: v, "seed": seed, "validation_overall": x,
                             "picked": v == picks[label]})
    atomic_write(md, "\n".join(lines) + "\n")
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=["method", key, "seed", "validation_overall", "picked"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(csv_path, buf.getvalue())
