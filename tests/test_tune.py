"""`fedpeft tune`: a per-method grid scored on the validation carve-out, resumable, with its picks."""

import csv

import pytest

from fedpeft.bench.tune import parse_values, tune, tune_suite
from fedpeft.cli import main
from fedpeft.errors import FedPeftError
from tests.test_bench import tiny_suite


def test_values_take_the_type_of_the_setting():
    assert parse_values("lr", ["1e-3", "3e-3"]) == [1e-3, 3e-3]
    assert parse_values("local_epochs", ["1", "2"]) == [1, 2]
    assert parse_values("head_policy", ["frozen", "local"]) == ["frozen", "local"]
    with pytest.raises(FedPeftError, match="not a valid value"):
        parse_values("local_epochs", ["1.5"])
    with pytest.raises(FedPeftError, match="not a setting"):
        parse_values("learning_rate", ["1"])
    with pytest.raises(FedPeftError, match="cannot be tuned"):
        parse_values("seed", ["1", "2"])
    with pytest.raises(FedPeftError, match="twice"):
        parse_values("lr", ["1e-3", "0.001"])


def test_grid_is_the_main_methods_times_the_values_on_validation():
    derived, origin = tune_suite(tiny_suite(), "lr", [1e-3, 1e-2], 0.25)
    # the ablation (seeds "first") is not tuned by default: it inherits its method's pick
    assert derived.labels == ["fedit-lr=0.001", "fedit-lr=0.01", "fedlease-lr=0.001", "fedlease-lr=0.01"]
    assert origin["fedlease-lr=0.01"] == ("fedlease", 0.01)
    cfg = derived.config(derived.entries[1], 3)
    assert (cfg.lr, cfg.validation_fraction, cfg.method, cfg.seed) == (0.01, 0.25, "fedit", 3)
    with pytest.raises(FedPeftError, match="validation-fraction"):
        tune_suite(tiny_suite(), "lr", [1e-3], 0.0)
    with pytest.raises(FedPeftError, match="fixes top_k"):
        tune_suite(tiny_suite(), "top_k", [1, 2], 0.2, labels=["fedlease-top1"])


def test_tune_runs_scores_on_validation_picks_the_best_and_resumes(tmp_path, tiny_backbone):
    calls, said = [], []

    def runner(cfg, backbone=None):
        from fedpeft.run import run

        calls.append((cfg.method, cfg.lr, cfg.validation_fraction))
        return run(cfg, backbone=backbone)

    out = tune(tiny_suite(), "lr", ["1e-4", "5e-3"], fraction=0.25, out=tmp_path, labels=["fedit"],
               backbone=tiny_backbone, runner=runner, say=said.append)
    assert calls == [("fedit", 1e-4, 0.25), ("fedit", 5e-3, 0.25)]
    rows = list(csv.DictReader(out["csv"].open()))
    assert [float(r["lr"]) for r in rows] == [1e-4, 5e-3]
    best = max(rows, key=lambda r: float(r["validation_overall"]))
    assert out["picks"] == {"fedit": float(best["lr"])}
    assert [r["picked"] for r in rows].count("True") == 1
    md = out["md"].read_text()
    assert "Validation overall" in md and "| fedit |" in md and "never on the test" in md
    # a second call runs nothing and reports the same pick; an archive of the grid reports it too
    again = tune(tiny_suite(), "lr", ["1e-4", "5e-3"], fraction=0.25, out=tmp_path, labels=["fedit"],
                 backbone=tiny_backbone, runner=runner, say=said.append, archive=tmp_path / "kept")
    assert len(calls) == 2 and again["picks"] == out["picks"] and "archived 2 grid points" in said[-1]
    kept = tune(tiny_suite(), "lr", ["1e-4", "5e-3"], fraction=0.25, out=tmp_path / "kept", labels=["fedit"],
                report_only=True, say=said.append)
    assert kept["picks"] == out["picks"] and not list((tmp_path / "kept").rglob("checkpoint.pt"))
    # a grid over another setting writes its own table beside the first, which stays as it was
    other = tune(tiny_suite(), "rank", ["2"], fraction=0.25, out=tmp_path, labels=["fedit"],
                 backbone=tiny_backbone, runner=runner, say=said.append)
    assert out["md"].name == "tune-lr.md" and other["md"].name == "tune-rank.md"
    assert out["md"].read_text() == md and other["picks"] == {"fedit": 2}


def test_cli_tune_bad_param_is_one_line_exit_2(capsys):
    assert main(["tune", "--suite", "glue4-mini", "--param", "nope", "--values", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a setting" in err[0]
