"""A rejected update is rolled back, recorded and visible, for every family of client state.

A client whose training "diverges" (its reply and everything in its store made NaN after its fit,
as a client without a guard would end up) is rejected by the server; its store (head, FedSA's local
B, FedDPA's local LoRA, FedLEASE's warmup LoRA with its AdamW state, routers) must then be exactly
the store it had before that round, its record must say it did not take part, the event must name
round, client and reason, and summary.md must count it. A round in which every update is rejected
stops the run with the previous checkpoint intact, and a resume after the cause is gone reaches the
numbers of a run that never failed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedpeft.algorithms.fedit import FedIT
from fedpeft.algorithms.feddpa import FedDPA
from fedpeft.algorithms.fedlease.algorithm import FedLEASE
from fedpeft.config import RunConfig
from fedpeft.errors import RunFailed
from fedpeft.records.checkpoint import load_checkpoint
from fedpeft.run import run


def _nan_like(value):
    """`value` with every floating tensor replaced by a NaN copy (never in place: tensors may be shared)."""
    if isinstance(value, torch.Tensor):
        return torch.full_like(value, math.nan) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _nan_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_nan_like(v) for v in value)
    return value


def diverge(monkeypatch, cls, targets: set[tuple[int, int]]):
    """After cls.fit of (round, client) in `targets`: the reply and the client's store become NaN."""
    original = cls.fit

    def fit(self, instruction, client):
        reply = original(self, instruction, client)
        if (instruction.config["round"], client.cid) in targets:
            reply.tensors = _nan_like(reply.tensors)
            client.store = _nan_like(client.store)
        return reply

    monkeypatch.setattr(cls, "fit", fit)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return True


FAMILIES = {
    # name: (algorithm class to patch, settings, round of the rejection, what the store must hold)
    "fedit-local-head": (FedIT, dict(method="fedit", head_policy="local"), 2, {"head"}),
    "fedsa-lora": (FedIT, dict(method="fedsa-lora"), 2, {"head", "lora"}),
    "feddpa": (FedDPA, dict(method="feddpa"), 2, {"head", "local_lora"}),
    "fedlease-warmup": (FedLEASE, dict(method="fedlease", warmup_rounds=2, global_rounds=3, max_clusters=2,
                                       head_policy="local"), 2, {"head", "lora", "warmup_optimizer", "warmup_step"}),
    "fedlease-phase2": (FedLEASE, dict(method="fedlease", warmup_rounds=1, global_rounds=3, max_clusters=2,
                                       head_policy="local", router_aggregation="local"), 3, {"head", "router"}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rejected_update_is_rolled_back_recorded_and_counted(family, tiny_cfg, tiny_backbone, tmp_path, monkeypatch):
    cls, settings, rnd, kept = FAMILIES[family]
    settings = {"global_rounds": max(settings.get("global_rounds", 2), rnd), **settings}
    bad = 1
    before = run(tiny_cfg(**settings, output_dir=str(tmp_path / "before")), backbone=tiny_backbone,
                 stop_after=rnd - 1)
    expected = load_checkpoint(before.run_dir)["client_stores"][bad]
    assert kept <= set(expected), (kept, set(expected))

    diverge(monkeypatch, cls, {(rnd, bad)})
    result = run(tiny_cfg(**settings, output_dir=str(tmp_path / "bad")), backbone=tiny_backbone, stop_after=rnd)
    got = load_checkpoint(result.run_dir)["client_stores"][bad]
    assert same(got, expected), f"client {bad}'s store after its rejected round {rnd} is not its store before it"

    events = [e for e in result.history.events if e["kind"] == "rejected_reply"]
    assert [(e["round"], e["client"]) for e in events] == [(rnd, bad)] and "NaN" in events[0]["reason"]
    rec = next(r for r in result.history.records if (r["round"], r["client"]) == (rnd, bad))
    assert rec["participated"] is False and rec["rejected"] is True and "train_loss" not in rec
    if family == "fedlease-warmup":  # left out of the clustering: a late joiner, unscored until it has an expert
        assert "loss" not in rec
    else:
        assert math.isfinite(rec["loss"])  # scored with its restored state, not with NaN
    others = [r for r in result.history.records if r["round"] == rnd and r["client"] != bad]
    assert others and all(r["participated"] and not r.get("rejected") for r in others)
    assert result.history.rounds[-1]["rejected"] == [bad]
    summary = (result.run_dir / "summary.md").read_text()
    assert f"Rejected updates: 1 (round {rnd} client {bad}:" in summary


def test_fedlease_client_rejected_at_the_warmup_upload_joins_late_from_its_restored_lora(
        tiny_cfg, tiny_backbone, tmp_path, monkeypatch):
    diverge(monkeypatch, FedLEASE, {(2, 1)})
    result = run(tiny_cfg(method="fedlease", warmup_rounds=2, global_rounds=4, max_clusters=2,
                          output_dir=str(tmp_path / "r")), backbone=tiny_backbone)
    kinds = [(e["kind"], e.get("round"), e.get("client")) for e in result.history.events]
    assert ("rejected_reply", 2, 1) in kinds and ("late_join", 3, 1) in kinds
    last = [r for r in result.history.records if r["round"] == 4]
    assert all(r["participated"] and math.isfinite(r["loss"]) for r in last)
    assert finite(load_checkpoint(result.run_dir)["client_stores"])


def test_every_update_rejected_stops_the_run_and_a_resume_after_the_fix_equals_an_unbroken_run(
        tiny_cfg, tiny_backbone, tmp_path, monkeypatch):
    full = run(tiny_cfg(global_rounds=3, output_dir=str(tmp_path / "full")), backbone=tiny_backbone)
    with monkeypatch.context() as patch:
        diverge(patch, FedIT, {(2, c) for c in range(4)})
        with pytest.raises(RunFailed, match="round 2: every client's update was rejected"):
            run(tiny_cfg(global_rounds=3, output_dir=str(tmp_path / "r")), backbone=tiny_backbone)
    assert load_checkpoint(tmp_path / "r")["round"] == 1
    saved = json.loads((tmp_path / "r" / "training_history.json").read_text())
    assert sum(e["kind"] == "rejected_reply" and e["round"] == 2 for e in saved["events"]) == 4
    resumed = run(RunConfig(resume=str(tmp_path / "r"), quiet=True), backbone=tiny_backbone)  # the cause is gone

    def records(res):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in
                sorted(res.history.records, key=lambda r: (r["round"], r["client"]))]

    assert records(resumed) == records(full)
    assert not [e for e in resumed.history.events if e["kind"] == "rejected_reply"]


def test_cli_exit_status_1_for_a_run_that_cannot_go_on(tiny_cfg, tiny_backbone, tmp_path, monkeypatch, capsys):
    from bad_inputs import tiny_run_argv
    from fedpeft.cli import main

    diverge(monkeypatch, FedIT, {(1, 0), (1, 1)})
    assert main(tiny_run_argv(tmp_path / "r")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedpeft: error: round 1: every client's update was rejected") and "--resume" in err[-1]


def test_a_diverged_local_run_fails_the_client_and_keeps_its_store(tiny_cfg, tiny_backbone, tmp_path, monkeypatch):
    """A client never keeps (or sends) NaN parameters: the fit fails, the client misses the round
    with the store it had, and the others carry on."""
    import fedpeft.training as training

    original = training.train_local
    calls = {"n": 0}

    def exploding(model, data, params, **kw):
        stats = original(model, data, params, **kw)
        calls["n"] += 1
        if calls["n"] == 6:  # round 2, client 1 (4 clients a round)
            with torch.no_grad():
                params[0].fill_(math.nan)
        return stats

    before = run(tiny_cfg(output_dir=str(tmp_path / "before")), backbone=tiny_backbone, stop_after=1)
    monkeypatch.setattr(training, "train_local", exploding)
    result = run(tiny_cfg(output_dir=str(tmp_path / "r")), backbone=tiny_backbone)
    assert [e["clients"] for e in result.history.events if e["kind"] == "missing_clients"] == [[1]]
    assert "diverged to NaN/Inf" in (result.run_dir / "training_log.txt").read_text()
    stores = load_checkpoint(result.run_dir)["client_stores"]
    assert same(stores[1], load_checkpoint(before.run_dir)["client_stores"][1]) and finite(stores)
