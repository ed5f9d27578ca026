"""LEFF invariants (docs/methods/leff.md) on a tiny random BERT and the bundled demo data: block sampling,
layer importance, students and distillation, the client's training, layer-wise aggregation, the
reduction to FedAvg-full, bytes, the Dirichlet cut and configuration errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedpeft.algorithms.leff.runtime import assembled as assembled_model
from fedpeft.algorithms.leff.distill import (distill_loss, distill_segment, eager_attention, init_student,
                                             run_blocks, student_depth, student_init_layers)
from fedpeft.algorithms.leff.sampling import (block_probabilities, block_scores, block_starts, draw_block,
                                              layer_importance)
from fedpeft.errors import FedPeftError
from tests.leff_helpers import bound, final_state

L = 4  # layers of the tiny model


@pytest.fixture(scope="module")
def bb4():
    from tiny_models import tiny_bert

    return tiny_bert(seed=0, layers=L)


@pytest.fixture
def leff_cfg(tiny_cfg):
    def make(**kw):
        base = dict(method="leff", tasks=["demo-sentiment"] * 3, global_rounds=2, partition="dirichlet_cut", alpha=1.0,
                    proxy_dataset="demo", distill_steps=2, distill_examples=64, importance_examples=16,
                    layer_budgets=["1"], lr=5e-3)
        base.update(kw)
        return tiny_cfg(**base)

    return make




def logits_of(alg, clients):
    from fedpeft.data.batching import collate

    batch = collate(clients[0].test, list(range(8)))
    batch.pop("labels")
    alg.runtime.model.eval()
    with torch.no_grad():
        return alg.runtime.model(**batch)


# ----------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("budget", [1, 2, 3, 6])
def test_sliding_blocks_are_every_contiguous_window(budget):
    starts = block_starts(6, budget, "sliding")
    assert len(starts) == 6 - budget + 1
    assert all(0 <= k and k + budget <= 6 for k in starts)


@pytest.mark.parametrize("budget", [1, 2, 4, 5])
def test_disjoint_blocks_cover_every_layer_and_end_at_L(budget):
    starts = block_starts(11, budget, "disjoint")
    covered = {l for k in starts for l in range(k, k + budget)}
    assert covered == set(range(11))
    assert max(starts) + budget == 11
    assert len(starts) == len(set(starts))


def test_budget_outside_1_to_L_is_an_error():
    with pytest.raises(FedPeftError, match="between 1 and"):
        block_starts(4, 5)


def test_block_score_is_the_sum_of_its_layer_scores():
    rng = np.random.default_rng(0)
    layer = rng.random(9)
    for budget in (1, 3, 9):
        starts = block_starts(9, budget)
        naive = []
        for k in starts:
            total = 0.0
            for l in range(k, k + budget):
                total += layer[l]
            naive.append(total)
        np.testing.assert_allclose(block_scores(layer, starts, budget), naive, rtol=0, atol=1e-12)


def test_probabilities_are_a_distribution_monotone_and_scale_free():
    s = np.array([0.3, 2.0, 1.1, 0.0])
    p = block_probabilities(s)
    assert (p >= 0).all() and math.isclose(p.sum(), 1.0, abs_tol=1e-12)
    assert list(np.argsort(p)) == list(np.argsort(s))  # monotone in s
    np.testing.assert_allclose(block_probabilities(s * 1e-4), p, atol=1e-12)
    np.testing.assert_allclose(block_probabilities(s * 1e6), p, atol=1e-12)
    for flat in (np.zeros(4), np.full(4, 3.0)):
        np.testing.assert_allclose(block_probabilities(flat), np.full(4, 0.25), atol=1e-12)
    hot, cool = block_probabilities(s, temperature=0.5), block_probabilities(s, temperature=5.0)
    assert cool.max() < p.max() < hot.max()  # a larger tau flattens p
    assert math.isclose(block_probabilities(s, normalise="none").sum(), 1.0)


def test_round_robin_is_deterministic_with_period_n_blocks():
    starts = block_starts(5, 2)
    seq = [draw_block("round_robin", starts, None, seed=1, rnd=r, client=3) for r in range(1, 13)]
    assert seq[:len(starts)] == starts
    assert seq[len(starts):2 * len(starts)] == starts


def _chi2_uniform(draws, n):
    counts = np.bincount(draws, minlength=n)
    expected = len(draws) / n
    return float(((counts - expected) ** 2 / expected).sum())


def test_random_and_equal_score_importance_are_uniform():
    starts = block_starts(6, 1)
    n = len(starts)
    rand = [draw_block("random", starts, None, seed=7, rnd=r, client=0) for r in range(10_000)]
    imp = [draw_block("importance", starts, block_probabilities(np.ones(n)), seed=7, rnd=r, client=0)
           for r in range(10_000)]
    # chi-square with 5 degrees of freedom: the 0.999 quantile is 20.5
    assert _chi2_uniform(rand, n) < 20.5
    assert _chi2_uniform(imp, n) < 20.5


def test_draws_are_reproducible_and_differ_across_clients():
    starts = block_starts(8, 1)
    p = block_probabilities(np.arange(8.0))
    a = [draw_block("importance", starts, p, seed=3, rnd=r, client=0) for r in range(50)]
    b = [draw_block("importance", starts, p, seed=3, rnd=r, client=0) for r in range(50)]
    c = [draw_block("importance", starts, p, seed=3, rnd=r, client=1) for r in range(50)]
    assert a == b and a != c


# ----------------------------------------------------------------------------------------- importance
def test_importance_has_no_side_effects(leff_cfg, bb4):
    alg, _ = bound(leff_cfg(), bb4)
    state = alg.init()
    model = alg.runtime.model
    alg.load_global(state)
    model.train()
    model.encoder.embeddings.dropout.eval()  # a mixed train/eval pattern that must come back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = alg.importance(state)
    assert len(scores) == L and all(s >= 0 for s in scores) and max(s for s in scores) > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
        assert p.requires_grad == flags[n]
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_importance_is_zero_when_every_gradient_is_zero(bb4):
    from fedpeft.models.task_model import TaskModel

    model = TaskModel(bb4.model, bb4.hidden_size)
    layers = [list(b.parameters()) for b in bb4.model.encoder.layer]
    scores = layer_importance(model, layers, lambda: sum(p.sum() for ps in layers for p in ps) * 0.0)
    assert scores == [0.0] * L


def test_server_batch_is_disjoint_from_every_client(leff_cfg):
    from fedpeft.data.partition.common import reserved_ids
    from fedpeft.data.partition.federation import partition_pools
    from fedpeft.data.pools import load_federation_pools

    pools = {"demo-sentiment": load_federation_pools("demo-sentiment", None)}
    train = pools["demo-sentiment"][0]
    held = {train[j] for j in reserved_ids("demo-sentiment", len(train), 16, 42)}
    parts = partition_pools(["demo-sentiment"] * 3, pools, train_samples=24, test_samples=8,
                            partition="dirichlet_cut", alpha=1.0, seed=42, reserve=16, min_train=8)
    seen = [id(ex) for p in parts for ex in p.train]
    assert len(seen) == len(set(seen))  # every example in exactly one client
    assert not held & {ex for p in parts for ex in p.train}


# ----------------------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("n,rate,m", [(1, 0.2, 1), (5, 0.5, 3), (10, 0.3, 3), (4, 1.0, 4), (11, 0.5, 6)])
def test_student_depth(n, rate, m):
    assert student_depth(n, rate) == m


def test_student_init_is_evenly_spaced_copies(bb4):
    assert student_init_layers(11, 6) == [0, 2, 4, 6, 8, 10]
    teacher = list(bb4.model.encoder.layer)
    student = init_student(teacher, 0.5)
    for blk, i in zip(student, student_init_layers(L, 2)):
        for (n, p), (_, q) in zip(blk.named_parameters(), teacher[i].named_parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n


def test_rate_one_student_is_the_teacher_and_no_step_runs(bb4):
    teacher = list(bb4.model.encoder.layer)
    student, info = distill_segment(bb4.model.embeddings, teacher, 1, 3, None, rate=1.0, alpha=0.5, steps=50,
                                    lr=1e-3, batch_size=4, seed=0)
    assert info["steps"] == 0 and len(student) == 3
    for s, t in zip(student, teacher[1:]):
        assert all(torch.equal(p, q) for p, q in zip(s.parameters(), t.parameters()))


@pytest.mark.parametrize("k", [0, 1, L - 1])
def test_rate_one_client_model_equals_the_global_model(leff_cfg, bb4, k):
    alg, clients = bound(leff_cfg(compression_rate=1.0), bb4)
    state = alg.init()
    alg.load_global(state)
    reference = logits_of(alg, clients)
    pre = alg.student(state, 1, 0, k - 1, []) if k > 0 else []
    suf = alg.student(state, 1, k + 1, L - 1, []) if k + 1 < L else []
    assert len(pre) + len(suf) == L - 1
    with assembled_model(alg.runtime, pre + alg.blocks()[k:k + 1] + suf):
        assembled = logits_of(alg, clients)
    torch.testing.assert_close(assembled, reference, rtol=0, atol=1e-6)


def _proxy(bb, n=12):
    from fedpeft.algorithms.leff.server_data import encode_texts, proxy_texts
    from fedpeft.config import RunConfig

    texts = proxy_texts(RunConfig(proxy_dataset="demo", distill_examples=n))
    return encode_texts(texts, bb.tokenizer, 24)


def _segment_outputs(bb, proxy, student_blocks):
    from fedpeft.data.batching import collate
    from fedpeft.algorithms.leff.distill import prefix_hidden

    batch = collate(proxy, list(range(len(proxy))))
    blocks = list(bb.model.encoder.layer)
    with torch.no_grad(), eager_attention(blocks + student_blocks):
        h = prefix_hidden(bb.model.embeddings, blocks[:1], batch)
        ht, at = run_blocks(blocks[1:], h, batch["attention_mask"], want_attention=True)
        hs, as_ = run_blocks(student_blocks, h, batch["attention_mask"], want_attention=True)
    return ht, at, hs, as_, batch


def test_distill_loss_properties(bb4):
    proxy = _proxy(bb4)
    student = init_student(list(bb4.model.encoder.layer)[1:], 0.5)
    ht, at, hs, as_, batch = _segment_outputs(bb4, proxy, student)
    mask = batch["attention_mask"]
    assert distill_loss(ht, at, hs, as_, mask, 0.5) > 0
    assert float(distill_loss(ht, at, ht, at, mask, 0.5)) == pytest.approx(0.0, abs=1e-7)
    # attention rows sum to 1 over unmasked keys
    sums = (at * mask[:, None, None, :]).sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)
    # different token ids at padded positions: same loss
    loss = distill_loss(ht, at, hs, as_, mask, 0.5)
    ids = batch["input_ids"].clone()
    ids[mask == 0] = 7
    from fedpeft.algorithms.leff.distill import prefix_hidden

    blocks = list(bb4.model.encoder.layer)
    with torch.no_grad(), eager_attention(blocks + student):
        b2 = {**batch, "input_ids": ids}
        h = prefix_hidden(bb4.model.embeddings, blocks[:1], b2)
        ht3, at3 = run_blocks(blocks[1:], h, mask, want_attention=True)
        hs3, as3 = run_blocks(student, h, mask, want_attention=True)
    assert mask.eq(0).any()
    torch.testing.assert_close(distill_loss(ht3, at3, hs3, as3, mask, 0.5), loss, rtol=0, atol=1e-6)


def test_distillation_ignores_proxy_labels_and_reduces_the_loss(bb4):
    proxy = _proxy(bb4, 16)
    relabelled = type(proxy)(proxy.input_ids, proxy.token_type_ids, np.ones_like(proxy.labels) * 5, proxy.pad_id)
    blocks = list(bb4.model.encoder.layer)
    kw = dict(rate=0.5, alpha=0.5, steps=30, lr=3e-3, batch_size=8, seed=3)
    s1, info1 = distill_segment(bb4.model.embeddings, blocks, 1, 3, proxy, **kw)
    s2, info2 = distill_segment(bb4.model.embeddings, blocks, 1, 3, relabelled, **kw)
    assert info1["steps"] == 30

    def full_loss(student):
        ht, at, hs, as_, batch = _segment_outputs(bb4, proxy, student)
        return float(distill_loss(ht, at, hs, as_, batch["attention_mask"], 0.5))

    assert full_loss(s1) < full_loss(init_student(blocks[1:], 0.5))
    assert info1["loss_last"] == info2["loss_last"]
    for a, b in zip(s1, s2):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(not p.requires_grad for blk in s1 for p in blk.parameters())


def test_teacher_cache_gives_the_per_step_targets_and_the_same_student(bb4):
    """--distill-teacher cached: a batch's inputs and targets read from the round's cache equal the
    per-step path's on its real tokens (float rounding apart), and distillation takes the same steps."""
    from fedpeft.algorithms.leff.distill import TeacherCache, prefix_hidden, run_blocks
    from fedpeft.data.batching import collate

    proxy = _proxy(bb4, 16)
    assert len({len(x) for x in proxy.input_ids}) > 1  # texts of several lengths: padding is exercised
    emb, blocks = bb4.model.embeddings, list(bb4.model.encoder.layer)
    cache = TeacherCache(emb, blocks, proxy, starts={0, 1}, ends={0, 3}, chunk=5)
    idx = [3, 0, 7, 11, 14]
    batch = collate(proxy, idx)
    was = bb4.model.training
    bb4.model.eval()
    try:
        with torch.no_grad(), eager_attention([emb, *blocks]):
            h_in = prefix_hidden(emb, blocks[:1], batch)
            h_t, a_t = run_blocks(blocks[1:4], h_in, batch["attention_mask"], True)
    finally:
        bb4.model.train(was)
    mask, c_in, c_t, c_a = cache.batch(idx, 1, 3)
    assert torch.equal(mask, batch["attention_mask"]) and c_in.shape == h_in.shape and c_a.shape == a_t.shape
    real = mask.bool()
    torch.testing.assert_close(c_in[real], h_in[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_t[real], h_t[real], atol=1e-5, rtol=1e-5)
    pairs = (real[:, :, None] & real[:, None, :])[:, None].expand_as(a_t)  # real query rows × real keys
    torch.testing.assert_close(c_a[pairs], a_t[pairs], atol=1e-6, rtol=1e-5)
    kw = dict(rate=0.5, alpha=0.5, steps=10, lr=3e-3, batch_size=8, seed=3)
    s1, i1 = distill_segment(emb, blocks, 1, 3, proxy, **kw)
    s2, i2 = distill_segment(emb, blocks, 1, 3, proxy, teacher_cache=cache, **kw)
    assert i2["steps"] == 10 and i1["loss_first"] == pytest.approx(i2["loss_first"], rel=1e-3)
    assert i1["loss_last"] == pytest.approx(i2["loss_last"], rel=1e-3)
    for a, b in zip(s1, s2):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)


def test_cached_teacher_in_a_round_distils_the_same_segments_as_per_step(leff_cfg, bb4):
    infos = {}
    for mode in ("per-step", "cached"):
        alg, _ = bound(leff_cfg(tasks=["demo-sentiment"] * 3, distill_teacher=mode, distill_steps=4), bb4)
        state = alg.init()
        alg.configure(state, 1, list(range(len(alg.federation))))
        infos[mode] = {tuple(d["segment"]): d for d in state["round_info"][1]["distilled"]}
        assert ("teacher_cache_seconds" in state["round_info"][1]) == (mode == "cached")
        assert alg._teacher_cache is None  # freed after the round's configure
    assert infos["per-step"].keys() == infos["cached"].keys()
    for seg, d in infos["per-step"].items():
        if d["steps"]:
            assert infos["cached"][seg]["loss_last"] == pytest.approx(d["loss_last"], rel=1e-3)


def test_distill_precision_run_distils_under_the_runs_autocast(leff_cfg, bb4):
    """--distill-precision fp32 (default) distils in float32 whatever --precision says; run uses the run's
    bf16 autocast: the same segments, losses that differ by bf16 rounding only."""
    losses = {}
    for precision, dp in (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "run")):
        alg, _ = bound(leff_cfg(tasks=["demo-sentiment"] * 3, precision=precision, distill_precision=dp,
                                distill_steps=3), bb4)
        state = alg.init()
        alg.configure(state, 1, list(range(len(alg.federation))))
        losses[(precision, dp)] = {tuple(d["segment"]): d["loss_last"] for d in state["round_info"][1]["distilled"]
                                   if d["steps"]}
    assert losses[("fp32", "fp32")] and losses[("fp32", "fp32")] == losses[("bf16", "fp32")]
    run = losses[("bf16", "run")]
    assert run.keys() == losses[("fp32", "fp32")].keys() and run != losses[("fp32", "fp32")]
    for seg, v in losses[("fp32", "fp32")].items():
        assert run[seg] == pytest.approx(v, rel=0.1, abs=1e-4)


def test_students_are_cached_per_round_and_segment(leff_cfg, bb4):
    alg, _ = bound(leff_cfg(sampling="round_robin", tasks=["demo-sentiment"] * 2), bb4)
    state = alg.init()
    msgs = alg.configure(state, 2, list(range(len(alg.federation))))  # round 2: every client's block is start 1, so prefix [0] and suffix [2, 3]
    assert [m.config["block_start"] for m in msgs.values()] == [1, 1]
    segments = [tuple(d["segment"]) for d in state["round_info"][2]["distilled"]]
    assert sorted(segments) == [(0, 0), (2, 3)]  # each distinct segment distilled once
    a, b = msgs[0].tensors, msgs[1].tensors
    for key in a:
        if key.startswith(("pre.", "suf.")):
            assert torch.equal(a[key], b[key])


def test_distill_reuse_reuses_a_student_only_while_its_blocks_and_those_before_are_unchanged(leff_cfg, bb4):
    """--distill-reuse unchanged: round-robin blocks repeat every L rounds; the suffix [1, 3] of block 0
    is distilled in round 1, reused in round 5 while blocks 0..3 are the same tensors, and distilled
    again once block 0 (before the segment) changed. Off (the paper): distilled every time."""
    def segments(info, key):
        return sorted(tuple(d["segment"]) for d in info.get(key, []))

    for reuse in ("off", "unchanged"):
        alg, _ = bound(leff_cfg(sampling="round_robin", tasks=["demo-sentiment"] * 2, distill_reuse=reuse,
                                global_rounds=12), bb4)
        state = alg.init()
        ids = list(range(len(alg.federation)))
        first = alg.configure(state, 1, ids)
        assert segments(state["round_info"][1], "distilled") == [(1, 3)]
        again = alg.configure(state, 5, ids)  # same block starts as round 1, nothing aggregated in between
        if reuse == "off":
            assert segments(state["round_info"][5], "distilled") == [(1, 3)]
            assert "reused" not in state["round_info"][5]
        else:
            assert segments(state["round_info"][5], "distilled") == []
            assert state["round_info"][5]["reused"] == [{"segment": [1, 3], "from_round": 1}]
            for key, t in first[0].tensors.items():
                if key.startswith("suf."):
                    assert torch.equal(again[0].tensors[key], t)  # the very student of round 1
            blocks = dict(state["blocks"])
            blocks[0] = {n: t + 1e-3 for n, t in blocks[0].items()}  # block 0 feeds the segment: its input changed
            state["blocks"] = blocks
            alg.configure(state, 9, ids)
            assert segments(state["round_info"][9], "distilled") == [(1, 3)] and state["round_info"][9]["reused"] == []


# ----------------------------------------------------------------------------------------- client
@pytest.mark.parametrize("budgets,start", [(["1"], 0), (["1"], L - 1), (["2"], 1), ([str(L)], 0)])
def test_client_trains_its_block_through_the_frozen_students(leff_cfg, bb4, budgets, start):
    alg, clients = bound(leff_cfg(layer_budgets=budgets, tasks=["demo-sentiment"] * 2, global_rounds=20), bb4)
    state = alg.init()
    budget = int(budgets[0])
    n_starts = L - budget + 1
    alg.cfg.sampling = "round_robin"
    rnd = start + 1 + n_starts  # round_robin picks start (rnd - 1) mod n_blocks
    msg = alg.configure(state, rnd, list(range(len(alg.federation))))[0]
    assert msg.config["block_start"] == start
    emb_before = {n: p.detach().clone() for n, p in alg.runtime.extra["embeddings"].named_parameters()}
    reply = alg.fit(msg, clients[0])
    # upload: exactly the trained blocks keyed by global index, plus the head set
    blocks = {k.split(".")[1] for k in reply.tensors if k.startswith("block.")}
    assert blocks == {str(l) for l in range(start, start + budget)}
    assert set(reply.tensors) == {k for k in msg.tensors if k.startswith(("block.", "head."))}
    assert reply.config["num_examples"] == len(clients[0].train)
    # every block changed (gradients reach it through the suffix student), frozen parts did not
    for l in range(start, start + budget):
        prefix = f"block.{l}."
        assert any(not torch.equal(reply.tensors[k], msg.tensors[k]) for k in reply.tensors if k.startswith(prefix))
    for n, p in alg.runtime.extra["embeddings"].named_parameters():
        assert torch.equal(p, emb_before[n])
    scratch = alg.runtime.extra["scratch"]
    for tag, offset in (("pre", 0), ("suf", msg.config["m_pre"])):
        count = msg.config[f"m_{tag}"]
        for j, blk in enumerate(scratch[offset:offset + count]):
            for n, p in blk.named_parameters():
                assert torch.equal(p, msg.tensors[f"{tag}.{j}.{n}"])
    if budget == L:
        assert msg.config["m_pre"] == msg.config["m_suf"] == 0


# ----------------------------------------------------------------------------------------- aggregation
def test_layerwise_mean_weights_and_bounds():
    from fedpeft.algorithms.leff.blocks import layerwise_mean

    g = {0: {"w": torch.zeros(3)}, 1: {"w": torch.full((3,), 9.0)}}
    ups = {0: {0: {"w": torch.tensor([1.0, 2.0, 3.0])}}, 1: {0: {"w": torch.tensor([5.0, 6.0, 7.0])}}}
    out = layerwise_mean(g, ups, {0: 1, 1: 3})
    torch.testing.assert_close(out[0]["w"], 0.25 * ups[0][0]["w"] + 0.75 * ups[1][0]["w"])
    assert out[1]["w"] is g[1]["w"]  # nobody trained layer 1: the very same tensor
    rev = layerwise_mean(g, dict(reversed(list(ups.items()))), {0: 1, 1: 3})
    assert torch.equal(rev[0]["w"], out[0]["w"])
    lo = torch.minimum(ups[0][0]["w"], ups[1][0]["w"])
    hi = torch.maximum(ups[0][0]["w"], ups[1][0]["w"])
    assert ((out[0]["w"] >= lo) & (out[0]["w"] <= hi)).all()
    single = layerwise_mean(g, {4: {1: {"w": torch.tensor([0.1, 0.2, 0.3])}}}, {4: 7})
    assert torch.equal(single[1]["w"], torch.tensor([0.1, 0.2, 0.3]))
    same = layerwise_mean(g, {0: {0: {"w": torch.tensor([0.3] * 3)}}, 1: {0: {"w": torch.tensor([0.3] * 3)}}}, {0: 2, 1: 5})
    assert torch.equal(same[0]["w"], torch.tensor([0.3] * 3))


def test_a_round_leaves_untrained_layers_bitwise_and_averages_the_head_over_all(leff_cfg, bb4):
    alg, clients = bound(leff_cfg(tasks=["demo-sentiment"] * 2, sampling="round_robin"), bb4)
    state = alg.init()
    before = {l: {n: t.clone() for n, t in b.items()} for l, b in state["blocks"].items()}
    msgs = alg.configure(state, 1, list(range(len(alg.federation))))  # both clients: block 0
    replies = {c.cid: alg.fit(msgs[c.cid], c) for c in clients}
    state = alg.aggregate(state, 1, replies)
    for l in range(1, L):
        assert all(torch.equal(state["blocks"][l][n], before[l][n]) for n in before[l])
    n = [c.num_examples for c in alg.federation]
    expected = {k: (replies[0].tensors[k].double() * n[0] + replies[1].tensors[k].double() * n[1]) / sum(n)
                for k in replies[0].tensors}
    for k, v in expected.items():
        if k.startswith("block."):
            _, layer, name = k.split(".", 2)
            torch.testing.assert_close(state["blocks"][int(layer)][name], v.float(), rtol=0, atol=1e-7)
        else:
            torch.testing.assert_close(state["heads"][("all", 2)][k[len("head."):]], v.float(), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------- equivalence, e2e
def test_leff_with_full_budgets_is_fedavg_full_bitwise(leff_cfg, bb4, tmp_path):
    from fedpeft.run import run

    a = run(leff_cfg(layer_budgets=[str(L)], output_dir=str(tmp_path / "leff")), backbone=bb4)
    b = run(leff_cfg(method="fedavg-full", output_dir=str(tmp_path / "fedavg")), backbone=bb4)
    sa, sb = final_state(a.run_dir), final_state(b.run_dir)
    for l in range(L):
        for n, t in sa["blocks"][l].items():
            assert torch.equal(t, sb["blocks"][l][n])
    for key, head in sa["heads"].items():
        assert all(torch.equal(v, sb["heads"][key][k]) for k, v in head.items())
    ha, hb = a.history.to_json(), b.history.to_json()
    assert [r["overall"] for r in ha["rounds"]] == [r["overall"] for r in hb["rounds"]]
    assert [r["bytes_up"] for r in ha["rounds"]] == [r["bytes_up"] for r in hb["rounds"]]


def test_tiny_run_is_reproducible_and_logs_blocks(leff_cfg, bb4, tmp_path):
    from fedpeft.run import run

    cfg = dict(layer_budgets=["1", "2"])
    a = run(leff_cfg(**cfg, output_dir=str(tmp_path / "a")), backbone=bb4)
    b = run(leff_cfg(**cfg, output_dir=str(tmp_path / "b")), backbone=bb4)
    ra, rb = a.history.to_json()["rounds"], b.history.to_json()["rounds"]
    for x, y in zip(ra, rb):
        assert x["overall"] == y["overall"] and x["bytes_up"] == y["bytes_up"] and x["bytes_down"] == y["bytes_down"]
    trained = [r for r in ra if r["round"] >= 1]
    assert all(len(r["blocks"]) == 3 and r["peak_client_memory_bytes"] > 0 for r in trained)
    for r in trained:
        for p in r["block_probabilities"].values():
            assert math.isclose(sum(p), 1.0)
        assert sorted(len(p) for p in r["block_probabilities"].values()) == [L - 1, L]
    events = json.loads((a.run_dir / "training_history.json").read_text())["events"]
    assert [e["round"] for e in events if e["kind"] == "leff_blocks"] == [1, 2]


def test_bench_report_shows_the_sampling_distribution_used_and_pairs_leff_variants(leff_cfg, bb4, tmp_path):
    """A LEFF suite's results.md reports, from each run's history, the distribution the clients drew blocks
    from (max-normalised at τ = 1: p_max / p_min ≤ e) beside the literal Eq. 6 on the same scores, and
    compares uniform sampling with LEFF's importance sampling, paired on the seed."""
    from fedpeft.bench.leff_sampling import run_sampling
    from fedpeft.bench.report import row_from_history, write_report
    from fedpeft.bench.suites import get_suite
    from fedpeft.run import run

    runs = {label: run(leff_cfg(output_dir=str(tmp_path / label), **kw), backbone=bb4).run_dir
            for label, kw in (("leff", {}), ("leff-uniform", {"sampling": "random"}))}
    used = run_sampling(runs["leff"])
    assert [e["round"] for e in used] == [1, 2] and all(len(e["used"]) == L for e in used)
    history = json.loads((runs["leff"] / "training_history.json").read_text())["rounds"]
    for e in used:
        raw = np.asarray(next(r["importance"] for r in history if r["round"] == e["round"]))
        assert e["used"].max() / e["used"].min() <= math.e * (1 + 1e-9)
        literal = np.exp(raw - raw.max())
        np.testing.assert_allclose(e["literal"], literal / literal.sum(), rtol=1e-12)
    assert all(np.allclose(e["used"], 1 / L) and e["literal"] is None for e in run_sampling(runs["leff-uniform"]))

    rows = [row_from_history(label, 1, json.loads((d / "training_history.json").read_text()), d)
            for label, d in runs.items()]
    files = write_report(rows, tmp_path / "report", suite=get_suite("leff-cpu"))
    md = files["md"].read_text()
    section = md[md.index("## Block sampling"):]
    assert "| leff | importance, max-normalised, τ = 1 | 1 | 2 | 4 |" in section
    assert "| leff-uniform | random | 1 | 2 | 4 | 1 [1, 1] | 0.25 [0.25, 0.25] | — |" in section
    assert "Against **leff**:" in md and "| leff-uniform | s1: " in md and "paired" in files


# ----------------------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("start", [0, 1, L - 1])
def test_bytes_match_the_closed_form(leff_cfg, bb4, start):
    alg, clients = bound(leff_cfg(sampling="round_robin", compression_rate=0.5, global_rounds=20), bb4)
    state = alg.init()
    b, r = 1, 0.5
    p_blk = sum(p.numel() for p in alg.blocks()[0].parameters())
    p_head = sum(v.numel() for v in state["head_init"][2].values())
    p_emb = sum(p.numel() for p in alg.runtime.extra["embeddings"].parameters())
    m_pre, m_suf = math.ceil(start * r), math.ceil((L - start - b) * r)
    for rnd, first in ((start + 1, True), (start + 1 + L, False)):
        msgs = alg.configure(state, rnd, list(range(len(alg.federation))))
        msg = msgs[0]
        assert msg.config["block_start"] == start
        down = 4 * ((b + m_pre + m_suf) * p_blk + p_head) + (4 * p_emb if first else 0)
        assert msg.nbytes == down
        replies = {c.cid: alg.fit(msgs[c.cid], c) for c in clients}
        assert replies[0].nbytes == 4 * (b * p_blk + p_head)
        state = alg.aggregate(state, rnd, replies)


# ----------------------------------------------------------------------------------------- data, config
def test_dirichlet_cut_partition_rules():
    from fedpeft.data.partition.client import label_skew
    from fedpeft.data.partition.federation import partition_pools
    from fedpeft.data.pools import load_federation_pools

    pools = {"demo-sentiment": load_federation_pools("demo-sentiment", None)}
    kw = dict(train_samples=40, test_samples=8, partition="dirichlet_cut", seed=5, min_train=4)
    a = partition_pools(["demo-sentiment"] * 4, pools, alpha=0.5, **kw)
    b = partition_pools(["demo-sentiment"] * 4, pools, alpha=0.5, **kw)
    assert [p.train_ids for p in a] == [p.train_ids for p in b]
    assert sum(len(p.train) for p in a) == 160 and len({j for p in a for j in p.train_ids}) == 160
    skews = [label_skew(partition_pools(["demo-sentiment"] * 4, pools, alpha=al, **kw)) for al in (0.1, 1.0, 50.0)]
    assert skews[0] > skews[1] > skews[2]
    with pytest.raises(FedPeftError, match=r"demo-sentiment.*alpha=0.01 over N=4 clients.*fewer than one batch"):
        partition_pools(["demo-sentiment"] * 4, pools, alpha=0.01, **{**kw, "min_train": 39})


def test_leff_config_errors():
    from fedpeft.config import RunConfig

    for kw, msg in (({"layer_budgets": ["0"]}, "layer-budgets"), ({"layer_budgets": ["uniform:3-1"]}, "uniform"),
                    ({"compression_rate": 0.0}, "compression-rate"), ({"participation": 1.5}, "participation")):
        with pytest.raises(FedPeftError, match=msg):
            RunConfig(method="leff", **kw)
    assert RunConfig(layer_budgets=["uniform:1-3"]).parse_layer_budgets() == (1, 3)


def test_budget_larger_than_the_model_and_mixed_tasks_are_errors(leff_cfg, bb4):
    with pytest.raises(FedPeftError, match="exceeds the model's 4 layers"):
        bound(leff_cfg(layer_budgets=["5"]), bb4)
    with pytest.raises(FedPeftError, match="one task per federation"):
        bound(leff_cfg(tasks=["demo-sentiment", "demo-topic"]), bb4)


def test_missing_proxy_is_a_clear_error(tmp_path):
    from fedpeft.algorithms.leff.server_data import proxy_texts
    from fedpeft.config import RunConfig

    with pytest.raises(FedPeftError, match="WNLI"):
        proxy_texts(RunConfig(proxy_dataset="wnli", data_dir=str(tmp_path)))


def test_partial_participation_trains_only_the_sampled_clients(leff_cfg, bb4):
    from fedpeft.engines.participation import participants

    alg, clients = bound(leff_cfg(tasks=["demo-sentiment"] * 4, participation=0.5, global_rounds=3), bb4)
    state = alg.init()
    part = participants(alg.cfg, 4, 1)
    assert len(part) == 2 and part == participants(alg.cfg, 4, 1)  # ceil(0.5 · 4), the same draw again
    msgs = alg.configure(state, 1, part)
    assert sorted(msgs) == part  # blocks are assigned (and students distilled) for the sample only
    assert sorted(state["assigned"][1]) == part
    replies = {c: alg.fit(msgs[c], clients[c]) for c in part}
    trained = {l for c in part for l in range(msgs[c].config["block_start"],
                                              msgs[c].config["block_start"] + msgs[c].config["budget"])}
    before = {l: {n: t.clone() for n, t in state["blocks"][l].items()} for l in range(L)}
    state = alg.aggregate(state, 1, replies)
    for l in set(range(L)) - trained:
        assert all(torch.equal(state["blocks"][l][n], before[l][n]) for n in before[l])
    assert any(not torch.equal(state["blocks"][l][n], before[l][n]) for l in trained for n in before[l])
    assert sorted(state["synced"]) == part


# ----------------------------------------------------------------------------------------- DeBERTa-v2/v3
@pytest.fixture(scope="module")
def deb4():
    from tiny_models import tiny_deberta

    return tiny_deberta(seed=0, layers=L)


@pytest.mark.parametrize("k", [0, 1, L - 1])
def test_deberta_rate_one_client_model_equals_the_global_model(leff_cfg, deb4, k):
    alg, clients = bound(leff_cfg(compression_rate=1.0), deb4)
    state = alg.init()
    alg.load_global(state)
    reference = logits_of(alg, clients)
    pre = alg.student(state, 1, 0, k - 1, []) if k > 0 else []
    suf = alg.student(state, 1, k + 1, L - 1, []) if k + 1 < L else []
    with assembled_model(alg.runtime, pre + alg.blocks()[k:k + 1] + suf):
        assembled = logits_of(alg, clients)
    torch.testing.assert_close(assembled, reference, rtol=0, atol=1e-6)


def test_deberta_distillation_uses_the_relative_attention_and_reduces_the_loss(deb4):
    from fedpeft.algorithms.leff.distill import prefix_hidden
    from fedpeft.data.batching import collate

    proxy = _proxy(deb4, 16)
    enc = deb4.model.encoder
    blocks = list(enc.layer)
    student0 = init_student(blocks[1:], 0.5)
    student, info = distill_segment(deb4.model.embeddings, blocks, 1, 3, proxy, rate=0.5, alpha=0.5, steps=30,
                                    lr=3e-3, batch_size=8, seed=0, owner=enc)
    assert info["steps"] == 30 and len(student) == 2

    def full_loss(s):
        batch = collate(proxy, list(range(len(proxy))))
        with torch.no_grad():
            h = prefix_hidden(deb4.model.embeddings, blocks[:1], batch, enc)
            ht, at = run_blocks(blocks[1:], h, batch["attention_mask"], True, enc)
            hs, as_ = run_blocks(s, h, batch["attention_mask"], True, enc)
        assert at.shape[1] == 2 and torch.isfinite(at).all()
        return float(distill_loss(ht, at, hs, as_, batch["attention_mask"], 0.5))

    assert full_loss(student) < full_loss(student0)
    assert len(enc.layer) == L  # the encoder's own block list is back


def test_deberta_head_set_includes_the_relative_embedding_layernorm(leff_cfg, deb4):
    alg, clients = bound(leff_cfg(tasks=["demo-sentiment"] * 2, sampling="round_robin", distill_steps=1), deb4)
    assert set(alg.aset()) == {"encoder.LayerNorm.weight", "encoder.LayerNorm.bias"}
    assert "encoder.rel_embeddings.weight" in {n for n, _ in alg.runtime.extra["block_owner"][0].named_parameters(prefix="encoder")}
    state = alg.init()
    msgs = alg.configure(state, 1, list(range(len(alg.federation))))
    replies = {c.cid: alg.fit(msgs[c.cid], c) for c in clients}
    p_blk = sum(p.numel() for p in alg.blocks()[0].parameters())
    p_head = sum(v.numel() for v in state["head_init"][2].values())
    assert replies[0].nbytes == 4 * (p_blk + p_head + 2 * deb4.hidden_size)  # one block + 𝒜
    rel_before = alg.runtime.extra["block_owner"][0].rel_embeddings.weight.detach().clone()
    state = alg.aggregate(state, 1, replies)
    n = [len(c.train) for c in clients]
    key = "aset.encoder.LayerNorm.weight"
    assert not torch.equal(replies[0].tensors[key], msgs[0].tensors[key])
    expected = (replies[0].tensors[key].double() * n[0] + replies[1].tensors[key].double() * n[1]) / sum(n)
    torch.testing.assert_close(state["aset"]["encoder.LayerNorm.weight"], expected.float(), rtol=0, atol=1e-7)
    assert torch.equal(alg.runtime.extra["block_owner"][0].rel_embeddings.weight, rel_before)  # frozen


def test_deberta_tiny_run_end_to_end(leff_cfg, deb4, tmp_path):
    from fedpeft.run import run

    result = run(leff_cfg(layer_budgets=["1", "2"], output_dir=str(tmp_path / "deb")), backbone=deb4)
    rounds = result.history.to_json()["rounds"]
    assert rounds[-1]["round"] == 2 and rounds[-1]["overall"] is not None
    assert any(d["steps"] > 0 for r in rounds[1:] for d in r["distilled"])


def test_resume_equals_uninterrupted(leff_cfg, bb4, tmp_path):
    from fedpeft.run import run

    kw = dict(layer_budgets=["1", "2"], global_rounds=3)
    full = run(leff_cfg(**kw, output_dir=str(tmp_path / "a")), backbone=bb4)
    run(leff_cfg(**kw, output_dir=str(tmp_path / "c")), backbone=bb4, stop_after=1)
    resumed = run(leff_cfg(**kw, output_dir=str(tmp_path / "c"), resume=str(tmp_path / "c")), backbone=bb4)

    def summary(res):
        return [(r["round"], r["client"], r.get("accuracy"), r.get("loss"), r["bytes_up"], r["bytes_down"])
                for r in sorted(res.history.records, key=lambda r: (r["round"], r["client"]))]

    assert summary(full) == summary(resumed)
    sa, sb = final_state(full.run_dir), final_state(resumed.run_dir)
    assert all(torch.equal(t, sb["blocks"][l][n]) for l in range(L) for n, t in sa["blocks"][l].items())


def test_dirichlet_cut_bins_stsb_scores():
    from fedpeft.data.partition.federation import partition_pools
    from fedpeft.data.tasks import Example

    rng = np.random.default_rng(0)
    train = [Example(f"a{i}", f"b{i}", float(s)) for i, s in enumerate(rng.uniform(0, 5, 400))]
    test = [Example(f"t{i}", f"u{i}", 2.5) for i in range(40)]
    parts = partition_pools(["stsb"] * 4, {"stsb": (train, test)}, train_samples=100, test_samples=10,
                            partition="dirichlet_cut", alpha=0.05, seed=1, min_train=4)
    bins = [{min(4, int(ex.label)) for ex in p.train} for p in parts]
    assert sum(len(p.train) for p in parts) == 400
    assert sum(len(b) for b in bins) < 4 * 5  # skewed: clients do not all see every score bin


def test_last_update_importance_is_data_free_and_uniform_at_first(leff_cfg, bb4):
    from fedpeft.algorithms.leff.blocks import update_importance

    alg, clients = bound(leff_cfg(importance_source="last_update", tasks=["demo-sentiment"] * 2), bb4)
    alg.importance = None  # must not be called: no server batch is used
    state = alg.init()
    msgs = alg.configure(state, 1, list(range(len(alg.federation))))
    assert state["round_info"][1]["importance"] is None
    assert all(np.allclose(p, 1 / len(p)) for p in state["round_info"][1]["block_probabilities"].values())
    state = alg.aggregate(state, 1, {c.cid: alg.fit(msgs[c.cid], c) for c in clients})
    scores = state["update_scores"]
    trained = {msgs[c].config["block_start"] for c in msgs}
    assert len(scores) == L and all((scores[l] > 0) == (l in trained) for l in range(L))
    g = {0: {"w": torch.tensor([1.0, 2.0])}}
    assert update_importance(g, {0: {"w": torch.tensor([1.5, 2.0])}}, 0.5) == [pytest.approx((1.0 * 1.5) ** 2)]
    alg.configure(state, 2, list(range(len(alg.federation))))
    assert state["round_info"][2]["importance"] == scores
