"""FedLEASE's router logs across a bench's runs: adaptive top-M against fixed top-k, per seed and task.

    python benchmarks/router_logs.py BENCH_OUT/paper-cpu [--labels fedlease fedlease-top2] [--out FILE.md]

For every run folder LABEL-seedK under the suite folder whose history holds router logs (FedLEASE, scored
with the mixture), it prints:
1. per run: M (the clusters found), the last round's overall, and the router logs of the last round,
   means over the clients and modules: experts per token, the own expert's gate mass γ_own, the share of
   tokens routed to the own expert alone (no router gradient there), the share whose γ is one-hot on any
   expert, and the router's entropy (docs/methods/fedlease.md#router-logs);
2. per label and task, the same logs and the task's metric at the last round, means over the seeds;
3. per label and layer (query and value modules together), γ_own and the own-only share at the last round.

It reads the runs' training_history.json and clustering.json only; nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

LOGS = ("experts_per_token", "gamma_own", "own_only_share", "single_expert_share", "router_entropy")
SHORT = {"experts_per_token": "experts/token", "gamma_own": "γ_own", "own_only_share": "own only",
         "single_expert_share": "one-hot", "router_entropy": "entropy (nats)"}
PRIMARY = {"cola": "matthews", "stsb": "pearson"}


def load(run_dir: Path) -> dict | None:
    """The last scored round's client records with router logs, and the run's facts; None without logs."""
    try:
        hist = json.loads((run_dir / "training_history.json").read_text())
    except (OSError, ValueError):
        return None
    records = [r for r in hist.get("records", []) if "gamma_own" in r]
    if not records:
        return None
    last = max(r["round"] for r in records)
    rounds = {r["round"]: r for r in hist["rounds"]}
    try:
        m = json.loads((run_dir / "clustering.json").read_text())["num_clusters"]
    except (OSError, ValueError, KeyError):
        m = None
    match = re.fullmatch(r"(.+)-seed(\d+)", run_dir.name)
    return {"label": match.group(1), "seed": int(match.group(2)), "round": last, "M": m,
            "overall": rounds.get(last, {}).get("overall"),
            "records": [r for r in records if r["round"] == last]}


def mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else float("nan")


def fmt(x: float, digits: int = 3) -> str:
    return "—" if x != x else f"{x:.{digits}f}"


def layer_of(key: str) -> int | None:
    m = re.fullmatch(r"[a-z_]+/(\d+)\.\w+", key)
    return int(m.group(1)) if m else None


def layer_mean(runs: list[dict], name: str, layer: int) -> float:
    """`name` at one layer (its query and value modules), mean over each run's clients, then over the runs."""
    return mean(mean(v for c in r["records"] for k, v in c.items() if k.startswith(name + "/") and layer_of(k) == layer)
                for r in runs)


def report(runs: list[dict]) -> str:
    lines = ["## Runs (last round; means over clients and modules)", "",
             "| label | seed | round | M | overall × 100 | " + " | ".join(SHORT[k] for k in LOGS) + " |",
             "|---|---|---|---|---|" + "---|" * len(LOGS)]
    for r in sorted(runs, key=lambda r: (r["label"], r["seed"])):
        lines.append(f"| {r['label']} | {r['seed']} | {r['round']} | {r['M'] if r['M'] is not None else '—'} | "
                     f"{fmt(100 * r['overall'], 2) if r['overall'] is not None else '—'} | "
                     + " | ".join(fmt(mean(c.get(k) for c in r["records"])) for k in LOGS) + " |")
    labels = sorted({r["label"] for r in runs})
    tasks = sorted({c["task"] for r in runs for c in r["records"]})
    lines += ["", "## By task (last round; means over the task's clients, then over seeds)", "",
              "| label | task | seeds | metric × 100 | " + " | ".join(SHORT[k] for k in LOGS) + " |",
              "|---|---|---|---|" + "---|" * len(LOGS)]
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        for task in tasks:
            per_seed = [[c for c in r["records"] if c["task"] == task] for r in mine]
            per_seed = [cs for cs in per_seed if cs]
            if not per_seed:
                continue
            metric = PRIMARY.get(task, "accuracy")
            vals = {k: mean(mean(c.get(k) for c in cs) for cs in per_seed) for k in (*LOGS, metric)}
            lines.append(f"| {label} | {task} | {len(per_seed)} | {fmt(100 * vals[metric], 2)} | "
                         + " | ".join(fmt(vals[k]) for k in LOGS) + " |")
    lines += ["", "## By layer (last round; γ_own / own-only share, query and value modules together, means over "
              "clients and seeds)", ""]
    layers = sorted({layer_of(k) for r in runs for c in r["records"] for k in c if layer_of(k) is not None})
    lines += ["| label | " + " | ".join(f"layer {l}" for l in layers) + " |", "|---|" + "---|" * len(layers)]
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        cells = [f"{fmt(layer_mean(mine, 'gamma_own', layer), 2)} / {fmt(layer_mean(mine, 'own_only_share', layer), 2)}"
                 for layer in layers]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite_dir", type=Path, help="a bench suite folder: OUT/SUITE holding LABEL-seedK run folders")
    ap.add_argument("--labels", nargs="+", help="only these labels (default: every run with router logs)")
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    if not args.suite_dir.is_dir():
        print(f"fedpeft: error: {args.suite_dir} is not a folder", file=sys.stderr)
        return 2
    runs = [r for d in sorted(args.suite_dir.iterdir()) if d.is_dir() and (r := load(d)) is not None
            and (not args.labels or r["label"] in args.labels)]
    if not runs:
        print(f"fedpeft: error: no finished FedLEASE run with router logs under {args.suite_dir}", file=sys.stderr)
        return 2
    text = f"# Router logs: {args.suite_dir.name}\n\n" + report(runs)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
