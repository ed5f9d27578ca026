"""Partial participation for every method, scoring cadence, many clients of one task, test data carved
from the train split, and client stores on disk (engines/participation.py, engines/client_stores.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.engines.participation import participants, sample_size, scored
from fedpeft.errors import FedPeftError
from fedpeft.run import run

SENT = ["demo-sentiment"] * 4 + ["demo-topic"] * 4


def _records(result):
    return {(r["round"], r["client"]): r for r in result.history.records}


def _metrics(result):
    keep = ("accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "bytes_eval_down", "participated", "sampled")
    return {k: {m: r.get(m) for m in keep} for k, r in _records(result).items()}


# ------------------------------------------------------------------ the draw
def test_the_sample_is_seeded_per_round_and_sized_by_fraction_or_count(tiny_cfg):
    cfg = tiny_cfg(tasks=["demo-sentiment"] * 10, participation=0.25)
    assert sample_size(cfg, 10) == math.ceil(0.25 * 10) == 3
    draws = [participants(cfg, 10, r) for r in range(1, 6)]
    assert all(len(d) == 3 and d == sorted(d) and len(set(d)) == 3 for d in draws)
    assert draws == [participants(cfg, 10, r) for r in range(1, 6)]  # same seed, same draws
    assert len({tuple(d) for d in draws}) > 1  # a new draw every round
    assert participants(tiny_cfg(tasks=["demo-sentiment"] * 10, participation=0.25, seed=7), 10, 1) != draws[0] or \
        participants(tiny_cfg(tasks=["demo-sentiment"] * 10, participation=0.25, seed=7), 10, 2) != draws[1]
    assert len(participants(tiny_cfg(tasks=["demo-sentiment"] * 10, clients_per_round=4), 10, 1)) == 4
    assert participants(tiny_cfg(tasks=["demo-sentiment"] * 10), 10, 3) == list(range(10))


def test_scoring_cadence(tiny_cfg):
    cfg = tiny_cfg(eval_every=3, eval_clients="sampled")
    assert scored(cfg, 8, 1, 10, [1, 2]) == [] and scored(cfg, 8, 3, 10, [1, 2]) == [1, 2]
    assert scored(cfg, 8, 10, 10, [1, 2]) == list(range(8))  # the last round scores everyone
    assert scored(tiny_cfg(eval_every=2), 8, 4, 10, [5]) == list(range(8))


@pytest.mark.parametrize("bad, match", [({"participation": 0.0}, "participation"), ({"clients_per_round": 0}, "clients-per-round"),
                                        ({"eval_every": 0}, "eval-every"), ({"num_clients": 0}, "num-clients")])
def test_bad_settings_are_one_clear_error(tiny_cfg, bad, match):
    with pytest.raises(FedPeftError, match=match):
        tiny_cfg(**bad)


def test_more_clients_per_round_than_clients_is_refused(tiny_cfg, tiny_backbone):
    with pytest.raises(FedPeftError, match="exceeds the 4 clients"):
        run(tiny_cfg(clients_per_round=5), backbone=tiny_backbone)


# ------------------------------------------------------------------ every method, every engine rule
@pytest.mark.parametrize("method", ["fedit", "fedsa-lora", "feddpa", "ifca", "fedlease"])
def test_only_the_sample_trains_and_its_replies_alone_are_aggregated(method, tiny_cfg, tiny_backbone):
    cfg = tiny_cfg(method=method, tasks=SENT, participation=0.5, global_rounds=4, warmup_rounds=2, ifca_clusters=2)
    result = run(cfg, backbone=tiny_backbone)
    recs = _records(result)
    for entry in result.history.rounds[1:]:
        rnd, sample = entry["round"], entry["participants"]
        assert sample == participants(result.config, 8, rnd) and len(sample) == 4
        trained = sorted(c for (r, c), rec in recs.items() if r == rnd and rec["participated"])
        assert trained == sample  # exactly the sample replied
        assert all(recs[(rnd, c)]["sampled"] is (c in sample) for (r, c) in recs if r == rnd)
        assert all(recs[(rnd, c)]["bytes_up"] == 0 for (r, c) in recs if r == rnd and c not in sample)
    last = result.history.rounds[-1]["round"]
    scored_last = [c for c in range(8) if "accuracy" in recs[(last, c)]]
    if method == "fedlease":  # a client that never uploaded a warmup LoRA has no expert to be scored with
        from tests.leff_helpers import final_state

        assert scored_last == sorted(final_state(result.run_dir)["cluster_of"])
    else:
        assert scored_last == list(range(8))  # the last round scores everyone


def test_fedit_aggregate_is_the_mean_of_the_sampled_replies(tiny_cfg, tiny_backbone):
    """Two rounds by hand: the server's LoRA after round 1 is the n-weighted mean of the sample's uploads."""
    from fedpeft.algorithms.fedit import LORA_PREFIX
    from fedpeft.algorithms.tensors import unprefixed, weighted_mean
    from fedpeft.run import bound

    alg, clients = bound(tiny_cfg(tasks=SENT, participation=0.25), tiny_backbone)
    state = alg.init()
    sample = participants(alg.cfg, 8, 1)
    msgs = alg.configure(state, 1, sample)
    assert sorted(msgs) == sample
    replies = {c: alg.fit(msgs[c], clients[c]) for c in sample}
    expected = weighted_mean([unprefixed(LORA_PREFIX, r.tensors) for r in replies.values()],
                             [r.config["num_examples"] for r in replies.values()])
    state = alg.aggregate(state, 1, replies)
    assert all(torch.equal(state["lora"][k], v) for k, v in expected.items())
    assert state["synced"] == sample


def test_a_client_first_sampled_late_gets_the_common_initialisation(tiny_cfg, tiny_backbone):
    """FedSA-LoRA: until it has replied once a client is sent A and B (its B starts at the common init)."""
    from fedpeft.run import bound

    alg, clients = bound(tiny_cfg(method="fedsa-lora", tasks=SENT, participation=0.25), tiny_backbone)
    state = alg.init()
    first = participants(alg.cfg, 8, 1)
    msgs = alg.configure(state, 1, first)
    state = alg.aggregate(state, 1, {c: alg.fit(msgs[c], clients[c]) for c in first})
    later = [c for c in range(8) if c not in first][:2]
    again = first[:1]
    nxt = alg.configure(state, 2, later + again)
    b_keys = [k for k in nxt[later[0]].tensors if k.endswith(".B")]
    assert b_keys and all(torch.equal(nxt[later[0]].tensors[k], nxt[later[1]].tensors[k]) for k in b_keys)
    assert not [k for k in nxt[again[0]].tensors if k.endswith(".B")]  # synced: B is local


def test_fedlease_late_joiners_and_clustering_on_the_uploaders(tiny_cfg, tiny_backbone):
    """Warmup W = 2, half the clients per round. Round W's sample uploads and is clustered; a client
    that trained in round 1 only uploads what it has when next sampled; a client never sampled during
    the warmup runs its whole warmup when first sampled, uploads, and joins the nearest expert."""
    cfg = tiny_cfg(method="fedlease", tasks=SENT, participation=0.5, warmup_rounds=2, global_rounds=6, max_clusters=3)
    result = run(cfg, backbone=tiny_backbone)
    r1, r2 = participants(result.config, 8, 1), participants(result.config, 8, 2)
    clustering = next(e for e in result.history.events if e["kind"] == "clustering")
    assert sorted(int(c) for c in clustering["client_to_expert"]) == r2  # round W's uploaders only
    joins = {e["client"]: e["round"] for e in result.history.events if e["kind"] == "late_join"}
    for c in range(8):
        if c in r2:
            continue
        first_after = next((r for r in range(3, 7) if c in participants(result.config, 8, r)), None)
        if first_after is None:
            assert c not in joins
            continue
        assert joins[c] == first_after, (c, joins)
    never_warmed = [c for c in joins if c not in r1 and c not in r2]
    recs = _records(result)
    for c in never_warmed:  # its whole warmup ran when it joined: W·E epochs of steps
        assert recs[(joins[c], c)]["participated"] and recs[(joins[c], c)]["train_loss"] is not None
    assert never_warmed or any(c in r1 and c not in r2 for c in joins), "the draw exercised no late rule"


# ------------------------------------------------------------------ scoring
def test_eval_every_and_sampled_scoring(tiny_cfg, tiny_backbone):
    result = run(tiny_cfg(tasks=SENT, participation=0.5, global_rounds=4, eval_every=2, eval_clients="sampled"),
                 backbone=tiny_backbone)
    recs = _records(result)
    scored_in = {r: sorted(c for (rr, c), rec in recs.items() if rr == r and "accuracy" in rec) for r in (1, 2, 3, 4)}
    assert scored_in[1] == [] and scored_in[3] == []
    assert scored_in[2] == participants(result.config, 8, 2)
    assert scored_in[4] == list(range(8))
    overall = [r["overall"] for r in result.history.rounds]
    assert overall[1] is None and overall[2] is not None and overall[4] is not None


# ------------------------------------------------------------------ many clients of one task
def test_num_clients_makes_n_clients_of_one_task(tiny_cfg, tiny_backbone):
    result = run(tiny_cfg(tasks=["demo-sentiment"], num_clients=12, participation=0.25, train_samples=8,
                          test_samples=4, global_rounds=2, partition="dirichlet", alpha=0.5), backbone=tiny_backbone)
    assert result.config.tasks == ["demo-sentiment"] * 12 and len(result.history.meta["clients"]) == 12
    with pytest.raises(FedPeftError, match="ONE task"):
        tiny_cfg(tasks=["demo-sentiment", "demo-topic"], num_clients=5).resolved(model_type="bert")


def test_test_source_train_carves_disjoint_test_sets_out_of_the_train_split(tiny_cfg):
    from fedpeft.run.federation import federation_parts

    cfg = tiny_cfg(tasks=["demo-sentiment"] * 6, train_samples=20, test_samples=40, test_source="train")
    parts = federation_parts(cfg.resolved(model_type="bert"))
    train = [(ex.text_a, ex.label) for p in parts for ex in p.train]
    test = [(ex.text_a, ex.label) for p in parts for ex in p.test]
    assert len(test) == 240 and len(set(test)) == len(test)  # more than the 200 of the validation split
    assert not set(train) & set(test)
    from fedpeft.data.sources import load_examples

    validation = {(ex.text_a, ex.label) for ex in load_examples("demo-sentiment", "validation")}
    assert not set(test) & validation  # drawn from the train split, not the validation split


# ------------------------------------------------------------------ client stores on disk
@pytest.mark.parametrize("method", ["fedsa-lora", "fedlease"])
def test_disk_stores_give_the_memory_run_and_resume_to_the_same_numbers(method, tiny_cfg, tiny_backbone, tmp_path):
    base = dict(method=method, tasks=SENT, participation=0.5, global_rounds=4, warmup_rounds=2, head_policy="local")
    mem = run(tiny_cfg(**base, output_dir=str(tmp_path / "mem")), backbone=tiny_backbone)
    disk = run(tiny_cfg(**base, client_store="disk", output_dir=str(tmp_path / "disk")), backbone=tiny_backbone)
    assert _metrics(disk) == _metrics(mem)
    files = list((tmp_path / "disk" / "client_stores").glob("*.pt"))
    assert files and len(files) <= 8
    stopped = run(tiny_cfg(**base, client_store="disk", output_dir=str(tmp_path / "resumed")), backbone=tiny_backbone,
                  stop_after=3)
    assert max(r["round"] for r in stopped.history.rounds) == 3
    import shutil

    saved = tmp_path / "round3"
    shutil.copytree(tmp_path / "resumed", saved)
    resumed = run(tiny_cfg(**base, client_store="disk", resume=str(tmp_path / "resumed"), output_dir=str(tmp_path / "resumed")), backbone=tiny_backbone)
    assert _metrics(resumed) == _metrics(mem)
    # A kill after round 4 wrote its stores but before its checkpoint: round 3's checkpoint and history
    # with round 4's store files. The resumed run must read every store as of round 3.
    for name in ("checkpoint.pt", "training_history.json"):
        shutil.copy(saved / name, tmp_path / "resumed" / name)
    again = run(tiny_cfg(**base, client_store="disk", resume=str(tmp_path / "resumed"), output_dir=str(tmp_path / "resumed")), backbone=tiny_backbone)
    assert _metrics(again) == _metrics(mem)
