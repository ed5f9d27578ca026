"""Accuracy against privacy: FedIT and FedLEASE on the glue4-mini federation under user-level DP.

Every run is a bench suite's run of that method (default glue4-mini, src/fedpeft/bench/suites.py:
16 clients, SST-2, QNLI, MRPC and CoLA x 4, MiniLM, the suite's rounds and sizes) with `--dp` added:
updates clipped to C, noise multiplier sigma, and the epsilon the accountant reports after the last
round (RDP, dp-accounting, replace-one, delta = --delta). One row per (method, sigma) plus the
non-private run; the table is the mean over --seeds. Runs go to OUT/<method>-<mode>-s<sigma>-seed<k>/
and a finished one is not run again, so an interrupted grid continues where it stopped.

    python benchmarks/dp_tradeoff.py                      # 2 methods x (no DP + 5 sigmas): 12 runs
    python benchmarks/dp_tradeoff.py --tiny               # smoke size: 8 clients, 16 examples each, 6 runs
    python benchmarks/dp_tradeoff.py --epsilons 100 10 1  # target epsilons instead of sigmas
    python benchmarks/dp_tradeoff.py --modes central local --seeds 1 2 3
    python benchmarks/dp_tradeoff.py --suite glue4-cpu    # a federation that learns more (about 5 min per run)

The DP noise is seeded (--dp-seed = the run seed) so the table can be reproduced; a private
deployment leaves --dp-seed unset (docs/privacy.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

from fedpeft.bench.runs import is_finished
from fedpeft.bench.suites import get_suite, with_swap
from fedpeft.bench.tables import mean_std
from fedpeft.config import RunConfig

TINY = dict(train_samples=16, test_samples=16, task_samples=[], max_length=32, batch_size=8)


def plan(args):
    suite, said = with_swap(get_suite(args.suite), args.fourth_task, args.data_dir)
    if said:
        print(said, file=sys.stderr, flush=True)
    points = [("off", None, None)]  # the non-private run
    for mode in args.modes:
        if args.epsilons:
            points += [(mode, None, e) for e in args.epsilons]
        else:
            points += [(mode, s, None) for s in args.noises]
    runs = []
    for label in args.methods:
        entry = next(e for e in suite.entries if e.label == label)
        for mode, sigma, eps in points:
            for seed in args.seeds:
                tag = "plain" if mode == "off" else f"{mode}-" + (f"s{sigma:g}" if sigma is not None else f"e{eps:g}")
                out = Path(args.out) / f"{label}-{tag}-seed{seed}"
                values = suite.config(entry, seed, output_dir=str(out), data_dir=args.data_dir).to_dict()
                if args.tiny:
                    tasks = list(dict.fromkeys(values["tasks"]))
                    values.update(TINY, tasks=[t for t in tasks for _ in range(2)])
                values.update(threads=args.threads, quiet=True)
                if mode != "off":
                    values.update(dp=mode, dp_clip=args.clip, dp_delta=args.delta, dp_seed=seed,
                                  dp_noise=sigma, dp_epsilon=eps)
                runs.append((label, mode, sigma, eps, seed, RunConfig.from_dict(values, source="dp_tradeoff")))
    return suite, runs


def row_of(label, mode, sigma, eps, seed, run_dir: Path) -> dict:
    history = json.loads((run_dir / "training_history.json").read_text())
    last = max(history["rounds"], key=lambda r: r["round"])
    row = {"method": label, "dp": mode, "target_epsilon": eps, "sigma": last.get("dp_noise", sigma),
           "epsilon": last.get("dp_epsilon"), "seed": seed, "overall": last["overall"],
           "clipped": (last["dp_clipped"] / last["dp_updates"]) if last.get("dp_updates") else None,
           "seconds": sum(r.get("seconds", 0) for r in history["rounds"])}
    row.update({f"task:{t}": v for t, v in last["per_task"].items()})
    return row


def fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}g}" if abs(v) >= 100 else f"{v:.{digits}f}"
    return str(v)


def table(rows, args) -> str:
    tasks = sorted({k for r in rows for k in r if k.startswith("task:")})
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["dp"], r["sigma"] if r["dp"] != "off" else None, r["target_epsilon"]), []).append(r)
    head = ["method", "DP", "sigma", "epsilon", "overall"] + [t[5:] for t in tasks] + ["clipped", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, mode, sigma, _), rs in groups.items():
        overall, sd = mean_std([r["overall"] for r in rs])
        eps = rs[0]["epsilon"]
        cells = [method, mode, fmt(sigma, 3) if sigma is not None else "-",
                 "∞ (no DP)" if mode == "off" else fmt(eps, 3),
                 f"{overall:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")]
        cells += [f"{mean_std([r.get(t) for r in rs])[0]:.3f}" for t in tasks]
        clipped = [r["clipped"] for r in rs if r["clipped"] is not None]
        cells += [f"{sum(clipped) / len(clipped):.0%}" if clipped else "-", str(len(rs))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["fedit", "fedlease"])
    ap.add_argument("--modes", nargs="+", default=["central"], choices=["central", "local"])
    ap.add_argument("--suite", default="glue4-mini", help="the bench suite whose federation and settings are used")
    ap.add_argument("--noises", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.3, 1.0],
                    help="noise multipliers sigma (default grid)")
    ap.add_argument("--epsilons", nargs="+", type=float, default=None, help="target epsilons instead of --noises")
    ap.add_argument("--clip", type=float, default=0.5, help="C (default 0.5: a little below the median update "
                                                            "norm of glue4-mini's FedIT rounds, 0.53-0.70)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1])
    ap.add_argument("--tiny", action="store_true", help="smoke size: 2 clients per task, 16 train / 16 test each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None, help="data root (default: $FEDPEFT_DATA_DIR)")
    ap.add_argument("--fourth-task", default="auto", help="as for fedpeft bench")
    ap.add_argument("--out", default=None, help="default: bench-results/dp_tradeoff-SUITE")
    args = ap.parse_args(argv)
    args.out = args.out or f"bench-results/dp_tradeoff-{args.suite}"
    if args.tiny:
        args.out = str(Path(args.out).with_name(Path(args.out).name + "-tiny"))
        if args.noises == ap.get_default("noises"):
            args.noises = [0.03, 1.0]

    from fedpeft.run import run

    suite, runs = plan(args)
    rows = []
    for i, (label, mode, sigma, eps, seed, cfg) in enumerate(runs, 1):
        run_dir = Path(cfg.output_dir)
        if not is_finished(run_dir):
            t0 = time.time()
            print(f"[{i}/{len(runs)}] {run_dir.name} ...", file=sys.stderr, flush=True)
            run(cfg)
            print(f"[{i}/{len(runs)}] {run_dir.name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        rows.append(row_of(label, mode, sigma, eps, seed, run_dir))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as fh:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    text = (f"# Accuracy vs privacy on {suite.name}{' (tiny)' if args.tiny else ''}\n\n"
            f"User-level DP, C = {args.clip:g}, delta = {args.delta:g}, epsilon after the last round (RDP accountant of "
            f"dp-accounting, one client's data replaced). 'overall' is the mean of the task means of the last "
            f"round; 'clipped' is the share of updates clipped in it (central only).\n\n{table(rows, args)}\n")
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
