"""The table of user mistakes: each must end `fedpeft` with one line `fedpeft: error: ...`, exit
status 2 and no traceback. tests/test_errors.py runs every case through `fedpeft.cli.main`;
benchmarks/faults.py runs the same table as its bad-input campaign.

A case is (name, build, words): `build(tmp, run_dir)` makes whatever files the mistake needs in the
empty folder `tmp` and returns the command line; `run_dir` is a finished tiny run (a template to
copy, never to change); `words` must all appear in the error line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

TINY = ["--model_name", "tiny_models:tiny_bert", "--train-samples", "8", "--test-samples", "4",
        "--global-rounds", "1", "--local-epochs", "1", "--batch-size", "8", "--max-length", "16", "--rank", "2",
        "--quiet"]


def tiny_run_argv(out: Path) -> list[str]:
    """A finished 1-round FedIT run on the tiny BERT and the bundled demo data (a few seconds)."""
    return ["run", "--method", "fedit", "--tasks", "demo-sentiment", "demo-topic", *TINY, "--output_dir", str(out)]


def _sst2(tmp: Path, train_body: bytes) -> Path:
    root = tmp / "data" / "SST-2"
    root.mkdir(parents=True)
    rows = "".join(f"good movie {i}\t1\nbad movie {i}\t0\n" for i in range(10)).encode()
    (root / "train.tsv").write_bytes(b"sentence\tlabel\n" + train_body + rows)
    (root / "dev.tsv").write_bytes(b"sentence\tlabel\n" + rows)
    return tmp / "data"


def _glue_run(data: Path, tmp: Path) -> list[str]:
    return ["run", "--method", "fedit", "--tasks", "sst2", "--data-dir", str(data), *TINY, "--output_dir",
            str(tmp / "out")]


def non_utf8_tsv(tmp, run_dir):
    # line 4 of train.tsv (header, two rows, then this one) carries a Latin-1 byte
    return _glue_run(_sst2(tmp, b"fine film\t1\nawful film\t0\ncaf\xe9 scene\t1\n"), tmp)


def field_over_csv_limit(tmp, run_dir):
    return _glue_run(_sst2(tmp, b"x" * 200_000 + b"\t1\n"), tmp)


def _settings(tmp: Path, name: str, text: str) -> list[str]:
    (tmp / name).write_text(text)
    return ["run", "--config", str(tmp / name), "--output_dir", str(tmp / "out")]


def _copy_run(tmp: Path, run_dir: Path) -> Path:
    dest = tmp / "run"
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns(".fedpeft.lock"))
    return dest


def corrupt_history_on_resume(tmp, run_dir):
    dest = _copy_run(tmp, run_dir)
    (dest / "training_history.json").write_text('{"rounds": [')
    return ["run", "--resume", str(dest)]


def corrupt_history_on_report(tmp, run_dir):
    dest = _copy_run(tmp, run_dir)
    (dest / "summary.md").unlink()
    (dest / "training_history.json").write_bytes(b"\x00\xff garbage")
    return ["report", str(dest)]


def foreign_history_on_report(tmp, run_dir):
    dest = _copy_run(tmp, run_dir)
    (dest / "summary.md").unlink()
    (dest / "training_history.json").write_text(json.dumps({"rounds": [{"round": "one"}], "records": []}))
    return ["report", str(dest)]


def config_json_is_a_folder(tmp, run_dir):
    (tmp / "out" / "config.json").mkdir(parents=True)
    return ["run", "--method", "fedit", "--tasks", "demo-sentiment", *TINY, "--output_dir", str(tmp / "out")]


def folder_holds_a_run(tmp, run_dir):
    dest = _copy_run(tmp, run_dir)
    return ["run", "--method", "fedit", "--tasks", "demo-sentiment", *TINY, "--output_dir", str(dest)]


def resume_changes_a_shaping_setting(tmp, run_dir):
    return ["run", "--resume", str(_copy_run(tmp, run_dir)), "--lr", "0.5"]


def resume_lowers_the_rounds(tmp, run_dir):
    dest = _copy_run(tmp, run_dir)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["global_rounds"] = 3  # as if the run had been planned for 3 rounds (not part of the fingerprint)
    (dest / "config.json").write_text(json.dumps(cfg))
    return ["run", "--resume", str(dest), "--global-rounds", "2"]


def settings_not_utf8(tmp, run_dir):
    (tmp / "run.toml").write_bytes(b"method = '\xff'\n")
    return ["run", "--config", str(tmp / "run.toml")]


def settings_file_is_a_folder(tmp, run_dir):
    (tmp / "run.toml").mkdir()
    return ["run", "--config", str(tmp / "run.toml")]


def resume_not_a_run(tmp, run_dir):
    (tmp / "notes.txt").write_text("not a run\n")
    return ["run", "--resume", str(tmp)]


def resume_missing_folder(tmp, run_dir):
    return ["run", "--resume", str(tmp / "nowhere")]


def edited_config_json_on_resume(tmp, run_dir):
    dest = _copy_run(tmp, run_dir)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["seed"] = cfg["seed"] + 1
    (dest / "config.json").write_text(json.dumps(cfg))
    return ["run", "--resume", str(dest)]


def lost_history_on_resume(tmp, run_dir):
    dest = _copy_run(tmp, run_dir)
    (dest / "training_history.json").unlink()
    return ["run", "--resume", str(dest)]


def report_not_a_run(tmp, run_dir):
    return ["report", str(tmp)]


# (name, build, words in the error line)
CASES: list[tuple[str, Callable[[Path, Path], list[str]], list[str]]] = [
    ("non-UTF-8 byte in a TSV", non_utf8_tsv, ["train.tsv, line 4", "0xe9", "not UTF-8"]),
    ("TSV field over the csv limit", field_over_csv_limit, ["train.tsv, line 2", "csv limit"]),
    ("--max-length beyond the model's positions",
     lambda tmp, rd: ["run", "--method", "fedit", "--tasks", "demo-sentiment", *TINY, "--max-length", "4096", "--output_dir",
                      str(tmp / "out")], ["--max-length 4096", "128 positions"]),
    ("--max-length holds no text token",
     lambda tmp, rd: ["run", "--method", "fedit", "--tasks", "demo-question", *TINY, "--max-length", "3", "--output_dir",
                      str(tmp / "out")], ["--max-length 3 cannot hold", "pair"]),
    ("--max-length holds no label word (decoder)",
     lambda tmp, rd: ["run", "--method", "fedit", "--tasks", "inst-sst2", "--model_name", "tiny_models:tiny_llama", "--max-length", "5",
                      "--quiet", "--output_dir", str(tmp / "out")], ["--max-length 5 cannot hold", "label word"]),
    ("NaN in a float flag", lambda tmp, rd: ["run", "--tasks", "sst2", "--lr", "nan"], ["--lr", "finite"]),
    ("inf in a float flag", lambda tmp, rd: ["run", "--tasks", "sst2", "--alpha", "inf"], ["--alpha", "finite"]),
    ("NaN in a TOML float", lambda tmp, rd: _settings(tmp, "run.toml", "lr = nan\n"), ["run.toml", "--lr", "finite"]),
    ("inf in a JSON float", lambda tmp, rd: _settings(tmp, "run.json", '{"round_timeout": Infinity}'),
     ["--round-timeout", "finite"]),
    ("threads = 1.5 in TOML", lambda tmp, rd: _settings(tmp, "run.toml", "threads = 1.5\n"),
     ["run.toml", "--threads must be a whole number", "1.5"]),
    ("tasks = \"sst2\" in TOML", lambda tmp, rd: _settings(tmp, "run.toml", 'tasks = "sst2"\n'),
     ["--tasks must be a list of strings", "'sst2'"]),
    ("threads = 1.5 in JSON", lambda tmp, rd: _settings(tmp, "run.json", '{"threads": 1.5}'),
     ["--threads must be a whole number"]),
    ("tasks = \"sst2\" in JSON", lambda tmp, rd: _settings(tmp, "run.json", '{"tasks": "sst2"}'),
     ["--tasks must be a list of strings"]),
    ("a string for a number in TOML", lambda tmp, rd: _settings(tmp, "run.toml", 'lr = "1e-3"\n'),
     ["--lr must be a number"]),
    ("a list at the top level (JSON)", lambda tmp, rd: _settings(tmp, "run.json", '["sst2", "sst2"]'),
     ["run.json", "table of settings", "list"]),
    ("a settings file that is not UTF-8", settings_not_utf8, ["run.toml", "0xff", "not UTF-8"]),
    ("a settings file that is a folder", settings_file_is_a_folder, ["run.toml is a folder"]),
    ("--output_dir whose config.json is a folder", config_json_is_a_folder, ["config.json is a folder"]),
    ("--output_dir that holds a run", folder_holds_a_run, ["already holds a run", "--resume", "--overwrite"]),
    ("corrupt training_history.json on --resume", corrupt_history_on_resume, ["training_history.json", "damaged"]),
    ("corrupt training_history.json on report", corrupt_history_on_report, ["training_history.json", "damaged"]),
    ("foreign training_history.json on report", foreign_history_on_report,
     ["training_history.json", "not a fedpeft training history"]),
    ("lost training_history.json on --resume", lost_history_on_resume, ["no training_history.json", "round 1"]),
    ("edited config.json on --resume", edited_config_json_on_resume, ["config.json says --seed", "checkpoint"]),
    ("--resume with a setting that shapes the run", resume_changes_a_shaping_setting,
     ["--lr 0.5", "shapes the run"]),
    ("--resume with fewer rounds", resume_lowers_the_rounds, ["--global-rounds 2", "the run has 3", "only raise"]),
    ("--resume of a folder that is not a run", resume_not_a_run, ["not a fedpeft run folder", "config.json"]),
    ("--resume of a folder that does not exist", resume_missing_folder, ["does not exist"]),
    ("report of a folder that is not a run", report_not_a_run, ["not a fedpeft run folder"]),
    ("argparse: a word for a number", lambda tmp, rd: ["run", "--global-rounds", "ten"],
     ["--global-rounds", "'ten'", "fedpeft run --help"]),
    ("argparse: an unknown flag", lambda tmp, rd: ["run", "--learning-rate", "3"],
     ["--learning-rate", "fedpeft run --help"]),
    ("argparse: a missing argument", lambda tmp, rd: ["report"], ["run_dir", "fedpeft report --help"]),
    ("argparse: an unknown command", lambda tmp, rd: ["train"], ["'train'", "fedpeft --help"]),
]
