"""Fault campaigns: does fedpeft lose or mix work when it is killed, started twice, fed bad input
or sent hostile replies? Prints one table: campaign, cases tried, survived, lost records (must be 0).

    python benchmarks/faults.py            # the full campaigns (≈ 25–40 min on 2 idle cores)
    python benchmarks/faults.py --quick    # a few cases of each (≈ 5 min); tests/test_faults.py runs a
                                           # short kill/resume campaign the same way

Campaigns:
- kill/resume: real `fedpeft run` processes on the tiny test BERT (tests/tiny_models.py) are killed
  with SIGKILL, each followed by `fedpeft run --resume` to the end; the resumed run must end with the
  records, events, summary and final checkpoint of an uninterrupted run (timings aside). Kill points:
  random instants over the run, and targeted ones: while the history, metrics.csv or checkpoint is
  being written, between the history and the checkpoint, while config.json or a method artifact is
  written, and runs killed twice (the resume killed too). The runs set FEDPEFT_TEST_WRITE_DELAY so
  that every atomic write pauses between its temporary file and its rename: the targeted kills land
  in that window, and random instants land in writes often. "lost records" counts per-client
  records (and events) of the uninterrupted run that the resumed one lacks, changed or doubled.
- concurrent starts: two `fedpeft run` commands on one --output_dir at the same moment, and a
  `--resume` of a folder whose run is still going: exactly one may write; the other must exit 2
  with one line; the run that wrote must equal an uninterrupted one.
- bad input: every case of tests/bad_inputs.py as its own `fedpeft` process (in-process with
  --quick): exit 2, one line `fedpeft: error: ...`, no traceback, the words the case expects, and no
  file of a run folder the command was refused on changed ("lost records" counts those files).
- hostile replies: the Flower server fed malformed and hostile replies by one of four clients
  (tests/flower_hostile.py's cases, through the real Flower records); "not available" without Flower.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC, TESTS = ROOT / "src", ROOT / "tests"
for p in (str(SRC), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

PY = sys.executable
TINY = ["--model_name", "tiny_models:tiny_bert", "--train-samples", "16", "--test-samples", "8", "--local-epochs", "1",
        "--batch-size", "8", "--max-length", "16", "--rank", "2", "--threads", "1", "--quiet"]
FOUR = ["demo-sentiment", "demo-sentiment", "demo-topic", "demo-topic"]
METHODS = {  # method → (its flags, number of rounds)
    "fedlease": (["--method", "fedlease", "--tasks", *FOUR, "--warmup-rounds", "2", "--max-clusters", "2",
                  "--global-rounds", "4"], 4),
    "feddpa": (["--method", "feddpa", "--tasks", *FOUR, "--global-rounds", "3"], 3),
    "fedit": (["--method", "fedit", "--tasks", *FOUR, "--global-rounds", "3"], 3),
}
TMP_OF = {"history": ".training_history.json.*.tmp", "metrics": ".metrics.csv.*.tmp",
          "checkpoint": ".checkpoint.pt.*.tmp", "config": ".config.json.*.tmp", "artifact": ".*.png.*.tmp"}


@dataclass
class Outcome:
    campaign: str
    tried: int = 0
    survived: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)


def env(delay: float | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), str(TESTS), e.get("PYTHONPATH")) if p)
    e["OMP_NUM_THREADS"] = "1"
    e.pop("FEDPEFT_TEST_WRITE_DELAY", None)
    if delay:
        e["FEDPEFT_TEST_WRITE_DELAY"] = str(delay)
    return e


def fedpeft(args: list[str], *, delay: float | None = None, cwd: Path | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "fedpeft", *args], env=env(delay), cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 1800) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# ------------------------------------------------------------------ what must survive
def _digest(value: Any, h) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        h.update(str((value.dtype, tuple(value.shape))).encode())
        h.update(value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _digest(value[k], h)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _digest(v, h)
    else:
        h.update(repr(value).encode())


def snapshot(run_dir: Path) -> dict[str, Any]:
    """What two runs of the same settings must share: records, round summaries and events without
    timings, the summary without its wall time, and the final checkpoint's contents."""
    import torch

    hist = json.loads((run_dir / "training_history.json").read_text())
    untimed = lambda d: json.dumps({k: v for k, v in d.items() if "seconds" not in k and k != "time"}, sort_keys=True)
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    _digest({k: ckpt[k] for k in ("round", "server_state", "client_stores")}, h)
    summary = [line for line in (run_dir / "summary.md").read_text().splitlines() if not line.startswith("Wall time")]
    return {"records": sorted(untimed(r) for r in hist["records"]), "rounds": [untimed(r) for r in hist["rounds"]],
            "events": [untimed(e) for e in hist["events"]], "checkpoint": h.hexdigest(), "summary": summary,
            "leftovers": sorted(p.name for p in run_dir.glob(".*.tmp"))}


def lost_records(ref: dict[str, Any], got: dict[str, Any]) -> int:
    """Records and events of `ref` missing from `got`, changed in it or doubled (extra ones count too)."""
    lost = 0
    for key in ("records", "events"):
        a, b = list(ref[key]), list(got[key])
        for item in a:
            if item in b:
                b.remove(item)
            else:
                lost += 1
        lost += len(b)
    return lost


def same_run(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """What differs besides records (empty: the runs are the same)."""
    return [k for k in ("rounds", "checkpoint", "summary", "leftovers") if ref[k] != got[k]]


# ------------------------------------------------------------------ kill/resume
def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            return True
        if proc.poll() is not None:
            return path.exists()
        time.sleep(0.005)
    return False


def kill_at_write(proc: subprocess.Popen, run_dir: Path, what: str, occurrence: int) -> str | None:
    """SIGKILL when the temporary file of `what` appears for the `occurrence`-th time (its write is
    then between the temporary file and the rename: FEDPEFT_TEST_WRITE_DELAY holds it there)."""
    pattern, seen, present = TMP_OF[what], 0, False
    while proc.poll() is None:
        now = any(run_dir.glob(pattern))
        if now and not present:
            seen += 1
            if seen >= occurrence:
                os.kill(proc.pid, signal.SIGKILL)
                return f"during {what} write #{seen}"
        present = now
        time.sleep(0.002)
    return None


def kill_at_instant(proc: subprocess.Popen, seconds: float) -> str | None:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    if proc.poll() is not None:
        return None
    os.kill(proc.pid, signal.SIGKILL)
    return f"at {seconds:.1f} s"


def state_at_kill(run_dir: Path) -> str:
    """Where the kill left the folder: checkpoint round, history round, temporary files."""
    import torch

    ck = "none"
    if (run_dir / "checkpoint.pt").exists():
        ck = str(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True, mmap=True)["round"])
    hist = "none"
    if (run_dir / "training_history.json").exists():
        rounds = json.loads((run_dir / "training_history.json").read_text())["rounds"]
        hist = str(max((r["round"] for r in rounds), default=0))
    tmp = ",".join(sorted(p.name.split(".")[1] + "." + p.name.split(".")[2] for p in run_dir.glob(".*.tmp")))
    return f"checkpoint {ck}, history {hist}" + (f", temp {tmp}" if tmp else "")


def plan_kills(n: int, rounds: int, rng: random.Random) -> list[tuple[str, Any]]:
    """n kill points: inside the history write, inside the checkpoint write, between the two, a random
    instant; then random instants alternating with the other targeted modes (each at a random round)."""
    first = ["history", "checkpoint", "metrics", "instant"]
    others = ["twice", "config", "artifact", "history", "checkpoint", "metrics"]
    modes = first[:n] + [("instant" if i % 2 == 0 else others[i // 2 % len(others)]) for i in range(max(0, n - 4))]
    out = []
    for mode in modes:
        if mode in ("history", "metrics"):
            out.append((mode, rng.randint(1, rounds + 1)))  # + the final save in finish()
        elif mode == "checkpoint":
            out.append((mode, rng.randint(1, rounds)))
        elif mode in ("config", "artifact"):
            out.append((mode, 1))
        else:
            out.append((mode, rng.random()))
    return out


def kill_resume_campaign(kills: int, *, methods: list[str], work: Path, seed: int = 0, delay: float = 0.25,
                         say=print) -> Outcome:
    out = Outcome("kill -9, then --resume")
    rng = random.Random(seed)
    for m_index, method in enumerate(methods):
        flags, rounds = METHODS[method]
        ref_dir = work / f"ref-{method}"
        proc = fedpeft(["run", *flags, *TINY, "--output_dir", str(ref_dir)], delay=delay)
        t0 = time.time()
        assert wait_for(ref_dir / "config.json", proc), f"reference {method} run did not start"
        t_config = time.time()
        code, err = finish(proc)
        if code != 0:
            raise RuntimeError(f"the uninterrupted {method} run failed: {err[-2000:]}")
        window = time.time() - t_config
        ref = snapshot(ref_dir)
        say(f"  reference {method}: {time.time() - t0:.0f} s ({window:.0f} s after config.json), "
            f"{len(ref['records'])} records")
        share = [k for k in range(kills) if k % len(methods) == m_index]
        for k, (mode, arg) in zip(share, plan_kills(len(share), rounds, rng)):
            run_dir = work / f"{method}-kill{k}"
            landed, attempts = None, 0
            while landed is None and attempts < 4:
                attempts += 1
                shutil.rmtree(run_dir, ignore_errors=True)
                proc = fedpeft(["run", *flags, *TINY, "--output_dir", str(run_dir)], delay=delay)
                if mode == "config":
                    landed = kill_at_write(proc, run_dir, "config", 1) if wait_for(run_dir, proc) else None
                elif not wait_for(run_dir / "config.json", proc):
                    landed = None
                elif mode in TMP_OF:
                    landed = kill_at_write(proc, run_dir, mode, arg)
                else:
                    landed = kill_at_instant(proc, arg * window / attempts)
                proc.wait()
                if landed is None:
                    arg = rng.random() if mode in ("instant", "twice") else max(1, arg - 1)
            if landed is None:
                out.notes.append(f"{method} #{k} {mode}: no kill landed in {attempts} tries (not counted)")
                continue
            where = state_at_kill(run_dir)
            if mode == "twice":  # the resume is killed too
                again = fedpeft(["run", "--resume", str(run_dir), "--quiet"], delay=delay)
                second = kill_at_instant(again, rng.random() * window * 0.7)
                again.wait()
                where += f"; resume killed {second or '(it had ended)'} → {state_at_kill(run_dir)}"
            out.tried += 1
            if (run_dir / "config.json").exists():
                code, err = finish(fedpeft(["run", "--resume", str(run_dir), "--quiet"]))
            else:  # killed before its settings were saved: nothing to resume, the same command starts it
                where += "; no config.json, so the same command again"
                code, err = finish(fedpeft(["run", *flags, *TINY, "--output_dir", str(run_dir)]))
            if code != 0:
                out.notes.append(f"{method} #{k} {mode} {landed} ({where}): resume exited {code}: {err.strip()[-300:]}")
                out.lost += len(ref["records"])
                continue
            got = snapshot(run_dir)
            lost, differs = lost_records(ref, got), same_run(ref, got)
            out.lost += lost
            ok = lost == 0 and not differs
            out.survived += ok
            out.notes.append(f"{method} #{k} {mode} {landed} ({where}): "
                             + ("same records" if ok else f"LOST {lost}, differs in {differs}"))
            say(f"  {out.notes[-1]}")
    return out


# ------------------------------------------------------------------ concurrent starts
def concurrency_campaign(cases: int, *, work: Path, delay: float = 0.25, say=print) -> Outcome:
    out = Outcome("two commands, one folder")
    flags, _ = METHODS["fedit"]
    ref_dir = work / "ref-concurrent"
    code, err = finish(fedpeft(["run", *flags, *TINY, "--output_dir", str(ref_dir)]))
    if code != 0:
        raise RuntimeError(f"the uninterrupted run failed: {err[-2000:]}")
    ref = snapshot(ref_dir)
    for k in range(cases):
        run_dir = work / f"concurrent{k}"
        if k % 2 == 0:  # two new runs at the same moment
            procs = [fedpeft(["run", *flags, *TINY, "--output_dir", str(run_dir)], delay=delay) for _ in range(2)]
            results = [finish(p) for p in procs]
            what = "two starts"
        else:  # a resume while the run is still going
            first = fedpeft(["run", *flags, *TINY, "--output_dir", str(run_dir)], delay=6 * delay)  # still going
            wait_for(run_dir / "checkpoint.pt", first)
            results = [finish(fedpeft(["run", "--resume", str(run_dir), "--quiet"])), finish(first)]
            what = "resume during the run"
        out.tried += 1
        codes = sorted(c for c, _ in results)
        refused = [e.strip() for c, e in results if c == 2]
        one_line = all(len(e.splitlines()) == 1 and e.startswith("fedpeft: error:") and "Traceback" not in e
                       for e in refused)
        lost = lost_records(ref, snapshot(run_dir)) if 0 in codes else len(ref["records"])
        out.lost += lost
        ok = codes == [0, 2] and one_line and lost == 0
        out.survived += ok
        out.notes.append(f"{what}: exit codes {codes}, refusal {refused[0][:90] if refused else '-'}"
                         + ("" if ok else f"  FAILED (lost {lost})"))
        say(f"  {out.notes[-1]}")
    return out


# ------------------------------------------------------------------ bad input
def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and p.name != ".fedpeft.lock"}


def bad_input_campaign(*, work: Path, in_process: bool, say=print) -> Outcome:
    from bad_inputs import CASES, tiny_run_argv

    out = Outcome("bad input: one line, exit 2")
    template = work / "template"
    code, err = finish(fedpeft(tiny_run_argv(template)))
    if code != 0:
        raise RuntimeError(f"the template run failed: {err[-2000:]}")
    for i, (name, build, words) in enumerate(CASES):
        tmp = work / f"bad{i}"
        tmp.mkdir()
        argv = build(tmp, template)
        before = _files(tmp)
        if in_process:
            from contextlib import redirect_stderr, redirect_stdout
            from io import StringIO

            from fedpeft.cli import main

            buf = StringIO()
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                with redirect_stderr(buf), redirect_stdout(StringIO()):
                    code = main(argv)
            finally:
                os.chdir(cwd)
            err = buf.getvalue()
        else:
            code, err = finish(fedpeft(argv, cwd=tmp))
        after = _files(tmp)
        changed = [f for f, h in before.items() if after.get(f) != h]
        err = err.strip()
        ok = (code == 2 and len(err.splitlines()) == 1 and err.startswith("fedpeft: error: ")
              and "Traceback" not in err and all(w in err for w in words) and not changed)
        out.tried += 1
        out.survived += ok
        out.lost += len(changed)
        out.notes.append(f"{name}: {'ok' if ok else 'FAILED'} (exit {code}) {err[:150]}"
                         + (f" changed {changed}" if changed else ""))
        if not ok:
            say(f"  {out.notes[-1]}")
    return out


# ------------------------------------------------------------------ hostile replies (engines/flower)
def hostile_campaign(*, quick: bool, work: Path) -> Outcome:
    """Every case of tests/flower_hostile.py (FedIT, 4 demo clients on the tiny BERT, 2 rounds): one
    client's reply is tampered with after the honest computation, through the real Flower records;
    it survives when the run completes, the reply is rejected and recorded, and every record equals
    the reference run's (where that client is simply missing). --quick runs a third of the cases."""
    try:
        import flwr  # noqa: F401
    except ModuleNotFoundError:
        return Outcome("hostile Flower replies", notes=["not available: Flower is not installed (fedpeft[flower])"])
    import flower_hostile as hostile  # tests/: the in-process grid and the hostile replies

    settings = dict(method="fedit", model_name="tiny_models:tiny_bert", tasks=["demo-sentiment"] * 2 + ["demo-topic"] * 2,
                    train_samples=24, test_samples=16, global_rounds=2, local_epochs=1, batch_size=8,
                    eval_batch_size=32, max_length=32, rank=2, lr=5e-3, threads=1, quiet=True, device="cpu",
                    precision="fp32")
    cases = list(hostile.CASES)[::3] if quick else list(hostile.CASES)
    tried, survived, lost = hostile.campaign(settings, work, node_config={"allow-model-factories": "tiny_models:tiny_bert"},
                                             cases=cases)
    return Outcome("hostile Flower replies", tried, survived, lost, [f"cases: {', '.join(cases)}"])


# ------------------------------------------------------------------ main
def table(outcomes: list[Outcome]) -> str:
    lines = ["| campaign | cases tried | survived | lost records |", "|---|---:|---:|---:|"]
    for o in outcomes:
        if o.tried == 0 and o.notes and o.notes[0].startswith("not available"):
            lines.append(f"| {o.campaign} | — | — | — ({o.notes[0]}) |")
        else:
            lines.append(f"| {o.campaign} | {o.tried} | {o.survived} | {o.lost} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few cases of each campaign (≈ 5 min)")
    ap.add_argument("--kills", type=int, default=None, help="kill points (default 24; 4 with --quick)")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                    help="methods of the kill campaign (default fedlease feddpa; fedit with --quick)")
    ap.add_argument("--only", nargs="+", default=None, choices=["kill", "concurrent", "bad", "hostile"])
    ap.add_argument("--delay", type=float, default=0.25, help="FEDPEFT_TEST_WRITE_DELAY of the killed runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--details", action="store_true", help="print every case after the table")
    args = ap.parse_args(argv)
    kills = args.kills if args.kills is not None else (4 if args.quick else 24)
    methods = args.methods or (["fedit"] if args.quick else ["fedlease", "feddpa"])
    only = set(args.only or ["kill", "concurrent", "bad", "hostile"])
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedpeft-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"fedpeft fault campaigns in {work} ({os.cpu_count()} CPUs, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})",
          flush=True)
    outcomes, t0 = [], time.time()
    say = lambda s: print(s, flush=True)
    if "kill" in only:
        say(f"kill/resume: {kills} kill points over {', '.join(methods)}")
        outcomes.append(kill_resume_campaign(kills, methods=methods, work=work / "kill", seed=args.seed,
                                             delay=args.delay, say=say))
    if "concurrent" in only:
        say("concurrent starts")
        outcomes.append(concurrency_campaign(2 if args.quick else 4, work=work / "concurrent", delay=args.delay, say=say))
    if "bad" in only:
        say("bad input")
        outcomes.append(bad_input_campaign(work=work / "bad", in_process=args.quick, say=say))
    if "hostile" in only:
        say("hostile replies")
        outcomes.append(hostile_campaign(quick=args.quick, work=work / "hostile"))
    load = os.getloadavg()
    print(f"\n{table(outcomes)}\n\n{time.time() - t0:.0f} s; load at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.details:
        for o in outcomes:
            print(f"\n{o.campaign}:")
            for n in o.notes:
                print(f"  {n}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    bad = any(o.lost or o.survived != o.tried for o in outcomes)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
