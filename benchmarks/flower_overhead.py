"""Wall time of the same run on the local engine, on Flower's Simulation Engine and on a loopback
deployment (1 SuperLink + N SuperNodes as separate processes), and where Flower's overhead goes.

    PYTHONPATH=src python benchmarks/flower_overhead.py                         # MiniLM, real SST-2, 4 and 16 clients
    PYTHONPATH=src python benchmarks/flower_overhead.py --clients 4 --modes local deploy-process
    PYTHONPATH=src python benchmarks/flower_overhead.py --model tiny_models:tiny_bert --data demo   # minutes, no data

Modes (every compared figure is taken in one invocation, one after the other):
- `local`: `--engine local`, torch using every core (`--threads` = cores);
- `local-1t`: `--engine local --threads 1`, the fair reference on a machine shared with other work
  (a multi-threaded torch waits for its slowest thread at every parallel region; the other modes
  run one thread per client);
- `flower-sim`: `--engine flower-sim`, `--client-cpus 1` (one Ray actor per core), 1 torch thread each;
- `deploy-process`: the documented deployment, `python -m fedpeft.flower_app supernode`: each
  SuperNode `--isolation process` with one long-lived fedpeft ClientApp worker and short polls, 1 thread
  each; the SuperLink keeps its state in memory (Flower's default, no `--database`);
- `deploy-process-db`: the same with the SuperLink's state in a SQLite file (`--database superlink.db`,
  as in the docs' TLS recipe, so node registrations survive a SuperLink restart): every message object
  is a committed write, which costs each message round trip;
- `deploy-subprocess`: Flower's default, a new `flwr-clientapp` process per message (imports torch and
  loads the model every time), 1 thread each, in-memory SuperLink.

"start-up" is from the start of the mode (process start for the deployments: SuperLink, SuperNodes,
`flwr run`) until the server knows every client; "per round" are the round times of
training_history.json (fit + aggregate + evaluate), "after start-up" their mean. The ratio column is
that mean over local's mean at the same client count. Every figure is marked `contended` when the
1-minute load average before the mode exceeded 0.5 (other work on the machine): rerun on an idle
machine for figures to quote.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The loopback deployment harness (flower_loopback.py) and the tiny random BERT (tiny_models.py) are
# test scaffolding: they live in the repository's tests/ folder, not in the fedpeft package. That
# folder goes on sys.path for this process, and on PYTHONPATH for the processes the runs start (Ray
# workers, SuperLink, SuperNodes, ClientApp workers), which load a factory model by its name.
ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = str(ROOT / "tests")
sys.path.insert(0, TESTS_DIR)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), TESTS_DIR) if p)

MODES = ("local", "local-1t", "flower-sim", "deploy-process", "deploy-process-db", "deploy-subprocess")
CONTENDED_LOAD = 0.5


def cpu_model() -> str:
    from fedpeft.hardware import cpu_info

    return cpu_info().model


def data_root(arg: str | None) -> str | None:
    if arg == "demo":
        return None
    for cand in (arg, os.environ.get("FEDPEFT_DATA_DIR")):
        if cand and (Path(cand) / "glue" / "SST-2").is_dir():
            return str(Path(cand).resolve())
    sys.exit("fedpeft: error: real SST-2 not found: pass --data ROOT (holding glue/SST-2/) or --data demo")


def settings(args, n: int, data: str | None) -> dict:
    task = "sst2" if data else "demo-sentiment"
    out = dict(method=args.method, model_name=args.model, tasks=[task] * n, train_samples=args.train_samples,
               test_samples=args.test_samples, global_rounds=args.rounds, local_epochs=1, batch_size=16,
               eval_batch_size=64, max_length=args.max_length, rank=4, lr=5e-4, threads=1, quiet=True,
               round_timeout=600.0, client_cpus=1.0)  # a message the SuperLink loses (it did: "database is
    # locked" in its sqlite store at 16 nodes on 2 busy cores) costs a round 10 minutes, not an hour
    if args.method == "fedlease":
        out["warmup_rounds"] = 1
    if data:
        out["data_dir"] = data
    return out


def _stamp(line: str) -> float:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def phases(run_dir: Path, t_start: float) -> dict:
    lines = (run_dir / "training_log.txt").read_text().splitlines()
    joined = [_stamp(x) for x in lines if " is node " in x]
    hist = json.loads((run_dir / "training_history.json").read_text())
    per_round = [r.get("seconds", 0.0) for r in hist["rounds"] if r["round"] > 0]
    first = _stamp(lines[0]) if lines else t_start
    return {"start": (max(joined) if joined else first) - t_start, "per_round": per_round,
            "mean": statistics.fmean(per_round) if per_round else float("nan")}


def run_engine(out: Path, cfg_over: dict, engine: str, threads: int, name: str) -> tuple[float, dict]:
    """One run in its own folder `out/name` (each mode its own: local and local-1t share an engine);
    --overwrite, so the benchmark can be rerun into the same --out."""
    from fedpeft.config import RunConfig
    from fedpeft.run import run

    t0 = time.time()
    res = run(RunConfig(**{**cfg_over, "threads": threads}, engine=engine, output_dir=str(out / name), overwrite=True))
    wall = time.time() - t0
    return wall, phases(res.run_dir, t0)


def run_deployment(out: Path, cfg_over: dict, mode: str, model: str) -> tuple[float, dict]:
    """`mode`: deploy-process, deploy-process-db or deploy-subprocess (see the module's docstring)."""
    from flower_loopback import Loopback, wait_for_file

    name = mode
    isolation = "subprocess" if mode == "deploy-subprocess" else "process"
    toml = out / f"{name}.toml"
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg_over.items()))
    node_config: dict = {"threads": 1}
    if ":" in model:
        node_config["allow-model-factories"] = model
    if cfg_over.get("data_dir"):
        node_config["data-dir"] = cfg_over["data_dir"]
    t0 = time.time()
    with Loopback(out / f"{name}-procs", state="file" if mode.endswith("-db") else "memory") as lb:
        lb.start_superlink()
        for i in range(len(cfg_over["tasks"])):
            lb.start_supernode(i, {"partition-id": i, **node_config}, isolation=isolation)
        lb.submit({"config": str(toml), "output-dir": str(out / name)})
        wait_for_file(out / name / "summary.md", 6 * 3600, alive=lb)
        wall = time.time() - t0
    return wall, phases(out / name, t0)


def cold_client_start(model: str) -> float:
    """What Flower's default isolation pays per message: a fresh Python importing the ClientApp,
    torch, transformers and loading the model."""
    code = ("import fedpeft.flower_app, fedpeft.algorithms.fedlease, sklearn.metrics; "
            f"from fedpeft.models.backbone import load_backbone; load_backbone({model!r})")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default=None, help="data root holding glue/SST-2 (default: $FEDPEFT_DATA_DIR), or"
                                                  " 'demo' for the bundled demo task")
    ap.add_argument("--method", default="fedit")
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-samples", type=int, default=32)
    ap.add_argument("--test-samples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--out", default="/tmp/fedpeft-flower-bench")
    args = ap.parse_args()
    data = data_root(args.data)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cores = os.cpu_count() or 1
    load0 = os.getloadavg()
    rows = []
    for n in args.clients:
        cfg_over = settings(args, n, data)
        for mode in args.modes:
            sub = out / f"{n}-clients"
            sub.mkdir(exist_ok=True)
            load = os.getloadavg()[0]
            print(f"[{time.strftime('%H:%M:%S')}] {n} clients, {mode} (load {load:.2f}) ...", flush=True)
            if mode == "local":
                wall, ph = run_engine(sub, cfg_over, "local", cores, mode)
                threads, procs = f"{cores} (torch)", "1"
            elif mode == "local-1t":
                wall, ph = run_engine(sub, cfg_over, "local", 1, mode)
                threads, procs = "1", "1"
            elif mode == "flower-sim":
                wall, ph = run_engine(sub, cfg_over, "flower-sim", 1, mode)
                threads, procs = f"1 per client, {cores} Ray actors", f"1 + {cores} actors"
            else:
                wall, ph = run_deployment(sub, cfg_over, mode, args.model)
                threads = "1 per node"
                link = "SuperLink (file state)" if mode.endswith("-db") else "SuperLink"
                procs = (f"{link} + ServerApp + {n} SuperNodes + {n} ClientApp workers" if mode != "deploy-subprocess"
                         else f"{link} + ServerApp + {n} SuperNodes + 1 flwr-clientapp per message")
            rows.append(dict(n=n, mode=mode, wall=wall, threads=threads, procs=procs, load=load, **ph))
            print(f"    wall {wall:.1f} s, start-up {ph['start']:.1f} s, rounds {[round(x, 1) for x in ph['per_round']]}",
                  flush=True)
            (out / "results.json").write_text(json.dumps({"rows": rows}, indent=1))  # so far
    cold = cold_client_start(args.model)
    load1 = os.getloadavg()
    # the reference: local on every core, or on one thread when that was the mode run
    local = {r["n"]: r["mean"] for r in rows if r["mode"] == "local"}
    for r in rows:
        if r["mode"] == "local-1t":
            local[r["n"]] = min(local.get(r["n"], float("inf")), r["mean"])
    print(f"\n{args.method}, {args.model}, {'real SST-2 (' + data + ')' if data else 'demo data'}, {args.rounds} rounds, "
          f"{args.train_samples} train / {args.test_samples} test examples per client, max length {args.max_length}")
    print(f"machine: {cpu_model()}, {cores} cores, Python {platform.python_version()}; load average "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start, {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at end; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}\n")
    print("| clients | mode | processes | torch threads | wall (s) | start-up (s) | per round (s) | after start-up (s/round) "
          "| × local (faster of local, local-1t) | load before |")
    print("|---:|---|---|---|---:|---:|---|---:|---:|---|")
    for r in rows:
        ratio = r["mean"] / local[r["n"]] if local.get(r["n"]) else float("nan")
        mark = "contended" if r["load"] > CONTENDED_LOAD else "idle"
        print(f"| {r['n']} | {r['mode']} | {r['procs']} | {r['threads']} | {r['wall']:.1f} | {r['start']:.1f} | "
              f"{[round(x, 1) for x in r['per_round']]} | {r['mean']:.1f} | {ratio:.2f} | {r['load']:.2f} ({mark}) |")
    print(f"\ncold start of one Flower-default ClientApp process (python + flwr + fedpeft + torch + transformers + "
          f"{args.model}): {cold:.1f} s — paid per message by deploy-subprocess, once per node by deploy-process")
    (out / "results.json").write_text(json.dumps({"rows": rows, "cold_start": cold, "load_start": load0,
                                                  "load_end": load1, "cpu": cpu_model(), "cores": cores}, indent=1))


if __name__ == "__main__":
    main()
