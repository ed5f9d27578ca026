#!/usr/bin/env python
"""Throughput of fedpeft's training path on this machine, every figure measured in ONE run.

    python benchmarks/throughput.py [--quick] [--threads N] [--out DIR] [--data-dir DIR] [--sections ...]

Sections (one function each):

1. machine matmul peak: float32 and bfloat16 GFLOP/s, at a large square size and at MiniLM's own
   shapes (tokens per batch × 384 × 384/1536); the peak of a dtype is the max of its rows;
2. local training on real SST-2 sentences: one client through `FedIT.fit` (so `train_local`
   exactly as FedIT calls it: LoRA r=4 on query/value, head trained, batch 32), fp32 and (where the
   CPU has native bf16) bf16, each with `--encoder-path padded` (the reference) and `varlen` (the
   padding-free forward and cheaper dropout, models/varlen.py): the fast path's gain in the same run;
3. the same step on synthetic random tokens, 32 × 64, no padding;
4. one FedIT round of 8 SST-2 clients through the in-process engine, with where the time goes;
5. a short FedIT run in fp32 and in bf16 with the same seed: final accuracies and their gap.

Training FLOPs are counted as 4 × N per real (non-padding) token, N = every parameter of the model
except the backbone's `embeddings` module (encoder layers + pooler + LoRA + head): 2N for the
forward pass and 2N for the backward pass to the activations (the frozen weights get no weight
gradient). Attention-score FLOPs (∝ sequence length) are not counted.

Timings are medians over >= 3 passes after a discarded warm-up pass, the variants interleaved;
`--threads N` sets torch's thread count (default: torch's own). Output: tables on stdout, and
results.md + results.json in --out (default bench-results/throughput/). results.json has the
headline figures as top-level plain numbers: `fp32_share_of_fp32_peak`, `bf16_share_of_bf16_peak`
(null without native bf16), `native_bf16` (true/false), each share for the encoder path a run uses
by default (`headline_encoder_path`), and `*_by_encoder_path` for both paths. The run is PROVISIONAL
when other processes used the cores meanwhile (machine.LoadMonitor: their CPU time from /proc), or
when the host's own speed moved under it: a matmul probe of the pass's dtype before and after every
training pass (SpeedProbe) gives `host_speed_spread`, the fastest over the slowest fp32 probe, and
beyond HOST_SPREAD_LIMIT the run is not final even with the guest idle. The same probes give
`fp32_share_of_adjacent_peak` / `bf16_share_of_adjacent_peak`: each pass against the machine's speed
of its own seconds, the median over passes (a VM's host moves both together). `--reps N` takes more
passes for a steadier median.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (HOST_SPREAD_LIMIT, LoadMonitor, SpeedProbe, host_line, host_speed, isa_line,  # noqa: E402
                     machine_info, status_line)

from fedpeft import metrics, training
from fedpeft.algorithms.base import Client, ClientInfo
from fedpeft.config import ENCODER_PATHS, RunConfig
from fedpeft.errors import FedPeftError
from fedpeft.data.batching import Encoded, train_batches
from fedpeft.run.assemble import build_algorithm
from fedpeft.run.federation import prepare_clients
from fedpeft.engines.local import LocalEngine
from fedpeft.models.backbone import load_backbone
from fedpeft.records.history import RunHistory
from fedpeft.run import run

REPO = Path(__file__).resolve().parents[1]
MODEL = "minilm"
SEED = 42
DEFAULT_PATH = RunConfig().encoder_path  # the path a run takes unless told: the headline figures are its
SECTIONS = ("matmul", "training", "synthetic", "round", "accuracy")


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    reps: int = 3  # measured passes per figure (after one discarded warm-up pass)
    matmul_square: int = 2048
    matmul_min_seconds: float = 0.2  # each matmul sample repeats the product for at least this long
    probe_seconds: float = 0.25  # the matmul probe before and after each training pass (SpeedProbe)
    batch_size: int = 32
    local_examples: int = 640  # section 2: one client, SST-2 train sentences
    local_epochs: int = 1
    synthetic_batches: int = 4  # section 3: batches of batch_size × synthetic_len per pass
    synthetic_len: int = 64
    round_clients: int = 8  # section 4
    round_train: int = 200
    round_test: int = 100
    round_epochs: int = 2  # RunConfig's default local_epochs
    round_rounds: int = 3  # every round is reported; the table quotes the median round
    acc_clients: int = 2  # section 5
    acc_train: int = 400
    acc_test: int = 200
    acc_rounds: int = 3
    acc_epochs: int = 2


QUICK = Settings(reps=3, matmul_square=768, matmul_min_seconds=0.05, probe_seconds=0.02, local_examples=64,
                 synthetic_batches=1, round_clients=4, round_train=32, round_test=32, round_epochs=1,
                 round_rounds=1, acc_train=64, acc_test=64, acc_rounds=1, acc_epochs=1)


# ---------------------------------------------------------------------------------------- helpers
def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """An aligned pipe table: readable as plain text and valid Markdown."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def resolve_data_dir(arg: str | None) -> str:
    root = arg or os.environ.get("FEDPEFT_DATA_DIR")
    if not root or not (Path(root) / "glue" / "SST-2" / "train.tsv").is_file():
        raise FedPeftError(f"SST-2 not found{f' under {root}' if root else ''}: pass --data-dir or set "
                           "FEDPEFT_DATA_DIR to a data root holding glue/SST-2/train.tsv")
    return str(root)


def header(settings: Settings, quick: bool, data_dir: str) -> dict[str, Any]:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), **machine_info(),
            "load_average_start": os.getloadavg(), "quick": quick, "data_dir": data_dir,
            "settings": dataclasses.asdict(settings)}


# ---------------------------------------------------------------------------------------- model setup
def base_config(data_dir: str, settings: Settings, **kw) -> RunConfig:
    """FedIT as the CLI runs it by default (LoRA r=4 on query/value, local head), quiet, resolved as
    `run` resolves it (LoRA targets for the architecture)."""
    return RunConfig(method="fedit", model_name=MODEL, data_dir=data_dir, batch_size=settings.batch_size,
                     seed=SEED, quiet=True, **kw).resolved()


def fedit_client(cfg: RunConfig):
    """A bound FedIT algorithm, its clients and the round-1 broadcast (what `run` builds before round 1)."""
    backbone = load_backbone(cfg.model_name)
    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    alg = build_algorithm(cfg, backbone, infos)
    broadcast = alg.configure(alg.init(), 1, list(range(len(alg.federation))))
    return alg, clients, broadcast


def non_embedding_params(model: torch.nn.Module) -> tuple[int, dict[str, int]]:
    """N = all parameters except those under any module named `embeddings`; plus a breakdown."""
    parts = {"embeddings": 0, "encoder layers (incl. LoRA)": 0, "pooler": 0, "head": 0, "other": 0}
    for name, p in model.named_parameters():
        if ".embeddings." in f".{name}":
            key = "embeddings"
        elif name.startswith("heads."):
            key = "head"
        elif ".pooler." in name:
            key = "pooler"
        elif ".encoder.layer." in f".{name}":
            key = "encoder layers (incl. LoRA)"
        else:
            key = "other"
        parts[key] += p.numel()
    return sum(v for k, v in parts.items() if k != "embeddings"), parts


def sst2_batch_tokens(client: Client, batch_size: int, padded: bool = True) -> int:
    """Mean tokens per training batch of this client (same batching as train_local) that the matmuls
    see: padded, or real only on the padding-free path."""
    rng = np.random.default_rng(0)
    sizes = [int(b["attention_mask"].numel() if padded else b["attention_mask"].sum())
             for b in train_batches(client.train, batch_size, rng)]
    return int(round(np.mean(sizes)))


def synthetic_data(n: int, length: int, vocab: int, seed: int = 0) -> Encoded:
    """n random sentences of exactly `length` tokens ([CLS] … [SEP]): no padding anywhere."""
    rng = np.random.default_rng(seed)
    ids = [np.concatenate([[101], rng.integers(1000, vocab, length - 2), [102]]).astype(np.int64) for _ in range(n)]
    types = [np.zeros(length, dtype=np.int64) for _ in range(n)]
    return Encoded(ids, types, rng.integers(0, 2, n).astype(np.int64), pad_id=0)


# ---------------------------------------------------------------------------------------- 1. matmul
def bench_matmul(settings: Settings, model_shapes: list[tuple[str, int, int, int]]) -> dict[str, Any]:
    """Median GFLOP/s of A(m×k) @ B(k×n) per dtype and shape; peak = max over shapes per dtype."""
    n = settings.matmul_square
    shapes = [(f"square {n}³", n, n, n)] + model_shapes
    rows = []
    for label, m, k, nn in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, nn).to(dtype)
            a @ b  # warm-up (and oneDNN/MKL kernel selection)
            t = time.perf_counter()
            a @ b
            inner = max(1, int(settings.matmul_min_seconds / max(time.perf_counter() - t, 1e-6)))
            samples = []
            for _ in range(max(5, settings.reps)):
                t = time.perf_counter()
                for _ in range(inner):
                    a @ b
                samples.append(2 * m * k * nn * inner / (time.perf_counter() - t) / 1e9)
            rows.append({"shape": label, "m": m, "k": k, "n": nn, "dtype": str(dtype).replace("torch.", ""),
                         "gflops": median(samples), "samples": samples})
    peak = {d: max(r["gflops"] for r in rows if r["dtype"] == d) for d in ("float32", "bfloat16")}
    return {"rows": rows, "peak_gflops": peak}


# ---------------------------------------------------------------------------------------- 2./3. training
def measure_fit(alg, instruction, client: Client) -> dict[str, float]:
    """One FedIT local run (`fit` → `train_local`) from the same instruction: identical work every call."""
    t = time.perf_counter()
    reply = alg.fit(instruction, client)
    wall = time.perf_counter() - t
    c = reply.config
    return {"fit_seconds": wall, "train_seconds": c["train_seconds"], "compute_seconds": c["compute_seconds"],
            "real_tokens": c["real_tokens"], "padded_tokens": c["padded_tokens"], "examples": c["num_examples"]}


def matmul_padding(alg) -> bool:
    """True when the model's matmuls see the padded batch; False on the padding-free (varlen) path."""
    from fedpeft.models.varlen import supports_varlen

    model = alg.runtime.model
    return not (getattr(model, "varlen", False) and supports_varlen(model.encoder))


def _own_dtype(alg) -> str:
    return "bfloat16" if alg.cfg.precision == "bf16" else "float32"


def bench_training(algs: dict[str, Any], instructions: dict[str, Any], client: Client, settings: Settings,
                   n_params: int, peak: dict[str, float], label: str,
                   probe: SpeedProbe | None = None) -> dict[str, Any]:
    """One pass per variant ("fp32 padded", "bf16 varlen", ...: each its own runtime, as a run with
    that precision and encoder path builds it), interleaved so a burst of contention hits every
    variant; a warm-up pass of each is discarded. With `probe`, each pass is bracketed by a matmul
    probe of its own dtype (`probe_gflops`: before, after)."""
    variants = tuple(algs)
    for v in variants:
        measure_fit(algs[v], instructions[v], client)  # warm-up pass
    passes = {v: [] for v in variants}
    for _ in range(settings.reps):
        for v in variants:
            before = probe(_own_dtype(algs[v])) if probe else None
            run = measure_fit(algs[v], instructions[v], client)
            if probe:
                run["probe_gflops"] = [before, probe(_own_dtype(algs[v]))]
            passes[v].append(run)
    out = {"label": label, "passes": passes, "by_precision": {}}
    for p in variants:
        runs = passes[p]
        real, padded = runs[0]["real_tokens"], runs[0]["padded_tokens"]
        executed = padded if matmul_padding(algs[p]) else real
        compute = median([r["compute_seconds"] for r in runs])
        steps = -(-runs[0]["examples"] * algs[p].cfg.local_epochs // settings.batch_size)
        useful = 4 * n_params * real / compute / 1e9
        own = _own_dtype(algs[p])
        out["by_precision"][p] = {
            "compute_seconds": compute, "fit_seconds": median([r["fit_seconds"] for r in runs]),
            "train_seconds": median([r["train_seconds"] for r in runs]), "steps": steps,
            "seconds_per_step": compute / steps, "real_tokens": real, "padded_tokens": padded,
            "executed_tokens": executed, "padding_fraction": 1 - real / padded,
            "matmul_padding_fraction": 1 - real / executed, "tokens_per_batch": padded / steps,
            "real_tokens_per_s": real / compute,
            "real_tokens_per_s_fit": real / median([r["fit_seconds"] for r in runs]),
            "useful_gflops": useful, "executed_gflops": 4 * n_params * executed / compute / 1e9,
            "frac_fp32_peak": useful / peak["float32"], "frac_bf16_peak": useful / peak["bfloat16"],
            "compute_share_of_fit": compute / median([r["fit_seconds"] for r in runs]),
            "precision": algs[p].cfg.precision, "encoder_path": algs[p].cfg.encoder_path,
            # the spread of the passes, as a share of this precision's own peak (fastest, slowest pass)
            "share_of_own_peak_range": [4 * n_params * real / r["compute_seconds"] / 1e9 / peak[own] for r in
                                        (min(runs, key=lambda r: r["compute_seconds"]),
                                         max(runs, key=lambda r: r["compute_seconds"]))],
        }
        if all("probe_gflops" in r for r in runs):
            # each pass against the mean of the probes around it, then the median over passes
            out["by_precision"][p]["share_of_adjacent_peak"] = median(
                [4 * n_params * real / r["compute_seconds"] / 1e9 / statistics.fmean(r["probe_gflops"]) for r in runs])
    bp = out["by_precision"]

    def gain(fast: str, slow: str) -> dict[str, float]:
        """fast over slow in real tokens/s: of the medians, and the median of the per-pass ratios."""
        return {"ratio": bp[fast]["real_tokens_per_s"] / bp[slow]["real_tokens_per_s"],
                "paired": median([a["compute_seconds"] / b["compute_seconds"] for a, b in zip(passes[slow], passes[fast])])}

    out["bf16_speedup"] = {e: gain(f"bf16 {e}", f"fp32 {e}") for e in ENCODER_PATHS if f"bf16 {e}" in bp}
    out["varlen_speedup"] = {p: gain(f"{p} varlen", f"{p} padded") for p in ("fp32", "bf16") if f"{p} varlen" in bp}
    return out


def bench_local_sst2(algs, clients, broadcasts, settings, n_params, peak, probe=None) -> dict[str, Any]:
    """Section 2: one SST-2 client, real sentences, length-grouped batches."""
    c = clients[0]
    return bench_training(algs, {p: b[c.cid] for p, b in broadcasts.items()}, c, settings, n_params, peak,
                          f"SST-2, {len(c.train)} examples × {next(iter(algs.values())).cfg.local_epochs} epoch(s)",
                          probe=probe)


def bench_synthetic(algs, clients, broadcasts, settings, n_params, peak, vocab: int) -> dict[str, Any]:
    """Section 3: the same FedIT step on random tokens, batch_size × synthetic_len, no padding."""
    n = settings.batch_size * settings.synthetic_batches
    base = clients[0]
    data = synthetic_data(n, settings.synthetic_len, vocab)
    client = Client(ClientInfo(base.cid, base.info.task, base.info.num_labels, n), data, base.test, False)
    saved = {p: a.cfg.local_epochs for p, a in algs.items()}
    for a in algs.values():
        a.cfg.local_epochs = 1
    try:
        return bench_training(algs, {p: b[base.cid] for p, b in broadcasts.items()}, client, settings, n_params,
                              peak, f"synthetic {settings.batch_size} × {settings.synthetic_len}, {n} examples × 1 epoch")
    finally:
        for p, a in algs.items():
            a.cfg.local_epochs = saved[p]


# ---------------------------------------------------------------------------------------- 4. round
def _timed(fn: Callable, totals: dict[str, float], key: str, log: list | None = None) -> Callable:
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t
        if log is not None:
            log.append(result)
        return result
    return wrapper


def bench_fedit_round(data_dir: str, settings: Settings) -> dict[str, Any]:
    """Section 4: FedIT rounds through LocalEngine (as `run` does), with the server/client hooks timed."""
    cfg = base_config(data_dir, settings, tasks=["sst2"] * settings.round_clients,
                      train_samples=settings.round_train, test_samples=settings.round_test,
                      global_rounds=settings.round_rounds, local_epochs=settings.round_epochs)
    backbone = load_backbone(cfg.model_name)
    setup = {}
    t = time.perf_counter()
    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    setup["data prep (read TSV, partition, tokenize)"] = time.perf_counter() - t
    t = time.perf_counter()
    alg = build_algorithm(cfg, backbone, infos)
    setup["build model (copy backbone, inject LoRA)"] = time.perf_counter() - t

    per_round = []
    totals = {k: 0.0 for k in ("fit", "aggregate", "configure", "evaluate", "predict", "metrics")}
    replies: list = []
    alg.fit = _timed(alg.fit, totals, "fit", replies)
    alg.aggregate = _timed(alg.aggregate, totals, "aggregate")
    alg.configure = _timed(alg.configure, totals, "configure")
    alg.evaluate = _timed(alg.evaluate, totals, "evaluate")
    # Algorithm.evaluate imports these at call time: patch the modules for the duration of the rounds.
    patched = [(training, "predict"), (metrics, "compute_metrics")]
    originals = [getattr(mod, name) for mod, name in patched]
    training.predict = _timed(training.predict, totals, "predict")
    metrics.compute_metrics = _timed(metrics.compute_metrics, totals, "metrics")

    # Snapshot the per-hook totals at each round boundary: wrap add_round, called at the end of a round.
    with tempfile.TemporaryDirectory() as tmp:
        history = RunHistory(Path(tmp), {"method": cfg.method})
        add_round = history.add_round
        last = dict(totals)

        def add_round_and_snapshot(rnd, phase, records, extra):
            entry = add_round(rnd, phase, records, extra)
            if rnd > 0:
                per_round.append({k: totals[k] - last[k] for k in totals} | {"replies": list(replies)})
                replies.clear()
            last.update(totals)
            return entry

        history.add_round = add_round_and_snapshot
        t = time.perf_counter()
        try:
            LocalEngine(alg, clients, history, Path(tmp)).run()
        finally:
            for (mod, name), fn in zip(patched, originals):
                setattr(mod, name, fn)
        engine_wall = time.perf_counter() - t

    rounds_out = []
    for entry, hooks in zip([r for r in history.rounds if r["round"] > 0], per_round):
        recs = [r for r in history.records if r["round"] == entry["round"] and r.get("participated")]
        wall = entry["seconds"]
        compute = sum(r["compute_seconds"] for r in recs)
        train = sum(rep.config["train_seconds"] for rep in hooks["replies"])
        fit = hooks["fit"]
        breakdown = {
            "forward + backward + optimizer (Σ compute_seconds)": compute,
            "train loop outside compute (batch collation, loss.item, token counts)": train - compute,
            "fit outside train_local (load LoRA/head, requires_grad, copy state out)": fit - train,
            "aggregation (accept + weighted mean)": hooks["aggregate"],
            "configure (next broadcast)": hooks["configure"],
            "evaluation: predict (forward passes + eval batch collation)": hooks["predict"],
            "evaluation: metrics (sklearn; its import lands in the first round)": hooks["metrics"],
            "evaluation: rest (load LoRA/head for eval)": hooks["evaluate"] - hooks["predict"] - hooks["metrics"],
        }
        # What the engine does in the round besides these hooks (its loop, records, history.add_round).
        breakdown["engine bookkeeping (rest)"] = wall - sum(breakdown.values())
        rounds_out.append({"round": entry["round"], "seconds": wall, "compute_seconds": compute,
                           "outside_compute_share": 1 - compute / wall, "breakdown": breakdown,
                           "real_tokens": sum(r["real_tokens"] for r in recs),
                           "padded_tokens": sum(r["padded_tokens"] for r in recs),
                           "accuracy": entry["overall"]})
    mid = sorted(rounds_out, key=lambda r: r["seconds"])[(len(rounds_out) - 1) // 2]
    return {"clients": settings.round_clients, "train": settings.round_train, "test": settings.round_test,
            "local_epochs": settings.round_epochs, "rounds": rounds_out, "median_round": mid["round"],
            "setup_seconds": setup,
            "outside_rounds_seconds (checkpoints, history files)": engine_wall - sum(r["seconds"] for r in rounds_out)}


# ---------------------------------------------------------------------------------------- 5. accuracy
def bench_precision_accuracy(data_dir: str, settings: Settings) -> dict[str, Any]:
    """Section 5: the same short FedIT run (`run(cfg)`) in fp32 and in bf16, same seed."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            cfg = base_config(data_dir, settings, tasks=["sst2"] * settings.acc_clients,
                              train_samples=settings.acc_train, test_samples=settings.acc_test,
                              global_rounds=settings.acc_rounds, local_epochs=settings.acc_epochs,
                              precision=precision, output_dir=str(Path(tmp) / precision))
            t = time.perf_counter()
            result = run(cfg)
            wall = time.perf_counter() - t
            rounds = [r for r in result.history.rounds if r["round"] > 0]
            out[precision] = {"final_accuracy": result.headline["overall"], "per_round": [r["overall"] for r in rounds],
                              "round_seconds": [r["seconds"] for r in rounds], "run_seconds": wall}
    out["difference_bf16_minus_fp32"] = out["bf16"]["final_accuracy"] - out["fp32"]["final_accuracy"]
    out["test_examples"] = settings.acc_clients * settings.acc_test
    return out


# ---------------------------------------------------------------------------------------- report
def render(res: dict[str, Any]) -> str:
    h, s = res["header"], res["header"]["settings"]
    out = [f"# fedpeft throughput benchmark{' (--quick: small sizes, smoke check only)' if h['quick'] else ''}", "",
           f"- torch {h['torch']}, {h['threads']} thread(s) (torch.get_num_threads(); OMP_NUM_THREADS={h['OMP_NUM_THREADS']}), "
           f"Python {h['python']}",
           f"- CPU: {h['cpu']} ({h['logical_cpus']} logical CPUs); {isa_line(h)}",
           f"- load average at start {' / '.join(f'{x:.2f}' for x in h['load_average_start'])}, at end "
           f"{' / '.join(f'{x:.2f}' for x in h['load_average_end'])}",
           f"- {status_line(res['load'])}",
           *([f"- {host_line(res['host_speed'])}"] if "host_speed" in res else []),
           f"- {h['date']}; medians of {s['reps']} passes after a discarded warm-up pass; total {res['total_seconds']:.0f} s", "",
           f"**Headline ({res['status']})**: SST-2 training with `--encoder-path {res['headline_encoder_path']}` "
           f"(a run's default): fp32 = {pct(res['fp32_share_of_fp32_peak'])} of the fp32 peak"
           + (f", bf16 = {pct(res['bf16_share_of_bf16_peak'])} of the bf16 peak" if res["bf16_share_of_bf16_peak"] is not None
              else " (no native bf16: bf16 not measured)") + "; by encoder path: " + ", ".join(
               f"{e}: fp32 {pct(res['fp32_share_of_fp32_peak_by_encoder_path'][e])}"
               + (f", bf16 {pct(res['bf16_share_of_bf16_peak_by_encoder_path'][e])}"
                  if res["bf16_share_of_bf16_peak_by_encoder_path"].get(e) is not None else "")
               for e in res["fp32_share_of_fp32_peak_by_encoder_path"]) + "."
           + (f" Against the matmul probes around each pass (the machine's speed of those seconds): fp32 "
              f"{pct(res['fp32_share_of_adjacent_peak'])}"
              + (f", bf16 {pct(res['bf16_share_of_adjacent_peak'])}" if res.get("bf16_share_of_adjacent_peak") else "")
              + "." if res.get("fp32_share_of_adjacent_peak") else ""), ""]
    if "matmul" not in res:
        return "\n".join(out)

    mm = res["matmul"]
    out += ["## 1. Matmul peak (same run)", "",
            table(["shape (m × k × n)", "dtype", "GFLOP/s"],
                  [[f"{r['shape']} ({r['m']}×{r['k']}×{r['n']})", r["dtype"], r["gflops"]] for r in mm["rows"]]), "",
            f"Peak (max of the rows): float32 **{mm['peak_gflops']['float32']:.1f}** GFLOP/s, "
            f"bfloat16 **{mm['peak_gflops']['bfloat16']:.1f}** GFLOP/s "
            f"({mm['peak_gflops']['bfloat16'] / mm['peak_gflops']['float32']:.2f}× float32).", ""]

    n, parts = res["params"]["non_embedding"], res["params"]["breakdown"]
    out += ["## 2–3. Local training (FedIT.fit → train_local; LoRA r=4 on query/value, head trained, batch "
            f"{s['batch_size']})", "",
            f"FLOPs per real token = 4 × N, N = {n:,} non-embedding parameters (everything but the `embeddings` "
            "module: " + ", ".join(f"{k} {v:,}" for k, v in parts.items() if k != "embeddings" and v) +
            f"; the {parts['embeddings']:,} embedding parameters are excluded).", ""]
    rows = []
    for sec in ("local", "synthetic"):
        if sec not in res:
            continue
        r = res[sec]
        for v, m in r["by_precision"].items():
            rows.append([r["label"], m["precision"], m["encoder_path"], m["real_tokens_per_s"], pct(m["padding_fraction"]),
                         pct(m["matmul_padding_fraction"]), m["tokens_per_batch"],
                         m["seconds_per_step"], m["useful_gflops"], m["executed_gflops"], pct(m["frac_fp32_peak"]),
                         pct(m["frac_bf16_peak"]) if m["precision"] == "bf16" else "-", pct(m["compute_share_of_fit"]),
                         "–".join(pct(x) for x in m["share_of_own_peak_range"])
                         if "share_of_own_peak_range" in m else "-"])
    out += [table(["data", "precision", "encoder path", "real tok/s", "batch padding", "matmul padding", "tok/batch",
                   "s/step", "GFLOP/s (real tok)", "GFLOP/s (executed)", "of fp32 peak", "of bf16 peak",
                   "compute / fit wall", "passes: fastest–slowest, of own peak"], rows), ""]
    for sec in ("local", "synthetic"):
        r = res.get(sec)
        if r is None:
            continue
        for p, g in r["varlen_speedup"].items():
            out.append(f"- {r['label']}: padding-free (varlen) vs padded, {p}: **{g['ratio']:.2f}×** real tok/s "
                       f"(paired per pass {g['paired']:.2f}×)")
        for e, g in r["bf16_speedup"].items():
            out.append(f"- {r['label']}: bf16 vs fp32, {e}: **{g['ratio']:.2f}×** (paired per pass {g['paired']:.2f}×)")
    if "synthetic" in res:
        loc, syn = res["local"], res["synthetic"]
        out += ["- SST-2 real tok/s as a share of synthetic " f"{s['batch_size']}×{s['synthetic_len']}: " + ", ".join(
            f"{v} {pct(loc['by_precision'][v]['real_tokens_per_s'] / syn['by_precision'][v]['real_tokens_per_s'])}"
            for v in loc["by_precision"]) + " (what short sentences cost)"]
    out += ["- batch padding: the collated batch's padding; matmul padding: what the matmuls multiply (0 on the "
            "padding-free path, models/varlen.py)", ""]

    rd = res.get("round")
    if rd is None:
        return "\n".join(out)
    out += [f"## 4. One FedIT round: {rd['clients']} SST-2 clients × {rd['train']} train / {rd['test']} test, "
            f"{rd['local_epochs']} local epoch(s), fp32", ""]
    out += [table(["round", "wall s", "Σ compute s", "outside compute", "accuracy", "padding"],
                  [[r["round"], r["seconds"], r["compute_seconds"], pct(r["outside_compute_share"]), f"{r['accuracy']:.4f}",
                    pct(1 - r["real_tokens"] / r["padded_tokens"])] for r in rd["rounds"]]), ""]
    mid = next(r for r in rd["rounds"] if r["round"] == rd["median_round"])
    out += [f"Where the time of round {mid['round']} (the median round) went:", "",
            table(["part", "seconds", "share of round"],
                  [[k, v, pct(v / mid["seconds"])] for k, v in mid["breakdown"].items()]), "",
            "Outside the rounds (once per run or after each round): " + ", ".join(
                f"{k} {v:.2f} s" for k, v in rd["setup_seconds"].items()) +
            f", checkpoint + history files {rd['outside_rounds_seconds (checkpoints, history files)']:.2f} s in total.", ""]

    acc = res.get("accuracy", "not run")
    if acc == "not run":
        return "\n".join(out)
    if acc is None:
        out += ["## 5. bf16 vs fp32 accuracy: skipped (no native bf16 on this CPU)", ""]
        return "\n".join(out)
    out += [f"## 5. bf16 vs fp32 accuracy: FedIT, {s['acc_clients']} SST-2 clients × {s['acc_train']} train / "
            f"{s['acc_test']} test, {s['acc_rounds']} round(s) × {s['acc_epochs']} epoch(s), seed {SEED}", "",
            table(["precision", "final accuracy", "per round", "run wall s"],
                  [[p, f"{acc[p]['final_accuracy']:.4f}", " ".join(f"{a:.4f}" for a in acc[p]["per_round"]),
                    acc[p]["run_seconds"]] for p in ("fp32", "bf16")]), "",
            f"bf16 − fp32: **{acc['difference_bf16_minus_fp32']:+.4f}** on {acc['test_examples']} test examples "
            f"(one seed: a gap of a few test examples is noise; 1 example = {1 / acc['test_examples']:.4f}).", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    """The benchmark; `settings` replaces the --quick/full sizes (tests pass tinier ones)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a 1–2 minute smoke check, not a measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--reps", type=int, default=None,
                    help="measured passes per figure (default 3): more for a steadier median; on a shared VM the "
                         "passes of one idle run differed by up to a third (benchmarks/README.md#throughputpy)")
    ap.add_argument("--out", default="bench-results/throughput", help="folder for results.md and results.json")
    ap.add_argument("--data-dir", default=None, help="data root with glue/SST-2 (default: $FEDPEFT_DATA_DIR)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, metavar="SECTION",
                    help=f"which sections to run (default: all of {' '.join(SECTIONS)}; training always runs, "
                         "with matmul: the headline figures need both)")
    args = ap.parse_args(argv)
    try:
        return _main(args, settings)
    except FedPeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, settings: Settings | None) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise FedPeftError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    logging.getLogger("fedpeft").setLevel(logging.WARNING)
    settings = settings or (QUICK if args.quick else Settings())
    if args.reps is not None:
        if args.reps < 1:
            raise FedPeftError(f"--reps must be at least 1, got {args.reps}")
        settings = dataclasses.replace(settings, reps=args.reps)
    sections = set(args.sections) | {"matmul", "training"}
    data_dir = resolve_data_dir(args.data_dir)
    start = time.perf_counter()
    res: dict[str, Any] = {"header": header(settings, args.quick, data_dir)}
    h = res["header"]
    monitor = LoadMonitor(h["threads"]).start()
    print(f"torch {h['torch']} | threads {h['threads']} | CPU {h['cpu']} | quick={args.quick}", flush=True)
    print(isa_line(h), flush=True)
    print(f"load average at start: {' / '.join(f'{x:.2f}' for x in h['load_average_start'])}", flush=True)
    precisions = ("fp32", "bf16") if h["native_bf16"] else ("fp32",)
    variants = {f"{p} {e}": (p, e) for p in precisions for e in ENCODER_PATHS}

    step = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)
    step(f"loading MiniLM and one SST-2 client, {len(variants)} runtimes ({', '.join(variants)})")
    algs, broadcasts = {}, {}
    for v, (p, e) in variants.items():  # each its own runtime: bf16 stores the frozen Linears in bf16, as a run does
        cfg = base_config(data_dir, settings, tasks=["sst2"], train_samples=settings.local_examples, test_samples=32,
                          global_rounds=1, local_epochs=settings.local_epochs, precision=p, encoder_path=e)
        algs[v], clients, broadcasts[v] = fedit_client(cfg)
    alg = algs[f"fp32 {DEFAULT_PATH}"]
    alg.runtime.model.head(clients[0].info.num_labels)  # heads are created on first use: count it too
    n_params, parts = non_embedding_params(alg.runtime.model)
    res["params"] = {"non_embedding": n_params, "breakdown": parts}
    hidden, inter = alg.runtime.model.hidden, load_backbone(MODEL).model.config.intermediate_size
    m_shapes = {"padded": sst2_batch_tokens(clients[0], settings.batch_size, padded=True),
                "varlen": sst2_batch_tokens(clients[0], settings.batch_size, padded=False)}
    m_syn = settings.batch_size * settings.synthetic_len
    model_shapes = []
    for tag, m in [(f"SST-2 batch, {e} ({m} tok)", m) for e, m in m_shapes.items()] + [(f"synthetic batch ({m_syn} tok)", m_syn)]:
        model_shapes += [(f"{tag}: q/k/v/out proj", m, hidden, hidden), (f"{tag}: FFN up", m, hidden, inter),
                         (f"{tag}: FFN down", m, inter, hidden)]

    step("1. matmul peak")
    res["matmul"] = bench_matmul(settings, model_shapes)
    peak = res["matmul"]["peak_gflops"]
    step(f"   peaks (same run): fp32 {peak['float32']:.1f} GFLOP/s, bf16 {peak['bfloat16']:.1f} GFLOP/s"
         + ("" if h["native_bf16"] else " (no native bf16: its peak is shown, bf16 training is skipped)"))
    step(f"2. local training on SST-2 ({', '.join(variants)})")
    probe = SpeedProbe(settings.matmul_square, settings.probe_seconds)
    res["local"] = bench_local_sst2(algs, clients, broadcasts, settings, n_params, peak, probe=probe)
    res["host_speed"] = host_speed(probe)
    if "synthetic" in sections:
        step(f"3. synthetic tokens ({', '.join(variants)})")
        res["synthetic"] = bench_synthetic(algs, clients, broadcasts, settings, n_params, peak,
                                           load_backbone(MODEL).tokenizer.vocab_size)
    del algs
    if "round" in sections:
        step("4. one FedIT round")
        res["round"] = bench_fedit_round(data_dir, settings)
    if "accuracy" in sections:
        step("5. bf16 vs fp32 accuracy")
        res["accuracy"] = bench_precision_accuracy(data_dir, settings) if h["native_bf16"] else None
    res["total_seconds"] = time.perf_counter() - start
    res["header"]["load_average_end"] = os.getloadavg()
    monitor.stop()
    res["load"] = monitor.summary(quick=args.quick)
    local = res["local"]["by_precision"]
    fp32_by = {e: local[f"fp32 {e}"]["frac_fp32_peak"] for e in ENCODER_PATHS}
    bf16_by = {e: (local[f"bf16 {e}"]["frac_bf16_peak"] if f"bf16 {e}" in local else None) for e in ENCODER_PATHS}
    adjacent = {p: local[f"{p} {DEFAULT_PATH}"].get("share_of_adjacent_peak") if f"{p} {DEFAULT_PATH}" in local
                else None for p in ("fp32", "bf16")}
    status = res["load"]["status"]
    if status == "final" and res["host_speed"]["spread"] > HOST_SPREAD_LIMIT:
        status = "PROVISIONAL"  # nothing else ran here, but the host's speed moved under the run
    # The headline figures, as plain top-level numbers for scripts.
    res = {"status": status, "native_bf16": bool(h["native_bf16"]),
           "fp32_share_of_fp32_peak": fp32_by[DEFAULT_PATH], "bf16_share_of_bf16_peak": bf16_by[DEFAULT_PATH],
           "headline_encoder_path": DEFAULT_PATH,
           "fp32_share_of_fp32_peak_by_encoder_path": fp32_by, "bf16_share_of_bf16_peak_by_encoder_path": bf16_by,
           "fp32_peak_gflops": peak["float32"], "bf16_peak_gflops": peak["bfloat16"],
           "fp32_share_of_adjacent_peak": adjacent["fp32"], "bf16_share_of_adjacent_peak": adjacent["bf16"],
           "host_speed_spread": res["host_speed"]["spread"],
           "threads": h["threads"], "cpu": h["cpu"], **res}
    step("done")

    report = render(res)
    print("\n" + report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps(_jsonable(res), indent=1) + "\n")
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if hasattr(o, "config") and hasattr(o, "tensors"):  # a Message: keep its plain values only
        return _jsonable(o.config)
    return o


if __name__ == "__main__":
    sys.exit(main())
