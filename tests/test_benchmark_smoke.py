"""The paper-protocol round and the clustering-signal study at smoke size (benchmarks/paper_round.py,
benchmarks/clustering_signal.py): they run end to end on real GLUE data and write what their READMEs
promise; without data they say so in one line. Their real figures come from the full runs. Also: the
benchmarks' final/PROVISIONAL rule (benchmarks/machine.py), and that every benchmark script imports."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert res["load"]["status"].startswith("quick") and res["status"].startswith("quick")  # never final
    # the runs bracketed by matmul probes (before, between, after): the host's speed, min <= median <= max
    lo, mid, hi = res["host_speed"]["float32"]
    assert 0 < lo <= mid <= hi and res["host_speed"]["spread"] == pytest.approx(hi / lo)


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


def test_load_monitor_calls_a_run_final_only_when_other_processes_left_the_cores_alone():
    """The benchmarks' final/PROVISIONAL rule counts other processes' CPU time (the machine's busy time
    minus the benchmark's own process tree), not the load average, which the benchmark's own threads keep
    above the thread count on an idle machine."""
    machine = load_benchmark("machine")
    assert machine.others_cores((0.0, 100.0, 40.0), (10.0, 120.0, 59.0)) == pytest.approx(0.1)  # 20 s busy, 19 own
    assert machine.others_cores((0.0, 100.0, 40.0), (10.0, 110.0, 52.0)) == 0.0  # clock skew never goes negative

    def monitor(clocks, loads=(3.0, 3.5)):
        m = machine.LoadMonitor(threads=2)
        m.samples, m.clocks = list(loads), clocks
        return m.summary()

    own_only = [(0.0, 0.0, 0.0), (5.0, 10.0, 9.9), (10.0, 20.0, 19.8)]  # 2 busy cores, all but 0.02 ours
    assert monitor(own_only)["status"] == "final"  # load 3.5 on 2 threads: the old rule said PROVISIONAL
    burst = [(0.0, 0.0, 0.0), (5.0, 10.0, 6.5), (10.0, 20.0, 16.5)]  # 0.7 cores of others in one interval
    got = monitor(burst)
    assert got["status"] == "PROVISIONAL" and got["others_peak"] == pytest.approx(0.7)
    steady = [(0.0, 0.0, 0.0), (50.0, 100.0, 92.5)]  # 0.15 cores of others on average
    assert monitor(steady)["status"] == "PROVISIONAL"
    assert monitor([], loads=(1.5, 1.9))["status"] == "final" and monitor([], loads=(2.5,))["status"] == "PROVISIONAL"
    assert "PROVISIONAL" in machine.status_line(got) and "0.70 in one interval" in machine.status_line(got)


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")))
def test_every_benchmark_script_imports(name):
    """A benchmark that no smoke test runs can rot unseen: decoder_throughput.py raised ImportError for a
    session after a helper moved (cpu_model, throughput.py → machine.py). Importing each one catches that kind."""
    module = load_benchmark(name)
    assert name == "machine" or callable(getattr(module, "main", None))
