#!/usr/bin/env python
"""Throughput of fedpeft's decoder path on SmolLM2-135M, every figure measured in ONE run.

    python benchmarks/decoder_throughput.py [--quick] [--threads N] [--data-dir DATA_ROOT] [--out DIR]

Sections:

1. machine matmul peak (`throughput.bench_matmul`): a large square product and SmolLM2's own shapes
   (512 tokens × 576 × 576/1536, and its LM head 576 × 49 152 on the target tokens), measured before
   and again after sections 2-3, each row's best of the two; the peak of a dtype is the max of its rows;
2. LoRA training through `FedIT.fit` (so `train_local` exactly as every method calls it: LoRA r = 8 on
   q_proj/v_proj, batch 8 × 64 tokens, 40 prompt + 24 target tokens, no padding), fp32 and bf16;
   2b. the same on real E2E training examples (MR prompt → reference, ≤ 128 tokens, the nlg-cpu suite's
   length, LoRA dropout 0.05 as a run has it), batches padded to their longest example as a run pads
   them, when a data root with e2e/ is given (`--data-dir`, default $FEDPEFT_DATA_DIR); FLOPs count the
   real tokens only, so padding shows as a lower share; each precision with both `--decoder-path`s
   (padded: the model's own forward; varlen: padding-free, the default), passes interleaved;
3. generation through `fedpeft.generation.generate_ids` on 8 chat prompts in one batch: greedy and
   beam 4 with the KV cache (fp32 and bf16), and greedy without it.

Training FLOPs: 4 × N_body per token (forward + backward to the activations; the frozen weights get
no weight gradient), N_body = the decoder layers' parameters (LoRA included, embeddings excluded),
plus 4 × V × H per TARGET token for the LM head, which fedpeft applies to target positions only.
Attention-score FLOPs (∝ sequence length, small at 64 tokens) are not counted. "Real tokens/s"
counts every token of the batch (prompt + target).

Generation tokens/s = tokens of the returned sequences (cut at EOS) / wall time; for beam search the
beams' extra work is in the time, not in the count.

Timings are medians over `reps` passes after a discarded warm-up pass; torch's thread count is used
as it is (set OMP_NUM_THREADS / --threads). The header prints the CPU model, its instruction sets and
whether it runs bf16 natively, and the figures are PROVISIONAL when other processes used the cores
meanwhile (machine.LoadMonitor). Output: tables on stdout, results.md + results.json in
--out (default bench-results/decoder/).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (HOST_SPREAD_LIMIT, LoadMonitor, SpeedProbe, cpu_model, host_line, host_speed,  # noqa: E402
                     isa_line, machine_info, status_line)
from throughput import bench_matmul, median, pct, table  # noqa: E402

from fedpeft.algorithms.registry import get_algorithm  # noqa: E402
from fedpeft.algorithms.base import Client, ClientInfo  # noqa: E402
from fedpeft.config import DECODER_PATHS, RunConfig  # noqa: E402
from fedpeft.data.batching import EncodedLM, encode_generation  # noqa: E402
from fedpeft.data.tasks import GenExample  # noqa: E402
from fedpeft.generation import GenerationSettings, generate_ids  # noqa: E402
from fedpeft.data.batching import prompt_batches  # noqa: E402
from fedpeft.models.backbone import load_backbone  # noqa: E402
from fedpeft.run.assemble import build_algorithm  # noqa: E402
from fedpeft.run.federation import prepare_clients  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short story about a cat who learns to fly.",
    "Explain why the sky is blue to a child.",
    "Give three tips for learning a new language.",
    "Describe a walk through a forest in autumn.",
    "What are the benefits of regular exercise?",
    "Write a poem about the sea at night.",
    "Summarize the plot of a detective novel you invent.",
    "List some ideas for a weekend trip in the mountains.",
]


@dataclass(frozen=True)
class Settings:
    reps: int = 3
    batch_size: int = 8
    prompt_len: int = 40
    target_len: int = 24  # EOS included: 64 tokens per example
    train_batches: int = 3  # optimizer steps per measured pass
    rank: int = 8
    new_tokens: int = 32
    gen_reps: int = 2  # generation passes are long (no-cache greedy recomputes the whole sequence)
    matmul_square: int = 2048
    matmul_min_seconds: float = 0.2


QUICK = Settings(reps=1, gen_reps=1, train_batches=1, new_tokens=8, matmul_square=768, matmul_min_seconds=0.05)


def synthetic_lm_data(n: int, s: Settings, vocab: int, seed: int = 0) -> EncodedLM:
    """n examples of exactly prompt_len + target_len random tokens (target ends in a real EOS)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(100, vocab, s.prompt_len + s.target_len).astype(np.int64) for _ in range(n)]
    return EncodedLM(ids, np.full(n, s.prompt_len, dtype=np.int64), [("",)] * n, pad_id=0)


def body_params(lm: torch.nn.Module) -> int:
    """Parameters of the decoder layers and final norm (LoRA included), without the embeddings."""
    emb = lm.get_input_embeddings().weight
    return sum(p.numel() for p in lm.get_decoder().parameters() if p is not emb)


def timed_fits(alg, client, s: Settings) -> dict[str, Any]:
    """`s.reps` timed FedIT.fit passes (after a warm-up pass) of a bound algorithm on `client`'s training
    data, and the figures both training sections report: the median compute time per step, tokens/s and
    useful GFLOP/s (4 × N_body per real token + 4 × V × H per target token)."""
    inst = alg.configure(alg.init(), 1, list(range(len(alg.federation))))[0]
    runs = [alg.fit(inst, client).config for _ in range(s.reps + 1)][1:]  # the first pass is the warm-up
    return fit_figures(alg, client, s, runs)


def fit_figures(alg, client, s: Settings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """timed_fits' figures from the replies' configs of the measured passes."""
    lm = alg.runtime.model.lm
    n_body, vh = body_params(lm), lm.get_output_embeddings().weight.numel()
    compute = median([r["compute_seconds"] for r in runs])
    real, target = client.train.real_tokens, client.train.target_tokens
    flops = 4 * n_body * real + 4 * vh * target
    adjacent = ({"share_of_adjacent_peak": median([flops / r["compute_seconds"] / 1e9 / statistics.fmean(r["probe_gflops"])
                                                    for r in runs])}
                if all("probe_gflops" in r for r in runs) else {})
    return {**adjacent, "steps": s.train_batches, "seconds_per_step": compute / s.train_batches,
            "real_tokens_per_s": real / compute, "target_tokens_per_s": target / compute,
            "useful_gflops": flops / compute / 1e9, "n_body": n_body, "lm_head_params": vh,
            "real_tokens": real, "padded_tokens": runs[0].get("padded_tokens"),
            "passes": [r["compute_seconds"] for r in runs]}


def bench_training(backbone, s: Settings, precisions=("fp32", "bf16")) -> dict[str, Any]:
    # "bench" is no registered task, so the settings are given resolved: the decoder's LoRA targets.
    cfg = RunConfig(method="fedit", tasks=["bench"], rank=s.rank, lora_alpha=2.0 * s.rank, batch_size=s.batch_size,
                    local_epochs=1, lr=1e-4, lora_dropout=0.0, quiet=True, target_modules=backbone.default_targets())
    out = {}
    for precision in precisions:
        cfg.precision = precision
        alg = get_algorithm(cfg)
        data = synthetic_lm_data(s.batch_size * s.train_batches, s, backbone.tokenizer.vocab_size)
        client = Client(ClientInfo(0, "bench", 0, len(data)), data, data, False)
        alg.bind(alg.build_runtime(backbone), [client.info])
        out[precision] = timed_fits(alg, client, s)
        del alg
    return out


def bench_training_e2e(backbone, s: Settings, data_dir: str, precisions=("fp32", "bf16"),
                       probe: SpeedProbe | None = None) -> dict[str, Any]:
    """FedIT.fit on the first batch_size × train_batches E2E training examples of one client, as a run
    encodes and pads them (max length 128, LoRA dropout 0.05), fp32 and bf16, each with both decoder
    paths (`--decoder-path`: padded, the model's own forward, and varlen, padding-free), their passes
    interleaved so a burst of other work hits both; keys "fp32 padded", ... and per precision the
    varlen / padded speed-up (ratio of the medians, and median of the paired per-pass ratios). With
    `probe`, every measured pass is bracketed by a matmul probe of its dtype (machine.SpeedProbe)."""
    out: dict[str, Any] = {}
    for precision in precisions:
        algs, clients = {}, None
        for path in DECODER_PATHS:
            cfg = RunConfig(method="fedit", model_name="smollm2", tasks=["e2e"], data_dir=data_dir, seed=1,
                            train_samples=s.batch_size * s.train_batches, test_samples=4, max_length=128,
                            batch_size=s.batch_size, local_epochs=1, lr=1e-4, rank=s.rank, lora_alpha=2.0 * s.rank,
                            precision=precision, decoder_path=path, quiet=True).resolved()
            infos, clients = prepare_clients(cfg, backbone.tokenizer)
            algs[path] = build_algorithm(cfg, backbone, infos)
        insts = {p: a.configure(a.init(), 1, [0])[0] for p, a in algs.items()}
        runs: dict[str, list] = {p: [] for p in algs}
        for rep in range(s.reps + 1):  # the first pass of each is the warm-up
            dtype = "bfloat16" if precision == "bf16" else "float32"
            for p, a in algs.items():
                before = probe(dtype) if probe and rep else None
                reply = dict(a.fit(insts[p], clients[0]).config)
                if rep:
                    if probe:
                        reply["probe_gflops"] = [before, probe(dtype)]
                    runs[p].append(reply)
        for p, a in algs.items():
            out[f"{precision} {p}"] = fit_figures(a, clients[0], s, runs[p])
        paired = [a["compute_seconds"] / b["compute_seconds"] for a, b in zip(runs["padded"], runs["varlen"])]
        out[f"{precision} speed-up"] = {
            "ratio": out[f"{precision} varlen"]["real_tokens_per_s"] / out[f"{precision} padded"]["real_tokens_per_s"],
            "paired": median(paired)}
        del algs
    return out


def e2e_figures(e2e: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Section 2b's per-(precision, path) figures, without its per-precision "speed-up" entries and its
    probes' `host_speed`."""
    return {k: v for k, v in (e2e or {}).items() if not k.endswith("speed-up") and k != "host_speed"}


def lora_model(backbone, s: Settings, precision: str):
    """SmolLM2 with FedIT's LoRA (B = 0 at init, so the text is the base model's) for `precision`."""
    cfg = RunConfig(method="fedit", tasks=["bench"], rank=s.rank, quiet=True, precision=precision,
                    target_modules=backbone.default_targets())
    alg = get_algorithm(cfg)
    alg.bind(alg.build_runtime(backbone), [ClientInfo(0, "bench", 0, 1)])
    alg.load_lora(alg.configure(alg.init(), 1, list(range(len(alg.federation))))[0], Client(ClientInfo(0, "bench", 0, 1), None, None, False))
    return alg.runtime.model


def bench_generation(backbone, s: Settings, precisions=("fp32", "bf16")) -> list[dict[str, Any]]:
    models = {p: lora_model(backbone, s, p) for p in precisions}
    tok = backbone.tokenizer
    chat = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            if getattr(tok, "chat_template", None) else p for p in PROMPTS]
    data = encode_generation([GenExample(p, "", ("",)) for p in chat], tok, max_length=256)
    rows = []
    for label, beams, cache, precision in (("greedy, KV cache", 1, True, "fp32"), ("greedy, no cache", 1, False, "fp32"),
                                           ("beam 4, KV cache", 4, True, "fp32"),
                                           ("greedy, KV cache, bf16", 1, True, "bf16"),
                                           ("beam 4, KV cache, bf16", 4, True, "bf16")):
        if precision not in models:
            continue
        model = models[precision]
        settings = GenerationSettings(num_beams=beams, max_new_tokens=s.new_tokens, batch_size=len(data),
                                      use_cache=cache)
        (idx, batch), = list(prompt_batches(data, len(data)))
        times, tokens = [], 0
        for rep in range(s.gen_reps + 1):
            t = time.perf_counter()
            new = generate_ids(model, batch["input_ids"], batch["attention_mask"], settings, precision)
            if rep:
                times.append(time.perf_counter() - t)
                tokens = sum(len(x) for x in new)
        wall = median(times)
        rows.append({"label": label, "prompts": len(data), "prompt_tokens": int(data.prompt_lengths.sum()),
                     "new_tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall, "passes": times})
    return rows


def merge_peaks(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Each row's best of the two passes (before and after the rest): on a shared machine a burst of
    other work during one pass must not lower the peak and so inflate the fractions of it."""
    rows = [dict(a, gflops=max(a["gflops"], b["gflops"]), samples=a["samples"] + b["samples"])
            for a, b in zip(first["rows"], second["rows"])]
    peak = {d: max(r["gflops"] for r in rows if r["dtype"] == d) for d in ("float32", "bfloat16")}
    return {"rows": rows, "peak_gflops": peak}


def render(res: dict[str, Any]) -> str:
    s, mm, tr = res["settings"], res["matmul"], res["training"]
    out = [f"# Decoder throughput: SmolLM2-135M on {res['cpu']}, {res['threads']} thread(s)", "",
           f"torch {torch.__version__}; {res['date']}; {res['isa']}", "",
           f"{status_line(res['load'])}", "",
           *([host_line(res["training_e2e"]["host_speed"], "around section 2b's passes")
              + (f" → **{res['load']['host_status']}**" if "host_status" in res["load"] else ""), ""]
             if (res.get("training_e2e") or {}).get("host_speed") else []),
           "## 1. Matmul peak", "",
           table(["shape", "dtype", "GFLOP/s"], [[r["shape"], r["dtype"], r["gflops"]] for r in mm["rows"]]), "",
           f"Peak: float32 {mm['peak_gflops']['float32']:.1f}, bfloat16 {mm['peak_gflops']['bfloat16']:.1f} GFLOP/s.", "",
           f"## 2. LoRA training (FedIT.fit, r = {s['rank']} on q_proj/v_proj, batch {s['batch_size']} × "
           f"{s['prompt_len'] + s['target_len']} tokens, {s['target_len']} target)", ""]
    rows = [[p, v["seconds_per_step"], v["real_tokens_per_s"], v["target_tokens_per_s"], v["useful_gflops"],
             pct(v["frac_fp32_peak"]), pct(v["frac_bf16_peak"]) if p == "bf16" else "-"] for p, v in tr.items()]
    out += [table(["precision", "s / step", "real tokens/s", "target tokens/s", "useful GFLOP/s", "of fp32 peak",
                   "of bf16 peak"], rows), "",
            f"N_body = {tr['fp32']['n_body'] / 1e6:.1f} M, LM head {tr['fp32']['lm_head_params'] / 1e6:.1f} M (target tokens only).", ""]
    e2e = e2e_figures(res.get("training_e2e"))
    if e2e:
        first = e2e["fp32 padded"]
        pad = (f"{1 - first['real_tokens'] / first['padded_tokens']:.1%} of the batches' tokens are padding"
               if first.get("padded_tokens") else "padding not reported")
        out += [f"## 2b. LoRA training on real E2E examples ({first['steps']} batches of {s['batch_size']}, ≤ 128 "
                f"tokens, {first['real_tokens']} real tokens; {pad}; FLOPs count real tokens only)", "",
                table(["precision, --decoder-path", "s / step", "real tokens/s", "target tokens/s", "useful GFLOP/s",
                       "of fp32 peak", "of bf16 peak", "of the probes around each pass (own dtype)"],
                      [[p, v["seconds_per_step"], v["real_tokens_per_s"], v["target_tokens_per_s"], v["useful_gflops"],
                        pct(v["frac_fp32_peak"]), pct(v["frac_bf16_peak"]) if p.startswith("bf16") else "-",
                        pct(v["share_of_adjacent_peak"]) if "share_of_adjacent_peak" in v else "-"]
                       for p, v in e2e.items()]), ""]
        for key, v in res["training_e2e"].items():
            if key.endswith("speed-up"):
                out += [f"varlen / padded, {key.split()[0]}: {v['ratio']:.3f}× (median of the paired passes "
                        f"{v['paired']:.3f}×)", ""]
    else:
        out += [f"## 2b. LoRA training on real E2E examples: not run ({res.get('e2e_note', 'no data root')})", ""]
    out += [f"## 3. Generation ({res['generation'][0]['prompts']} prompts in one batch, ≤ {s['new_tokens']} new tokens)", ""]
    out += [table(["decoding", "new tokens", "seconds", "tokens/s"],
                  [[r["label"], r["new_tokens"], r["seconds"], r["tokens_per_s"]] for r in res["generation"]]), ""]
    g = {r["label"]: r for r in res["generation"]}
    out += [f"KV cache speed-up (greedy): {g['greedy, no cache']['seconds'] / g['greedy, KV cache']['seconds']:.2f}×", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true", help="one pass of everything (a smoke test, not a measurement)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--data-dir", default=os.environ.get("FEDPEFT_DATA_DIR"),
                    help="data root with e2e/ for section 2b (default: $FEDPEFT_DATA_DIR; without it 2b is skipped)")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "decoder"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Settings()
    info = machine_info()
    print(f"CPU: {info['cpu']}; {isa_line(info)}; {torch.get_num_threads()} thread(s)", flush=True)
    monitor = LoadMonitor(torch.get_num_threads()).start()
    backbone = load_backbone("smollm2", kind="causal")
    tokens = s.batch_size * (s.prompt_len + s.target_len)
    target_tokens = s.batch_size * s.target_len
    shapes = [("q/o 512×576×576", tokens, 576, 576), ("mlp 512×576×1536", tokens, 576, 1536),
              ("mlp down 512×1536×576", tokens, 1536, 576), (f"lm head {target_tokens}×576×49152", target_tokens, 576, 49152)]
    print("1. matmul peak", flush=True)
    mm = bench_matmul(s, shapes)
    print("2. training", flush=True)
    precisions = ("fp32", "bf16") if info["native_bf16"] else ("fp32",)  # bf16 crawls without native support
    tr = bench_training(backbone, s, precisions)
    e2e, e2e_note = None, ""
    if args.data_dir and (Path(args.data_dir) / "e2e").is_dir():
        print("2b. training on E2E", flush=True)
        probe = SpeedProbe(2048 if not args.quick else 256, 0.25 if not args.quick else 0.02)
        e2e = bench_training_e2e(backbone, s, args.data_dir, precisions, probe=probe)
        e2e["host_speed"] = host_speed(probe)
    else:
        e2e_note = "no data root with e2e/: give --data-dir or set FEDPEFT_DATA_DIR"
    print("3. generation", flush=True)
    gen = bench_generation(backbone, s, precisions)
    print("1'. matmul peak again", flush=True)
    mm = merge_peaks(mm, bench_matmul(s, shapes))
    for v in [*tr.values(), *e2e_figures(e2e).values()]:
        v["frac_fp32_peak"] = v["useful_gflops"] / mm["peak_gflops"]["float32"]
        v["frac_bf16_peak"] = v["useful_gflops"] / mm["peak_gflops"]["bfloat16"]
    monitor.stop()
    load = monitor.summary(quick=args.quick)
    if e2e and load["status"] == "final" and e2e["host_speed"]["spread"] > HOST_SPREAD_LIMIT:
        load["host_status"] = "PROVISIONAL"  # nothing else ran here, but the host's speed moved under 2b
    res = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "isa": isa_line(info), "load": load,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "settings": vars(s) if not hasattr(s, "__dataclass_fields__") else {k: getattr(s, k) for k in s.__dataclass_fields__},
           "matmul": mm, "training": tr, "training_e2e": e2e, "e2e_note": e2e_note, "generation": gen}
    text = render(res)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
