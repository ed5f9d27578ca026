"""Baselines on the tiny BERT: what each method trains, what it sends, and how the server averages."""

import logging

import pytest
import torch

from fedpeft.algorithms.registry import algorithm_class
from fedpeft.algorithms.base import Message
from fedpeft.algorithms.tensors import weighted_mean
from fedpeft.algorithms.feddpa import GLOBAL, LOCAL, FedDPA
from fedpeft.algorithms.fedit import LORA_PREFIX, FedIT
from fedpeft.algorithms.fedprox import FedProx
from fedpeft.algorithms.fedsa_lora import FedSALoRA
from fedpeft.algorithms.ffa_lora import FFALoRA
from fedpeft.algorithms.ifca import IFCA, cluster_prefix
from fedpeft.run.assemble import build_algorithm
from fedpeft.run.federation import prepare_clients
from fedpeft.models.adapters import get_lora_state, lora_parameters, set_lora_state
from fedpeft.run import run

HIDDEN, LAYERS = 16, 2  # tiny BERT; LoRA on query and value


def _setup(cls, cfg, backbone):
    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    alg = build_algorithm(cfg, backbone, infos)
    assert type(alg) is cls
    return alg, clients


def _factor(key):
    return key.rsplit(".", 1)[-1]


def _lora(tensors, prefix=LORA_PREFIX):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _hand_replies(state_lora, factors, values_and_sizes):
    ups = {}
    for cid, (value, n) in enumerate(values_and_sizes):
        tensors = {LORA_PREFIX + k: torch.full_like(v, value) for k, v in state_lora.items() if _factor(k) in factors}
        ups[cid] = Message(tensors, {"num_examples": n})
    return ups


def test_baselines_are_registered():
    assert algorithm_class("ffa-lora") is FFALoRA and algorithm_class("fedsa-lora") is FedSALoRA
    assert algorithm_class("fedprox") is FedProx and algorithm_class("feddpa") is FedDPA
    assert algorithm_class("ifca") is IFCA


def test_every_catalogue_entry_builds_its_named_class():
    """methods.py names each class by a string: a typo there must fail here, not in a user's run."""
    from fedpeft.algorithms.base import Algorithm
    from fedpeft.methods import CATALOGUE

    for spec in CATALOGUE:
        cls = algorithm_class(spec.name)
        assert issubclass(cls, Algorithm) and cls.name == spec.name, spec


# ------------------------------------------------------------------ bytes per round
# Counted bytes equal the closed forms of docs/methods/baselines.md#communication-per-round.
@pytest.mark.parametrize("method", ["ffa-lora", "fedsa-lora", "fedprox", "feddpa", "ifca"])
def test_bytes_match_closed_form(method, tiny_cfg, tiny_backbone):
    k = 3
    cfg = tiny_cfg(method=method, head_policy="local", global_rounds=1, ifca_clusters=k,
                   tasks=["demo-sentiment", "demo-topic"])
    result = run(cfg, backbone=tiny_backbone)
    r = cfg.rank
    p_a = LAYERS * 2 * r * HIDDEN
    p_b = LAYERS * 2 * HIDDEN * r
    p_e = p_a + p_b
    up, down, first = {"ffa-lora": (p_b, p_b, p_e), "fedsa-lora": (p_a, p_a, p_e), "fedprox": (p_e, p_e, p_e),
                       "feddpa": (p_e, p_e, p_e), "ifca": (p_e, k * p_e, k * p_e)}[method]
    recs = result.history.records
    assert {rec["round"] for rec in recs} == {0, 1}
    for rec in recs:
        if rec["round"] >= 1:
            assert (rec["bytes_up"], rec["bytes_down"]) == (4 * up, 4 * down), rec
        else:  # the common init (A and B, all K for IFCA) plus the client's head init
            n = 4 if rec["task"] == "demo-topic" else 2
            p_h = HIDDEN * HIDDEN + HIDDEN + n * HIDDEN + n
            assert rec["bytes_down"] == 4 * (first + p_h)


# ------------------------------------------------------------------ FFA-LoRA
def test_ffa_lora_trains_and_sends_only_b_and_a_stays_the_common_init(tiny_cfg, tiny_backbone):
    alg, clients = _setup(FFALoRA, tiny_cfg(method="ffa-lora"), tiny_backbone)
    state = alg.init()
    init = {k: v.clone() for k, v in state["lora"].items()}
    ins = alg.configure(state, 1, list(range(len(alg.federation))))
    assert {_factor(k) for k in _lora(ins[0].tensors)} == {"A", "B"}  # first instruction: whole common init
    replies = {}
    for c in clients:
        replies[c.cid] = alg.fit(ins[c.cid], c)
        after = get_lora_state(alg.runtime.sites)
        for key, v in after.items():
            if _factor(key) == "A":
                assert torch.equal(v, init[key]), key  # A never trained
        assert any(not torch.equal(after[k], init[k]) for k in after if _factor(k) == "B")
        sent = _lora(replies[c.cid].tensors)
        assert sent and {_factor(k) for k in sent} == {"B"}
        assert all(torch.equal(c.store["lora"][k], init[k]) for k in c.store["lora"])  # kept A = init
    state = alg.aggregate(state, 1, replies)
    for key in init:
        if _factor(key) == "A":
            assert torch.equal(state["lora"][key], init[key])
    expected = weighted_mean([_lora(r.tensors) for r in replies.values()],
                             [r.config["num_examples"] for r in replies.values()])
    assert all(torch.equal(state["lora"][k], v) for k, v in expected.items())
    nxt = alg.configure(state, 2, list(range(len(alg.federation))))
    assert {_factor(k) for k in _lora(nxt[0].tensors)} == {"B"}
    # Round 2: every client trains from the same A, which is still the init.
    for c in clients[:2]:
        alg.fit(nxt[c.cid], c)
        a_now = get_lora_state(alg.runtime.sites, factors=("A",))
        assert all(torch.equal(v, init[k]) for k, v in a_now.items())


def test_ffa_lora_aggregate_is_n_weighted_and_rejects_a(tiny_cfg, tiny_backbone, caplog):
    alg, _ = _setup(FFALoRA, tiny_cfg(method="ffa-lora"), tiny_backbone)
    state = alg.init()
    a_before = {k: v.clone() for k, v in state["lora"].items() if _factor(k) == "A"}
    ups = _hand_replies(state["lora"], ("B",), [(1.0, 10), (3.0, 30)])
    state = alg.aggregate(state, 1, ups)
    for k, v in state["lora"].items():
        if _factor(k) == "B":
            assert torch.equal(v, torch.full_like(v, 0.25 * 1.0 + 0.75 * 3.0)), k
        else:
            assert torch.equal(v, a_before[k])
    with_a = _hand_replies(state["lora"], ("A", "B"), [(9.0, 10)])
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        logging.getLogger("fedpeft").propagate = True
        state = alg.aggregate(state, 2, with_a)
    assert "unexpected tensor" in caplog.text
    assert all(torch.equal(state["lora"][k], v) for k, v in a_before.items())


# ------------------------------------------------------------------ FedSA-LoRA
def test_fedsa_lora_sends_a_and_keeps_b_on_the_client(tiny_cfg, tiny_backbone):
    alg, clients = _setup(FedSALoRA, tiny_cfg(method="fedsa-lora"), tiny_backbone)
    state = alg.init()
    init = {k: v.clone() for k, v in state["lora"].items()}
    ins = alg.configure(state, 1, list(range(len(alg.federation))))
    assert {_factor(k) for k in _lora(ins[0].tensors)} == {"A", "B"}  # round 1: the whole common init
    replies = {}
    for c in clients:
        replies[c.cid] = alg.fit(ins[c.cid], c)
        after = get_lora_state(alg.runtime.sites)
        assert any(not torch.equal(after[k], init[k]) for k in after if _factor(k) == "A")
        assert any(not torch.equal(after[k], init[k]) for k in after if _factor(k) == "B")
        assert {_factor(k) for k in _lora(replies[c.cid].tensors)} == {"A"}
        assert {_factor(k) for k in c.store["lora"]} == {"B"}
        assert all(torch.equal(c.store["lora"][k], after[k]) for k in c.store["lora"])
    state = alg.aggregate(state, 1, replies)
    expected = weighted_mean([_lora(r.tensors) for r in replies.values()],
                             [r.config["num_examples"] for r in replies.values()])
    assert all(torch.equal(state["lora"][k], v) for k, v in expected.items())
    nxt = alg.configure(state, 2, list(range(len(alg.federation))))
    assert all({_factor(k) for k in _lora(m.tensors)} == {"A"} for m in nxt.values())
    # Client i's model is s·B_i·Ā: the global A with its own B.
    for c in clients:
        alg.load_for_eval(nxt[c.cid], c)
        now = get_lora_state(alg.runtime.sites)
        for k, v in now.items():
            assert torch.equal(v, expected[k] if _factor(k) == "A" else c.store["lora"][k]), k
    b0, b1 = clients[0].store["lora"], clients[1].store["lora"]
    assert any(not torch.equal(b0[k], b1[k]) for k in b0)  # personal Bs differ
    replies2 = {c.cid: alg.fit(nxt[c.cid], c) for c in clients[:2]}
    assert all(_factor(k) != "B" for r in replies2.values() for k in r.tensors if k.startswith(LORA_PREFIX))


def test_fedsa_lora_aggregate_is_n_weighted_over_a_only(tiny_cfg, tiny_backbone):
    alg, _ = _setup(FedSALoRA, tiny_cfg(method="fedsa-lora"), tiny_backbone)
    state = alg.init()
    b_before = {k: v.clone() for k, v in state["lora"].items() if _factor(k) == "B"}
    state = alg.aggregate(state, 1, _hand_replies(state["lora"], ("A",), [(2.0, 1), (6.0, 3)]))
    for k, v in state["lora"].items():
        if _factor(k) == "A":
            assert torch.equal(v, torch.full_like(v, 0.25 * 2.0 + 0.75 * 6.0)), k
        else:
            assert torch.equal(v, b_before[k])


# ------------------------------------------------------------------ FedProx
def _fit_one(cls, cfg, backbone, cid=0):
    alg, clients = _setup(cls, cfg, backbone)
    state = alg.init()
    ins = alg.configure(state, 1, list(range(len(alg.federation))))
    return alg, _lora(alg.fit(ins[cid], clients[cid]).tensors), state["lora"]


def test_fedprox_mu_zero_equals_fedit_exactly_and_mu_pulls_toward_global(tiny_cfg, tiny_backbone):
    _, fedit, glob = _fit_one(FedIT, tiny_cfg(local_epochs=2), tiny_backbone)
    _, prox0, _ = _fit_one(FedProx, tiny_cfg(method="fedprox", fedprox_mu=0.0, local_epochs=2), tiny_backbone)
    _, prox, _ = _fit_one(FedProx, tiny_cfg(method="fedprox", fedprox_mu=50.0, local_epochs=2), tiny_backbone)
    assert fedit.keys() == prox0.keys() == prox.keys()
    assert all(torch.equal(fedit[k], prox0[k]) for k in fedit)
    assert any(not torch.equal(fedit[k], prox[k]) for k in fedit)

    def dist(up):
        return sum(float(((up[k] - glob[k]) ** 2).sum()) for k in up) ** 0.5

    assert 0 < dist(prox) < 0.8 * dist(fedit)


def test_fedprox_term_is_half_mu_squared_distance_to_the_snapshot(tiny_cfg, tiny_backbone):
    alg, _ = _setup(FedProx, tiny_cfg(method="fedprox", fedprox_mu=0.3), tiny_backbone)
    params = lora_parameters(alg.runtime.sites)
    term = alg.local_extra_loss(params)  # snapshot of θ_global taken here
    assert float(term()) == 0.0
    with torch.no_grad():
        deltas = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
        for p, d in zip(params, deltas):
            p.add_(d)
    for p in params:
        p.requires_grad_(True)
    value = term()
    expected = 0.5 * 0.3 * sum(float((d ** 2).sum()) for d in deltas)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    for p, d in zip(params, deltas):
        assert torch.allclose(p.grad, 0.3 * d, atol=1e-6)  # gradient mu·(θ − θ_global)
        p.requires_grad_(False)
        p.grad = None


# ------------------------------------------------------------------ FedDPA
def test_feddpa_forward_is_the_lambda_mixture(tiny_cfg, tiny_backbone):
    lam = 0.3
    alg, _ = _setup(FedDPA, tiny_cfg(method="feddpa", feddpa_lambda=lam), tiny_backbone)
    sites = alg.runtime.sites
    gen = torch.Generator().manual_seed(5)
    states = {}
    for name in (GLOBAL, LOCAL):
        states[name] = {k: torch.randn(v.shape, generator=gen) for k, v in get_lora_state(sites, adapter=name).items()}
        set_lora_state(sites, states[name], adapter=name)
    site = sites[0]
    s = alg.cfg.lora_alpha / alg.cfg.rank
    x = torch.randn(3, HIDDEN, generator=gen)
    key = f"layer.{site.layer}.{site.module}."

    def delta(name):
        return x @ states[name][key + "A"].T @ states[name][key + "B"].T

    alg.runtime.model.eval()
    with torch.no_grad():
        base = site.lora.base_layer(x)
        alg.use("mixture")
        mixed = site.lora(x)
        alg.use("global")
        alone = site.lora(x)
    assert torch.allclose(mixed, base + lam * s * delta(GLOBAL) + (1 - lam) * s * delta(LOCAL), atol=1e-5)
    assert torch.allclose(alone, base + s * delta(GLOBAL), atol=1e-5)
    assert not torch.allclose(mixed, alone, atol=1e-3)


def test_feddpa_trains_global_then_local_and_sends_only_global(tiny_cfg, tiny_backbone):
    cfg = tiny_cfg(method="feddpa", head_policy="frozen")
    alg, clients = _setup(FedDPA, cfg, tiny_backbone)
    state = alg.init()
    ins = alg.configure(state, 1, list(range(len(alg.federation))))
    sites = alg.runtime.sites
    replies = {c.cid: alg.fit(ins[c.cid], c) for c in clients}
    local_init = alg.local_init()
    for c in clients:
        up = _lora(replies[c.cid].tensors)
        assert set(up) == set(state["lora"]) and len(replies[c.cid].tensors) == len(up)  # global LoRA only
        local = c.store["local_lora"]
        assert any(not torch.equal(local[k], local_init[k]) for k in local)  # the local LoRA trained
        for v in local.values():  # and is in no payload
            assert not any(t.shape == v.shape and torch.equal(t, v) for t in replies[c.cid].tensors.values())
    # Phase 1 is FedIT's local step on the global LoRA alone; phase 2 leaves the global LoRA frozen.
    fedit, fclients = _setup(FedIT, tiny_cfg(head_policy="frozen"), tiny_backbone)
    fins = fedit.configure(fedit.init(), 1, list(range(len(fedit.federation))))
    for cid in (0, 2):
        ref = _lora(fedit.fit(fins[cid], fclients[cid]).tensors)
        assert all(torch.equal(ref[k], _lora(replies[cid].tensors)[k]) for k in ref)
    state = alg.aggregate(state, 1, replies)
    expected = weighted_mean([_lora(r.tensors) for r in replies.values()],
                             [r.config["num_examples"] for r in replies.values()])
    assert all(torch.equal(state["lora"][k], v) for k, v in expected.items())
    # Evaluation: the aggregated global plus the client's own local LoRA, mixed with λ.
    nxt = alg.configure(state, 2, list(range(len(alg.federation))))
    c = clients[1]
    alg.load_for_eval(nxt[c.cid], c)
    assert all(torch.equal(v, expected[k]) for k, v in get_lora_state(sites, adapter=GLOBAL).items())
    assert all(torch.equal(v, c.store["local_lora"][k]) for k, v in get_lora_state(sites, adapter=LOCAL).items())
    s = cfg.lora_alpha / cfg.rank
    assert sites[0].lora.active_adapters == [GLOBAL, LOCAL]
    assert sites[0].lora.scaling[GLOBAL] == pytest.approx(0.5 * s) == sites[0].lora.scaling[LOCAL]


def test_feddpa_aggregate_is_n_weighted(tiny_cfg, tiny_backbone):
    alg, _ = _setup(FedDPA, tiny_cfg(method="feddpa"), tiny_backbone)
    state = alg.init()
    state = alg.aggregate(state, 1, _hand_replies(state["lora"], ("A", "B"), [(1.0, 3), (5.0, 1)]))
    assert all(torch.equal(v, torch.full_like(v, 0.75 * 1.0 + 0.25 * 5.0)) for v in state["lora"].values())


def _feddpa_with_random_adapters(tiny_cfg, tiny_backbone, **kw):
    alg, clients = _setup(FedDPA, tiny_cfg(method="feddpa", feddpa_weighting="instance", **kw), tiny_backbone)
    state = alg.init()
    ins = alg.configure(state, 1, list(range(len(alg.federation))))
    c = clients[0]
    alg.load_for_eval(ins[c.cid], c)
    gen = torch.Generator().manual_seed(11)
    for name in (GLOBAL, LOCAL):
        rand = {k: torch.randn(v.shape, generator=gen) for k, v in get_lora_state(alg.runtime.sites, adapter=name).items()}
        set_lora_state(alg.runtime.sites, rand, adapter=name)
        if name == LOCAL:
            c.store["local_lora"] = rand
    state["lora"] = get_lora_state(alg.runtime.sites, adapter=GLOBAL)
    return alg, c, alg.configure(state, 1, list(range(len(alg.federation))))[c.cid]


def test_feddpa_instance_weights_are_scaled_mean_cosines(tiny_cfg, tiny_backbone):
    alg, c, ins = _feddpa_with_random_adapters(tiny_cfg, tiny_backbone, feddpa_max_weight=0.5)
    alg.load_for_eval(ins, c)
    w = alg.instance_weights(c, 1)
    assert w.shape == (len(c.test),) and (w >= 0).all() and (w <= 0.5).all()
    assert len(set(w.round(6).tolist())) > 1  # per instance, not one number
    assert (alg.instance_weights(c, 1) == w).all()  # seeded by (seed, client, round)
    # the definition, by hand, for test instance 0: 0.5 × mean cosine to its K drawn references
    import numpy as np
    from fedpeft.seeding import derive_seed
    rng = np.random.default_rng(derive_seed(alg.cfg.seed, "feddpa-instances", c.cid, 1))
    refs = rng.choice(len(c.train), size=alg.cfg.feddpa_instances, replace=False)
    for site in alg.runtime.sites:
        site.lora.set_adapter([LOCAL])
        site.lora.scaling[LOCAL] = alg.runtime.extra["scale"][id(site.lora)]
    with torch.no_grad():
        e_test = alg._embed(c.test, np.array([0]))
        e_ref = alg._embed(c.train, refs)
    expect = (0.5 * torch.nn.functional.cosine_similarity(e_test, e_ref).mean()).clamp(0, 1).item()
    assert w[0] == pytest.approx(expect, abs=1e-5)


def test_feddpa_per_instance_scaling_equals_one_instance_at_a_time(tiny_cfg, tiny_backbone):
    import numpy as np
    from fedpeft.data.batching import collate

    alg, c, ins = _feddpa_with_random_adapters(tiny_cfg, tiny_backbone)
    alg.load_for_eval(ins, c)
    weights = np.linspace(0.0, 1.0, len(c.test)).astype(np.float32)
    preds, _ = alg._predict_weighted(c, weights)
    model = alg.runtime.model
    expected = []
    for i in range(len(c.test)):
        for site in alg.runtime.sites:
            s = alg.runtime.extra["scale"][id(site.lora)]
            site.lora.scaling[GLOBAL] = (1 - float(weights[i])) * s
            site.lora.scaling[LOCAL] = float(weights[i]) * s
        batch = collate(c.test, [i])
        batch.pop("labels")
        with torch.no_grad():
            expected.append(int(model(**batch).argmax(-1)))
    assert preds.tolist() == expected
    # weight 0 everywhere is the global LoRA alone
    zero, _ = alg._predict_weighted(c, np.zeros(len(c.test), np.float32))
    alg.use("global")
    from fedpeft.training import predict
    alone, _ = predict(model, c.test, batch_size=32)
    assert zero.tolist() == alone.tolist()


def test_feddpa_instance_weighting_runs_end_to_end(tiny_cfg, tiny_backbone):
    res = run(tiny_cfg(method="feddpa", feddpa_weighting="instance", global_rounds=1), backbone=tiny_backbone)
    last = [r for r in res.history.records if r["round"] == 1]
    assert all(0.0 <= r["feddpa_local_weight"] <= 0.5 for r in last)


# ------------------------------------------------------------------ IFCA + LoRA
def test_ifca_init_is_per_cluster_seeded_with_nonzero_b(tiny_cfg, tiny_backbone):
    alg, _ = _setup(IFCA, tiny_cfg(method="ifca", ifca_clusters=3), tiny_backbone)
    s1, s2 = alg.init(), alg.init()
    assert len(s1["clusters"]) == 3
    for a, b in zip(s1["clusters"], s2["clusters"]):
        assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic from (seed, k)
    c0, c1 = s1["clusters"][0], s1["clusters"][1]
    assert all(not torch.equal(c0[k], c1[k]) for k in c0)
    bs = torch.cat([v.flatten() for k, v in c0.items() if _factor(k) == "B"])
    assert 0.5e-3 < float(bs.std()) < 2e-3
    ins = alg.configure(s1, 1, list(range(len(alg.federation))))
    assert all(set(ins[0].tensors) >= set(cluster_prefix(k) + key for key in c0) for k in range(3))


def test_ifca_client_picks_the_lowest_loss_cluster_ties_to_lower_k(tiny_cfg, tiny_backbone):
    alg, clients = _setup(IFCA, tiny_cfg(method="ifca", ifca_clusters=3), tiny_backbone)
    state = alg.init()
    c = clients[0]
    gen = torch.Generator().manual_seed(11)
    cands = [{k: torch.randn(v.shape, generator=gen) for k, v in state["clusters"][0].items()} for _ in range(3)]
    state["clusters"] = cands
    ins = alg.configure(state, 1, list(range(len(alg.federation))))[c.cid]
    alg.heads.load(ins, c)
    losses = alg.cluster_losses(ins, c)
    order = sorted(range(3), key=lambda i: losses[i])
    assert losses[order[0]] < losses[order[1]]  # distinguishable candidates
    best, worst = cands[order[0]], cands[order[2]]
    # Best at k = 1 (so "always 0" fails) and an exact copy at k = 2 (so "last minimum" fails).
    state["clusters"] = [worst, best, {k: v.clone() for k, v in best.items()}]
    ins = alg.configure(state, 1, list(range(len(alg.federation))))[c.cid]
    got = alg.cluster_losses(ins, c)
    assert got[1] == got[2] < got[0]
    reply = alg.fit(ins, c)
    assert reply.config["cluster"] == 1
    assert c.store["cluster_losses"] == got  # chosen with the eval-mode losses of every cluster
    # The upload is the chosen cluster trained: it started from `best`.
    alg2, clients2 = _setup(IFCA, tiny_cfg(method="ifca", ifca_clusters=3), tiny_backbone)
    state["clusters"] = [best, worst, worst]
    assert alg2.fit(alg2.configure(state, 1, list(range(len(alg2.federation))))[0], clients2[0]).config["cluster"] == 0
    assert any(not torch.equal(_lora(reply.tensors)[k], best[k]) for k in best)


def test_ifca_aggregates_each_cluster_over_its_choosers_only(tiny_cfg, tiny_backbone, caplog):
    alg, _ = _setup(IFCA, tiny_cfg(method="ifca", ifca_clusters=3), tiny_backbone)
    state = alg.init()
    before = [{k: v.clone() for k, v in cl.items()} for cl in state["clusters"]]
    ups = _hand_replies(state["clusters"][0], ("A", "B"), [(1.0, 10), (3.0, 30), (7.0, 5), (100.0, 5)])
    for cid, k in {0: 1, 1: 1, 2: 0, 3: 5}.items():
        ups[cid].config["cluster"] = k
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        logging.getLogger("fedpeft").propagate = True
        state = alg.aggregate(state, 1, ups)
    assert "client 3" in caplog.text and "cluster" in caplog.text  # index out of range: rejected
    assert all(torch.equal(v, torch.full_like(v, 7.0)) for v in state["clusters"][0].values())
    assert all(torch.equal(v, torch.full_like(v, 0.25 * 1.0 + 0.75 * 3.0)) for v in state["clusters"][1].values())
    assert all(torch.equal(state["clusters"][2][k], v) for k, v in before[2].items())  # unchosen: unchanged
    assert state["assign"] == {0: 1, 1: 1, 2: 0}
    assert alg.round_info(state, 1) == {"ifca_choice": {"0": 1, "1": 1, "2": 0}}  # recorded in the history


def test_ifca_shared_heads_are_grouped_by_chosen_cluster(tiny_cfg, tiny_backbone):
    alg, clients = _setup(IFCA, tiny_cfg(method="ifca", ifca_clusters=2, head_policy="shared"), tiny_backbone)
    state = alg.init()
    ups = _hand_replies(state["clusters"][0], ("A", "B"), [(1.0, 10), (2.0, 10)])
    head_shape = {k: v for k, v in state["head_init"][2].items()}
    for cid, (k, value) in {0: (0, 1.0), 1: (1, 5.0)}.items():  # both 2-label clients, different clusters
        ups[cid].config["cluster"] = k
        ups[cid].tensors.update({"head." + n: torch.full_like(v, value) for n, v in head_shape.items()})
    state = alg.aggregate(state, 1, ups)
    nxt = alg.configure(state, 2, list(range(len(alg.federation))))
    w0, w1 = nxt[0].tensors["head.out_proj.weight"], nxt[1].tensors["head.out_proj.weight"]
    assert torch.equal(w0, torch.full_like(w0, 1.0)) and torch.equal(w1, torch.full_like(w1, 5.0))


# ------------------------------------------------------------------ resume keeps client-side state
@pytest.mark.parametrize("method", ["fedsa-lora", "feddpa", "ifca"])
def test_resume_equals_uninterrupted_with_client_state(method, tiny_cfg, tiny_backbone, tmp_path):
    def cfg(name, **kw):
        return tiny_cfg(method=method, global_rounds=2, ifca_clusters=2, tasks=["demo-sentiment", "demo-topic"],
                        output_dir=str(tmp_path / name), **kw)

    full = run(cfg("a"), backbone=tiny_backbone)
    run(cfg("b"), backbone=tiny_backbone, stop_after=1)
    resumed = run(cfg("b", resume=str(tmp_path / "b")), backbone=tiny_backbone)

    def metrics(res):
        return [(r["round"], r["client"], r.get("accuracy"), r.get("loss")) for r in
                sorted(res.history.records, key=lambda r: (r["round"], r["client"]))]

    assert metrics(full) == metrics(resumed)
