"""`fedpeft bench --suite paper`: refused on a machine without a CUDA GPU, and its plumbing proven on
the CPU by running the same suite definition shrunk to a tiny random model and a few examples."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedpeft import hardware
from fedpeft.bench.matrix import bench
from fedpeft.bench.suites import SUITES, shrunk
from fedpeft.cli import main
from fedpeft.errors import FedPeftError

# What the test changes of the paper suite: the model, the sizes, the rounds (one Phase-2 round after
# one warmup round), one thread. Everything else (tasks, QQP included, batch 128, r = 4, M_max = 8,
# the frozen head, lr, every entry of the matrix and its overrides) is the suite's own.
SHRINK = dict(model_name="tiny_models:tiny_bert", train_samples=8, test_samples=4, task_samples=[],
              max_length=24, global_rounds=2, warmup_rounds=1, local_epochs=1, threads=1)


def _write(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")


def fake_glue(root: Path, per_class: int = 24) -> Path:
    """SST-2, QNLI, MRPC and QQP in the GLUE TSV layouts, train and dev, `per_class` rows per class."""
    g = root / "glue"
    words = ["good", "bad", "film", "plot", "what", "why", "is", "the", "a", "who", "old", "new"]

    def text(i: int, k: int) -> str:
        return " ".join(words[(i * 7 + j * 3 + k) % len(words)] for j in range(4 + i % 3))

    for split, n in (("train", per_class), ("dev", per_class)):
        rows = [(i, c) for c in (0, 1) for i in range(n)]
        _write(g / "SST-2" / f"{split}.tsv", [["sentence", "label"]] + [[text(i, c), str(c)] for i, c in rows])
        _write(g / "QNLI" / f"{split}.tsv", [["index", "question", "sentence", "label"]] + [
            [str(k), text(i, c) + " ?", text(i + 1, c), "entailment" if c else "not_entailment"]
            for k, (i, c) in enumerate(rows)])
        _write(g / "MRPC" / f"{split}.tsv", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]] + [
            [str(c), str(2 * k), str(2 * k + 1), text(i, c), text(i + 2, c)] for k, (i, c) in enumerate(rows)])
        _write(g / "QQP" / f"{split}.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]] + [
            [str(k), str(2 * k), str(2 * k + 1), text(i, c) + " ?", text(i + 3, c) + " ?", str(c)]
            for k, (i, c) in enumerate(rows)])
    return root


def test_paper_suite_refuses_without_a_gpu_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    code = main(["bench", "--suite", "paper", "--out", str(tmp_path / "out"), "--data-dir", str(fake_glue(tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("fedpeft: error: suite 'paper'") and "CUDA GPU" in err[-1]
    assert not (tmp_path / "out" / "paper").exists()  # refused before any run folder was made


def test_shrunk_keeps_the_suite_definition():
    paper = SUITES["paper"]
    small = shrunk(paper, **SHRINK)
    assert small.entries == paper.entries and small.name == "paper-shrunk" and not small.requires_gpu
    assert {k: v for k, v in small.base.items() if k not in SHRINK} == {
        k: v for k, v in paper.base.items() if k not in SHRINK}
    with pytest.raises(FedPeftError, match="unknown setting 'no_such'"):
        shrunk(paper, no_such=1)


def test_paper_suite_plumbing_on_a_tiny_model_on_the_cpu(tmp_path):
    """Every entry of the paper suite runs end to end (16 clients, the four tasks with QQP, each
    method's and ablation's overrides) and the report tabulates them, on the CPU."""
    paper = SUITES["paper"]
    small = shrunk(paper, **SHRINK, device="cpu", precision="fp32")
    said: list[str] = []
    files = bench(small, [1], tmp_path / "out", data_dir=str(fake_glue(tmp_path)), threads=1, say=said.append)
    with open(files["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == [e.label for e in paper.entries]
    for r in rows:
        assert {"sst2", "qnli", "mrpc", "qqp"} <= set(r) and r["rounds"] == "2", r["label"]
        cfg = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        assert cfg["tasks"] == paper.base["tasks"] and cfg["batch_size"] == 128 and cfg["head_policy"] == "frozen"
        assert cfg["device"] == "cpu"
    md = files["md"].read_text()
    assert "87.76" in md and "## Paired comparisons" in md
