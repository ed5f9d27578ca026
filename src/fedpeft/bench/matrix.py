"""Run a suite's matrix into OUT/<suite>/<label>-seed<k>/, skipping finished runs, then report.

A run folder counts as finished when it has summary.md and its training_history.json holds the
last round (round == global_rounds). A folder whose config.json differs from the suite's settings
(an edited suite) is an error rather than a silent reuse. A folder with a checkpoint but no summary is resumed from the
checkpoint (`--resume`); anything else is run from the start (`--overwrite`). One log line per
run started and finished (with its headline), and one per run skipped.

Two `bench` commands may share an --out (e.g. one per core): a run folder being trained is locked
by the process training it (the run folder's own lock, run/assemble.py: an flock the kernel frees
when that process ends, however it ends), and the other command skips that run instead of training
it into the same folder at the same time. The lock is taken before the folder is looked at, so
"finished?" and "run it" are one step; a lock file is never deleted, so no command can remove
another's lock. flock guards processes on one machine (and on file systems that support it).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedpeft.bench.runs import is_finished, run_dir_for
from fedpeft.bench.suites import Suite
from fedpeft import hardware
from fedpeft.errors import FedPeftError
from fedpeft.hardware import CPU

log = logging.getLogger("fedpeft")


@dataclass
class RunRef:
    label: str
    seed: int
    method: str
    run_dir: Path
    status: str  # "ran", "resumed", "restarted" (stopped before a checkpoint), "skipped", "busy" (another process)


# Fields that may differ between a finished run and the suite without making it a different run.
# The device is where a run computes, like its threads; its precision changes its numbers and is compared.
_IGNORED = {"output_dir", "resume", "quiet", "data_dir", "threads", "device", "tracking", "tracking_uri",
            "tracking_experiment"}


def check_same_settings(run_dir: Path, cfg, backbone=None) -> None:
    """A run folder made with other settings (an edited suite) must not be reused silently. The
    folder's config.json is resolved, so the plan is compared resolved too (against `backbone`'s
    architecture when a test injects one)."""
    import dataclasses

    from fedpeft.config import LEFF_FAMILY, RunConfig
    from fedpeft.data.tasks import is_generation_run
    from fedpeft.run.assemble import settings_before_they_existed

    try:
        raw = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return
    raw.update(settings_before_they_existed(raw))  # a run saved before a setting existed: what it used
    decoder_run = is_generation_run(raw)
    model_type = getattr(backbone, "model_type", None)
    # A folder saved before a setting became automatic holds the unresolved value: resolve both sides.
    # The saved device and precision are already concrete (what the run used, maybe on another machine's
    # GPU): compared as they are, never resolved again here, where that GPU may not exist.
    hw = {k: raw[k] for k in ("device", "precision", "client_gpus") if k in raw}
    saved = RunConfig.from_dict({**raw, "device": CPU, "precision": "fp32", "client_gpus": 0.0},
                                source=str(run_dir / "config.json"))
    saved = {**saved.resolved(model_type=model_type).to_dict(), **hw}
    saved = {k: v for k, v in saved.items() if k in raw}
    planned = cfg.resolved(model_type=model_type).to_dict()
    # LEFF's settings do not touch another method's run (a new LEFF default must not orphan old runs)
    unused = set() if cfg.method in LEFF_FAMILY else {
        f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("group") == "leff"}
    if not decoder_run:  # how a decoder runs is no setting of an encoder's run
        unused.add("decoder_path")
    for key in sorted(planned):
        if key in unused:
            continue
        if key not in _IGNORED and key in saved and saved[key] != planned[key]:
            raise FedPeftError(f"{run_dir} was run with {key}={saved[key]!r}, but the suite now says "
                               f"{planned[key]!r}: remove that folder or use another --out")


def check_hardware(suite: Suite) -> None:
    """A suite sized for a GPU (`requires_gpu`, the paper's own setting) refuses to train without one:
    on a CPU it would take days per method (its note says how long)."""
    if suite.requires_gpu and not hardware.cuda_available():
        raise FedPeftError(f"suite {suite.name!r} trains the paper's model at the paper's size and needs a CUDA GPU, "
                           f"and torch sees none here: run it on a machine with one (--device auto finds it), "
                           f"or use a CPU-sized suite such as glue4-cpu")


def claim(run_dir: Path) -> bool:
    """Take the run folder's lock for this process (run/assemble.py); False if another process holds it."""
    from fedpeft.run.assemble import lock_run_dir

    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock_run_dir(run_dir)
    except FedPeftError:
        return False
    return True


def release(run_dir: Path) -> None:
    from fedpeft.run.assemble import release_run_dir

    release_run_dir(run_dir)


def _headline_text(history) -> str:
    head = history.headline()
    if head is None:
        return "no scored round"
    tasks = " ".join(f"{t}={v:.3f}" for t, v in head["per_task"].items() if v is not None)
    return f"overall {head['overall']:.4f} (round {head['round']}; {tasks})"


def _say(msg: str) -> None:
    # The runs set the "fedpeft" logger to WARNING on the console when quiet: bench progress must
    # show regardless, so it goes straight to stderr (and to the log of no run).
    import sys

    print(msg, file=sys.stderr, flush=True)


def run_matrix(suite: Suite, seeds: list[int], out: str | Path, *, labels: list[str] | None = None,
               data_dir: str | None = None, backbone=None, runner: Callable | None = None,
               say: Callable[[str], None] = _say, threads: int | None = None,
               tracking: str | None = None, tracking_uri: str | None = None,
               encoder_path: str | None = None, decoder_path: str | None = None) -> list[RunRef]:
    """Run (or skip, or resume) every (label, seed) of the suite; return them in suite order.

    `backbone` is passed to every run (tests inject a tiny model); `runner` replaces
    fedpeft.run.run (tests count calls). `tracking`: every run is logged as its own run (named
    LABEL-seedK) under one experiment, the suite's name, in one store: OUT/SUITE/mlflow.db (MLflow)
    or OUT/SUITE/tensorboard/ (TensorBoard) unless `tracking_uri` names another. `encoder_path`:
    every run with that --encoder-path (a setting of the run: a finished run with the other one is
    refused by check_same_settings, not reused); `decoder_path` likewise.
    """
    if tracking and tracking != "none" and tracking_uri is None:
        dest = (Path(out) / suite.name).resolve()
        tracking_uri = f"sqlite:///{dest / 'mlflow.db'}" if tracking == "mlflow" else str(dest / "tensorboard")
    if runner is None:
        from fedpeft.run import run as runner
    plan = suite.plan(list(seeds), labels)
    check_hardware(suite)
    if suite.note:
        say(f"bench {suite.name}: note: {suite.note}")
    refs: list[RunRef] = []
    for i, (entry, seed) in enumerate(plan, 1):
        run_dir = run_dir_for(Path(out), suite, entry.label, seed)
        cfg = suite.config(entry, seed, output_dir=str(run_dir), data_dir=data_dir)
        if encoder_path is not None:
            cfg.encoder_path = encoder_path
        if decoder_path is not None:
            cfg.decoder_path = decoder_path
        if threads is not None:
            cfg.threads = threads  # not a setting of the run: wall times are, so the report says it
        if tracking and tracking != "none":  # not settings of the run either: where it is logged
            cfg.tracking, cfg.tracking_uri, cfg.tracking_experiment = tracking, tracking_uri, suite.name
        tag = f"[{i}/{len(plan)}] {entry.label} seed {seed}"
        if not claim(run_dir):
            say(f"{tag}: being run by another process, skipped ({run_dir})")
            refs.append(RunRef(entry.label, seed, cfg.method, run_dir, "busy"))
            continue
        try:
            check_same_settings(run_dir, cfg, backbone)
            if is_finished(run_dir):  # checked under the lock: another command may have just finished it
                say(f"{tag}: finished earlier, skipped ({run_dir})")
                refs.append(RunRef(entry.label, seed, cfg.method, run_dir, "skipped"))
                continue
            status = "ran"
            if (run_dir / "checkpoint.pt").is_file() and (run_dir / "config.json").is_file():
                cfg.resume, status = str(run_dir), "resumed"
                cfg.output_dir = None  # the run's folder is --resume's
            elif any((run_dir / name).exists() for name in ("config.json", "training_history.json")):
                cfg.overwrite = True  # stopped before its first checkpoint: nothing to keep, run it again
                status = "restarted"
            verb = {"ran": "started", "resumed": "resuming",
                    "restarted": "started again (its folder held a run stopped before its first checkpoint; "
                                 "the run's --overwrite empties it)"}[status]
            say(f"{tag}: {verb} -> {run_dir}")
            start = time.perf_counter()
            result = runner(cfg, backbone=backbone)
            say(f"{tag}: finished in {time.perf_counter() - start:.0f} s, {_headline_text(result.history)}")
            refs.append(RunRef(entry.label, seed, cfg.method, run_dir, status))
        finally:
            release(run_dir)
    return refs


def bench(suite: Suite, seeds: list[int], out: str | Path, *, labels: list[str] | None = None,
          data_dir: str | None = None, backbone=None, runner: Callable | None = None,
          say: Callable[[str], None] = _say, threads: int | None = None,
          report_only: bool = False, tracking: str | None = None, tracking_uri: str | None = None,
          encoder_path: str | None = None, decoder_path: str | None = None,
          archive: str | Path | None = None) -> dict[str, Path]:
    """Run the matrix, then write results.csv, results.md and results.png in OUT/<suite>/.

    `report_only`: run nothing; tabulate the runs of the plan that are finished (a matrix still
    running elsewhere, or one stopped part-way) and name the ones that are not. `archive`: also copy
    every finished run's evidence to ARCHIVE/<suite>/<label>-seed<k>/ (bench/archive.py)."""
    from fedpeft.bench.report import load_rows, write_report

    if report_only:
        refs, pending = [], []
        for entry, seed in suite.plan(list(seeds), labels):
            run_dir = run_dir_for(Path(out), suite, entry.label, seed)
            if is_finished(run_dir):
                refs.append(RunRef(entry.label, seed, entry.overrides.get("method", suite.base.get("method", "")),
                                   run_dir, "skipped"))
            else:
                pending.append(f"{entry.label} seed {seed}")
        if pending:
            say(f"bench {suite.name}: not finished, left out of the report: {', '.join(pending)}")
    else:
        refs = run_matrix(suite, seeds, out, labels=labels, data_dir=data_dir, backbone=backbone,
                          runner=runner, say=say, threads=threads, tracking=tracking, tracking_uri=tracking_uri,
                          encoder_path=encoder_path, decoder_path=decoder_path)
    dest = Path(out) / suite.name
    busy = [f"{r.label} seed {r.seed}" for r in refs if r.status == "busy"]
    if busy:
        say(f"bench {suite.name}: still running elsewhere, left out of the report: {', '.join(busy)}")
        refs = [r for r in refs if r.status != "busy"]
    rows = load_rows(refs)
    if not rows:
        raise FedPeftError(f"no finished runs to report in {dest}")
    files = write_report(rows, dest, suite=suite, seeds=list(seeds))
    say(f"bench {suite.name}: {len(refs)} runs; results in {files['md']}, {files['csv']}, {files['png']}")
    if archive is not None:
        from fedpeft.bench.archive import archive_runs

        copied, kept = archive_runs((r.run_dir, run_dir_for(Path(archive), suite, r.label, r.seed)) for r in refs)
        say(f"bench {suite.name}: archived {copied} runs in {Path(archive) / suite.name}"
            + (f" ({kept} already there)" if kept else ""))
    return files
