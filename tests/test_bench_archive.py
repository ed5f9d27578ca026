"""`fedpeft bench --archive`: a matrix's evidence without model state, which a later bench on another
machine (another --out) reports, pairs with new runs and completes."""

import csv
import json

import pytest

from fedpeft.bench.archive import DATA_ROOT, EVIDENCE, RUN_DIR
from fedpeft.bench.matrix import bench
from fedpeft.bench.runs import is_finished, run_dir_for
from fedpeft.errors import FedPeftError
from test_bench import counting_runner, tiny_suite


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def first_machine(tmp_path_factory, tiny_backbone):
    """Seed 1 of fedit and fedlease run on 'the first machine', archived as they finish."""
    root = tmp_path_factory.mktemp("archive")
    data = root / "some" / "data-root"
    data.mkdir(parents=True)
    said = []
    files = bench(tiny_suite(), [1], root / "out", labels=["fedit", "fedlease"], backbone=tiny_backbone,
                  say=said.append, archive=root / "archive", data_dir=str(data))
    return root, files, said


def test_archive_keeps_the_evidence_without_model_state_or_local_paths(first_machine):
    root, _, said = first_machine
    suite = tiny_suite()
    assert any("archived 2 runs" in line for line in said)
    for label in ("fedit", "fedlease"):
        kept = run_dir_for(root / "archive", suite, label, 1)
        names = {p.name for p in kept.iterdir()}
        assert {"config.json", "summary.md", "training_history.json", "predictions.npz"} <= names <= (
            set(EVIDENCE) | {p.name for p in kept.glob("lora_client_map_round_*.json")})
        assert "checkpoint.pt" not in names and not any(n.endswith(".png") for n in names)
        assert is_finished(kept)
        for p in kept.iterdir():
            if p.suffix in (".json", ".md", ".txt", ".csv"):
                text = p.read_text()
                assert str(root) not in text, p.name  # neither the run folder nor the data root
        cfg = json.loads((kept / "config.json").read_text())
        assert cfg["output_dir"] == RUN_DIR and cfg["data_dir"] == DATA_ROOT
    assert (run_dir_for(root / "archive", suite, "fedlease", 1) / "clustering.json").is_file()


def test_an_archive_reports_as_the_original_and_a_later_bench_completes_it(first_machine, tiny_backbone):
    root, files, _ = first_machine
    suite, calls, said = tiny_suite(), [], []
    original = {(r["label"], r["seed"]): r for r in _rows(files["csv"])}
    again = bench(suite, [1], root / "archive", labels=["fedit", "fedlease"], say=said.append, report_only=True)
    for r in _rows(again["csv"]):
        assert r["overall"] == original[(r["label"], r["seed"])]["overall"]
    assert _rows(again["paired"])[0]["differences"] == _rows(files["paired"])[0]["differences"]

    # "another machine": the bench on the archive runs only seed 2 and pairs it with the archived seed 1
    later = bench(suite, [1, 2], root / "archive", labels=["fedit", "fedlease"], backbone=tiny_backbone,
                  runner=counting_runner(calls), say=said.append)
    assert sorted((m, s) for m, s, _ in calls) == [("fedit", 2), ("fedlease", 2)]
    assert {p["seeds"] for p in _rows(later["paired"])} == {"1 2"}


def test_archiving_again_copies_nothing_and_never_replaces_another_run(first_machine, tiny_backbone):
    root, _, _ = first_machine
    suite, calls, said = tiny_suite(), [], []
    archive = root / "archive2"
    bench(suite, [1], root / "out", labels=["fedit", "fedlease"], say=said.append, report_only=True, archive=archive)
    bench(suite, [1], root / "out", labels=["fedit", "fedlease"], say=said.append, report_only=True, archive=archive)
    assert "archived 0 runs" in said[-1] and "(2 already there)" in said[-1]

    # The archive's fedit seed 1 is another run's: refused, and nothing is written, not even fedlease's.
    summary = run_dir_for(archive, suite, "fedit", 1) / "summary.md"
    summary.write_text("another run\n")
    lease = run_dir_for(archive, suite, "fedlease", 1)
    for p in lease.iterdir():
        p.unlink()
    with pytest.raises(FedPeftError, match="already holds another run.*summary.md"):
        bench(suite, [1], root / "out", labels=["fedit", "fedlease"], say=said.append, report_only=True,
              archive=archive)
    assert summary.read_text() == "another run\n" and list(lease.iterdir()) == []
    assert calls == []


def test_cli_archive_flag(first_machine, monkeypatch, capsys):
    from fedpeft.bench.suites import SUITES
    from fedpeft.cli import main

    root, _, _ = first_machine
    monkeypatch.setitem(SUITES, "tiny", tiny_suite())
    assert main(["bench", "--suite", "tiny", "--seeds", "1", "--methods", "fedit", "--out", str(root / "out"),
                 "--report-only", "--archive", str(root / "a3")]) == 0
    assert is_finished(run_dir_for(root / "a3", tiny_suite(), "fedit", 1))
    assert not (root / "a3" / "tiny" / "fedlease-seed1").exists()
