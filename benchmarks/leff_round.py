#!/usr/bin/env python
"""A LEFF round against a FedAvg-full round on the leff-cpu suite's settings, and where LEFF's time goes.

    python benchmarks/leff_round.py [--rounds 3] [--distill-steps 200] [--threads 1] [--seed 1]
                                    [--variants fedavg-full paper ...] [--out DIR] [--data-dir DIR] [--quick]

Every variant builds the leff-cpu suite's federation (src/fedpeft/bench/suites.py: SST-2, 4 clients,
Dirichlet α = 0.05 over 4 × 128 examples, MiniLM, 64 tokens, 1 local epoch, batch 16, layer budget 1,
r_c = 0.5, --precision auto) with `--distill-steps` (default 200, the paper's and RunConfig's; the
suite itself uses 20 to fit a CPU) and runs `--rounds` whole rounds through the algorithm, as the
in-process engine does: configure (LEFF: importance + distillation of the round's students), every
client's fit, aggregation, then every client scores the global model. Variants:

- `fedavg-full`: the reference round (every client trains the whole model);
- `paper`: LEFF as the paper runs it (the defaults: per-step teacher, fp32 distillation, no reuse);
- `cached`: `--distill-teacher cached` (the teacher's outputs once per round; equal up to rounding);
- `bf16`: `--distill-precision run` (distillation under the run's autocast: bf16 here when native);
- `reuse`: `--distill-reuse unchanged` (a student whose blocks are unchanged is reused);
- `fast`: the three together.

`--step-costs S` adds a paired measurement of one distillation step: the segment of blocks 1..L−1
(the longest a budget-1 client needs) distilled for S steps per-step (the paper's loop), with the
cached teacher (its one-off cache build timed apart), and cached under bf16 autocast, interleaved
over 3 passes; it prints the median seconds per step of each.

Per round: configure / fit / aggregate / evaluate seconds, the segments distilled and reused; the
table quotes each variant's median round and its ratio to FedAvg-full's median round. The machine
header (CPU model, instruction sets, threads, load average) comes from fedpeft.hardware; the figures
are PROVISIONAL when other processes used the cores meanwhile (machine.LoadMonitor). Output: a
table on stdout, results.md and results.json in --out (default bench-results/leff_round/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
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
    "cached": {"method": "leff", "distill_teacher": "cached"},
    "bf16": {"method": "leff", "distill_precision": "run"},
    "reuse": {"method": "leff", "distill_reuse": "unchanged"},
    "fast": {"method": "leff", "distill_teacher": "cached", "distill_precision": "run", "distill_reuse": "unchanged"},
}
PARTS = ("configure", "fit", "aggregate", "evaluate")


def config(variant: str, args) -> RunConfig:
    values = {**SUITES["leff-cpu"].base, **VARIANTS[variant], "global_rounds": max(args.rounds, 2),
              "distill_steps": args.distill_steps, "seed": args.seed, "threads": args.threads, "quiet": True}
    if args.data_dir:
        values["data_dir"] = args.data_dir
    if args.quick:
        values.update(train_samples=32, test_samples=32, distill_examples=64)
    return RunConfig.from_dict(values, source=f"benchmarks/leff_round.py variant {variant!r}").resolved()


def one_variant(variant: str, args) -> dict[str, Any]:
    from fedpeft.models.backbone import load_backbone
    from fedpeft.run import bound

    cfg = config(variant, args)
    alg, clients = bound(cfg, load_backbone(cfg.model_name))
    ids = list(range(len(clients)))
    state = alg.init()
    rounds = []
    for rnd in range(1, args.rounds + 1):
        t = {}
        t0 = time.perf_counter()
        ins = alg.configure(state, rnd, ids)
        t["configure"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        replies = {c.cid: alg.fit(ins[c.cid], c) for c in clients}
        t["fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        state = alg.aggregate(state, rnd, replies)
        t["aggregate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluation = alg.configure_evaluate(state, rnd, ids, ins)
        for c in clients:
            alg.evaluate(evaluation[c.cid], c)
        t["evaluate"] = time.perf_counter() - t0
        info = state.get("round_info", {}).get(rnd, {})
        rounds.append({"round": rnd, "seconds": sum(t.values()), "split": t,
                       "distilled": len([d for d in info.get("distilled", []) if d.get("steps")]),
                       "reused": len(info.get("reused", [])),
                       "importance_seconds": info.get("importance_seconds"), "distill_seconds": info.get("distill_seconds"),
                       "teacher_cache_seconds": info.get("teacher_cache_seconds")})
        inner = (f" (importance {info['importance_seconds']:.1f}, distillation {info['distill_seconds']:.1f})"
                 if "distill_seconds" in info else "")
        print(f"  {variant} round {rnd}: {sum(t.values()):.1f} s (" + ", ".join(
            f"{k} {v:.1f}{inner if k == 'configure' else ''}" for k, v in t.items())
              + f"; distilled {rounds[-1]['distilled']}, reused {rounds[-1]['reused']})", flush=True)
    return {"variant": variant, "precision": cfg.precision, "rounds": rounds,
            "median_round_seconds": statistics.median(r["seconds"] for r in rounds)}


def step_costs(args) -> dict[str, Any]:
    """Median seconds per distillation step of segment 1..L-1: per-step teacher, cached teacher, cached + bf16."""
    from fedpeft.algorithms.leff.distill import TeacherCache, distill_segment
    from fedpeft.hardware import autocast
    from fedpeft.models.backbone import load_backbone
    from fedpeft.run import bound

    cfg = config("paper", args)
    alg, _ = bound(cfg, load_backbone(cfg.model_name))
    state = alg.init()
    alg.load_global(state)
    emb, blocks, proxy, owner = alg.runtime.extra["embeddings"], alg.blocks(), alg.proxy(), alg.runtime.extra["block_owner"][0]
    a, b = 1, len(blocks) - 1
    t = time.perf_counter()
    cache = TeacherCache(emb, blocks, proxy, starts={a}, ends={b}, chunk=64, owner=owner)
    cache_seconds = time.perf_counter() - t
    kw = dict(rate=cfg.compression_rate, alpha=cfg.distill_alpha, steps=args.step_costs, lr=cfg.distill_lr,
              batch_size=cfg.distill_batch_size, seed=1, owner=owner)
    modes = {"per-step": (None, "fp32"), "cached": (cache, "fp32"), "cached + bf16": (cache, "bf16")}
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(3):
        for m, (c, precision) in modes.items():
            t = time.perf_counter()
            with autocast(precision, next(blocks[0].parameters()).device):
                distill_segment(emb, blocks, a, b, proxy, teacher_cache=c, **kw)
            samples[m].append((time.perf_counter() - t) / args.step_costs)
    out = {"segment": [a, b], "steps": args.step_costs, "cache_build_seconds": cache_seconds,
           "texts": len(proxy), "seconds_per_step": {m: statistics.median(v) for m, v in samples.items()},
           "samples": samples}
    print("distillation step, segment %d-%d: " % (a, b) + ", ".join(
        f"{m} {v:.3f} s/step" for m, v in out["seconds_per_step"].items())
          + f"; cache build {cache_seconds:.1f} s for {len(proxy)} texts", flush=True)
    return out


def render(res: dict[str, Any]) -> str:
    h = res["header"]
    out = [f"# LEFF round vs FedAvg-full round{' (--quick: smoke check)' if h['quick'] else ''}", "",
           f"- {h['date']}; CPU {h['cpu']} ({h['logical_cpus']} logical CPUs); {isa_line(h)}",
           f"- torch {h['torch']}, {h['threads']} thread(s); leff-cpu settings, {h['rounds']} round(s) per variant, "
           f"distill_steps {h['distill_steps']}, seed {h['seed']}",
           f"- {status_line(res['load'])}", ""]
    ref = res["runs"].get("fedavg-full")
    out += ["| variant | rounds | median round s | " + " | ".join(f"{p} s" for p in PARTS)
            + " | of which distillation s | segments distilled / reused | vs FedAvg-full |", "|---" * (len(PARTS) + 6) + "|"]
    for name, r in res["runs"].items():
        med = r["median_round_seconds"]
        mid = sorted(r["rounds"], key=lambda x: x["seconds"])[(len(r["rounds"]) - 1) // 2]
        out.append(f"| {name} | {len(r['rounds'])} | {med:.1f} | " + " | ".join(f"{mid['split'][p]:.1f}" for p in PARTS)
                   + f" | {mid['distill_seconds'] or 0.0:.1f} | {mid['distilled']} / {mid['reused']} | "
                   + (f"{med / ref['median_round_seconds']:.2f}×" if ref else "-") + " |")
    out += ["", "Part columns: the median round's. configure = LEFF's importance batch + distillation of the "
            "round's students (+ the teacher cache under `cached`)."]
    sc = res.get("step_costs")
    if sc:
        base = sc["seconds_per_step"]["per-step"]
        out += ["", f"One distillation step, segment {sc['segment'][0]}–{sc['segment'][1]}, median of 3 interleaved passes "
                f"of {sc['steps']} steps:", "", "| mode | s / step | vs per-step |", "|---|---|---|"]
        out += [f"| {m} | {v:.3f} | {v / base:.2f}× |" for m, v in sc["seconds_per_step"].items()]
        out += ["", f"The cache itself: {sc['cache_build_seconds']:.1f} s for {sc['texts']} texts, once per round."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per variant (the table quotes the median)")
    ap.add_argument("--distill-steps", type=int, default=200, help="distillation steps per student (paper: 200)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", nargs="*", default=["fedavg-full", "paper"], choices=list(VARIANTS),
                    help="variants to run whole rounds of (none: only --step-costs)")
    ap.add_argument("--out", default="bench-results/leff_round")
    ap.add_argument("--data-dir", default=None, help="data root with glue/SST-2 and glue/WNLI (default: $FEDPEFT_DATA_DIR)")
    ap.add_argument("--step-costs", type=int, default=0, metavar="S",
                    help="also time S distillation steps per mode (per-step, cached, cached + bf16), interleaved")
    ap.add_argument("--quick", action="store_true", help="32 train / 32 test per client, 64 distillation texts: a smoke check")
    args = ap.parse_args(argv)
    try:
        if args.rounds < 1:
            raise FedPeftError(f"--rounds must be at least 1, got {args.rounds}")
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
        if args.step_costs > 0:
            res["step_costs"] = step_costs(args)
        for v in args.variants:
            res["runs"][v] = one_variant(v, args)
            print(f"{v}: median round {res['runs'][v]['median_round_seconds']:.1f} s", flush=True)
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
