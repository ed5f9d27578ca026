"""Experiment tracking (`--tracking tensorboard|mlflow`, records/tracking.py), read back with each
library's own reader: the settings as parameters, every round's metrics at step = round, the
summary and figures at the end; a resumed run continues its MLflow run; `fedpeft bench` logs each
run of the matrix as its own run under one experiment named after the suite."""

from __future__ import annotations

import json

import pytest

from fedpeft.config import RunConfig
from fedpeft.run import run


def _scalars_by_round(history, name):
    if name.startswith("task/"):
        _, task, metric = name.split("/")
        return {e["round"]: e["per_task_metrics"][task][metric] for e in history.rounds if task in e["per_task_metrics"]}
    return {e["round"]: e[name] for e in history.rounds if isinstance(e.get(name), (int, float))}


def test_tensorboard_events_hold_every_round_and_the_final_files(tiny_cfg, tiny_backbone):
    pytest.importorskip("tensorboard", reason="TensorBoard is an extra: pip install 'fedpeft[tracking]'")
    pytest.importorskip("dp_accounting", reason="the privacy accountant is an extra: pip install 'fedpeft[dp]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(tiny_cfg(tracking="tensorboard", dp="central", dp_noise=1.0, dp_clip=0.5, global_rounds=2),
                 backbone=tiny_backbone)
    events = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for name in ("overall", "client_macro", "task/demo-sentiment/accuracy", "task/demo-topic/accuracy", "bytes_up",
                 "bytes_down", "seconds", "dp_epsilon"):
        logged = {e.step: e.value for e in events.Scalars(name)}
        expected = _scalars_by_round(result.history, name)
        assert logged.keys() == expected.keys() and expected, name
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, step)
    assert sorted(_scalars_by_round(result.history, "bytes_down")) == [0, 1, 2]  # the initial broadcast is step 0
    assert "learning_curves" in tags["images"]
    texts = {t: events.Tensors(t) for t in tags["tensors"]}
    summary = [t for t in texts if t.startswith("summary")]
    assert summary and b"Overall (mean of task means)" in texts[summary[0]][-1].tensor_proto.string_val[0]
    config = [t for t in texts if t.startswith("config")]
    assert config and b'"method": "fedit"' in texts[config[0]][0].tensor_proto.string_val[0]


def test_mlflow_store_holds_params_metrics_artifacts_and_resume_continues_the_run(tiny_cfg, tiny_backbone, tmp_path):
    pytest.importorskip("mlflow", reason="MLflow is an extra: pip install 'fedpeft[tracking]'")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    stopped = run(tiny_cfg(method="fedlease", warmup_rounds=1, global_rounds=3, tracking="mlflow",
                           tracking_experiment="lab", output_dir=str(out)), backbone=tiny_backbone, stop_after=2)
    first_id = json.loads((out / "tracking.json").read_text())["run_id"]
    result = run(RunConfig(resume=str(out), quiet=True), backbone=tiny_backbone)  # its settings: config.json
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lab")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first_id] and runs[0].info.run_name == "run"
    assert runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    saved = json.loads((out / "config.json").read_text())
    assert params["method"] == "fedlease" and float(params["lr"]) == saved["lr"]
    assert json.loads(params["tasks"]) == saved["tasks"] and params["target_modules"] == json.dumps(saved["target_modules"])
    for name in ("overall", "task/demo-topic/accuracy", "bytes_up", "seconds", "aggregate_seconds"):
        expected = _scalars_by_round(result.history, name)
        logged = {m.step: m.value for m in client.get_metric_history(first_id, name)}
        assert logged == pytest.approx(expected) and expected, name
    assert stopped.history.rounds[-1]["round"] == 2 and max(_scalars_by_round(result.history, "overall")) == 3
    artifacts = {a.path for a in client.list_artifacts(first_id)}
    assert {"summary.md", "config.json", "metrics.csv", "learning_curves.png", "dendrogram.png"} <= artifacts


def test_bench_logs_each_run_under_the_suites_experiment(tmp_path, tiny_backbone):
    pytest.importorskip("mlflow", reason="MLflow is an extra: pip install 'fedpeft[tracking]'")
    from mlflow.tracking import MlflowClient

    from fedpeft.bench.matrix import bench
    from test_bench import tiny_suite

    bench(tiny_suite(), [1], tmp_path, backbone=tiny_backbone, say=lambda m: None, tracking="mlflow",
          labels=["fedit", "fedlease"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'tiny' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["fedit-seed1", "fedlease-seed1"]
    for r in runs:
        assert r.data.params["method"] == r.info.run_name.split("-")[0]
        assert [m.step for m in client.get_metric_history(r.info.run_id, "overall")] == [1, 2]
    # a second bench without tracking reuses the finished runs: tracking is not a setting of the run
    bench(tiny_suite(), [1], tmp_path, backbone=tiny_backbone, say=lambda m: None, labels=["fedit", "fedlease"])


def test_a_missing_tracker_is_one_clear_error(tiny_cfg, tiny_backbone, monkeypatch):
    import builtins

    from fedpeft.errors import FedPeftError

    real = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(FedPeftError, match=r"--tracking mlflow needs MLflow: pip install 'fedpeft\[tracking\]'"):
        run(tiny_cfg(tracking="mlflow"), backbone=tiny_backbone)


def test_importing_fedpeft_imports_no_tracker():
    import subprocess
    import sys

    code = ("import sys, fedpeft, fedpeft.cli, fedpeft.run, fedpeft.algorithms.privacy; "
            "print(sorted(m for m in ('mlflow', 'tensorboard', 'dp_accounting') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
