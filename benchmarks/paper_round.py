#!/usr/bin/env python
"""One round of the FedLEASE paper's data protocol on MiniLM: where its time goes, what share of the
machine's matmul peak it uses, and what a FedLEASE Phase-2 round costs against a FedIT round.

    PYTHONPATH=src python benchmarks/paper_round.py [--data-dir DATA_ROOT] [--threads N] [--out DIR]
        [--fedit-rounds 2] [--quick]

The federation is the `paper` suite's (docs/methods/fedlease.md#paper-setting) with the packaged MiniLM
for RoBERTa-large, on this CPU at `--precision auto`: 16 clients (SST-2, QNLI, MRPC and QQP x 4; CoLA
for QQP where the data root has no QQP, as the glue4 suites swap it), 1,000 training / 200 test
examples per client (MRPC 500 / 64: its class pools are too small), batch 128, 128 tokens, 2 local
epochs, frozen head, r = 4 on query/value. Test examples come out of each task's train split, as
paper-cpu does, so CoLA's and MRPC's small validation splits do not limit the clients. QNLI gets 860 /
200: the offline copy has no train split, and the train pool carved out of its validation split holds
1,742 examples of its smaller class, short of 4 x 500.

Runs, each through `fedpeft.run` (the engine a user gets), in this order:
- FedIT, `--fedit-rounds` rounds (2): every round is a steady-state training round;
- FedLEASE with the task clustering (M = 4, one expert per task: the cluster count the issue's target
  names), 1 warmup round + 1 Phase-2 round; the Phase-2 round is the one compared.

For each round, from training_history.json: the wall time split into training (the clients' fit calls),
evaluation (configure_evaluate and every client's evaluate call) and everything else (configure,
aggregation, clustering, bookkeeping); the useful FLOPs over the wall time as a share of the best
matmul peak measured in this run (max of fp32 and, where the CPU runs it natively, bf16). Useful
FLOPs: 4 N per real training token (forward and backward to the activations) and 2 N per real test
token (forward), N = the model's parameters outside the embeddings (benchmarks/throughput.py's count;
MiniLM: 10.98 M with the head). FedLEASE's expert LoRA FLOPs are not counted: both methods get
credit for the same backbone work, so the Phase-2 / FedIT ratio is a pure cost ratio.

Targets (issue 18): useful FLOPs >= 40 % of the best peak; FedLEASE Phase-2 (M = 4) <= 1.2x FedIT.
Output: tables on stdout; results.md and results.json in --out (default bench-results/paper-round/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (HOST_SPREAD_LIMIT, LoadMonitor, SpeedProbe, host_line, host_speed, isa_line,  # noqa: E402
                     machine_info, one_line_errors, status_line)
from throughput import QUICK, Settings, bench_matmul, non_embedding_params, table  # noqa: E402

from fedpeft.bench.suites import SUITES
from fedpeft.config import RunConfig
from fedpeft.models.backbone import load_backbone
from fedpeft.run import run
from fedpeft.run.assemble import build_algorithm
from fedpeft.run.federation import prepare_clients

TASKS = ("sst2", "qnli", "mrpc", "qqp")


def paper_config(data_dir: str, quick: bool, **kw) -> dict[str, Any]:
    """The paper suite's settings with MiniLM on this machine (see the module docstring)."""
    base = dict(SUITES["paper"].base)
    fourth = "qqp" if (Path(data_dir) / "glue" / "QQP" / "train.tsv").is_file() else "cola"
    tasks = [t if t != "qqp" else fourth for t in TASKS]
    base.update(model_name="minilm", tasks=[t for t in tasks for _ in range(4)], precision="auto",
                carve_out=True, test_source="train", data_dir=data_dir, quiet=True, device="cpu",
                eval_batch_size=256, task_samples=[*base["task_samples"], "qnli=860:200"])
    if quick:  # the plumbing at smoke size: a few examples per client, 1 epoch
        base.update(train_samples=32, test_samples=16, task_samples=["mrpc=32:16"], local_epochs=1,
                    batch_size=16, max_length=64)
    base.update(kw)
    return base


def federation_size(cfg: RunConfig) -> tuple[dict[int, dict[str, int]], int]:
    """Real tokens of each client's training and test data (the same seeded partition the run makes),
    and N, the model's parameters outside the embeddings (LoRA and head included)."""
    backbone = load_backbone(cfg.model_name)
    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    n_params, _ = non_embedding_params(build_algorithm(cfg, backbone, infos).runtime.model)
    toks = {c.cid: {"train": int(sum(len(x) for x in c.train.input_ids)),
                    "test": int(sum(len(x) for x in c.test.input_ids))} for c in clients}
    return toks, n_params


def run_rounds(settings: dict[str, Any], out: Path, label: str) -> list[dict[str, Any]]:
    """Run the configuration; its training_history.json's rounds (round 0, the first broadcast, dropped),
    each with its client records under "clients"."""
    run_dir = out / "runs" / label
    cfg = RunConfig(**settings, output_dir=str(run_dir), overwrite=True)
    print(f"  {label}: {cfg.global_rounds} round(s) ...", flush=True)
    run(cfg)
    history = json.loads((run_dir / "training_history.json").read_text())
    return [{**r, "clients": [c for c in history["records"] if c["round"] == r["round"]]}
            for r in history["rounds"] if r["round"] > 0]


def split(rnd: dict[str, Any], toks: dict[int, dict[str, int]], n_params: int, epochs: int,
          peak: float) -> dict[str, Any]:
    """A round's wall time split, and its useful FLOPs over the wall time (`peak` in FLOP/s)."""
    records = rnd["clients"]
    fit = sum(r.get("fit_seconds") or 0.0 for r in records)
    compute = sum(r.get("compute_seconds") or 0.0 for r in records)
    evaluate = rnd["evaluate_seconds"]
    trained = sum(r.get("real_tokens") or 0 for r in records)
    tested = sum(toks[r["client"]]["test"] for r in records if r.get("participated", True))
    useful = 4 * n_params * trained + 2 * n_params * tested
    wall = rnd["seconds"]
    return {"round": rnd["round"], "phase": rnd["phase"], "seconds": wall, "training": fit, "compute": compute,
            "evaluation": evaluate, "other": wall - fit - evaluate, "trained_tokens": trained,
            "tested_tokens": tested, "expected_trained_tokens": epochs * sum(t["train"] for t in toks.values()),
            "useful_gflop": useful / 1e9, "useful_gflops": useful / wall / 1e9, "share_of_best_peak": useful / wall / peak,
            "training_share_of_best_peak": 4 * n_params * trained / fit / peak if fit else float("nan"),
            "evaluation_share_of_best_peak": 2 * n_params * tested / evaluate / peak if evaluate else float("nan")}


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("FEDPEFT_DATA_DIR"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--fedit-rounds", type=int, default=2)
    ap.add_argument("--out", default="bench-results/paper-round")
    ap.add_argument("--quick", action="store_true", help="smoke check at a few examples per client")
    args = ap.parse_args(argv)
    if not args.data_dir or not (Path(args.data_dir) / "glue" / "SST-2" / "train.tsv").is_file():
        print("fedpeft: error: the GLUE data is not found: pass --data-dir or set FEDPEFT_DATA_DIR to a data root "
              "holding glue/SST-2, glue/QNLI, glue/MRPC and glue/CoLA (or glue/QQP)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    monitor = LoadMonitor(info["threads"]).start()
    started = time.perf_counter()
    print(f"CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs); {isa_line(info)}")
    print(f"torch {info['torch']}, {info['threads']} thread(s); load average at start "
          f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}")

    common = paper_config(args.data_dir, args.quick, threads=args.threads)
    resolved = RunConfig(method="fedit", **common).resolved()
    precision = resolved.precision
    print(f"federation: {len(common['tasks'])} clients ({', '.join(dict.fromkeys(common['tasks']))}), "
          f"{common['train_samples']} train / {common['test_samples']} test (MRPC {common['task_samples']}), "
          f"batch {common['batch_size']}, {common['max_length']} tokens, {common['local_epochs']} local epoch(s), "
          f"precision auto -> {precision}")

    # 1. the same run's matmul peaks: the large square and the shapes of a full paper batch
    s = QUICK if args.quick else Settings()
    rows = common["batch_size"] * common["max_length"] // 4  # a batch of ~32-token sentences, typical here
    mm = bench_matmul(s, [(f"paper batch (~{rows} tok): FFN up", rows, 384, 1536),
                          (f"paper batch (~{rows} tok): q/k/v/out", rows, 384, 384)])
    peaks = {k: v for k, v in mm["peak_gflops"].items() if k == "float32" or info["native_bf16"]}
    best = max(peaks.values())  # GFLOP/s
    print("matmul peaks (GFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + f"; best {best:.1f}")

    print("tokenizing the federation once to count its tokens ...", flush=True)
    toks, n_params = federation_size(resolved)

    # 2. the rounds, each run bracketed by matmul probes of the run's precision: the host's speed may
    # move under an idle guest (machine.SpeedProbe), and these probes say by how much it did here
    probe = SpeedProbe(s.matmul_square, 0.02 if args.quick else 0.5)
    dtype = "bfloat16" if precision == "bf16" else "float32"
    probe("float32"), probe(dtype)
    fedit = run_rounds({**common, "method": "fedit", "global_rounds": args.fedit_rounds}, out, "fedit")
    probe("float32"), probe(dtype)
    lease = run_rounds({**common, "method": "fedlease", "clustering": "task", "warmup_rounds": 1,
                        "global_rounds": 2}, out, "fedlease")
    probe("float32"), probe(dtype)
    speed = host_speed(probe)
    epochs = common["local_epochs"]
    rows_out = [("FedIT", split(r, toks, n_params, epochs, best * 1e9)) for r in fedit]
    rows_out += [(f"FedLEASE {'warmup' if r['phase'] == 'warmup' else 'Phase-2, M = 4'}",
                  split(r, toks, n_params, epochs, best * 1e9)) for r in lease]
    load = monitor.stop()
    if args.quick:
        load["status"] = "quick (smoke check, not a measurement)"
    # nothing else may have run here and the host's speed still have moved under the runs
    status = "PROVISIONAL" if load["status"] == "final" and speed["spread"] > HOST_SPREAD_LIMIT else load["status"]

    fedit_median = statistics.median(x["seconds"] for _, x in rows_out[:len(fedit)])
    phase2 = [x for label, x in rows_out if "Phase-2" in label]
    ratio = phase2[0]["seconds"] / fedit_median if phase2 else float("nan")
    headers = ["round", "wall s", "training s", "evaluation s", "other s", "trained tok", "useful GFLOP",
               "useful GFLOP/s", "of best peak", "training of best peak", "evaluation of best peak"]
    body = [[f"{label} (round {x['round']})", x["seconds"], x["training"], x["evaluation"], x["other"],
             f"{x['trained_tokens']:,}", x["useful_gflop"], x["useful_gflops"], f"{100 * x['share_of_best_peak']:.1f} %",
             f"{100 * x['training_share_of_best_peak']:.1f} %", f"{100 * x['evaluation_share_of_best_peak']:.1f} %"]
            for label, x in rows_out]
    lines = [
        "# FedLEASE paper-protocol round on MiniLM",
        "",
        f"- CPU: {info['cpu']}; {isa_line(info)}",
        f"- torch {info['torch']}, {info['threads']} thread(s); precision auto -> {precision}",
        f"- matmul peaks in this run (GFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items())
        + f"; best {best:.1f}",
        f"- N = {n_params:,} parameters outside the embeddings; 4 N FLOPs per trained token, 2 N per test token",
        f"- {status_line(load)}",
        f"- {host_line(speed, 'before, between and after the two runs')} → **{status}**",
        f"- {datetime.datetime.now().isoformat(timespec='seconds')}; total {time.perf_counter() - started:.0f} s",
        "",
        table(headers, body),
        "",
        f"FedLEASE Phase-2 (M = 4) round / FedIT round (median of {len(fedit)}): **{ratio:.2f}x** (target <= 1.2x)",
        f"Best useful share of the best peak: **{100 * max(x['share_of_best_peak'] for _, x in rows_out):.1f} %** "
        "(target >= 40 %)",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({
        "machine": info, "load": load, "precision": precision, "peaks": peaks, "best_peak": best,
        "n_params": n_params, "rounds": [{"label": label, **x} for label, x in rows_out],
        "phase2_over_fedit": ratio, "host_speed": speed, "status": status, "settings": common}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
