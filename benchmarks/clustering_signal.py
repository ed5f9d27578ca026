#!/usr/bin/env python
"""What decides whether FedLEASE's B-matrix clustering recovers the tasks (issue 17, section 3).

    PYTHONPATH=src FEDPEFT_DATA_DIR=DATA_ROOT python benchmarks/clustering_signal.py \
        [--suites paper-cpu glue4-cpu] [--variants ...] [--seeds 42] [--threads 1] [--out DIR] [--quick]

For each federation (a `fedpeft bench` suite's: paper-cpu, glue4-cpu) and each variant of the warmup,
the 16 clients run FedLEASE's warmup exactly as a run does (`FedLEASE.fit` in the warmup phase: one
AdamW run over W·E epochs from the common initialisation, frozen head, the suite's lr, batch and
data), and the uploaded LoRAs are compared with Eq. 2 (docs/methods/fedlease.md#client-distance).
Reported per (suite, variant, seed):

- ARI of the clustering a run makes (average linkage, M chosen by silhouette over k = 2..8) against
  the clients' tasks, and the M found; ARI of the same linkage cut at k = 4 (the true task count);
- mean Eq. 2 distance within a task and across tasks, and their gap (across − within): the signal
  the clustering reads; a gap near 0 means nothing to find;
- the clients' mean training loss over the warmup (has the warmup learned at all).

Variants (each changes one thing against `default`, the warmup as specified):
- `default`: A and B trained, AdamW, the suite's batch and W·E;
- `a-frozen`: only B trained, A stays at the common initialisation (then B alone carries the update);
- `sgd`: SGD with momentum 0.9, lr 0.05 (no decoupled weight decay), instead of AdamW: AdamW's
  per-coordinate normalisation makes every client's update the same size whatever its gradient;
- `batch-x2` / `batch-half`: twice / half the suite's batch (half / twice the steps per epoch);
- `epochs-1` / `epochs-x2`: W·E of 1 epoch / twice the suite's;
- `grad-init`: no training: the full-batch gradient of the loss w.r.t. B at the common
  initialisation (dropout off), the signal before any optimiser or sampling noise.
For `default` the same uploads are also compared on ΔW = B·A instead of B, on B·A₀ (B through the
common initial A, the same for every client) and on A − A₀ (each client's drift of A alone), and per
module (each of the 12 LoRA sites alone): rows `default [ΔW = B·A]`, `default [B·A₀ …]`,
`default [A − A₀ …]` and `default [module …]`. If B·A₀ scores like B and the drift of A like ΔW, the
signal ΔW adds comes from the A matrices, not from a re-weighting of B.

Writes results.md and results.json to --out (default bench-results/clustering-signal/). ARI is a
property of one seed's partition: with --seeds 42 43 44 the table gives mean ± std per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import isa_line, machine_info, one_line_errors  # noqa: E402

from fedpeft import training
from fedpeft.algorithms.fedlease.clustering import b_distance_matrix, cluster_clients, linkage_matrix, _cut
from fedpeft.algorithms.fedit import LORA_PREFIX
from fedpeft.algorithms.tensors import unprefixed
from fedpeft.bench.suites import get_suite, with_swap
from fedpeft.config import RunConfig
from fedpeft.data.batching import train_batches
from fedpeft.models.adapters import lora_key, lora_parameters
from fedpeft.models.backbone import load_backbone
from fedpeft.run.assemble import build_algorithm
from fedpeft.run.federation import prepare_clients

VARIANTS = ("default", "a-frozen", "sgd", "batch-x2", "batch-half", "epochs-1", "epochs-x2", "grad-init")
SGD_LR, SGD_MOMENTUM = 0.05, 0.9


# ------------------------------------------------------------------------------------ the warmup
def suite_config(name: str, data_dir: str, seed: int, quick: bool, threads: int) -> RunConfig:
    suite, _ = with_swap(get_suite(name), "auto", data_dir)
    base = dict(suite.base)
    if quick:  # plumbing only: a few examples per client
        base.update(train_samples=16, test_samples=8, task_samples=[f"{t}=16:8" for t in ("mrpc", "cola")],
                    max_length=32, warmup_rounds=1)
    base.update(method="fedlease", seed=seed, data_dir=data_dir, quiet=True, threads=threads, device="cpu")
    base["global_rounds"] = base["warmup_rounds"] + 1
    return RunConfig(**base).resolved()


@contextlib.contextmanager
def patched_training(variant: str, b_params: set[int]):
    """`training.train_local` as the variant needs it (restored on exit)."""
    original, adamw = training.train_local, torch.optim.AdamW

    def train_local(model, data, params, **kw):
        if variant == "a-frozen":
            params = [p for p in params if id(p) in b_params]
        return original(model, data, params, **kw)

    def sgd(params, lr, betas=None, eps=None, weight_decay=0.0):  # AdamW's signature, as train_local calls it
        return torch.optim.SGD(params, lr=SGD_LR, momentum=SGD_MOMENTUM)

    training.train_local = train_local
    if variant == "sgd":
        torch.optim.AdamW = sgd
    try:
        yield
    finally:
        training.train_local, torch.optim.AdamW = original, adamw


def warmup_uploads(cfg: RunConfig, variant: str, backbone
                   ) -> tuple[list[str], list[dict[str, torch.Tensor]], float, dict[str, torch.Tensor]]:
    """Every client's uploaded warmup LoRA (A and B) after FedLEASE's W warmup rounds, its task, the
    clients' mean training loss and the common initial LoRA they all started from. `grad-init`: the
    gradient of B at the common init instead of the uploads."""
    overrides = {"batch-x2": {"batch_size": 2 * cfg.batch_size}, "batch-half": {"batch_size": max(1, cfg.batch_size // 2)},
                 "epochs-1": {"warmup_rounds": 1, "local_epochs": 1},
                 "epochs-x2": {"local_epochs": 2 * cfg.local_epochs}}.get(variant, {})
    cfg = RunConfig(**{**cfg.to_dict(), **overrides}) if overrides else cfg
    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    alg = build_algorithm(cfg, backbone, infos)
    state = alg.init()
    init = {k: v.clone() for k, v in state["lora"].items()}
    everyone = list(range(len(clients)))
    tasks = [c.info.task for c in clients]
    if variant == "grad-init":
        ins = alg.configure(state, 1, everyone)
        return tasks, [init_gradient(alg, ins[c.cid], c, cfg) for c in clients], float("nan"), init
    b_params = {id(p) for p in lora_parameters(alg.runtime.sites, factors=("B",))}
    uploads, losses = {}, []
    with patched_training(variant, b_params):
        for rnd in range(1, alg.warmup_rounds + 1):
            ins = alg.configure(state, rnd, everyone)
            replies = {c.cid: alg.fit(ins[c.cid], c) for c in clients}
            losses += [r.config["train_loss"] for r in replies.values() if "train_loss" in r.config]
            if rnd < alg.warmup_rounds:
                state = alg.aggregate(state, rnd, replies)
            else:
                uploads = {cid: unprefixed(LORA_PREFIX, r.tensors) for cid, r in replies.items()}
    return tasks, [uploads[c.cid] for c in clients], float(np.mean(losses)), init


def init_gradient(alg, instruction, client, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """d loss / d B summed over the client's whole training set (dropout off), at the common init."""
    alg._load_warmup(instruction, client)
    model = alg.runtime.model
    sites = alg.runtime.sites
    b = {lora_key(s.layer, s.module, "B"): lora_parameters([s], factors=("B",))[0] for s in sites}
    for p in b.values():
        p.requires_grad_(True)
        p.grad = None
    model.eval()
    try:
        rng = np.random.default_rng(0)
        for batch in train_batches(client.train, cfg.eval_batch_size, rng):
            labels = batch.pop("labels")
            loss = training.batch_loss(model, batch, labels, cfg.precision, client.regression)
            (loss * len(labels) / len(client.train)).backward()
        return {k: p.grad.detach().clone() for k, p in b.items()}
    finally:
        for p in b.values():
            p.requires_grad_(False)
            p.grad = None


# ------------------------------------------------------------------------------------ the signal
def ari(labels_a, labels_b) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(labels_a, labels_b))


def signal(tasks: list[str], mats: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Eq. 2 on `mats` (per client: module -> matrix): ARI of the run's clustering and of the k = 4
    cut, the M found, within- and across-task mean distances."""
    d = b_distance_matrix(mats)
    truth = [sorted(set(tasks)).index(t) for t in tasks]
    result = cluster_clients(d, max_clusters=8, seed=seed)
    k = len(set(tasks))
    cut = _cut(linkage_matrix(d), len(tasks), k)
    same = np.equal.outer(truth, truth)
    off = ~np.eye(len(tasks), dtype=bool)
    within, across = float(d[same & off].mean()), float(d[~same].mean())
    return {"ari": ari(truth, result.labels), "m": result.num_clusters, "ari_k": ari(truth, cut),
            "within": within, "across": across, "gap": across - within}


def rows_for(tasks, uploads, seed: int, variant: str, init: dict[str, torch.Tensor] | None = None
             ) -> list[tuple[str, dict[str, Any]]]:
    b = [{k: v for k, v in u.items() if k.endswith(".B")} for u in uploads]
    out = [(variant, signal(tasks, b, seed))]
    if variant != "default":
        return out
    # ΔW = B·A per module (the update the LoRA applies), and each module alone
    dw = [{k[:-2]: (u[k] @ u[k[:-2] + ".A"]) for k in u if k.endswith(".B")} for u in uploads]
    out.append(("default [ΔW = B·A]", signal(tasks, dw, seed)))
    if init is not None:
        # Why ΔW keeps what B loses: B seen through the common initial A_0 (the same A for everyone:
        # only B differs), and each client's A drift from A_0 alone (what ΔW adds beyond B·A_0).
        b_a0 = [{k[:-2]: (u[k] @ init[k[:-2] + ".A"]) for k in u if k.endswith(".B")} for u in uploads]
        out.append(("default [B·A₀, common init A]", signal(tasks, b_a0, seed)))
        drift = [{k: u[k] - init[k] for k in u if k.endswith(".A")} for u in uploads]
        out.append(("default [A − A₀, drift of A]", signal(tasks, drift, seed)))
    for key in sorted(b[0]):
        out.append((f"default [module {key[:-2]}]", signal(tasks, [{key: x[key]} for x in b], seed)))
    return out


# ------------------------------------------------------------------------------------ report
def summarise(results: list[dict[str, Any]]) -> list[list[Any]]:
    table = []
    keys = list(dict.fromkeys((r["suite"], r["row"]) for r in results))
    for suite, row in keys:
        rs = [r for r in results if r["suite"] == suite and r["row"] == row]

        def cell(field: str, fmt: str = "{:.2f}") -> str:
            xs = [r[field] for r in rs if r[field] == r[field]]
            if not xs:
                return "-"
            if len(xs) == 1:
                return fmt.format(xs[0])
            return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"

        table.append([suite, row, len(rs), cell("ari"), cell("m", "{:.1f}"), cell("ari_k"), cell("within", "{:.3f}"),
                      cell("across", "{:.3f}"), cell("gap", "{:.3f}"), cell("train_loss", "{:.3f}")])
    return table


def markdown(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", nargs="+", default=["paper-cpu", "glue4-cpu"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[42])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("FEDPEFT_DATA_DIR"))
    ap.add_argument("--out", default="bench-results/clustering-signal")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if not args.data_dir or not (Path(args.data_dir) / "glue" / "SST-2" / "train.tsv").is_file():
        print("fedpeft: error: the GLUE data is not found: pass --data-dir or set FEDPEFT_DATA_DIR to a data root "
              "holding glue/SST-2, glue/QNLI, glue/MRPC and glue/CoLA", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"CPU: {info['cpu']}; {isa_line(info)}; torch {info['torch']}, {args.threads} thread(s)", flush=True)
    backbone = load_backbone("minilm")
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for suite in args.suites:
        for seed in args.seeds:
            for variant in args.variants:
                t = time.perf_counter()
                cfg = suite_config(suite, args.data_dir, seed, args.quick, args.threads)
                tasks, uploads, loss, init = warmup_uploads(cfg, variant, backbone)
                rows = [{"suite": suite, "seed": seed, "variant": variant, "row": row, "train_loss": loss, **sig}
                        for row, sig in rows_for(tasks, uploads, seed, variant, init)]
                results += rows
                r = rows[0]  # the variant's own row (default: Eq. 2 on B); the others are its diagnostics
                print(f"{suite} seed {seed} {variant}: ARI {r['ari']:.2f} (M = {r['m']}), ARI@k {r['ari_k']:.2f}, "
                      f"within {r['within']:.3f} across {r['across']:.3f}, loss {loss:.3f} "
                      f"[{time.perf_counter() - t:.0f} s]", flush=True)
                (out / "results.json").write_text(json.dumps({"machine": info, "args": vars(args), "results": results},
                                                              indent=1, default=str))
    headers = ["suite", "variant", "seeds", "ARI (M by silhouette)", "M", "ARI at k = 4", "within d", "across d",
               "gap", "warmup train loss"]
    text = "\n".join([
        "# What decides FedLEASE's clustering: Eq. 2 signal by warmup variant",
        "",
        f"- CPU: {info['cpu']}; torch {info['torch']}, {args.threads} thread(s); "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; {time.perf_counter() - started:.0f} s",
        f"- `python benchmarks/clustering_signal.py --suites {' '.join(args.suites)} --variants "
        f"{' '.join(args.variants)} --seeds {' '.join(map(str, args.seeds))} --threads {args.threads}"
        f"{' --quick' if args.quick else ''}`",
        "",
        markdown(headers, summarise(results)),
    ])
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
