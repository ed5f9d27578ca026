"""results.csv (one row per run), results.md (mean ± std per label, paper numbers alongside, and the
paired comparisons against FedLEASE and FedIT of bench/stats.py), paired.csv (those comparisons) and
results.png (overall metric per label, std error bars when there are several seeds) from the run folders of a matrix.

Definitions (the same as a run's summary.md):
- per-task value: the task's primary metric (accuracy; Matthews correlation for CoLA) at the
  headline round, i.e. the last scored non-warmup round, averaged over that task's clients;
- overall: the mean of the task means; best round: the non-warmup round with the highest overall;
- bytes per client per round: mean over the Phase-2 rounds (phase "train": no init broadcast, no
  warmup) of the round's bytes divided by the number of clients;
- seconds per round: mean wall time over the rounds that trained (init excluded);
- precision, device: what the run computed with (its resolved config.json: `--precision auto`
  is bf16 on hardware with native bf16, fp32 elsewhere).
The std over seeds is the sample standard deviation (ddof = 1); with one seed only the mean shows.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Iterable

from fedpeft.atomic import atomic_write
from fedpeft.bench.tables import FIXED_COLUMNS, TAIL_COLUMNS, mean_std, task_columns
from fedpeft.errors import FedPeftError
from fedpeft.hardware import CPU

# The FedLEASE paper's main GLUE table (docs/methods/fedlease.md#reference-results): RoBERTa-large,
# 16 clients (SST-2, QNLI, MRPC, QQP x 4), accuracy %.
PAPER_MAIN: dict[str, dict[str, float]] = {
    "fedit": {"sst2": 93.33, "qnli": 85.43, "mrpc": 76.35, "qqp": 73.82, "avg": 82.23},
    "feddpa": {"sst2": 91.90, "qnli": 83.13, "mrpc": 81.60, "qqp": 81.35, "avg": 84.49},
    "fedsa-lora": {"sst2": 91.97, "qnli": 82.70, "mrpc": 82.08, "qqp": 81.65, "avg": 84.60},
    "ifca": {"sst2": 92.95, "qnli": 85.90, "mrpc": 78.63, "qqp": 80.42, "avg": 84.48},
    "fedlease": {"sst2": 93.33, "qnli": 87.22, "mrpc": 86.93, "qqp": 83.57, "avg": 87.76},
}
# The paper's ablations, GLUE average accuracy. The paper's "clustered experts without adaptive top-M"
# does not say which k; it is shown next to both fixed top-k rows, marked with *.
PAPER_ABLATION: dict[str, tuple[float, str]] = {
    "fedlease-single-r": (82.00, ""),
    "fedlease-single-4r": (83.84, ""),
    "fedlease-per-client": (80.69, ""),
    "fedlease-top1": (85.91, "*"),
    "fedlease-top2": (85.91, "*"),
}


def row_from_history(label: str, seed: int, history: dict[str, Any], run_dir: str | Path = "") -> dict[str, Any]:
    """One results.csv row from a run's training_history.json (as a dict)."""
    meta, rounds = history.get("meta", {}), history.get("rounds", [])
    scored = [r for r in rounds if r.get("phase") != "warmup" and r.get("overall") is not None]
    if not scored:
        raise FedPeftError(f"run {label} seed {seed} has no scored round after warmup ({run_dir})")
    head = scored[-1]
    best = max(scored, key=lambda r: r["overall"])
    n_clients = len(meta.get("clients") or meta.get("tasks") or []) or 1
    phase2 = [r for r in rounds if r.get("phase") == "train"] or [r for r in rounds if r.get("phase") != "init"]
    trained = [r for r in rounds if r.get("phase") != "init"]
    row: dict[str, Any] = {"label": label, "method": meta.get("method", ""), "seed": seed}
    for task, value in head["per_task"].items():
        row[task] = value
    row.update(
        overall=head["overall"], best_round=best["round"], best_overall=best["overall"],
        bytes_up_per_client_round=_mean([r.get("bytes_up", 0) / n_clients for r in phase2]),
        bytes_down_per_client_round=_mean([r.get("bytes_down", 0) / n_clients for r in phase2]),
        seconds_per_round=_mean([r.get("seconds", 0.0) for r in trained]),
        total_seconds=sum(r.get("seconds", 0.0) for r in rounds),
        rounds=max((r["round"] for r in rounds), default=0), **_hardware_of(run_dir), run_dir=str(run_dir),
    )
    # LEFF family: analytic client memory (max over rounds), client compute per round (mean over the
    # clients' local runs), and steady-state bytes: uploads of rounds 1..T, the broadcasts that rounds
    # 2..T trained from (round 0's carries the one-time embeddings; the last is never used).
    memory = [r["peak_client_memory_bytes"] for r in rounds if r.get("peak_client_memory_bytes")]
    if memory:
        row["peak_client_memory_bytes"] = max(memory)
    compute = [r["compute_seconds"] for r in history.get("records", []) if r.get("compute_seconds") is not None]
    if compute:
        row["client_compute_seconds"] = _mean(compute)
    last = row["rounds"]
    row["steady_bytes_up_per_client_round"] = _mean([r.get("bytes_up", 0) / n_clients for r in trained])
    row["steady_bytes_down_per_client_round"] = _mean(
        [r.get("bytes_down", 0) / n_clients for r in rounds if 1 <= r["round"] < last])
    return row


def _hardware_of(run_dir: str | Path) -> dict[str, str]:
    """The precision and device a run actually used (its resolved config.json; a folder written
    before they were settings used float32 on the CPU)."""
    import json

    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"precision": saved.get("precision", "fp32"), "device": saved.get("device", CPU)}


def load_rows(refs: Iterable[Any]) -> list[dict[str, Any]]:
    """Rows for RunRefs (label, seed, run_dir) of finished runs."""
    from fedpeft.bench.runs import read_history

    return [row_from_history(r.label, r.seed, read_history(r.run_dir), r.run_dir) for r in refs]


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per label (in first-seen order): n, seeds and (mean, std) of every numeric column."""
    labels: list[str] = []
    for r in rows:
        if r["label"] not in labels:
            labels.append(r["label"])
    cols = task_columns(rows) + ["overall", "best_overall", "bytes_up_per_client_round",
                                 "bytes_down_per_client_round", "seconds_per_round", "total_seconds"]
    out = []
    for label in labels:
        group = [r for r in rows if r["label"] == label]
        agg = {"label": label, "method": group[0]["method"], "n": len(group),
               "seeds": [r["seed"] for r in group]}
        for c in cols:
            agg[c] = mean_std([r[c] for r in group if c in r])
        out.append(agg)
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _pm(ms: tuple[float, float | None], scale: float = 100.0, digits: int = 2) -> str:
    m, s = ms
    if m is None or math.isnan(m):
        return "—"
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if s is not None else "")


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    cols = FIXED_COLUMNS + task_columns(rows) + TAIL_COLUMNS
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in cols})
    return atomic_write(path, buf.getvalue())


def write_paired_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["label", "reference", "seeds", "differences", "mean", "low", "high", "resolved"])
    w.writeheader()
    w.writerows(rows)
    return atomic_write(path, buf.getvalue())


def markdown(rows: list[dict[str, Any]], *, title: str, description: str = "",
             paired: list[str] | None = None) -> str:
    """results.md; `paired`: the paired-comparison section (bench/stats.py markdown_lines)."""
    from fedpeft.data.tasks import get_task

    tasks = task_columns(rows)
    aggs = aggregate(rows)
    generation = any(get_task(t).is_generation for t in tasks if _known(t))
    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    primary = ("; ".join(f"{t}: {get_task(t).primary_metric}" for t in tasks if _known(t)) if generation
               else "accuracy; Matthews correlation for CoLA")
    paper_note = ("Paper: FedLEASE Table 1 (RoBERTa-large on GLUE: a different experiment, listed only to place "
                  "the methods)" if generation else
                  "Paper: the FedLEASE paper's Table 1 / ablation averages (docs/methods/fedlease.md#reference-results; "
                  "RoBERTa-large, QQP instead of CoLA, so not directly comparable)")
    lines += [
        "Values × 100 at the last round (the headline; the best round in its own column), mean ± sample std "
        f"over seeds. Per task: the primary metric ({primary}), mean over the "
        "task's clients; overall = mean of the task means. Communication: bytes per client per round, mean "
        f"over the Phase-2 rounds. {paper_note}.", "",
        "| label | seeds | " + " | ".join(tasks) + " | overall | best round | paper avg | KB up / client / round "
        "| KB down / client / round | s / round |",
        "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|---|",
    ]
    for a in aggs:
        paper = ""
        if a["label"] in PAPER_MAIN:
            paper = f"{PAPER_MAIN[a['label']]['avg']:.2f}"
        elif a["label"] in PAPER_ABLATION:
            v, mark = PAPER_ABLATION[a["label"]]
            paper = f"{v:.2f}{mark}"
        lines.append(
            f"| {a['label']} | {','.join(str(s) for s in a['seeds'])} | "
            + " | ".join(_pm(a[t]) for t in tasks)
            + f" | **{_pm(a['overall'])}** | {_pm(a['best_overall'])} | {paper or '—'} | "
            f"{_pm(a['bytes_up_per_client_round'], 1e-3, 1)} | {_pm(a['bytes_down_per_client_round'], 1e-3, 1)} | "
            f"{_pm(a['seconds_per_round'], 1.0, 1)} |")
    present = [a["label"] for a in aggs if a["label"] in PAPER_MAIN]
    if present:
        lines += ["", "Paper Table 1 (accuracy %, RoBERTa-large) for the labels above:", "",
                  "| label | SST-2 | QNLI | MRPC | QQP | Avg |", "|---|---|---|---|---|---|"]
        for label in present:
            p = PAPER_MAIN[label]
            lines.append(f"| {label} | {p['sst2']:.2f} | {p['qnli']:.2f} | {p['mrpc']:.2f} | {p['qqp']:.2f} | {p['avg']:.2f} |")
    if any(a["label"] in ("fedlease-top1", "fedlease-top2") for a in aggs):
        lines += ["", "\\* the paper's 'clustered experts without adaptive top-M' (85.91) does not state k."]
    lines += ["", "Ranking by overall (mean): " + " > ".join(
        a["label"] for a in sorted(aggs, key=lambda a: -a["overall"][0]))]
    if paired:
        lines += ["", "Which of these orderings the test data resolves: see the paired comparisons below."]
        lines += paired
    return "\n".join(lines) + "\n"


def _known(task: str) -> bool:
    from fedpeft.data.tasks import TASKS

    return task in TASKS


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> Path:
    from fedpeft.figures import figure as _figure, save as _save

    aggs = aggregate(rows)
    means = [a["overall"][0] * 100 for a in aggs]
    errs = [(a["overall"][1] or 0.0) * 100 for a in aggs]
    fig = _figure(max(6.0, 0.7 * len(aggs) + 2), 4.5)
    ax = fig.add_subplot()
    x = list(range(len(aggs)))
    has_std = any(a["overall"][1] is not None for a in aggs)
    bars = ax.bar(x, means, yerr=errs if has_std else None, capsize=4,
                  color=["tab:red" if a["label"] == "fedlease" else "tab:blue" for a in aggs])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([a["label"] for a in aggs], rotation=40, ha="right")
    ax.set_ylabel("overall (mean of task metrics) × 100")
    ax.set_title(title)
    ax.axhline(0.0, color="black", linewidth=0.8)  # bars start at 0 (CoLA's MCC can make a mean negative)
    return _save(fig, path)


def write_report(rows: list[dict[str, Any]], dest: str | Path, *, suite=None, seeds: list[int] | None = None) -> dict[str, Path]:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = suite.name if suite is not None else dest.name
    title = f"fedpeft bench: {name}"
    files = {"csv": write_csv(rows, dest / "results.csv"),
             "md": dest / "results.md"}
    from fedpeft.bench import stats

    leff = suite is not None and suite.extra.get("report") == "leff"
    if leff:
        from fedpeft.bench.leff_report import LEFF_REFERENCES, leff_markdown, nlg_values

        values = [nlg_values(r) for r in rows]  # read once: leff_markdown tabulates them for generation suites
        generation = bool(rows) and all(v is not None for v in values)
        comparisons, notes = ([], []) if generation else stats.compare_rows(rows, references=LEFF_REFERENCES)
    else:
        comparisons, notes = stats.compare_rows(rows)
    if comparisons:
        files["paired"] = write_paired_csv(stats.csv_rows(comparisons), dest / "paired.csv")
    paired = stats.markdown_lines(comparisons, notes)
    if leff:
        atomic_write(files["md"], leff_markdown(rows, title=title, description=suite.description, paired=paired,
                                                values=values))
    else:
        atomic_write(files["md"], markdown(rows, title=title, description=suite.description if suite else "",
                                           paired=paired))
    files["png"] = plot(rows, dest / "results.png", title=f"{name}: overall by method")
    return files
