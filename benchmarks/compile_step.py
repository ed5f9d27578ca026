#!/usr/bin/env python
"""Does `torch.compile` make a MiniLM LoRA training step faster on this CPU? Eager against compiled, in one run.

    PYTHONPATH=src FEDPEFT_DATA_DIR=DATA_ROOT python benchmarks/compile_step.py [--threads N] [--reps 3]

The step is throughput.py's section 2 (one FedIT client, 640 SST-2 sentences, batch 32, LoRA r = 4 on
query/value, the padding-free encoder path a run takes by default), fp32 and, where the CPU runs it
natively, bf16. "compiled" wraps every encoder layer's forward in `torch.compile(dynamic=True)` (one
compiled graph serves the six layers and every batch length, so nothing recompiles per batch) and
draws dropout with torch's own `F.dropout` (fedpeft's faster CPU dropout draws its mask with numpy,
which torch.compile cannot trace: each call would split the graph). The compile itself happens in
the first, discarded pass and is reported apart. Passes are interleaved; medians of --reps.

Why this is a benchmark and not a setting: issue 18 asked for `torch.compile` of the training step as
a lever; this measures whether it is one here before any code path depends on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import LoadMonitor, isa_line, machine_info, status_line  # noqa: E402
from throughput import Settings, base_config, fedit_client, resolve_data_dir, table  # noqa: E402

import fedpeft.models.varlen as varlen  # noqa: E402


def build(data_dir: str, precision: str, compiled: bool):
    cfg = base_config(data_dir, Settings(), tasks=["sst2"], train_samples=640, test_samples=32, local_epochs=1,
                      precision=precision)
    alg, clients, broadcast = fedit_client(cfg)
    if compiled:
        model = alg.runtime.model
        for m in model.modules():
            if type(m) is varlen.FastDropout:
                m.__class__ = nn.Dropout
        for layer in varlen.base_encoder(model.encoder).encoder.layer:
            layer.forward = torch.compile(layer.forward, dynamic=True)
    return alg, clients[0], broadcast


def fit(alg, client, broadcast, compiled: bool) -> tuple[float, int]:
    saved = varlen._dropout
    if compiled:  # the attention probabilities' dropout, traceable (see the module docstring)
        varlen._dropout = lambda x, p, training=True: F.dropout(x, p, training)
    try:
        reply = alg.fit(broadcast[client.cid], client)
    finally:
        varlen._dropout = saved
    return reply.config["compute_seconds"], reply.config["real_tokens"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir)
    info = machine_info()
    print(f"CPU: {info['cpu']}; {isa_line(info)}; torch {info['torch']}, {info['threads']} thread(s)")
    monitor = LoadMonitor(info["threads"]).start()
    precisions = ["fp32"] + (["bf16"] if info["native_bf16"] else [])
    variants = {(p, c): build(data_dir, p, c) for p in precisions for c in (False, True)}
    first = {}
    for key, (alg, client, bc) in variants.items():
        t = time.perf_counter()
        fit(alg, client, bc, key[1])
        first[key] = time.perf_counter() - t
    passes = {key: [] for key in variants}
    for _ in range(args.reps):
        for key, (alg, client, bc) in variants.items():
            passes[key].append(fit(alg, client, bc, key[1]))
    load = monitor.stop()
    rows = []
    for p in precisions:
        eager = statistics.median(s for s, _ in passes[(p, False)])
        for c in (False, True):
            sec = statistics.median(s for s, _ in passes[(p, c)])
            tok = passes[(p, c)][0][1]
            rows.append([p, "compiled" if c else "eager", f"{first[(p, c)]:.1f}", f"{sec:.2f}", f"{tok / sec:,.0f}",
                         f"{eager / sec:.2f}x"])
    print(table(["precision", "step", "first pass s (compile)", "compute s (median)", "real tok/s", "speed-up"], rows))
    print(status_line(load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
