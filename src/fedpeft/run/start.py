"""`run(cfg)`: train and evaluate a federation, in-process or on Flower's Simulation Engine, and write
its run folder. The CLI, bench and tests start every run here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError
from fedpeft.run.assemble import (abandon_new_run, build_algorithm, check_new_run_dir, open_history, open_run_dir,
                                  release_run_dir, settle)


@dataclass
class RunResult:
    run_dir: Path
    history: Any  # records.history.RunHistory
    config: RunConfig

    @property
    def headline(self) -> dict[str, Any] | None:
        return self.history.headline()


def run(cfg: RunConfig, *, backbone=None, stop_after: int | None = None, fail=None) -> RunResult:
    """Train and evaluate the federation `cfg` describes; write the run folder.

    `backbone` lets tests pass a tiny model; `stop_after` stops after that round (resume tests);
    `fail` injects client failures {(round, client): exception}. The run folder's lock is held
    from the first look at the folder to the end of the run, and freed however the run ends.
    """
    if cfg.engine == "flower":
        raise FedPeftError("--engine flower is the deployed ServerApp: start it with `flwr run APP_DIR SUPERLINK` "
                           "(docs/flower.md), or use --engine flower-sim on one machine")
    if cfg.resume is None and cfg.output_dir:
        check_new_run_dir(Path(cfg.output_dir), overwrite=cfg.overwrite)  # before loading anything
    run_dir = Path(cfg.resume) if cfg.resume else None
    try:
        cfg, backbone = settle(cfg, backbone)
        if cfg.engine == "flower-sim":
            from fedpeft.run.flower import run_flower_sim

            run_dir, resume = open_run_dir(cfg)
            history = run_flower_sim(cfg, run_dir, resume=resume, stop_after=stop_after, backbone=backbone)
            return RunResult(run_dir, history, cfg)

        from fedpeft.engines.local import LocalEngine
        from fedpeft.records.progress import Progress
        from fedpeft.run.federation import prepare_clients

        run_dir, resume = open_run_dir(cfg)
        try:
            infos, clients = prepare_clients(cfg, backbone.tokenizer)
            algorithm = build_algorithm(cfg, backbone, infos)
        except FedPeftError:
            if not resume:
                abandon_new_run(run_dir)
            raise
        history = open_history(run_dir, cfg, infos, resume=resume)
        progress = Progress(algorithm.num_rounds, enabled=not cfg.quiet)
        try:
            LocalEngine(algorithm, clients, history, run_dir, progress=progress, fail=fail).run(
                resume=resume, stop_after=stop_after)
        finally:
            progress.close()
            history.save()
        history.finish()
        return RunResult(run_dir, history, cfg)
    finally:
        release_run_dir(run_dir)
