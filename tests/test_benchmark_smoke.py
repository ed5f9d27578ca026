"""The paper-protocol round and the clustering-signal study at smoke size (benchmarks/paper_round.py,
benchmarks/clustering_signal.py): they run end to end on real GLUE data and write what their READMEs
promise; without data they say so in one line. Their real figures come from the full runs."""

from __future__ import annotations

import json

import pytest

from conftest import data_dir_or_skip, load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")  # the benchmarks' --threads 1 is put back after the module


def test_paper_round_quick_splits_every_round_and_compares_phase2(tmp_path):
    data = data_dir_or_skip()
    bench = load_benchmark("paper_round")
    assert bench.main(["--quick", "--threads", "1", "--data-dir", data, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    labels = [r["label"] for r in res["rounds"]]
    assert labels == ["FedIT", "FedIT", "FedLEASE warmup", "FedLEASE Phase-2, M = 4"]
    for r in res["rounds"]:
        assert r["training"] > 0 and r["evaluation"] > 0
        assert r["training"] + r["evaluation"] <= r["seconds"] + 1e-6  # the split adds up to the round
        # every trained token counted once per epoch: what the fits report is what the data holds
        assert r["trained_tokens"] == r["expected_trained_tokens"]
        assert 0 < r["share_of_best_peak"] < 1
    assert res["phase2_over_fedit"] > 0
    assert res["load"]["status"].startswith("quick")  # a smoke check is never called final


def test_clustering_signal_quick_reports_ari_and_the_eq2_gap(tmp_path):
    data = data_dir_or_skip()
    bench = load_benchmark("clustering_signal")
    assert bench.main(["--quick", "--suites", "glue4-cpu", "--variants", "default", "grad-init", "--threads", "1",
                       "--data-dir", data, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    names = [r["row"] for r in rows]
    assert names[:4] == ["default", "default [ΔW = B·A]", "default [B·A₀, common init A]",
                         "default [A − A₀, drift of A]"] and names[-1] == "grad-init"
    assert sum(n.startswith("default [module ") for n in names) == 12  # MiniLM: query and value in 6 layers
    for r in rows:
        assert -1 <= r["ari"] <= 1 and -1 <= r["ari_k"] <= 1 and 1 <= r["m"] <= 8  # 1: all distances equal (A has not moved yet)
        assert r["gap"] == pytest.approx(r["across"] - r["within"])
    assert (tmp_path / "results.md").read_text().count("| glue4-cpu |") == len(names)


@pytest.mark.parametrize("name", ["paper_round", "clustering_signal"])
def test_without_data_one_line_and_status_2(name, tmp_path, capsys):
    bench = load_benchmark(name)
    assert bench.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedpeft: error: the GLUE data is not found") and "\n" not in err
