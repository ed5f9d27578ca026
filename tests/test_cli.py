"""CLI: official flag names, TOML precedence, and one-line errors with exit status 2."""

import json

import pytest

from fedpeft.cli import build_parser, config_from_args, main
from fedpeft.errors import FedPeftError


def _cfg(argv):
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_official_underscore_names_are_accepted():
    cfg = _cfg(["--tasks", "sst2", "qnli", "--model_name", "minilm", "--global_rounds", "5", "--local_epochs", "3",
                "--warmup_rounds", "2", "--lr", "0.003", "--rank", "8", "--max_clusters", "4",
                "--train_samples", "100", "--test_samples", "50", "--batch_size", "16", "--seed", "7",
                "--output_dir", "out"])
    assert (cfg.global_rounds, cfg.local_epochs, cfg.warmup_rounds, cfg.lr, cfg.rank, cfg.max_clusters,
            cfg.train_samples, cfg.test_samples, cfg.batch_size, cfg.seed, cfg.output_dir) == \
        (5, 3, 2, 0.003, 8, 4, 100, 50, 16, 7, "out")
    assert _cfg(["--global-rounds", "9"]).global_rounds == 9


def test_toml_config_is_overridden_by_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "fedit"\ntasks = ["sst2", "mrpc"]\nglobal_rounds = 7\nlr = 0.01\n')
    cfg = _cfg(["--config", str(toml), "--lr", "0.002"])
    assert cfg.tasks == ["sst2", "mrpc"] and cfg.global_rounds == 7 and cfg.lr == 0.002


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_unknown_task_is_one_line(capsys, tmp_path):
    err = _error(capsys, ["run", "--tasks", "sst3", "--output_dir", str(tmp_path / "r"), "--quiet"])
    assert "sst3" in err and "sst2" in err  # names the mistake and the known tasks


@pytest.mark.parametrize("argv, words", [
    (["--rank", "0"], "--rank"),
    (["--global_rounds", "0"], "--global-rounds"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
    ([], "--tasks"),
])
def test_bad_values_are_one_line(capsys, tmp_path, argv, words):
    err = _error(capsys, ["run", *argv, "--output_dir", str(tmp_path / "r"), "--quiet"])
    assert words in err


def test_bad_config_file_and_unknown_setting(capsys, tmp_path):
    assert "does not exist" in _error(capsys, ["run", "--config", str(tmp_path / "nope.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 3\n")
    assert "learning_rate" in _error(capsys, ["run", "--config", str(bad)])
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 3\n")
    assert "cannot read" in _error(capsys, ["run", "--config", str(broken)])


def test_unknown_method_is_rejected_by_the_parser(capsys):
    err = _error(capsys, ["run", "--method", "fedfoo"])
    assert "fedfoo" in err and "fedpeft run --help" in err


def test_missing_data_folder_is_one_line(capsys, tmp_path):
    err = _error(capsys, ["run", "--tasks", "sst2", "sst2", "--data-dir", str(tmp_path / "missing"),
                          "--output_dir", str(tmp_path / "r"), "--quiet"])
    assert "missing" in err


def test_corrupt_tsv_row_is_one_line_with_file_and_line(capsys, tmp_path):
    root = tmp_path / "data" / "SST-2"
    root.mkdir(parents=True)
    rows = "sentence\tlabel\n" + "".join(f"good movie {i}\t1\nbad movie {i}\t0\n" for i in range(20))
    (root / "train.tsv").write_text(rows + "broken row without label\n")
    (root / "dev.tsv").write_text(rows)
    err = _error(capsys, ["run", "--tasks", "sst2", "--data-dir", str(tmp_path / "data"), "--train-samples", "4",
                          "--test-samples", "2", "--output_dir", str(tmp_path / "r"), "--quiet"])
    assert "train.tsv" in err and "42" in err


def test_unreachable_hub_model_says_how_to_work_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _error(capsys, ["run", "--tasks", "demo-sentiment", "--model_name", "someone/not-a-real-model",
                          "--output_dir", str(tmp_path / "r"), "--quiet"])
    assert "offline" in err and "minilm" in err


def test_resume_of_a_folder_without_a_run(capsys, tmp_path):
    err = _error(capsys, ["run", "--resume", str(tmp_path)])
    assert "cannot resume" in err


def test_report_prints_a_finished_run(capsys, tiny_cfg, tiny_backbone):
    from fedpeft.run import run

    result = run(tiny_cfg(global_rounds=1), backbone=tiny_backbone)
    (result.run_dir / "summary.md").unlink()  # report re-renders it from the history
    assert main(["report", str(result.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Overall (mean of task means)" in out and "demo-topic" in out
    assert json.loads((result.run_dir / "config.json").read_text())["global_rounds"] == 1


def test_task_samples_override_per_task_sizes(capsys, tmp_path):
    cfg = _cfg(["--tasks", "mrpc", "sst2", "--task-samples", "mrpc=500:64"])
    assert cfg.samples_for_tasks() == ({"mrpc": 500, "sst2": 1000}, {"mrpc": 64, "sst2": 200})
    err = _error(capsys, ["run", "--tasks", "mrpc", "--task-samples", "mrpc=500", "--output_dir", str(tmp_path)])
    assert "TASK=TRAIN:TEST" in err


def test_model_factory_loads_once_per_process_and_runs(tmp_path, tiny_backbone):
    """--model_name module:function: a function of an importable module that returns a Backbone (here the
    tiny random models of tests/tiny_models.py, which conftest.py puts on the import path)."""
    import torch

    from fedpeft.models.backbone import Backbone, load_backbone

    bb = load_backbone("tiny_models:tiny_bert")
    assert isinstance(bb, Backbone) and (bb.model_type, bb.kind) == ("bert", "encoder")
    assert load_backbone("tiny_models:tiny_bert") is bb  # loaded once, cached by name
    ref = tiny_backbone.model.state_dict()  # called with no arguments: seed 0
    assert all(torch.equal(v, ref[k]) for k, v in bb.model.state_dict().items())
    assert load_backbone("tiny_models:tiny_llama", kind="causal").kind == "causal"
    with pytest.raises(FedPeftError, match="generation tasks need a decoder"):
        load_backbone("tiny_models:tiny_bert", kind="causal")
    with pytest.raises(FedPeftError, match="classification tasks need an encoder"):
        load_backbone("tiny_models:tiny_llama")
    with pytest.raises(FedPeftError, match="--quantization does not apply"):
        load_backbone("tiny_models:tiny_llama", kind="causal", quantization="8bit")
    out = tmp_path / "r"
    assert main(["run", "--method", "fedit", "--tasks", "demo-sentiment", "demo-topic", "--model_name",
                 "tiny_models:tiny_bert", "--train-samples", "8", "--test-samples", "4", "--global-rounds", "1",
                 "--local-epochs", "1", "--batch-size", "8", "--max-length", "16", "--rank", "2",
                 "--output_dir", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["model_name"] == "tiny_models:tiny_bert"


@pytest.mark.parametrize("name, words", [
    ("no_such_module_here:model", "names the module 'no_such_module_here', which is not importable"),
    ("tiny_models:no_such_model", "has no function 'no_such_model'"),
    ("os:sep", "is a str, not a function"),
    ("os:getcwd", "returned str, not a fedpeft.models.backbone.Backbone"),
])
def test_bad_model_factory_is_one_line(capsys, tmp_path, name, words):
    err = _error(capsys, ["run", "--tasks", "demo-sentiment", "--model_name", name,
                          "--output_dir", str(tmp_path / "r"), "--quiet"])
    assert name in err and words in err, err


def test_python_m_fedpeft_is_the_cli():
    import os
    import subprocess
    import sys
    from pathlib import Path

    import fedpeft

    src = str(Path(fedpeft.__file__).resolve().parents[1])  # the fedpeft under test, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    res = subprocess.run([sys.executable, "-m", "fedpeft", "--help"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: fedpeft "), res.stdout
    assert "COMMAND" in res.stdout.splitlines()[0]
