"""`fedpeft bench`: matrix, resume, report (on synthetic histories) and the CLI errors."""

import csv
import math

import pytest

from fedpeft.bench.matrix import bench, run_matrix
from fedpeft.bench.report import aggregate, markdown, row_from_history, write_report
from fedpeft.bench.runs import is_finished, run_dir_for
from fedpeft.bench.tables import mean_std
from fedpeft.bench.suites import SUITES, Entry, Suite, get_suite
from fedpeft.errors import FedPeftError

TINY_BASE = dict(tasks=["demo-sentiment", "demo-sentiment", "demo-topic", "demo-topic"], train_samples=16,
                 test_samples=8, global_rounds=2, warmup_rounds=1, local_epochs=1, batch_size=8,
                 eval_batch_size=32, max_length=24, rank=2, lr=5e-3, max_clusters=2, quiet=True)


def tiny_suite():
    return Suite(name="tiny", description="tiny test suite", base=TINY_BASE,
                 entries=(Entry("fedit", {"method": "fedit"}),
                          Entry("fedlease", {"method": "fedlease"}),
                          Entry("fedlease-top1", {"method": "fedlease", "routing": "fixed_topk", "top_k": 1}, "first")))


def counting_runner(calls):
    from fedpeft.run import run

    def runner(cfg, backbone=None):
        calls.append((cfg.method, cfg.seed, cfg.resume))
        return run(cfg, backbone=backbone)

    return runner


def test_matrix_runs_every_label_and_seed_writes_reports_and_resumes(tmp_path, tiny_backbone):
    suite, calls, said = tiny_suite(), [], []
    files = bench(suite, [1, 2], tmp_path, backbone=tiny_backbone, runner=counting_runner(calls), say=said.append)
    # main methods on both seeds, the ablation on the first seed only
    assert sorted((m, s) for m, s, _ in calls) == [("fedit", 1), ("fedit", 2), ("fedlease", 1), ("fedlease", 1),
                                                   ("fedlease", 2)]
    for label, seed in [("fedit", 1), ("fedit", 2), ("fedlease", 1), ("fedlease", 2), ("fedlease-top1", 1)]:
        assert is_finished(run_dir_for(tmp_path, suite, label, seed))
    assert not (tmp_path / "tiny" / "fedlease-top1-seed2").exists()
    assert sum("started" in line for line in said) == 5 and sum("finished in" in line for line in said) == 5
    assert all("overall" in line for line in said if "finished in" in line)

    with open(files["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["label"], r["seed"]) for r in rows] == [("fedit", "1"), ("fedit", "2"), ("fedlease", "1"),
                                                       ("fedlease", "2"), ("fedlease-top1", "1")]
    assert {"demo-sentiment", "demo-topic", "overall", "best_round", "bytes_up_per_client_round",
            "seconds_per_round"} <= set(rows[0])
    assert float(rows[0]["bytes_up_per_client_round"]) > 0
    md = files["md"].read_text()
    assert "| fedit | 1,2 |" in md and "| fedlease-top1 | 1 |" in md and "87.76" in md
    assert files["png"].stat().st_size > 1000
    # Paired comparisons from the runs' predictions.npz: every label against both references, and the
    # saved outcomes reproduce the headline overall of the run's history exactly.
    import json

    from fedpeft.bench.stats import overall
    from fedpeft.records.predictions import read_predictions

    for r in rows:
        saved = read_predictions(r["run_dir"])
        history = json.loads((tmp_path / "tiny" / f"{r['label']}-seed{r['seed']}" / "training_history.json").read_text())
        assert saved.round == history["rounds"][-1]["round"] == int(r["rounds"])
        assert overall(saved) == pytest.approx(history["rounds"][-1]["overall"], abs=1e-9)
    assert "## Paired comparisons" in md and "Against **fedlease**:" in md and "Against **fedit**:" in md
    assert "| fedit | s1: " in md and "| fedlease-top1 | s1: " in md
    with open(files["paired"]) as fh:
        paired = list(csv.DictReader(fh))
    assert {(p["label"], p["reference"]) for p in paired} == {
        ("fedit", "fedlease"), ("fedlease-top1", "fedlease"), ("fedlease", "fedit"), ("fedlease-top1", "fedit")}
    assert next(p for p in paired if p["label"] == "fedit")["seeds"] == "1 2"

    # Resume: a second call runs nothing; a removed run folder is the only one run again.
    calls.clear()
    bench(suite, [1, 2], tmp_path, backbone=tiny_backbone, runner=counting_runner(calls), say=said.append)
    assert calls == []
    (tmp_path / "tiny" / "fedit-seed2" / "summary.md").unlink()
    refs = run_matrix(suite, [1, 2], tmp_path, backbone=tiny_backbone, runner=counting_runner(calls), say=said.append)
    assert [(m, s) for m, s, _ in calls] == [("fedit", 2)]
    assert calls[0][2] is not None  # continued from its checkpoint, not started over
    assert [r.status for r in refs].count("skipped") == 4

    # An edited suite does not silently reuse runs made with other settings.
    edited = Suite(name="tiny", description="", base={**TINY_BASE, "lr": 1e-3}, entries=suite.entries)
    with pytest.raises(FedPeftError, match="lr"):
        run_matrix(edited, [1], tmp_path, backbone=tiny_backbone, runner=counting_runner(calls), say=said.append)


def test_a_run_another_process_is_training_is_skipped_and_a_stale_lock_taken_over(tmp_path, tiny_backbone):
    """Two bench commands sharing an --out must not train one run folder at the same time: the run
    folder's lock (an flock) held by a live process makes the bench skip that run; a lock file left
    by a process that is gone is no lock at all; and the lock file is never deleted."""
    import subprocess
    import sys

    from filelock import FileLock, Timeout

    from fedpeft.run.assemble import LOCK

    suite, calls, said = tiny_suite(), [], []
    busy_dir = run_dir_for(tmp_path, suite, "fedit", 1)
    busy_dir.mkdir(parents=True)
    holder = subprocess.Popen(  # another process, holding the lock until its stdin closes
        [sys.executable, "-c", "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); sys.stdin.read()", str(busy_dir / LOCK)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        stale_dir = run_dir_for(tmp_path, suite, "fedlease", 1)
        stale_dir.mkdir(parents=True)
        (stale_dir / LOCK).write_text("12345\n")  # left by a process that was killed
        files = bench(suite, [1], tmp_path, labels=["fedit", "fedlease"], backbone=tiny_backbone,
                      runner=counting_runner(calls), say=said.append)
        assert [(m, s) for m, s, _ in calls] == [("fedlease", 1)]
        assert any("being run by another process" in line for line in said)
        assert any("still running elsewhere" in line and "fedit seed 1" in line for line in said)
        assert not is_finished(busy_dir) and (busy_dir / LOCK).exists()  # left alone
        with pytest.raises(Timeout):
            FileLock(str(busy_dir / LOCK), timeout=0).acquire()  # still the other process's
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert is_finished(stale_dir) and (stale_dir / LOCK).exists()  # ran; the lock file stays, released
    FileLock(str(stale_dir / LOCK), timeout=0).acquire()
    with open(files["csv"]) as fh:
        assert [r["label"] for r in csv.DictReader(fh)] == ["fedlease"]


def synthetic_history(overall_by_round, per_task_last, *, clients=4, warmup=0, up=1000, down=2000, seconds=2.0):
    rounds = [{"round": 0, "phase": "init", "overall": None, "per_task": {}, "bytes_up": 0, "bytes_down": 9999,
               "seconds": 0.0}]
    for i, ov in enumerate(overall_by_round, 1):
        phase = "warmup" if i <= warmup else "train"
        rounds.append({"round": i, "phase": phase, "overall": ov,
                       "per_task": per_task_last if i == len(overall_by_round) else {},
                       "bytes_up": up * (3 if phase == "warmup" else 1) * clients,
                       "bytes_down": down * clients, "seconds": seconds})
    return {"meta": {"method": "fedlease", "tasks": ["a"] * clients, "clients": [{}] * clients}, "rounds": rounds,
            "records": []}


def test_row_from_history_uses_last_round_and_phase2_bytes():
    h = synthetic_history([0.9, 0.5, 0.7, 0.6], {"a": 0.6}, warmup=1)
    row = row_from_history("fedlease", 1, h)
    assert row["overall"] == 0.6 and row["a"] == 0.6
    assert row["best_round"] == 3 and row["best_overall"] == 0.7  # the warmup round 1 is not a candidate
    assert row["bytes_up_per_client_round"] == 1000 and row["bytes_down_per_client_round"] == 2000
    assert row["seconds_per_round"] == 2.0 and row["total_seconds"] == 8.0 and row["rounds"] == 4


def test_mean_std_on_known_numbers(tmp_path):
    assert mean_std([0.8, 0.9, 1.0]) == (pytest.approx(0.9), pytest.approx(0.1))
    assert mean_std([0.5]) == (0.5, None)
    rows = [row_from_history("fedit", s, synthetic_history([v], {"a": v, "b": 1 - v}))
            for s, v in [(1, 0.80), (2, 0.90), (3, 1.00)]]
    rows.append(row_from_history("ifca", 1, synthetic_history([0.7], {"a": 0.7, "b": 0.3})))
    aggs = {a["label"]: a for a in aggregate(rows)}
    assert aggs["fedit"]["n"] == 3
    assert aggs["fedit"]["overall"] == (pytest.approx(0.9), pytest.approx(0.1))
    assert aggs["fedit"]["b"][0] == pytest.approx(0.1) and aggs["fedit"]["b"][1] == pytest.approx(0.1)
    assert aggs["ifca"]["overall"] == (0.7, None)
    md = markdown(rows, title="t")
    assert "| fedit | 1,2,3 | 90.00 ± 10.00 | 10.00 ± 10.00 | **90.00 ± 10.00** |" in md
    assert "| ifca | 1 | 70.00 | 30.00 | **70.00** |" in md
    assert "82.23" in md and "84.48" in md  # paper Avg next to the matching labels
    assert "Ranking by overall (mean): fedit > ifca" in md
    files = write_report(rows, tmp_path / "out")
    with open(files["csv"]) as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert not math.isnan(aggs["fedit"]["seconds_per_round"][0])


def test_suites_are_well_formed():
    for suite in SUITES.values():
        if suite.name in ("leff-cpu", "leff-cpu-200", "nlg-cpu", "leff-nlg", "glue4-cpu-tuned", "paper-cpu"):  # their own shapes: elsewhere, below
            continue
        plan = suite.plan([1, 2, 3])
        assert len(plan) == 6 * 3 + 5  # six main methods x 3 seeds, five ablations on seed 1
        for entry, seed in plan:
            cfg = suite.config(entry, seed, output_dir="x")
            cfg.check_runnable()
            assert len(cfg.tasks) == 16
    mini = get_suite("glue4-mini").config(Entry("x", {"method": "fedlease"}), 1)
    assert mini.carve_out and mini.model_name == "minilm"
    with pytest.raises(FedPeftError, match="no method label"):
        get_suite("glue4-mini").plan([1], ["nope"])


def test_paper_cpu_suite_is_the_six_main_methods_on_sixteen_clients_with_200_test_examples_each():
    from conftest import data_dir_or_skip
    from fedpeft.run.federation import federation_parts

    suite = get_suite("paper-cpu")
    plan = suite.plan([1, 2, 3])
    assert [e.label for e, s in plan if s == 1] == ["fedit", "fedsa-lora", "feddpa", "ifca", "fedlease",
                                                    "fedlease-oracle", "fedlease-delta-w", "fedlease-top2"]
    assert len(plan) == 22 and [e.label for e, s in plan if s == 3] == [e.label for e, s in plan if s == 2] == [
        "fedit", "fedsa-lora", "feddpa", "ifca", "fedlease", "fedlease-oracle", "fedlease-top2"]
    delta_w = [e for e, s in plan if e.label == "fedlease-delta-w"]  # an option, on the first seed only
    assert len(delta_w) == 1 and suite.config(delta_w[0], 1, output_dir="x").clustering_matrices == "delta_w"
    top2 = suite.config(next(e for e, s in plan if e.label == "fedlease-top2"), 1, output_dir="x")
    assert (top2.method, top2.routing, top2.top_k) == ("fedlease", "fixed_topk", 2)
    cfg = suite.config(plan[0][0], 1, output_dir="x", data_dir=data_dir_or_skip())
    cfg.check_runnable()
    assert cfg.model_name == "minilm" and cfg.head_policy == "frozen" and cfg.rank == 4
    # the offline data supplies every client: 4 tasks x 4, disjoint class-balanced 200-example test sets
    parts = federation_parts(cfg)
    assert [p.task for p in parts] == [t for t in ("sst2", "qnli", "mrpc", "cola") for _ in range(4)]
    assert all(len(p.test) == 200 for p in parts)
    assert [len(p.train) for p in parts] == [400] * 8 + [380] * 4 + [400] * 4


def test_nlg_suite_compares_three_methods_on_eight_decoder_clients():
    suite = get_suite("nlg-cpu")
    plan = suite.plan([1, 2])
    assert [e.label for e, _ in plan] == ["fedit", "fedit", "feddpa", "feddpa", "fedlease", "fedlease"]
    for entry, seed in plan:
        cfg = suite.config(entry, seed, output_dir="x")
        cfg.check_runnable()
        assert len(cfg.tasks) == 8 and len(set(cfg.tasks)) == 4 and cfg.model_name == "smollm2"
        assert cfg.method == entry.label and cfg.seed == seed


def test_cli_unknown_suite_is_one_line_exit_2(capsys):
    from fedpeft.cli import main

    assert main(["bench", "--suite", "nope", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown suite 'nope'" in err and "glue4-cpu" in err


def test_threads_reach_every_run_without_changing_its_settings(tmp_path, tiny_backbone):
    seen = []

    def runner(cfg, backbone=None):
        from fedpeft.run import run

        seen.append(cfg.threads)
        return run(cfg, backbone=backbone)

    suite = tiny_suite()
    run_matrix(suite, [1], tmp_path, labels=["fedit"], backbone=tiny_backbone, runner=runner, say=lambda m: None,
               threads=1)
    assert seen == [1]
    # the same run with another thread count is the same run: skipped, not an error
    refs = run_matrix(suite, [1], tmp_path, labels=["fedit"], backbone=tiny_backbone, runner=runner,
                      say=lambda m: None, threads=2)
    assert [r.status for r in refs] == ["skipped"] and seen == [1]


def test_encoder_path_reaches_every_run_and_is_a_setting_of_the_run(tmp_path, tiny_backbone):
    """bench --encoder-path padded runs the matrix that way; a finished run of the other path is not
    reused for it, and a folder saved before the setting existed counts as padded."""
    import json
    seen = []

    def runner(cfg, backbone=None):
        from fedpeft.run import run

        seen.append(cfg.encoder_path)
        return run(cfg, backbone=backbone)

    suite = tiny_suite()
    run_matrix(suite, [1], tmp_path, labels=["fedit"], backbone=tiny_backbone, runner=runner, say=lambda m: None)
    run_matrix(suite, [1], tmp_path / "padded", labels=["fedit"], backbone=tiny_backbone, runner=runner,
               say=lambda m: None, encoder_path="padded")
    assert seen == ["varlen", "padded"]
    with pytest.raises(FedPeftError, match="encoder_path"):
        run_matrix(suite, [1], tmp_path, labels=["fedit"], backbone=tiny_backbone, runner=runner,
                   say=lambda m: None, encoder_path="padded")
    saved = run_dir_for(tmp_path / "padded", suite, "fedit", 1) / "config.json"
    raw = json.loads(saved.read_text())
    del raw["encoder_path"]
    saved.write_text(json.dumps(raw))
    with pytest.raises(FedPeftError, match="encoder_path"):  # the default (varlen) is not what that run used
        run_matrix(suite, [1], tmp_path / "padded", labels=["fedit"], backbone=tiny_backbone, runner=runner,
                   say=lambda m: None)


def test_report_only_tabulates_finished_runs_and_names_the_rest(tmp_path, tiny_backbone):
    calls, said = [], []
    suite = tiny_suite()
    run_matrix(suite, [1], tmp_path, labels=["fedit"], backbone=tiny_backbone, runner=counting_runner(calls),
               say=said.append)
    files = bench(suite, [1, 2], tmp_path, runner=counting_runner(calls), say=said.append, report_only=True)
    assert len(calls) == 1  # nothing ran
    rows = list(csv.DictReader(open(files["csv"])))
    assert [(r["label"], r["seed"]) for r in rows] == [("fedit", "1")]
    assert "not finished" in said[-2] and "fedit seed 2" in said[-2] and "fedlease-top1 seed 1" in said[-2]


def test_glue4_runs_qqp_instead_of_cola_when_its_data_can_be_had(monkeypatch, tmp_path):
    from fedpeft.bench.suites import with_swap

    (tmp_path / "glue").mkdir()
    monkeypatch.setattr("fedpeft.hub.hub_reachable", lambda *a, **k: True)
    # a local data root without QQP: the hub is not asked (the loader would not use it), CoLA runs
    suite, said = with_swap(get_suite("glue4-cpu"), "auto", str(tmp_path))
    assert suite.name == "glue4-cpu" and "cola" in suite.base["tasks"] and "qqp" in said
    # no local root and a reachable hub: QQP replaces CoLA, in a suite folder of its own
    monkeypatch.delenv("FEDPEFT_DATA_DIR", raising=False)
    suite, said = with_swap(get_suite("glue4-cpu"), "auto", None)
    assert suite.name == "glue4-cpu-qqp" and "QQP" in suite.description and "CoLA" not in suite.description
    assert suite.base["tasks"].count("qqp") == 4 and "cola" not in suite.base["tasks"]
    assert not any(x.startswith("cola=") for x in suite.base["task_samples"])
    assert suite.config(suite.entries[0], 1).tasks[-1] == "qqp"
    # unreachable hub: CoLA, and forcing either side works without asking
    monkeypatch.setattr("fedpeft.hub.hub_reachable", lambda *a, **k: False)
    assert with_swap(get_suite("glue4-mini"), "auto", None)[0].name == "glue4-mini"
    assert with_swap(get_suite("glue4-mini"), "qqp", None)[0].name == "glue4-mini-qqp"
    with pytest.raises(FedPeftError, match="auto, cola or qqp"):
        with_swap(get_suite("glue4-mini"), "mnli", None)
    with pytest.raises(FedPeftError, match="no task swap"):
        with_swap(get_suite("leff-cpu"), "qqp", None)
    assert get_suite("glue4-cpu").swap == ("cola", "qqp")  # the registry itself is untouched


def test_tuned_suite_is_glue4_cpu_with_each_methods_picked_lr_only():
    base, tuned = get_suite("glue4-cpu"), get_suite("glue4-cpu-tuned")
    main = [e.label for e in tuned.entries if e.seeds == "all"]
    assert main[-1] == "fedlease-oracle" and set(main[:-1]) <= set(base.labels[:6])
    # the ablations on the first seed: glue4-cpu's (but single-r, which is FedIT) and fixed top-k over the oracle
    firsts = [e.label for e in tuned.entries if e.seeds == "first"]
    assert set(firsts) == set(base.labels[6:]) - {"fedlease-single-r"} | {"fedlease-oracle-top1", "fedlease-oracle-top2"}
    fedlease_lr = tuned.config(next(e for e in tuned.entries if e.label == "fedlease"), 1).lr
    for entry in tuned.entries:
        twin = entry.label.replace("-oracle", "")
        a = base.config(next(e for e in base.entries if e.label == twin), 1).to_dict()
        b = tuned.config(entry, 1).to_dict()
        assert {k for k in a if a[k] != b[k]} <= ({"lr", "clustering"} if "oracle" in entry.label else {"lr"})
        if entry.seeds == "first":
            assert b["lr"] == fedlease_lr
        if "oracle" in entry.label:
            assert b["clustering"] == "task"


def test_a_default_that_became_auto_still_matches_runs_saved_before(tmp_path):
    """proxy_dataset went from 'wnli' to 'auto' (which resolves to wnli on GLUE): old runs are reused."""
    import json

    from fedpeft.bench.matrix import check_same_settings

    suite = get_suite("glue4-mini")
    cfg = suite.config(suite.entries[0], 1)
    # a saved config.json holds the precision the run resolved (never "auto")
    saved = {**cfg.to_dict(), "proxy_dataset": "wnli", "precision": cfg.resolved().precision}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_same_settings(tmp_path, cfg)  # no error
    # for a FedLEASE run LEFF's settings are moot ...
    (tmp_path / "config.json").write_text(json.dumps({**saved, "proxy_dataset": "webnlg", "distill_steps": 7}))
    check_same_settings(tmp_path, cfg)
    # ... for a LEFF run they are not
    leff = get_suite("leff-cpu")
    lcfg = leff.config(leff.entries[0], 1)
    (tmp_path / "config.json").write_text(json.dumps({**lcfg.to_dict(), "proxy_dataset": "webnlg",
                                                      "precision": lcfg.resolved().precision}))
    with pytest.raises(FedPeftError, match="proxy_dataset"):
        check_same_settings(tmp_path, lcfg)


def test_a_run_stopped_before_its_first_checkpoint_is_started_again_and_said_so(tmp_path, tiny_backbone):
    suite, calls, said = tiny_suite(), [], []
    run_dir = run_dir_for(tmp_path, suite, "fedit", 1)
    run_dir.mkdir(parents=True)
    (run_dir / "training_history.json").write_text('{"rounds": []}')  # killed before round 1's checkpoint
    refs = run_matrix(suite, [1], tmp_path, labels=["fedit"], backbone=tiny_backbone,
                      runner=counting_runner(calls), say=said.append)
    assert [r.status for r in refs] == ["restarted"] and calls == [("fedit", 1, None)]
    assert "started again" in said[0] and "stopped before its first checkpoint" in said[0]
    assert is_finished(run_dir)
