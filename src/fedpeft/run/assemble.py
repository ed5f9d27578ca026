"""One way to build a run, for every entry point (CLI, bench, Flower ServerApp and ClientApp, export).

A run is assembled in the same steps wherever it starts:
  1. settings: the saved config.json when resuming, resolved once (`RunConfig.resolved`);
  2. the backbone of the kind the tasks need (an encoder, or a decoder for generation tasks);
  3. the algorithm from the method catalogue, its runtime built on that backbone;
  4. the federation: the clients' data (where the data is) or what the server knows of them;
  5. the run folder, its log and history.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError

log = logging.getLogger("fedpeft")


# ------------------------------------------------------------ steps 1–3
def saved_config(cfg: RunConfig) -> RunConfig:
    """`cfg` itself, or for `--resume DIR` the settings DIR was run with (its config.json)."""
    if cfg.resume is None:
        return cfg
    path = Path(cfg.resume) / "config.json"
    if not path.is_file():
        raise FedPeftError(f"cannot resume: {path} does not exist")
    saved = RunConfig.load(path)
    saved.resume, saved.quiet = cfg.resume, cfg.quiet
    return saved


def load_run_backbone(cfg: RunConfig, backbone=None):
    """The backbone the tasks need: an encoder, or a causal LM for generation tasks. Tests pass a
    ready one (`backbone`); it must be of the right kind."""
    from fedpeft.data.tasks import backbone_kind

    kind = backbone_kind(cfg.tasks)
    if backbone is None:
        from fedpeft.models.backbone import load_backbone

        return load_backbone(cfg.model_name, kind=kind, quantization=cfg.quantization)
    if getattr(backbone, "kind", "encoder") != kind:
        need = "a causal (decoder)" if kind == "causal" else "an encoder"
        raise FedPeftError(f"these tasks need {need} backbone, got {backbone.name!r} ({backbone.kind})")
    return backbone


def settle(cfg: RunConfig, backbone=None):
    """Steps 1–2: (resolved settings, backbone)."""
    cfg = saved_config(cfg)
    if not cfg.tasks:
        cfg.check_runnable()  # no clients: say so before loading anything
    backbone = load_run_backbone(cfg, backbone)
    cfg = cfg.resolved(model_type=backbone.model_type)
    cfg.check_runnable()
    return cfg, backbone


def build_algorithm(cfg: RunConfig, backbone, federation=None):
    """Step 3: the algorithm with its runtime; bound to `federation` (ClientInfo list) when given.
    `cfg` is resolved against this backbone (a no-op for settings that are resolved already)."""
    from fedpeft.algorithms.registry import get_algorithm

    cfg = cfg.resolved(model_type=backbone.model_type)
    algorithm = get_algorithm(cfg)
    runtime = algorithm.build_runtime(backbone)
    if federation is not None:
        algorithm.bind(runtime, federation)
    else:
        algorithm.runtime = runtime  # bound when the federation is known (Flower: after discovery)
    return algorithm


# ------------------------------------------------------------ step 5
def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_run_dir(cfg: RunConfig) -> tuple[Path, bool]:
    """Create the run folder, start its log, apply the thread count and save the resolved settings
    as config.json: (run folder, resuming?)."""
    from fedpeft.records.history import setup_logging

    resume = cfg.resume is not None
    run_dir = Path(cfg.resume) if resume else (Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedPeftError(f"cannot create the run folder {run_dir}: {exc.strerror}") from None
    setup_logging(run_dir, cfg.quiet)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    to_save = RunConfig(**{**cfg.to_dict(), "resume": None, "output_dir": str(run_dir)})
    to_save.save(run_dir / "config.json")
    log.info("run folder: %s", run_dir)
    return run_dir, resume


def open_history(run_dir: Path, cfg: RunConfig, federation, *, resume: bool):
    from fedpeft.records.history import RunHistory

    meta = {"method": cfg.method, "model_name": cfg.model_name, "tasks": cfg.tasks, "seed": cfg.seed,
            "clients": [vars(i) for i in federation], "engine": cfg.engine}
    history = RunHistory.open(run_dir, meta, resume=resume)
    if cfg.tracking != "none":  # --tracking: every round entry and the final files go to the tracker too
        from fedpeft.records.tracking import open_tracker

        history.listeners.append(open_tracker(cfg, run_dir, resume=resume))
    return history


def bound(cfg: RunConfig, backbone=None):
    """(algorithm bound to its federation, clients): a run's parts without a run folder, as an
    engine gets them (benchmarks and tests drive the hooks by hand)."""
    from fedpeft.run.federation import prepare_clients

    cfg, backbone = settle(cfg, backbone)
    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    return build_algorithm(cfg, backbone, infos), clients
