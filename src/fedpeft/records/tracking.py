"""Experiment tracking (`--tracking tensorboard|mlflow`): a run logged to the tracker a lab already uses.

What is logged, by both trackers:
- the resolved settings (config.json) as parameters (TensorBoard: hparams and a text);
- after every round, with step = round: `overall`, `client_macro`, `task/<task>/<metric>` for every
  metric of every task, `bytes_up`, `bytes_down`, `seconds` and the other numbers of the round's
  history entry (under --dp: `dp_epsilon`, `dp_noise`, ...);
- at the end: summary.md and the run's figures (learning curves and the method's plots), plus
  config.json and metrics.csv for MLflow (TensorBoard: the summary as text, figures as images).

Both work offline. TensorBoard writes an event folder, RUN_DIR/tensorboard by default. MLflow writes a
local SQLite store, RUN_DIR/mlflow.db with artifacts in RUN_DIR/mlartifacts (MLflow 3 refuses its
old file store unless told to allow it, so the local store is the database MLflow recommends);
`--tracking-uri` points it elsewhere (a tracking server, another sqlite:/// file). A resumed run
continues its MLflow run (tracking.json in the run folder keeps its id).

A tracker listens to the run's history (records/history.py): `on_round(entry)` for each round
entry it records, `on_finish(run_dir)` after summary.md and the figures are written. A tracker that
fails is a warning, never a lost run. The libraries are imported only here, when a run asks.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

from fedpeft.errors import FedPeftError
from fedpeft.atomic import atomic_write_json

log = logging.getLogger("fedpeft")

INSTALL_HINT = "pip install 'fedpeft[tracking]'"
STATE_FILE = "tracking.json"  # the MLflow run a resumed run continues


def round_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """The numbers of a round's history entry as flat metric names (finite values only)."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    for task, metrics in (entry.get("per_task_metrics") or {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"task/{task}/{name}"] = float(value)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def params_of(settings: dict[str, Any]) -> dict[str, str]:
    """Settings as tracker parameters: strings, lists as JSON."""
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in sorted(settings.items())}


def _artifact_files(run_dir: Path) -> list[Path]:
    names = ["summary.md", "config.json", "metrics.csv"]
    return [run_dir / n for n in names if (run_dir / n).is_file()] + sorted(run_dir.glob("*.png"))


class TensorBoardTracker:
    def __init__(self, logdir: Path, settings: dict[str, Any], *, resume: bool):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FedPeftError(f"--tracking tensorboard needs TensorBoard: {INSTALL_HINT}") from None
        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        if not resume:
            from torch.utils.tensorboard.summary import hparams

            values = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in settings.items()}
            for summary in hparams(values, {"overall": 0.0}):  # the HPARAMS tab; `overall` is logged each round
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(settings, indent=1) + "\n```", 0)
        self.last_step = 0
        log.info("tracking: TensorBoard events in %s (tensorboard --logdir %s)", self.logdir, self.logdir.parent)

    def on_round(self, entry: dict[str, Any]) -> None:
        step = int(entry["round"])
        for name, value in round_metrics(entry).items():
            self.writer.add_scalar(name, value, step)
        self.last_step = max(self.last_step, step)
        self.writer.flush()

    def on_finish(self, run_dir: Path) -> None:
        import matplotlib.image as mpimg

        for path in _artifact_files(Path(run_dir)):
            if path.suffix == ".png":
                image = mpimg.imread(str(path))[..., :3]
                self.writer.add_image(path.stem, image, self.last_step, dataformats="HWC")
            elif path.name == "summary.md":
                self.writer.add_text("summary", path.read_text(), self.last_step)
        self.writer.close()


class MlflowTracker:
    def __init__(self, uri: str, experiment: str, run_name: str, settings: dict[str, Any], run_dir: Path, *,
                 resume: bool, artifact_root: Path | None):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from mlflow.tracking import MlflowClient
        except ImportError:
            raise FedPeftError(f"--tracking mlflow needs MLflow: {INSTALL_HINT}") from None
        for name in ("mlflow", "alembic"):  # its database set-up talks at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = uri
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = self._continued(run_dir) if resume else None
            if self.run_id is None:
                experiment_id = self._experiment(experiment, artifact_root)
                self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                                     tags={"fedpeft.run_dir": str(run_dir)}).info.run_id
                self._log_params(params_of(settings))
            else:
                self.client.update_run(self.run_id, status="RUNNING")
        atomic_write_json(Path(run_dir) / STATE_FILE, {"tracker": "mlflow", "uri": uri, "run_id": self.run_id})
        log.info("tracking: MLflow run %s in experiment %r at %s", self.run_id, experiment, uri)

    def _continued(self, run_dir: Path) -> str | None:
        try:
            saved = json.loads((Path(run_dir) / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return saved.get("run_id") if saved.get("uri") == self.uri else None

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            location = (artifact_root / name).resolve().as_uri() if artifact_root else None
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # another process created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def on_round(self, entry: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(entry["round"])) for k, v in round_metrics(entry).items()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def on_finish(self, run_dir: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for path in _artifact_files(Path(run_dir)):
                self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, status="FINISHED")


def open_tracker(cfg, run_dir: Path, *, resume: bool):
    """The tracker `cfg.tracking` names, started for the run in `run_dir`."""
    run_dir = Path(run_dir)
    settings = cfg.to_dict() | {"output_dir": str(run_dir), "resume": None}
    if cfg.tracking == "tensorboard":
        logdir = Path(cfg.tracking_uri) / run_dir.name if cfg.tracking_uri else run_dir / "tensorboard"
        return TensorBoardTracker(logdir, settings, resume=resume)
    if cfg.tracking == "mlflow":
        if cfg.tracking_uri:
            uri = cfg.tracking_uri
            local = uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).parent
        else:
            uri, local = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}", run_dir
        # a local store keeps its artifacts beside it; a server decides for itself
        return MlflowTracker(uri, cfg.tracking_experiment, run_dir.name, settings, run_dir, resume=resume,
                             artifact_root=Path(local) / "mlartifacts" if local else None)
    raise FedPeftError(f"unknown --tracking {cfg.tracking!r}")
