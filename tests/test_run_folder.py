"""Run folders never lose or mix work: one process per folder for the run's lifetime, no run written
over another without --overwrite, unique default names, and a resume that keeps the settings that
shape the run (refusing a change by name), applies and reports the ones that may change, and ends
with the records of an uninterrupted run whatever the checkpoint and the history held."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from fedpeft.cli import main
from fedpeft.config import RunConfig
from fedpeft.engines.local import LocalEngine
from fedpeft.errors import FedPeftError
from fedpeft.records.checkpoint import load_checkpoint
from fedpeft.run import run
from fedpeft.run.assemble import LOCK, default_run_dir


def records(result_or_dir):
    """Records and round summaries without timings: what must equal between two runs."""
    hist = (json.loads((result_or_dir / "training_history.json").read_text()) if not hasattr(result_or_dir, "history")
            else result_or_dir.history.to_json())
    recs = [{k: v for k, v in r.items() if "seconds" not in k} for r in
            sorted(hist["records"], key=lambda r: (r["round"], r["client"]))]
    rounds = [{k: v for k, v in r.items() if "seconds" not in k} for r in hist["rounds"]]
    events = [{k: v for k, v in e.items() if k != "time"} for e in hist["events"]]
    return recs, rounds, events


def hold_lock(folder):
    """Another process holding `folder`'s run lock until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from filelock import FileLock; "
                             "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); sys.stdin.read()",
                             str(folder / LOCK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def lock_is_free(folder) -> bool:
    res = subprocess.run([sys.executable, "-c", "import sys; from filelock import FileLock, Timeout\n"
                          "try:\n FileLock(sys.argv[1], timeout=0).acquire(); print('free')\n"
                          "except Timeout:\n print('held')", str(folder / LOCK)],
                         capture_output=True, text=True, timeout=120)
    return res.stdout.strip() == "free"


# ------------------------------------------------------------------ one process per folder
def test_lock_is_held_for_the_whole_run_and_freed_after_it(tiny_cfg, tiny_backbone, tmp_path, monkeypatch):
    seen = []
    original = LocalEngine._report

    def report(self, rnd, *args):
        seen.append(lock_is_free(self.run_dir))  # mid-run, another process tries to take the lock
        return original(self, rnd, *args)

    monkeypatch.setattr(LocalEngine, "_report", report)
    result = run(tiny_cfg(), backbone=tiny_backbone)
    assert seen == [False, False]  # held in every round
    assert lock_is_free(result.run_dir) and (result.run_dir / LOCK).exists()  # freed, never deleted


def test_a_folder_another_process_holds_is_refused_before_any_work(tiny_cfg, tiny_backbone, tmp_path, capsys):
    run(tiny_cfg(output_dir=str(tmp_path / "r")), backbone=tiny_backbone, stop_after=1)
    holder = hold_lock(tmp_path / "r")
    try:
        assert main(["run", "--resume", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedpeft: error:") and "in use by another fedpeft process" in err
        assert len(err.splitlines()) == 1
        with pytest.raises(FedPeftError, match="in use by another fedpeft process"):
            run(tiny_cfg(output_dir=str(tmp_path / "r"), overwrite=True), backbone=tiny_backbone)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert load_checkpoint(tmp_path / "r")["round"] == 1  # untouched


def test_a_failed_run_frees_its_lock(tiny_cfg, tiny_backbone, tmp_path):
    with pytest.raises(Exception):
        run(tiny_cfg(), backbone=tiny_backbone, fail={(1, c): RuntimeError("down") for c in range(4)})
    assert lock_is_free(tmp_path / "run")


# ------------------------------------------------------------------ no run over another
def test_new_run_into_a_run_folder_refuses_naming_resume_and_overwrite(tiny_cfg, tiny_backbone, tmp_path):
    first = run(tiny_cfg(), backbone=tiny_backbone)
    before = (first.run_dir / "training_history.json").read_bytes()
    with pytest.raises(FedPeftError, match=r"already holds a run .*`--resume .*`--overwrite`"):
        run(tiny_cfg(lr=0.5), backbone=tiny_backbone)
    assert (first.run_dir / "training_history.json").read_bytes() == before


def test_overwrite_replaces_the_run_and_leaves_nothing_of_it(tiny_cfg, tiny_backbone, tmp_path):
    first = run(tiny_cfg(method="fedlease", global_rounds=2, warmup_rounds=1, max_clusters=2), backbone=tiny_backbone)
    assert (first.run_dir / "clustering.json").is_file()
    (first.run_dir / "client_state").mkdir()
    second = run(tiny_cfg(global_rounds=1, overwrite=True), backbone=tiny_backbone)
    names = {p.name for p in second.run_dir.iterdir()}
    assert "clustering.json" not in names and "client_state" not in names  # nothing of the old run mixed in
    saved = json.loads((second.run_dir / "config.json").read_text())
    assert saved["method"] == "fedit" and saved["overwrite"] is False  # a saved config never overwrites again
    with pytest.raises(FedPeftError, match="not a fedpeft run's settings"):
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "config.json").write_text('{"name": "someone else"}')
        run(tiny_cfg(output_dir=str(tmp_path / "foreign"), overwrite=True), backbone=tiny_backbone)


def test_default_folders_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-120000")
    cfg = RunConfig(method="fedit")
    made = [default_run_dir(cfg, tmp_path / "runs") for _ in range(3)]
    assert [p.name for p in made] == ["fedit-20250101-120000", "fedit-20250101-120000-2", "fedit-20250101-120000-3"]
    assert all(p.is_dir() for p in made)
    # two processes in the same second: mkdir is atomic, so they cannot both take one name
    code = ("import sys, time; time.strftime = lambda *a: '20250101-120000'; from pathlib import Path; "
            "from fedpeft.config import RunConfig; from fedpeft.run.assemble import default_run_dir; "
            "print(default_run_dir(RunConfig(method='fedit'), Path(sys.argv[1])).name)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "runs2")], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    names = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert len(set(names)) == 4, names


def test_stale_temporary_files_of_a_killed_writer_are_removed(tiny_cfg, tiny_backbone, tmp_path):
    run(tiny_cfg(global_rounds=2), backbone=tiny_backbone, stop_after=1)
    stale = tmp_path / "run" / ".checkpoint.pt.99999.12345.tmp"
    stale.write_bytes(b"half a checkpoint")
    run(RunConfig(resume=str(tmp_path / "run"), quiet=True), backbone=tiny_backbone)
    assert not stale.exists()


# ------------------------------------------------------------------ resume
def test_checkpoint_carries_the_fingerprint_and_an_edited_config_is_refused(tiny_cfg, tiny_backbone, tmp_path):
    run(tiny_cfg(), backbone=tiny_backbone, stop_after=1)
    fp = load_checkpoint(tmp_path / "run")["fingerprint"]
    assert fp["settings"]["rank"] == 2 and fp["settings"]["seed"] == 42 and len(fp["sha256"]) == 64
    assert "global_rounds" not in fp["settings"] and "threads" not in fp["settings"]  # may change on resume
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**cfg, "rank": 8}))
    with pytest.raises(FedPeftError, match=r"config.json says --rank 8, but the checkpoint was made with 2"):
        run(RunConfig(resume=str(tmp_path / "run")), backbone=tiny_backbone)


@pytest.mark.parametrize("flags, words", [
    (dict(lr=0.5), "--lr 0.5: it was run with 0.005, and --lr shapes the run"),
    (dict(method="feddpa"), "--method 'feddpa'"),
    (dict(tasks=["demo-topic"]), "--tasks"),
    (dict(seed=7), "--seed 7"),
    (dict(global_rounds=1, method="fedit"), "can only raise it"),
])
def test_resume_refuses_a_change_that_shapes_the_run_by_name(flags, words, tiny_cfg, tiny_backbone, tmp_path):
    run(tiny_cfg(global_rounds=2), backbone=tiny_backbone, stop_after=1)
    before = (tmp_path / "run" / "training_history.json").read_bytes()
    with pytest.raises(FedPeftError, match=words):
        run(RunConfig(resume=str(tmp_path / "run"), **flags), backbone=tiny_backbone)
    assert (tmp_path / "run" / "training_history.json").read_bytes() == before


def test_resume_applies_allowed_flags_says_so_and_equals_a_longer_run(tiny_cfg, tiny_backbone, tmp_path, capsys):
    from bad_inputs import tiny_run_argv

    assert main(tiny_run_argv(tmp_path / "short")) == 0  # 1 round
    argv = tiny_run_argv(tmp_path / "long")
    argv[argv.index("--global-rounds") + 1] = "2"
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "short"), "--global-rounds", "2", "--threads", "1",
                 "--no-quiet"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "--global-rounds 2 (was 1)" in err and "--threads 1 (was None)" in err
    assert "--quiet False (was True)" in err
    saved = json.loads((tmp_path / "short" / "config.json").read_text())
    assert (saved["global_rounds"], saved["threads"], saved["quiet"]) == (2, 1, False)
    assert "--global-rounds 2 (was 1)" in (tmp_path / "short" / "training_log.txt").read_text()
    assert records(tmp_path / "short") == records(tmp_path / "long")


def test_resume_drops_what_was_recorded_after_the_checkpoint(tiny_cfg, tiny_backbone, tmp_path):
    """Killed between the history write and the checkpoint write: the history holds round 2 (with
    its events), the checkpoint round 1. The resumed run redoes round 2 and records it once."""
    fail = {(2, 1): RuntimeError("client 1 is down in round 2")}
    full = run(tiny_cfg(global_rounds=3, output_dir=str(tmp_path / "full")), backbone=tiny_backbone, fail=fail)
    run(tiny_cfg(global_rounds=3, output_dir=str(tmp_path / "one")), backbone=tiny_backbone, stop_after=1)
    run(tiny_cfg(global_rounds=3, output_dir=str(tmp_path / "k")), backbone=tiny_backbone, stop_after=2, fail=fail)
    shutil.copy(tmp_path / "one" / "checkpoint.pt", tmp_path / "k" / "checkpoint.pt")  # the kill's leftovers
    resumed = run(RunConfig(resume=str(tmp_path / "k"), quiet=True), backbone=tiny_backbone, fail=fail)
    assert records(resumed) == records(full)
    assert sum(e["kind"] == "missing_clients" for e in resumed.history.events) == 1


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tiny_cfg, tiny_backbone, tmp_path):
    full = run(tiny_cfg(output_dir=str(tmp_path / "full")), backbone=tiny_backbone)
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(full.run_dir / "config.json", killed / "config.json")  # the folder a kill in round 1 leaves
    cfg = json.loads((killed / "config.json").read_text())
    (killed / "config.json").write_text(json.dumps({**cfg, "output_dir": str(killed)}))
    resumed = run(RunConfig(resume=str(killed), quiet=True), backbone=tiny_backbone)
    assert records(resumed) == records(full)


def test_a_run_refused_while_loading_its_data_leaves_the_folder_free(tiny_cfg, tiny_backbone, tmp_path):
    """A mistake found after the folder opened (too few examples for the clients) takes back the run's
    config.json: the corrected command runs in the same folder without --overwrite."""
    out = tmp_path / "run"
    with pytest.raises(FedPeftError):
        run(tiny_cfg(train_samples=100_000, output_dir=str(out)), backbone=tiny_backbone)
    assert not (out / "config.json").exists() and (out / "training_log.txt").exists()
    result = run(tiny_cfg(output_dir=str(out)), backbone=tiny_backbone)
    assert (out / "config.json").exists() and len(result.history.rounds) == 3
