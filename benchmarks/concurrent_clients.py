"""Concurrent or sequential clients on a CPU: does Flower's Simulation Engine with one thread per client
(two clients training at once on 2 cores) beat the in-process engine with one client at a time on two
threads? Same federation, same seed, both measured in this one run.

    PYTHONPATH=src python benchmarks/concurrent_clients.py [--rounds 3] [--clients 8] [--threads 2]
        [--train-samples 64] [--test-samples 32] [--data-dir DATA_ROOT] [--out bench-results/concurrent]
        [--one-thread-reference]

The federation: `--clients` clients (8) on the packaged MiniLM, FedIT, one local epoch, `--precision
auto` (the default a user gets), on the CPU. SST-2 from the data root when there is one, else the
bundled demo tasks. The two settings:

- sequential: `--engine local --threads T` (T = --threads, 2): one client at a time, T threads;
- concurrent: `--engine flower-sim --client-cpus 1 --threads 1`: Ray runs T clients at a time, one
  thread each (Ray sets OMP_NUM_THREADS=1 in every client actor);
- with `--one-thread-reference`, also `--engine local --threads 1` (one client at a time, one thread):
  it separates what the concurrency gains from what leaving a second OpenMP thread out gains.

A round's time is training_history.json's round time (fit + aggregation + evaluation of every
client); Ray's start-up and the clients' model loading happen before round 1 and are reported apart.
The ratio is sequential / concurrent per round, over rounds 2.. (round 1 also warms the kernels of
every Ray worker), so > 1 means the concurrent clients are faster.

The figures are only as good as the machine is quiet: the script prints the CPU model, its instruction
sets, the thread counts and the load average at the start and the end, and calls the figures
PROVISIONAL when the load average exceeded the thread count the benchmark uses (other work was
competing for the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def federation(args) -> dict:
    from fedpeft.data.sources import has_local_split

    data_dir = args.data_dir or os.environ.get("FEDPEFT_DATA_DIR")
    if data_dir and has_local_split("sst2", "train", data_dir):
        tasks, name = ["sst2"] * args.clients, "SST-2"
    else:
        data_dir = None
        tasks = [t for t in ("demo-sentiment", "demo-topic") for _ in range(args.clients // 2)]
        tasks += ["demo-sentiment"] * (args.clients - len(tasks))
        name = "the bundled demo tasks (no data root with SST-2)"
    return dict(data=name, settings=dict(
        method="fedit", model_name="minilm", tasks=tasks, data_dir=data_dir, train_samples=args.train_samples,
        test_samples=args.test_samples, global_rounds=args.rounds, local_epochs=1, batch_size=16,
        eval_batch_size=32, max_length=64, rank=4, lr=3e-3, head_policy="frozen", device="cpu",
        precision="auto", quiet=True, seed=1))


def timed_run(settings: dict, out: Path, **engine) -> dict:
    from fedpeft.config import RunConfig
    from fedpeft.run import run

    t0 = time.perf_counter()
    res = run(RunConfig(**settings, **engine, output_dir=str(out)))
    wall = time.perf_counter() - t0
    hist = json.loads((res.run_dir / "training_history.json").read_text())
    rounds = [r["seconds"] for r in hist["rounds"] if r["round"] > 0]
    saved = json.loads((res.run_dir / "config.json").read_text())
    return {"wall_seconds": wall, "round_seconds": rounds, "start_seconds": wall - sum(rounds),
            "overall": res.headline["overall"], "precision": saved["precision"], "device": saved["device"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="threads of the sequential setting = clients at once")
    parser.add_argument("--train-samples", type=int, default=64)
    parser.add_argument("--test-samples", type=int, default=32)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="bench-results/concurrent")
    parser.add_argument("--one-thread-reference", action="store_true",
                        help="also time the local engine on one thread (one client at a time)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 warms up and is not in the ratio")

    import torch

    from fedpeft import hardware
    from fedpeft.engines.flower import require_flower

    require_flower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fed = federation(args)
    threads = args.threads
    load_start = hardware.load_average()
    print(f"machine: {hardware.machine_summary()}", flush=True)
    print(f"federation: {args.clients} clients on MiniLM, {fed['data']}, {args.train_samples} train / "
          f"{args.test_samples} test each, FedIT, {args.rounds} rounds, 1 local epoch", flush=True)
    print(f"sequential: local engine, {threads} threads | concurrent: flower-sim, --client-cpus 1, "
          f"{threads} clients at a time, 1 thread each", flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    sequential = timed_run(fed["settings"], out / f"local-{stamp}", engine="local", threads=threads)
    print(f"sequential rounds (s): {' '.join(f'{s:.1f}' for s in sequential['round_seconds'])}", flush=True)
    concurrent = timed_run(fed["settings"], out / f"flower-sim-{stamp}", engine="flower-sim", threads=1,
                           client_cpus=1.0, client_gpus=0.0)
    print(f"concurrent rounds (s): {' '.join(f'{s:.1f}' for s in concurrent['round_seconds'])}", flush=True)
    single = None
    if args.one_thread_reference:
        single = timed_run(fed["settings"], out / f"local-1thread-{stamp}", engine="local", threads=1)
        print(f"one-thread rounds (s): {' '.join(f'{s:.1f}' for s in single['round_seconds'])}", flush=True)
    load_end = hardware.load_average()

    seq, conc = sequential["round_seconds"][1:], concurrent["round_seconds"][1:]
    ratio = statistics.mean(seq) / statistics.mean(conc)
    per_round = [s / c for s, c in zip(seq, conc)]
    loads = [x for x in (load_start, load_end) if x is not None]
    peak_load = max((x[0] for x in loads), default=0.0)
    contended = peak_load > threads
    faster = "concurrent (flower-sim, --client-cpus 1)" if ratio > 1 else f"sequential (local engine, --threads {threads})"
    result = {
        "machine": hardware.machine_summary(), "cpu_model": hardware.cpu_info().model,
        "cpu_capability": hardware.cpu_info().capability, "native_bf16": hardware.cpu_info().native_bf16,
        "torch": torch.__version__, "logical_cpus": os.cpu_count(), "threads": threads,
        "load_average_start": load_start, "load_average_end": load_end, "contended": contended,
        "federation": fed["data"], "clients": args.clients, "rounds": args.rounds,
        "train_samples": args.train_samples, "test_samples": args.test_samples,
        "precision": sequential["precision"], "sequential": sequential, "concurrent": concurrent,
        "ratio_sequential_over_concurrent": ratio, "ratio_per_round": per_round, "faster": faster,
        "one_thread_reference": single,
        "ratio_one_thread_over_concurrent": (statistics.mean(single["round_seconds"][1:]) / statistics.mean(conc)
                                             if single else None),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"| setting | threads × clients at once | round 1 (s) | rounds 2..{args.rounds}, mean (s) | start-up (s) | overall |")
    print("|---|---|---|---|---|---|")
    rows = [("sequential: local engine", sequential, f"{threads} × 1"),
            ("concurrent: flower-sim", concurrent, f"1 × {threads}")]
    if single:
        rows.append(("reference: local engine, 1 thread", single, "1 × 1"))
    for name, r, shape in rows:
        print(f"| {name} | {shape} | {r['round_seconds'][0]:.1f} | {statistics.mean(r['round_seconds'][1:]):.1f} | "
              f"{r['start_seconds']:.1f} | {r['overall']:.4f} |")
    print()
    print(f"round time ratio sequential / concurrent (rounds 2..{args.rounds}): {ratio:.2f} "
          f"(per round: {', '.join(f'{x:.2f}' for x in per_round)}); faster: {faster}")
    if single:
        print(f"reference: local engine on 1 thread / concurrent: {result['ratio_one_thread_over_concurrent']:.2f}")
    print(f"precision {sequential['precision']}; load average at start "
          f"{'/'.join(f'{x:.2f}' for x in load_start) if load_start else 'n/a'}, at end "
          f"{'/'.join(f'{x:.2f}' for x in load_end) if load_end else 'n/a'} (1/5/15 min)")
    if contended:
        print(f"PROVISIONAL: the 1-minute load average reached {peak_load:.2f}, above the {threads} threads this "
              f"benchmark uses: other work competed for the cores, so these times are not the machine's. "
              f"Rerun on an idle machine before quoting them.")
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
