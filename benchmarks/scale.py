"""Many clients in one process: memory and time per round at N = 100, 1,000 and 10,000 clients.

    python benchmarks/scale.py                       # FedIT, FedLEASE, FedSA-LoRA at 100, 1,000, 10,000 clients
    python benchmarks/scale.py --sizes 100 1000      # a subset; --methods fedit; --quick for a smoke check
    python benchmarks/scale.py --out DIR             # results.md / results.json (default bench-results/scale/)

Every (method, N) runs in its own process (so its peak RSS is its own) on the packaged MiniLM:
N clients of SST-2 (`--num-clients N`, Dirichlet label skew α = 0.5), 10 % of them trained per round,
3 rounds (FedLEASE: 1 warmup round, then clustering of that round's uploaders, then 2 rounds with
late joiners), scoring the round's sample and, after the last round, every client. SST-2's 67,349
training sentences hold 16 train + 4 test examples for up to ~3,300 clients (the Dirichlet shares of 4 + 2 run out
of negatives at 10,000); 10,000 clients get
3 + 2 (`--test-source train`: test data carved from the train split, disjoint from training data).

Printed per run: peak RSS, RSS per client (against the smallest N of the same method), seconds per
round, the server's seconds per round (round wall time minus the clients' own fit and evaluate
calls: sampling, configure, aggregation with clustering, bookkeeping) and its share of the round,
the clustering's seconds, and the sizes of training_history.json and metrics.csv. Then the
clustering alone on N synthetic clients (MiniLM's 12 B matrices of 384 × 4 each): Eq. 2 on all
N² pairs, average linkage, silhouettes for k = 2..8.

Targets (issue): 1,000 clients in under 4 GiB; 10,000 clients run at all; server work under 5 % of a
round; clustering 10,000 clients in under a minute. Run on an idle machine: with 2 threads and a busy
core torch slows down many times; the header prints the load average and marks a contended run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (100, 1000, 10000)
METHODS = ("fedit", "fedlease", "fedsa-lora")


def rss_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_model() -> str:
    from fedpeft.hardware import cpu_info

    return cpu_info().model


def one(method: str, n: int, rounds: int, participation: float, data_dir: str, out: Path) -> dict:
    """One run in this process; returns its figures."""
    from fedpeft.config import RunConfig
    from fedpeft.run import run

    train, test = (16, 4) if n <= 3000 else (3, 2)
    cfg = RunConfig(method=method, tasks=["sst2"], num_clients=n, partition="dirichlet", alpha=0.5,
                    train_samples=train, test_samples=test, test_source="train", participation=participation,
                    eval_clients="sampled", global_rounds=rounds, warmup_rounds=1, local_epochs=1, batch_size=16,
                    eval_batch_size=32, max_length=64, head_policy="frozen", max_clusters=8, quiet=True,
                    data_dir=data_dir, output_dir=str(out))
    t0 = time.perf_counter()
    result = run(cfg)
    total = time.perf_counter() - t0
    rounds_ = [r for r in result.history.rounds if r["round"] > 0]
    server = [r["seconds"] - r.get("client_seconds", 0.0) for r in rounds_]
    clustering = next((e for e in result.history.events if e["kind"] == "clustering"), None)
    state_seconds = clustering.get("seconds") if clustering is not None else None
    return {"method": method, "clients": n, "train": train, "test": test, "rss_peak": rss_peak_bytes(),
            "total_seconds": total, "round_seconds": [r["seconds"] for r in rounds_], "server_seconds": server,
            "clustered_clients": len(clustering["client_to_expert"]) if clustering else None,
            "clustering_seconds": state_seconds,
            "history_bytes": (out / "training_history.json").stat().st_size,
            "metrics_csv_bytes": (out / "metrics.csv").stat().st_size,
            "overall": result.history.rounds[-1]["overall"]}


def clustering_alone(n: int, seed: int = 0) -> dict:
    """Eq. 2 + average linkage + silhouettes on n synthetic clients with MiniLM's B shapes."""
    import numpy as np

    from fedpeft.algorithms.fedlease.clustering import b_distance_matrix, cluster_clients

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 12, 384, 4)).astype(np.float32)
    clients = [{f"{i}.B": centers[c % 4, i] + 0.8 * rng.normal(size=(384, 4)).astype(np.float32) for i in range(12)}
               for c in range(n)]
    t0 = time.perf_counter()
    d = b_distance_matrix(clients)
    t1 = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = cluster_clients(d, max_clusters=8)
    t2 = time.perf_counter()
    return {"clients": n, "distance_seconds": t1 - t0, "cluster_seconds": t2 - t1, "total_seconds": t2 - t0,
            "num_clusters": result.num_clusters, "rss_peak": rss_peak_bytes()}


def _child(args) -> None:
    if args.one[0] == "cluster":
        print(json.dumps(clustering_alone(int(args.one[1]))))
        return
    method, n = args.one[0], int(args.one[1])
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(one(method, n, args.rounds, args.participation, args.data_dir, Path(tmp) / "run")))


def _spawn(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--participation", type=float, default=0.1)
    p.add_argument("--cluster-sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--data-dir", default=os.environ.get("FEDPEFT_DATA_DIR"))
    p.add_argument("--out", default="bench-results/scale")
    p.add_argument("--quick", action="store_true", help="smoke check: 20 and 60 clients, fedit and fedlease")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return _child(args)
    if not args.data_dir:
        sys.exit("scale.py: error: SST-2 is needed: give --data-dir or set FEDPEFT_DATA_DIR to a data root")
    if args.quick:
        args.sizes, args.methods, args.cluster_sizes = [20, 60], ["fedit", "fedlease"], [500]
    import torch

    load0 = os.getloadavg()[0]
    threads = torch.get_num_threads()
    lines = [f"# Scale: {', '.join(args.methods)} at {', '.join(map(str, args.sizes))} clients", "",
             f"CPU {cpu_model()}, torch {torch.__version__}, {threads} threads "
             f"(capability {torch.backends.cpu.get_cpu_capability()}), load average at start {load0:.2f}"
             + (" — CONTENDED: figures are not final" if load0 > threads else ""), "",
             f"{args.participation:.0%} of the clients per round, {args.rounds} rounds, MiniLM, SST-2 with Dirichlet "
             "label skew α = 0.5; each run in its own process.", "",
             "| method | clients | train/test per client | peak RSS | RSS per client | s/round (median) | "
             "server s/round (median) | server share | clustering s (clients) | history.json | metrics.csv |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    runs = []
    for method in args.methods:
        base = None
        for n in args.sizes:
            r = _spawn(["--one", method, str(n), "--rounds", str(args.rounds), "--participation",
                        str(args.participation), "--data-dir", args.data_dir])
            r.setdefault("method", method)
            r.setdefault("clients", n)
            runs.append(r)
            if "error" in r:
                row = f"| {method} | {n} | failed: {r['error']} |"
            else:
                import statistics

                per = ""
                if base is not None:
                    per = f"{(r['rss_peak'] - base['rss_peak']) / (n - base['clients']) / 2**10:.1f} KiB"
                base = base or r
                s = statistics.median(r["round_seconds"])
                srv = statistics.median(r["server_seconds"])
                cl = "—" if r["clustering_seconds"] is None else f"{r['clustering_seconds']:.2f} ({r['clustered_clients']})"
                row = (f"| {method} | {n} | {r['train']}/{r['test']} | {gib(r['rss_peak'])} | {per or '—'} | {s:.1f} | "
                       f"{srv:.2f} | {srv / s:.1%} | {cl} | {r['history_bytes'] / 2**20:.1f} MiB | "
                       f"{r['metrics_csv_bytes'] / 2**20:.1f} MiB |")
            lines.append(row)
            print(row, flush=True)
    lines += ["", "Clustering alone (synthetic B matrices with MiniLM's shapes, 4 groups):", "",
              "| clients | Eq. 2 on all pairs, s | linkage + silhouettes, s | total, s | M | peak RSS |", "|---|---|---|---|---|---|"]
    print("\n".join(lines[-4:]), flush=True)
    for n in args.cluster_sizes:
        c = _spawn(["--one", "cluster", str(n)])
        runs.append({"clustering_alone": c})
        row = (f"| {n} | failed: {c['error']} |" if "error" in c else
               f"| {n} | {c['distance_seconds']:.1f} | {c['cluster_seconds']:.1f} | {c['total_seconds']:.1f} | "
               f"{c['num_clusters']} | {gib(c['rss_peak'])} |")
        lines.append(row)
        print(row, flush=True)
    load1 = os.getloadavg()[0]
    lines += ["", f"Load average at the end {load1:.2f}" + (" — CONTENDED" if load1 > threads else "")]
    print(lines[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"cpu": cpu_model(), "threads": threads, "load": [load0, load1],
                                                  "runs": runs}, indent=1) + "\n")
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
