"""Every figure (FedLEASE's and the run's learning curves) writes a non-empty PNG from small inputs."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fedpeft.errors import FedPeftError
from fedpeft.algorithms.fedlease import plots
from fedpeft.records.plots import plot_learning_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, expected):
    assert path == expected
    data = expected.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


@pytest.fixture
def clients():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (3, 4)), rng.normal(3, 0.1, (3, 4))])
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    names = [f"client {i} ({'sst2' if i < 3 else 'qnli'})" for i in range(6)]
    return d / d.max() * 1.2, names, [0, 0, 0, 1, 1, 1]


def test_dendrogram(tmp_path, clients):
    d, names, _ = clients
    out = tmp_path / "sub" / "dendrogram.png"  # parent folders are created
    assert_png(plots.plot_dendrogram(d, names, out), out)


def test_mds(tmp_path, clients):
    d, names, labels = clients
    out = tmp_path / "mds.png"
    assert_png(plots.plot_mds(d, labels, names, out, seed=0), out)
    with pytest.raises(FedPeftError):
        plots.plot_mds(d, labels[:-1], names, tmp_path / "bad.png")


def test_distance_heatmap(tmp_path, clients):
    d, names, _ = clients
    out = tmp_path / "heatmap.png"
    assert_png(plots.plot_distance_heatmap(d, names, str(out)), out)
    with pytest.raises(FedPeftError):
        plots.plot_distance_heatmap(d[:, :3], names, out)


def test_silhouette(tmp_path):
    out = tmp_path / "silhouette.png"
    assert_png(plots.plot_silhouette({2: 0.41, 3: 0.62, 4: 0.55}, 3, out), out)


def test_expert_usage(tmp_path):
    usage = {
        "client 0 (sst2)": {"layer 0": 1.0, "layer 1": 1.6},
        "client 1 (qnli)": {"layer 0": 1.3, "layer 1": 2.0},
    }
    out = tmp_path / "usage.png"
    assert_png(plots.plot_expert_usage(usage, out), out)


def test_learning_curves(tmp_path):
    history = {
        "rounds": [
            {"round": 1, "phase": "warmup", "overall": 0.60, "per_task": {"sst2": 0.7, "qnli": 0.5}},
            {"round": 2, "phase": "warmup", "overall": 0.70, "per_task": {"sst2": 0.8, "qnli": 0.6}},
            {"round": 3, "phase": "train", "overall": None, "per_task": {"sst2": 0.85}},
            {"round": 4, "phase": "train", "overall": 0.80, "per_task": {"sst2": 0.9, "qnli": 0.7}},
        ]
    }
    out = tmp_path / "curves.png"
    assert_png(plot_learning_curves(history, out), out)
    with pytest.raises(FedPeftError):
        plot_learning_curves({"rounds": []}, tmp_path / "empty.png")


def test_importing_plots_does_not_import_matplotlib():
    import subprocess

    code = "import sys, fedpeft.records.plots, fedpeft.algorithms.fedlease.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
