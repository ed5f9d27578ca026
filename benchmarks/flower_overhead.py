"""Wall time of the same 2-round FedLEASE run (tiny BERT, 4 demo clients, warmup 1) on the local
engine, on Flower's Simulation Engine and on a loopback deployment (1 SuperLink + 4 SuperNodes), and
where Flower's overhead goes. Prints a table.

    PYTHONPATH=src python benchmarks/flower_overhead.py [--model tiny_models:tiny_bert|minilm] [--out /tmp/flower-bench]

Phases come from the run log's timestamps: "start" is process/engine start-up until the server
knows every client (Ray start and actors for flower-sim; SuperLink, SuperNodes, `flwr run` and the
query round for a deployment), "rounds" the sum of the round times in training_history.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The loopback deployment harness (flower_loopback.py) and the tiny random BERT (tiny_models.py, the
# default --model) are test scaffolding: they live in the repository's tests/ folder, not in the
# fedpeft package. That folder goes on sys.path for this process, and on PYTHONPATH for the processes
# the runs start (Ray workers, SuperLink, SuperNodes, the cold-start probe), which load the model by
# its factory name.
TESTS_DIR = str(Path(__file__).resolve().parents[1] / "tests")
sys.path.insert(0, TESTS_DIR)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), TESTS_DIR) if p)

TASKS = ["demo-sentiment", "demo-sentiment", "demo-topic", "demo-topic"]


def settings(model: str) -> dict:
    return dict(method="fedlease", model_name=model, tasks=TASKS, train_samples=24, test_samples=16, global_rounds=2,
                warmup_rounds=1, local_epochs=1, batch_size=8, max_length=32, rank=2, lr=5e-3, threads=1, quiet=True,
                round_timeout=900.0)


def _stamp(line: str) -> float:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def phases(run_dir: Path) -> dict:
    lines = (run_dir / "training_log.txt").read_text().splitlines()
    first = _stamp(lines[0])
    joined = [_stamp(x) for x in lines if " is node " in x]
    hist = json.loads((run_dir / "training_history.json").read_text())
    rounds = sum(r.get("seconds", 0) for r in hist["rounds"])
    return {"start": (max(joined) - first) if joined else 0.0, "rounds": rounds,
            "per_round": [round(r.get("seconds", 0), 1) for r in hist["rounds"] if r["round"] > 0]}


def run_local(out: Path, model: str, engine: str) -> tuple[float, Path]:
    from fedpeft.config import RunConfig
    from fedpeft.run import run

    t0 = time.perf_counter()
    res = run(RunConfig(**settings(model), engine=engine, output_dir=str(out / engine)))
    return time.perf_counter() - t0, res.run_dir


def run_deployment(out: Path, model: str) -> tuple[float, Path, float]:
    from flower_loopback import Loopback, wait_for_file

    root = out / "deploy"
    toml = out / "run.toml"
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings(model).items()))
    t0 = time.perf_counter()
    with Loopback(root) as lb:
        lb.start_superlink()
        link = time.perf_counter() - t0
        for i in range(len(TASKS)):
            lb.start_supernode(i, {"partition-id": i})
        lb.submit({"config": str(toml), "output-dir": str(out / "deployment")})
        wait_for_file(out / "deployment" / "summary.md", 3600, alive=lb)
        wall = time.perf_counter() - t0
    return wall, out / "deployment", link


def cold_client_start(model: str) -> float:
    """What every deployed message pays: a fresh Python importing the ClientApp, torch, transformers."""
    code = ("import fedpeft.flower_app, fedpeft.algorithms.fedlease, sklearn.metrics; "
            f"from fedpeft.models.backbone import load_backbone; load_backbone({model!r})")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def serialization(model: str) -> tuple[float, int]:
    """Seconds to translate one FedLEASE phase-2 instruction of this model to Flower records and back."""
    import torch

    from fedpeft.algorithms.base import Message
    from fedpeft.engines.flower.records import from_records, to_records

    hidden, layers = (384, 6) if model == "minilm" else (16, 2)
    tensors = {f"moe.{layer}.{m}.expert{e}.{ab}": torch.randn(2, hidden)
               for layer in range(layers) for m in ("query", "value") for e in range(2) for ab in "AB"}
    msg = Message(tensors, {"round": 2, "phase": "train", "num_experts": 2, "own_expert": 0})
    t0 = time.perf_counter()
    for _ in range(20):
        from_records(to_records(msg))
    return (time.perf_counter() - t0) / 20, msg.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_models:tiny_bert")
    ap.add_argument("--out", default="/tmp/fedpeft-flower-bench")
    ap.add_argument("--skip", nargs="*", default=[], help="local, flower-sim, deployment")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = []
    load = os.getloadavg()[0]
    for engine in ("local", "flower-sim"):
        if engine not in args.skip:
            wall, run_dir = run_local(out, args.model, engine)
            rows.append((engine, wall, phases(run_dir), ""))
    if "deployment" not in args.skip:
        wall, run_dir, link = run_deployment(out, args.model)
        rows.append(("loopback deployment", wall, phases(run_dir), f"SuperLink up in {link:.1f} s"))
    cold = cold_client_start(args.model)
    ser, nbytes = serialization(args.model)
    print(f"\n2-round FedLEASE (warmup 1), {args.model}, 4 clients, {os.cpu_count()} cores, load average {load:.1f} at start\n")
    print("| engine | wall (s) | start-up until all clients known (s) | rounds (s) | per round (s) | note |")
    print("|---|---:|---:|---:|---|---|")
    for name, wall, ph, note in rows:
        print(f"| {name} | {wall:.1f} | {ph['start']:.1f} | {ph['rounds']:.1f} | {ph['per_round']} | {note} |")
    print(f"\ncold start of one deployed ClientApp process (python + flwr + fedpeft + torch + transformers + {args.model}): {cold:.1f} s")
    print(f"records translation of one FedLEASE instruction ({nbytes / 1e3:.1f} kB of tensors), there and back: {ser * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
