#!/usr/bin/env python
"""A LEFF round against a FedAvg-full round on the leff-cpu suite's settings, and where LEFF's time goes.

    python benchmarks/leff_round.py [--rounds 3] [--distill-steps 200] [--threads 1] [--seed 1]
                                    [--variants paper ...] [--out DIR] [--data-dir DIR] [--quick]

Each variant is one `fedpeft run` (the in-process engine) of the leff-cpu suite's base settings
(src/fedpeft/bench/suites.py: SST-2, 4 clients, Dirichlet α = 0.05 over 4 × 128 examples, MiniLM,
64 tokens, 1 local epoch, batch 16, layer budget 1, r_c = 0.5) with `--distill-steps` (default 200,
the paper's and RunConfig's; the suite itself uses 20 to fit a CPU) and `--rounds` rounds. Variants:

- `fedavg-full`: the reference round (every client trains the whole model).
- `paper`: LEFF as the paper runs it: every segment's student initialised from evenly spaced
  teacher blocks and distilled for `--distill-steps` steps, every round.
- `reuse`: `--distill-reuse unchanged`: a segment whose teacher blocks and every block before it are
  unchanged since the round that distilled its student reuses that student (numerics change: the
  student was distilled on that round's draws; off by default).
- `warm`: `--distill-warm-start`: a segment distilled in an earlier round starts from that student
  (numerics change; off by default).

What one round costs: the engine's round r runs every client's fit, aggregates, configures round
r + 1 (LEFF: the importance batch and the distillation of round r + 1's students) and scores every
client; round 1's own students are distilled before the loop, outside any round. So rounds
1..R − 1 are whole LEFF rounds, and the table quotes their median (round R configures nothing).
Split: fit (Σ clients' fit), configure (LEFF: distillation + importance), evaluation, the rest.

The machine header (CPU model, instruction sets, threads, load average) comes from fedpeft.hardware;
the figures are PROVISIONAL when the 1-minute load average exceeded the thread count during the run.
Output: a table on stdout, results.md and results.json in --out (default bench-results/leff_round/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import LoadMonitor, isa_line, machine_info, status_line  # noqa: E402

from fedpeft.bench.suites import SUITES
from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError

VARIANTS = {
    "fedavg-full": {"method": "fedavg-full"},
    "paper": {"method": "leff"},
    "reuse": {"method": "leff", "distill_reuse": "unchanged"},
    "warm": {"method": "leff", "distill_warm_start": True},
    "reuse+warm": {"method": "leff", "distill_reuse": "unchanged", "distill_warm_start": True},
}


def config(variant: str, args, out: Path) -> RunConfig:
    values = {**SUITES["leff-cpu"].base, **VARIANTS[variant], "global_rounds": args.rounds,
              "distill_steps": args.distill_steps, "seed": args.seed, "threads": args.threads,
              "output_dir": str(out / variant), "quiet": True}
    if args.data_dir:
        values["data_dir"] = args.data_dir
    if args.quick:
        values.update(train_samples=32, test_samples=32)
    return RunConfig.from_dict(values, source=f"benchmarks/leff_round.py variant {variant!r}")


def one_run(variant: str, args, out: Path) -> dict[str, Any]:
    from fedpeft.run import run

    cfg = config(variant, args, out)
    t = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - t
    history = result.history
    rounds = []
    for entry in history.rounds:
        rnd = entry["round"]
        if rnd < 1 or rnd >= args.rounds:  # round R configures nothing: not a whole round
            continue
        recs = [r for r in history.records if r["round"] == rnd]
        fit = sum(r.get("fit_seconds") or 0.0 for r in recs)
        split = {"fit": fit, "configure (LEFF: distillation + importance)": entry["configure_seconds"],
                 "evaluation": entry["evaluate_seconds"]}
        split["rest (aggregation, bookkeeping)"] = entry["seconds"] - sum(split.values())
        nxt = next((e for e in history.rounds if e["round"] == rnd + 1), {})
        rounds.append({"round": rnd, "seconds": entry["seconds"], "split": split,
                       "distilled_segments": len(nxt.get("distilled", [])),
                       "reused_segments": len(nxt.get("reused", [])), "overall": entry["overall"]})
    final = history.rounds[-1]["overall"]
    return {"variant": variant, "run_seconds": wall, "rounds": rounds, "final_overall": final,
            "median_round_seconds": statistics.median(r["seconds"] for r in rounds)}


def render(res: dict[str, Any]) -> str:
    h = res["header"]
    out = [f"# LEFF round vs FedAvg-full round{' (--quick: smoke check)' if h['quick'] else ''}", "",
           f"- {h['date']}; CPU {h['cpu']} ({h['logical_cpus']} logical CPUs); {isa_line(h)}",
           f"- torch {h['torch']}, {h['threads']} thread(s); leff-cpu settings, {h['rounds']} rounds, "
           f"distill_steps {h['distill_steps']}, seed {h['seed']}",
           f"- {status_line(res['load'])}", ""]
    ref = res["runs"].get("fedavg-full")
    rows = []
    for name, r in res["runs"].items():
        med = r["median_round_seconds"]
        mid = sorted(r["rounds"], key=lambda x: x["seconds"])[(len(r["rounds"]) - 1) // 2]
        sp = mid["split"]
        rows.append(f"| {name} | {med:.1f} | " + " | ".join(f"{v:.1f}" for v in sp.values())
                    + f" | {mid['distilled_segments']} / {mid['reused_segments']} | "
                    + (f"{med / ref['median_round_seconds']:.2f}×" if ref else "-") + f" | {r['final_overall']:.4f} |")
    out += ["| variant | median round s | fit s | configure s (distillation) | evaluation s | rest s | "
            "segments distilled / reused (next round) | vs FedAvg-full | final overall |",
            "|---|---|---|---|---|---|---|---|---|", *rows, "",
            "Split columns: the median round's. Rounds 1..R−1 (each includes the next round's distillation).",
            "final overall: one seed, a smoke signal, not an accuracy comparison."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (≥ 2; the median is over rounds 1..R-1)")
    ap.add_argument("--distill-steps", type=int, default=200, help="distillation steps per student (paper: 200)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["fedavg-full", "paper"], choices=list(VARIANTS))
    ap.add_argument("--out", default="bench-results/leff_round")
    ap.add_argument("--data-dir", default=None, help="data root with glue/SST-2 and glue/WNLI (default: $FEDPEFT_DATA_DIR)")
    ap.add_argument("--quick", action="store_true", help="32 train / 32 test per client: a smoke check")
    args = ap.parse_args(argv)
    try:
        if args.rounds < 2:
            raise FedPeftError(f"--rounds must be at least 2 (round R configures nothing), got {args.rounds}")
        if args.threads < 1:
            raise FedPeftError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        logging.getLogger("fedpeft").setLevel(logging.WARNING)
        out = Path(args.out)
        info = machine_info()
        res: dict[str, Any] = {"header": {"date": datetime.datetime.now().isoformat(timespec="seconds"), **info,
                                          "rounds": args.rounds, "distill_steps": args.distill_steps,
                                          "seed": args.seed, "quick": args.quick}, "runs": {}}
        print(f"CPU {info['cpu']} | {isa_line(info)} | threads {info['threads']}", flush=True)
        monitor = LoadMonitor(info["threads"]).start()
        with tempfile.TemporaryDirectory() as tmp:
            for v in args.variants:
                r = one_run(v, args, Path(tmp))
                res["runs"][v] = r
                print(f"{v}: median round {r['median_round_seconds']:.1f} s, rounds "
                      + ", ".join(f"{x['seconds']:.1f}" for x in r["rounds"]) + f"; final overall {r['final_overall']:.4f}",
                      flush=True)
        monitor.stop()
        res["load"] = monitor.summary(quick=args.quick)
        ref = res["runs"].get("fedavg-full")
        res["status"] = res["load"]["status"]
        res["ratio_to_fedavg_full"] = ({v: r["median_round_seconds"] / ref["median_round_seconds"]
                                        for v, r in res["runs"].items()} if ref else None)
        report = render(res)
        print("\n" + report)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(report + "\n")
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
        return 0
    except FedPeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
