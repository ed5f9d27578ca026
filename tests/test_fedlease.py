"""FedLEASE as an algorithm on the tiny random BERT (docs/methods/fedlease.md): Phase-2 training and the
head policy, the warmup (one upload, one AdamW run), expert and router initialisation, aggregation within
the cluster, communication, the single-shared-expert and per-client ablations, a tiny end-to-end run, late
join, failures and resume. The mixture layer (test_moe_lora.py) and the clustering (test_clustering.py)
have their own files.

Server-side tests (initialisation, aggregation) drive `configure` / `aggregate` directly with hand-made
replies; client-side tests use real `fit` calls; run-level tests use `fedpeft.run.run`.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedpeft.algorithms.registry import get_algorithm
from fedpeft.algorithms.base import Message
from fedpeft.algorithms.heads import HEAD_PREFIX
from fedpeft.algorithms.tensors import unprefixed, weighted_mean
from fedpeft.algorithms.fedit import LORA_PREFIX
from fedpeft.algorithms.fedlease import clustering
from fedpeft.algorithms.fedlease.algorithm import MOE_PREFIX, FedLEASE
from fedpeft.algorithms.fedlease.single_expert import SingleSharedExpert
from fedpeft.data.batching import num_batches, train_batches
from fedpeft.run.assemble import build_algorithm
from fedpeft.run.federation import prepare_clients
from fedpeft.models.adapters import get_lora_state, lora_key, lora_parameters
from fedpeft.models.moe.layer import moe_layers
from fedpeft.models.moe.state import moe_key, parse_moe_key
from fedpeft.records.checkpoint import load_checkpoint
from fedpeft.run import run
from fedpeft.seeding import derive_seed
from fedpeft.training import train_local

from fedlease_comm import closed_form_bytes, head_param_count, lora_module_dims, param_counts

TASKS4 = ["demo-sentiment", "demo-sentiment", "demo-topic", "demo-topic"]
TASKS3 = ["demo-sentiment", "demo-sentiment", "demo-topic"]
HIDDEN = 16  # tiny_models.tiny_bert: hidden 16, 2 layers, query/value targets
MODULES = [(layer, module) for layer in range(2) for module in ("query", "value")]


# ---------------------------------------------------------------------------------------------- helpers
def _setup(cfg, backbone):
    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    alg = build_algorithm(cfg, backbone, infos)
    return alg, clients


def _play(alg, clients, state, rnd):
    """One round by hand: configure, fit every client in `clients`, aggregate."""
    ins = alg.configure(state, rnd, list(range(len(alg.federation))))
    replies = {c.cid: alg.fit(ins[c.cid], c) for c in clients}
    state = alg.aggregate(state, rnd, replies)
    return ins, replies, state


def _expert(state, j):
    return {k: v for k, v in state["experts"].items() if parse_moe_key(k)[2] == j}


def _assert_same(a, b, path="state"):
    """Recursive exact equality of nested dicts / lists / tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _warm_upload(state, a, b, n):
    """A warmup upload with A_i = a·1 and B_i = b·1 in every module (keys built by `lora_key`)."""
    tensors = {}
    for layer, module in MODULES:
        for factor, value in (("A", a), ("B", b)):
            key = lora_key(layer, module, factor)
            tensors[LORA_PREFIX + key] = torch.full_like(state["lora"][key], value)
    return Message(tensors, {"num_examples": n, "uploaded_warmup": True})


def _p2_reply(state, j, n, value=None, seed=0, router=True):
    """A Phase-2 reply of a client of cluster j: expert j (+ router j), constant `value` or random."""
    gen = torch.Generator().manual_seed(seed)
    src = dict(_expert(state, j))
    if router:
        src.update(state["routers"][j])
    tensors = {MOE_PREFIX + k: (torch.full_like(v, value) if value is not None else torch.randn(v.shape, generator=gen))
               for k, v in src.items()}
    return Message(tensors, {"num_examples": n, "own_expert": j})


def _records(result, keys=("accuracy", "f1", "loss", "train_loss", "bytes_up", "bytes_down")):
    return [(r["round"], r["phase"], r["client"], *(r.get(k) for k in keys))
            for r in sorted(result.history.records, key=lambda r: (r["round"], r["client"]))]


@pytest.fixture
def force_clusters(monkeypatch):
    """Replace the clustering by fixed canonical labels (the clustering has its own tests)."""

    def apply(labels):
        def fake(distance, **kwargs):
            d = np.asarray(distance)
            assert d.shape == (len(labels), len(labels)), "forced labels do not match the uploads"
            return clustering.ClusteringResult(list(labels), max(labels) + 1, {}, "forced", [], d)

        monkeypatch.setattr(clustering, "cluster_clients", fake)

    return apply


@pytest.fixture
def no_plots(monkeypatch):
    """Skip matplotlib in runs whose plots are not under test (they dominate a tiny run's time)."""
    from fedpeft.algorithms.fedlease import plots
    from fedpeft.records import plots as run_plots

    for name in ("plot_dendrogram", "plot_mds", "plot_distance_heatmap", "plot_silhouette", "plot_expert_usage"):
        monkeypatch.setattr(plots, name, lambda *a, **k: None)
    monkeypatch.setattr(run_plots, "plot_learning_curves", lambda *a, **k: None)


@pytest.fixture
def transition(tiny_cfg, tiny_backbone, force_clusters):
    """A server right after the transition (W = 1), 4 clients in clusters {0, 1} and {2, 3}, from
    constant hand-made warmup uploads with sizes n = (1, 2, 3, 6)."""

    def make(**overrides):
        cfg = tiny_cfg(method="fedlease", tasks=TASKS4, warmup_rounds=1, global_rounds=3, **overrides)
        alg, clients = _setup(cfg, tiny_backbone)
        force_clusters([0, 0, 1, 1])
        state = alg.init()
        ups = {0: _warm_upload(state, 1.0, -1.0, 1), 1: _warm_upload(state, 5.0, 3.0, 2),
               2: _warm_upload(state, 2.0, 4.0, 3), 3: _warm_upload(state, 8.0, 0.5, 6)}
        state = alg.aggregate(state, 1, ups)
        return alg, clients, state

    return make


# ---------------------------------------------------------------------------------------------- Phase-2 training
def _after_warmup(tiny_cfg, tiny_backbone, force_clusters, **overrides):
    """Four clients (TASKS4) forced into clusters [0, 0, 1, 1], one warmup round played: (alg, clients, state)."""
    cfg = tiny_cfg(method="fedlease", tasks=TASKS4, warmup_rounds=1, **{"global_rounds": 2, **overrides})
    alg, clients = _setup(cfg, tiny_backbone)
    force_clusters([0, 0, 1, 1])
    _, _, state = _play(alg, clients, alg.init(), 1)
    return alg, clients, state


@pytest.mark.parametrize("path", ["varlen", "padded"])
def test_phase2_mixture_keeps_the_encoder_paths_dropout(path, tiny_cfg, tiny_backbone, force_clusters):
    """The mixture layers made at the transition get the dropout of the run's encoder path: the varlen
    path's FastDropout everywhere (no plain nn.Dropout left to draw torch's slow masks), the padded
    path's nn.Dropout (the reference) untouched."""
    from torch import nn

    from fedpeft.models.varlen import FastDropout

    alg, clients, state = _after_warmup(tiny_cfg, tiny_backbone, force_clusters, encoder_path=path)
    ins = alg.configure(state, 2, list(range(len(alg.federation))))
    alg.fit(ins[0], clients[0])
    encoder = alg.runtime.model.encoder
    moe_dropouts = [m.lora_dropout for _, m in moe_layers(encoder)]
    assert moe_dropouts and all(isinstance(d, nn.Dropout) for d in moe_dropouts)
    kinds = {type(m) for m in encoder.modules() if isinstance(m, nn.Dropout)}
    assert kinds == ({FastDropout} if path == "varlen" else {nn.Dropout})


@pytest.mark.parametrize("policy", ["local", "shared", "frozen"])
def test_item10_phase2_fit_trains_only_own_expert_routers_and_head(policy, tiny_cfg, tiny_backbone, force_clusters):
    """Phase 2 trains only the client's own expert, its router and (unless frozen) its head: those get a
    gradient and change; the other experts and the backbone get no gradient, and nothing else changes."""
    alg, clients, state = _after_warmup(tiny_cfg, tiny_backbone, force_clusters, head_policy=policy)
    ins = alg.configure(state, 2, list(range(len(alg.federation))))
    model = alg.runtime.model
    for c in clients:  # in engine order: client 2's fit follows client 1's, which trained expert 0
        j = ins[c.cid].config["own_expert"]
        assert j == (0 if c.cid < 2 else 1)
        alg.load_for_eval(ins[c.cid], c)  # the exact state fit starts from
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        layers = moe_layers(model.encoder)
        assert len(layers) == len(MODULES)
        own = {id(p) for _, m in layers for p in (m.lora_A[j], m.lora_B[j])}
        routers = {id(m.router.weight) for _, m in layers}
        head = {id(p) for p in model.head_parameters()}
        # The loaded experts are the broadcast ones.
        for _, m in layers:
            for e in range(2):
                sent = ins[c.cid].tensors[MOE_PREFIX + moe_key(m.layer_index, m.module_name, e, "A")]
                assert torch.equal(m.lora_A[e], sent)
        alg.fit(ins[c.cid], c)
        trained = own | routers | (head if policy != "frozen" else set())
        for name, p in model.named_parameters():
            if id(p) in trained:
                assert p.grad is not None, f"client {c.cid}: {name} got no gradient"
                assert not torch.equal(p, before[name]), f"client {c.cid}: {name} was not trained"
            else:
                # Another task's head (another shape) is not part of this client's model: in the one
                # shared in-process model it may hold a stale gradient of its own clients' fit.
                if not name.startswith("heads.") or id(p) in head:
                    assert p.grad is None, f"client {c.cid}: {name} has a gradient"
                assert torch.equal(p, before[name]), f"client {c.cid}: {name} changed"
        if policy == "frozen":  # a frozen head is still the common initialisation
            for k, v in state["head_init"][c.info.num_labels].items():
                assert torch.equal(c.store["head"][k], v)


# ---------------------------------------------------------------------------------------------- classification head policy
@pytest.mark.parametrize("policy", ["local", "frozen"])
def test_item11_local_and_frozen_heads_never_travel(policy, tiny_cfg, tiny_backbone, force_clusters):
    """Under `local` and `frozen` the head never travels except the common initialisation, once, in round 1;
    a frozen head stays at that initialisation, a local one is trained."""
    cfg = tiny_cfg(method="fedlease", tasks=TASKS4, warmup_rounds=2, global_rounds=4, head_policy=policy)
    alg, clients = _setup(cfg, tiny_backbone)
    force_clusters([0, 0, 1, 1])
    state = alg.init()
    for rnd in range(1, 5):
        ins, replies, state = _play(alg, clients, state, rnd)
        for cid, reply in replies.items():
            assert not any(k.startswith(HEAD_PREFIX) for k in reply.tensors), (rnd, cid)
        for cid, msg in ins.items():
            heads = [k for k in msg.tensors if k.startswith(HEAD_PREFIX)]
            assert bool(heads) == (rnd == 1), (rnd, cid)  # only the common init, until the first reply
    assert not state["heads"]
    for c in clients:
        init = state["head_init"][c.info.num_labels]
        same = [torch.equal(c.store["head"][k], v) for k, v in init.items()]
        assert all(same) if policy == "frozen" else not all(same)


def test_item11_shared_head_is_averaged_within_the_cluster_over_equal_shapes(tiny_cfg, tiny_backbone,
                                                                            force_clusters):
    """Under `shared` a client's next head is the n_i-weighted mean over its (cluster, head shape) group
    only: heads of other clusters or other label counts never mix, and a client alone in its group gets
    its own head back."""
    # Cluster 0 = {0, 1 (2 labels), 2 (4 labels)}, cluster 1 = {3 (4 labels)}: client 2 shares a cluster
    # with 0 and 1 but not their head shape, and shares its shape with 3 but not its cluster.
    cfg = tiny_cfg(method="fedlease", tasks=TASKS4, warmup_rounds=1, global_rounds=3, head_policy="shared")
    alg, clients = _setup(cfg, tiny_backbone)
    force_clusters([0, 0, 0, 1])
    state = alg.init()

    def head_of(msg):
        return unprefixed(HEAD_PREFIX, msg.tensors)

    def expect(replies, cids):
        return weighted_mean([head_of(replies[c]) for c in cids], [replies[c].config["num_examples"] for c in cids])

    for rnd in (1, 2):  # warmup upload (the Phase-2 starting heads), then a Phase-2 round
        _, replies, state = _play(alg, clients, state, rnd)
        assert all(head_of(r) for r in replies.values())  # under `shared` the head is uploaded
        nxt = alg.configure(state, rnd + 1, list(range(len(alg.federation))))
        _assert_same(head_of(nxt[0]), expect(replies, [0, 1]))
        _assert_same(head_of(nxt[1]), head_of(nxt[0]))
        _assert_same(head_of(nxt[2]), head_of(replies[2]))  # alone in its (cluster, shape) group
        _assert_same(head_of(nxt[3]), head_of(replies[3]))
        assert not torch.equal(head_of(nxt[2])["dense.weight"], head_of(nxt[3])["dense.weight"])
        assert not torch.equal(head_of(nxt[0])["dense.weight"], head_of(replies[0])["dense.weight"])


# ---------------------------------------------------------------------------------------------- warmup: one upload
def test_item12_warmup_exchanges_nothing_until_one_upload_at_round_w(tiny_cfg, tiny_backbone):
    """The warmup exchanges nothing until one upload at round W: round 1 carries the same common
    initialisation (A random, B = 0, the head) to everyone, rounds 2..W carry nothing, the server's state
    does not move, and each client uploads its whole warmup LoRA exactly once, at round W."""
    w = 3
    cfg = tiny_cfg(method="fedlease", tasks=TASKS4, warmup_rounds=w, global_rounds=w + 1)
    alg, clients = _setup(cfg, tiny_backbone)
    state = alg.init()
    init = copy.deepcopy(state)
    uploads = {c.cid: 0 for c in clients}
    for rnd in range(1, w + 1):
        ins = alg.configure(state, rnd, list(range(len(alg.federation))))
        assert all(m.config["phase"] == "warmup" for m in ins.values())
        if rnd == 1:  # the common initialisation: identical A, B and head tensors for everyone
            first = ins[0].tensors
            lora_keys = {LORA_PREFIX + lora_key(layer, module, f) for layer, module in MODULES for f in "AB"}
            assert lora_keys <= set(first)
            for c in clients:
                got = ins[c.cid].tensors
                for k in lora_keys:
                    assert torch.equal(got[k], first[k])
                assert set(got) - lora_keys == {HEAD_PREFIX + k for k in state["head_init"][c.info.num_labels]}
                for k, v in state["head_init"][c.info.num_labels].items():
                    assert torch.equal(got[HEAD_PREFIX + k], v)
            a = first[LORA_PREFIX + lora_key(0, "query", "A")]
            assert a.abs().sum() > 0 and all(first[k].abs().sum() == 0 for k in lora_keys if k.endswith(".B"))
        else:
            assert all(not m.tensors for m in ins.values()), f"round {rnd}: a warmup instruction carries tensors"
        assert all(m.config["upload"] == (rnd == w) for m in ins.values())
        replies = {c.cid: alg.fit(ins[c.cid], c) for c in clients}
        for cid, r in replies.items():
            if r.tensors:
                uploads[cid] += 1
        if rnd < w:
            assert all(not r.tensors and not r.config["uploaded_warmup"] for r in replies.values()), rnd
            state = alg.aggregate(state, rnd, replies)
            _assert_same({k: v for k, v in state.items() if k != "synced"},
                         {k: v for k, v in init.items() if k != "synced"})
        else:
            for c in clients:  # the upload is exactly the client's warmup LoRA, every module
                r = replies[c.cid]
                assert r.config["uploaded_warmup"] and r.config["num_examples"] == len(c.train)
                _assert_same(unprefixed(LORA_PREFIX, r.tensors), c.store["lora"])
                assert set(r.tensors) == lora_keys
            state = alg.aggregate(state, rnd, replies)
    assert uploads == {c.cid: 1 for c in clients}
    assert "experts" in state and sorted(state["cluster_of"]) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------- warmup: one AdamW run
def test_d3_warmup_epochs_are_one_adamw_run(tiny_cfg, tiny_backbone):
    """W = 2, E = 1 equals ONE AdamW run with one linear schedule over 2 epochs (an independent loop
    here), and differs from two fresh runs; the optimiser state is carried in the store, then freed."""
    # the head trained with the LoRA (head policy local): the reference loop below steps it too
    cfg = tiny_cfg(method="fedlease", tasks=TASKS4, warmup_rounds=2, global_rounds=3, local_epochs=1,
                   head_policy="local")
    alg, clients = _setup(cfg, tiny_backbone)
    rt, c = alg.runtime, clients[0]
    model, sites = rt.model, rt.sites
    state = alg.init()
    init = alg.configure(state, 1, list(range(len(alg.federation))))[0]
    nb = num_batches(len(c.train), cfg.batch_size)
    assert nb >= 2

    def load_init():
        alg._load_warmup(init, c)  # the common initialisation, into the one model
        c.store.clear()
        params = lora_parameters(sites) + model.head_parameters()
        for p in params:
            p.requires_grad_(True)
        return params

    # Reference: one optimiser, one schedule decaying linearly to 0 over W·E·nb steps.
    params = load_init()
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    total, step = 2 * nb, 0
    for rnd in (1, 2):
        seed = derive_seed(cfg.seed, "warmup", c.cid, rnd)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model.train()
        for batch in train_batches(c.train, cfg.batch_size, rng):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * max(0.0, 1 - step / total)
            labels = batch.pop("labels")
            loss = F.cross_entropy(model(**batch).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            step += 1
    model.eval()
    reference, reference_head = get_lora_state(sites), model.head_state()

    # Negative control: two fresh AdamW runs, each with its own schedule.
    params = load_init()
    for rnd in (1, 2):
        train_local(model, c.train, params, epochs=1, lr=cfg.lr, batch_size=cfg.batch_size,
                    seed=derive_seed(cfg.seed, "warmup", c.cid, rnd), weight_decay=cfg.weight_decay,
                    max_grad_norm=cfg.max_grad_norm)
    restarted = get_lora_state(sites)
    for p in params:
        p.requires_grad_(False)
    c.store.clear()

    # The algorithm.
    _, replies, state = _play(alg, [c], state, 1)
    assert c.store["warmup_step"] == nb
    opt_state = c.store["warmup_optimizer"]["state"]
    assert len(opt_state) == len(params) and all(int(s["step"]) == nb for s in opt_state.values())
    _, replies, state = _play(alg, [c], state, 2)
    assert c.store["warmup_step"] == 2 * nb
    assert "warmup_optimizer" not in c.store  # freed once warmup is over
    got = unprefixed(LORA_PREFIX, replies[0].tensors)
    for k in reference:
        assert torch.equal(got[k], reference[k]), k
    _assert_same(c.store["head"], reference_head)
    assert any(not torch.allclose(restarted[k], reference[k], rtol=0, atol=1e-5) for k in reference)


# ---------------------------------------------------------------------------------------------- expert and router initialisation
def test_item19_eq3_experts_are_data_size_weighted_cluster_means(transition):
    """Expert j starts as the n_i-weighted mean of its members' warmup LoRAs (Eq. 3) under exactly the
    structured keys; each cluster's routers come from (seed, j), so the members of a cluster start
    identical and the clusters differ."""
    alg, _, state = transition()
    assert state["num_experts"] == 2 and state["cluster_of"] == {0: 0, 1: 0, 2: 1, 3: 1}
    # n = (1, 2) in cluster 0, (3, 6) in cluster 1; every value below is exact in binary.
    want = {(0, "A"): (1 * 1.0 + 2 * 5.0) / 3, (0, "B"): (1 * -1.0 + 2 * 3.0) / 3,
            (1, "A"): (3 * 2.0 + 6 * 8.0) / 9, (1, "B"): (3 * 4.0 + 6 * 0.5) / 9}
    keys = {moe_key(layer, module, j, f) for layer, module in MODULES for j in range(2) for f in "AB"}
    assert set(state["experts"]) == keys  # every (layer, module, expert, factor), nothing else
    for key, t in state["experts"].items():
        layer, module, j, f = parse_moe_key(key)
        shape = state["lora"][lora_key(layer, module, f)].shape
        expected = torch.full(shape, want[(j, f)], dtype=torch.float64).to(torch.float32)
        assert t.dtype == torch.float32 and torch.equal(t, expected), key
    # One router per cluster per module, (2M-1) × d_in, from (seed, j): members start identical.
    for j in range(2):
        assert set(state["routers"][j]) == {moe_key(layer, module, None, "router") for layer, module in MODULES}
        assert all(t.shape == (3, HIDDEN) for t in state["routers"][j].values())
        _assert_same(state["routers"][j], alg._router_init({(layer, module): HIDDEN for layer, module in MODULES}, j, 2))
    assert not torch.equal(state["routers"][0][moe_key(0, "query", None, "router")],
                           state["routers"][1][moe_key(0, "query", None, "router")])


def test_item19_malformed_warmup_upload_is_rejected_not_half_used(tiny_cfg, tiny_backbone, force_clusters):
    """A warmup upload with a missing key is rejected whole (strict loading): that client is not clustered
    and no expert uses any of its tensors."""
    cfg = tiny_cfg(method="fedlease", tasks=TASKS4, warmup_rounds=1, global_rounds=2)
    alg, _ = _setup(cfg, tiny_backbone)
    force_clusters([0, 0, 1])  # three accepted uploads
    state = alg.init()
    bad = _warm_upload(state, 100.0, 100.0, 5)
    del bad.tensors[LORA_PREFIX + lora_key(1, "value", "B")]
    ups = {0: _warm_upload(state, 1.0, 1.0, 1), 1: _warm_upload(state, 3.0, 3.0, 1),
           2: _warm_upload(state, 7.0, 7.0, 1), 3: bad}
    state = alg.aggregate(state, 1, ups)
    assert 3 not in state["cluster_of"]
    assert all(torch.equal(t, torch.full_like(t, 7.0)) for t in _expert(state, 1).values())


# ---------------------------------------------------------------------------------------------- aggregation within the cluster
def test_item20_locality(transition):
    """Only cluster j's members change expert j and router j: an outsider's reply, or a member of another
    cluster claiming expert j, leaves them unchanged."""
    alg, _, state = transition()
    replies = {c: _p2_reply(state, state["cluster_of"][c], n=c + 1, seed=c) for c in range(4)}
    base = alg.aggregate(copy.deepcopy(state), 2, replies)
    r_key = moe_key(1, "value", None, "router")

    outsider = {**replies, 2: _p2_reply(state, 1, n=3, seed=99)}  # client 2 is not in C_0
    out = alg.aggregate(copy.deepcopy(state), 2, outsider)
    _assert_same(_expert(out, 0), _expert(base, 0))
    _assert_same(out["routers"][0], base["routers"][0])
    assert not torch.equal(out["routers"][1][r_key], base["routers"][1][r_key])
    assert all(not torch.equal(out["experts"][k], base["experts"][k]) for k in _expert(base, 1))

    # A client of C_1 that sends expert 0 (claiming own_expert = 0) does not enter expert 0 either.
    intruder = {**replies, 3: _p2_reply(state, 0, n=50, seed=7)}
    out = alg.aggregate(copy.deepcopy(state), 2, intruder)
    _assert_same(_expert(out, 0), _expert(base, 0))
    _assert_same(out["routers"][0], base["routers"][0])

    member = {**replies, 1: _p2_reply(state, 0, n=2, seed=99)}  # client 1 is in C_0
    mem = alg.aggregate(copy.deepcopy(state), 2, member)
    assert all(not torch.equal(mem["experts"][k], base["experts"][k]) for k in _expert(base, 0))
    assert all(not torch.equal(mem["routers"][0][k], base["routers"][0][k]) for k in base["routers"][0])
    _assert_same(_expert(mem, 1), _expert(base, 1))
    _assert_same(mem["routers"][1], base["routers"][1])


def test_item21_weights_are_exactly_the_data_sizes(transition):
    """The aggregation weights are exactly the data sizes n_i (0.25 · 4 + 0.75 · 8 = 7 exactly), and
    identical uploads aggregate to themselves whatever the weights."""
    alg, _, state = transition()
    # Members of C_0 with n = (1, 3): 0.25 · 4 + 0.75 · 8 = 7 exactly (experts and routers).
    replies = {0: _p2_reply(state, 0, n=1, value=4.0), 1: _p2_reply(state, 0, n=3, value=8.0)}
    out = alg.aggregate(copy.deepcopy(state), 2, replies)
    for t in [*_expert(out, 0).values(), *out["routers"][0].values()]:
        assert torch.equal(t, torch.full_like(t, 7.0))
    # Identical uploads aggregate to the same tensor, whatever the weights.
    same = _p2_reply(state, 1, n=1, seed=5)
    out = alg.aggregate(copy.deepcopy(state), 2, {2: same, 3: Message(same.tensors, {"num_examples": 7,
                                                                                      "own_expert": 1})})
    for k, v in unprefixed(MOE_PREFIX, same.tensors).items():
        got = out["routers"][1][k] if k.endswith(".router") else out["experts"][k]
        assert torch.equal(got, v), k


def test_item22_every_client_receives_bit_identical_experts(transition):
    """After aggregation every client receives all M experts, bit-identical to the server's and to every
    other client's, plus its own cluster's router."""
    alg, clients, state = transition()
    replies = {c: _p2_reply(state, state["cluster_of"][c], n=c + 1, seed=c) for c in range(4)}
    state = alg.aggregate(state, 2, replies)
    ins = alg.configure(state, 3, list(range(len(alg.federation))))
    expert_keys = {MOE_PREFIX + k for k in state["experts"]}
    for c in clients:
        msg = ins[c.cid]
        assert expert_keys <= set(msg.tensors)  # all M experts
        for k in expert_keys:
            assert torch.equal(msg.tensors[k], ins[0].tensors[k])
            assert torch.equal(msg.tensors[k], state["experts"][k[len(MOE_PREFIX):]])
        j = state["cluster_of"][c.cid]
        assert msg.config["own_expert"] == j and msg.config["num_experts"] == 2
        _assert_same(unprefixed(MOE_PREFIX, {k: v for k, v in msg.tensors.items() if k.endswith(".router")}),
                     state["routers"][j])


def test_item23_local_routers_never_travel_and_the_server_never_changes_them(tiny_cfg, tiny_backbone,
                                                                            force_clusters):
    """Under `router_aggregation = local` routers never travel and the server never changes them: each client
    generates its cluster's initial router from (seed, j) itself, then trains and keeps its own."""
    alg, clients, state = _after_warmup(tiny_cfg, tiny_backbone, force_clusters, global_rounds=3,
                                        router_aggregation="local")
    routers = copy.deepcopy(state["routers"])
    ins = alg.configure(state, 2, list(range(len(alg.federation))))
    for c in clients:  # the client generates its cluster's initial router itself, from (seed, j)
        alg.load_for_eval(ins[c.cid], c)
        _assert_same(c.store["router"], routers[state["cluster_of"][c.cid]])
    for rnd in (2, 3):
        ins, replies, state = _play(alg, clients, state, rnd)
        for m in [*ins.values(), *replies.values(), *alg.configure(state, rnd + 1, list(range(len(alg.federation)))).values()]:
            assert not any(k.endswith(".router") for k in m.tensors)
        _assert_same(state["routers"], routers)
    key = moe_key(0, "query", None, "router")
    assert not torch.equal(clients[0].store["router"][key], routers[0][key])  # trained locally
    assert not torch.equal(clients[0].store["router"][key], clients[1].store["router"][key])  # not averaged
    alg.load_for_eval(alg.configure(state, 4, list(range(len(alg.federation))))[0], clients[0])  # the next round starts from the kept router
    layer = next(m for _, m in moe_layers(alg.runtime.model.encoder) if (m.layer_index, m.module_name) == (0, "query"))
    assert torch.equal(layer.router.weight, clients[0].store["router"][key])


def test_item24_empty_cluster_keeps_expert_and_router(transition):
    """A cluster with no reply keeps its expert and router bit for bit; with no reply at all nothing changes."""
    alg, _, state = transition()
    before = copy.deepcopy(state)
    out = alg.aggregate(copy.deepcopy(state), 2, {0: _p2_reply(state, 0, n=1, seed=1),
                                                  1: _p2_reply(state, 0, n=1, seed=2)})
    _assert_same(_expert(out, 1), _expert(before, 1))
    _assert_same(out["routers"][1], before["routers"][1])
    assert all(not torch.equal(out["experts"][k], before["experts"][k]) for k in _expert(before, 0))
    # No reply at all: nothing changes.
    out = alg.aggregate(copy.deepcopy(state), 2, {})
    _assert_same(out["experts"], before["experts"])
    _assert_same(out["routers"], before["routers"])


# ---------------------------------------------------------------------------------------------- communication
def test_item25_roberta_large_closed_form_from_its_config_on_meta():
    """The communication closed form on RoBERTa-large's real shapes (built on the meta device, M = 4, r = 4):
    P_E = 393,216, P_R = 344,064, P_H = 1,051,650, and 2,949,120 B up and 7,667,712 B down per client per
    Phase-2 round."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    with torch.device("meta"):
        model = RobertaModel(config, add_pooling_layer=False)
    assert next(model.parameters()).device.type == "meta"
    dims = lora_module_dims(model, ["query", "value"])
    assert dims == [(1024, 1024)] * 48
    p = param_counts(dims, rank=4, num_experts=4)
    assert (p.expert, p.router) == (393_216, 344_064)
    assert head_param_count(1024, 2) == 1_051_650
    comm = closed_form_bytes(dims, rank=4, num_experts=4)  # float32, head local, router aggregated
    assert (comm.round_up, comm.round_down) == (2_949_120, 7_667_712)
    assert comm.transition_down == 7_667_712 and comm.warmup_up == 4 * 393_216 == 1_572_864  # FedIT's b·P_E
    assert closed_form_bytes(dims, rank=4, num_experts=4, router_aggregation="local").round_up == 1_572_864
    assert param_counts(dims, rank=4, num_experts=4, routing="fixed_topk").router == 48 * 4 * 1024


def _check_bytes(result, cfg, m, backbone):
    dims = lora_module_dims(backbone.model, backbone.default_targets())
    assert dims == [(HIDDEN, HIDDEN)] * 4
    w, last = cfg.warmup_rounds, cfg.global_rounds
    rounds = sorted({r["round"] for r in result.history.records})
    assert rounds == list(range(0, last + 1))
    for rec in result.history.records:
        labels = 4 if rec["task"] == "demo-topic" else 2
        comm = closed_form_bytes(dims, rank=cfg.rank, num_experts=m, routing=cfg.routing,
                                 router_aggregation=cfg.router_aggregation, head_policy=cfg.head_policy,
                                 head_params=head_param_count(HIDDEN, labels))
        rnd = rec["round"]
        if rnd == 0:
            want = (0, comm.init_down)
        elif rnd < w:
            want = (0, 0)
        elif rnd == w:
            want = (comm.warmup_up, comm.transition_down)
        else:
            want = (comm.round_up, comm.round_down)
        assert (rec["bytes_up"], rec["bytes_down"]) == want, (rnd, rec["client"])


@pytest.mark.parametrize("routing", ["adaptive_topM", "fixed_topk"])
@pytest.mark.parametrize("head", ["local", "shared"])
@pytest.mark.parametrize("rho", ["cluster", "local"])
def test_item25_counted_bytes_equal_the_closed_form(rho, head, routing, tiny_cfg, tiny_backbone, force_clusters,
                                                    no_plots):
    """The bytes counted on the real messages equal the closed form in every round (initialisation, warmup,
    transition, Phase 2) for aggregated and local routers, local and shared heads, adaptive and fixed
    routing."""
    cfg = tiny_cfg(method="fedlease", tasks=TASKS3, warmup_rounds=2, global_rounds=3, router_aggregation=rho,
                   head_policy=head, routing=routing, train_samples=16, test_samples=8)
    force_clusters([0, 0, 1])
    result = run(cfg, backbone=tiny_backbone)
    _check_bytes(result, cfg, 2, tiny_backbone)


# ---------------------------------------------------------------------------------------------- ablation: single shared expert
@pytest.mark.parametrize("multiplier", [1, 2])
def test_item28_single_shared_equals_fedit(multiplier, tiny_cfg, tiny_backbone, tmp_path, no_plots):
    """The single-shared-expert ablation is FedIT at rank r × multiplier: identical records round by round,
    no warmup, and b·P_E uploaded per round."""
    common = dict(tasks=TASKS4, global_rounds=2, warmup_rounds=1)
    lease = run(tiny_cfg(method="fedlease", experts="single_shared", single_rank_multiplier=multiplier, rank=2,
                         output_dir=str(tmp_path / "lease"), **common), backbone=tiny_backbone)
    fedit = run(tiny_cfg(method="fedit", rank=2 * multiplier, output_dir=str(tmp_path / "fedit"), **common),
                backbone=tiny_backbone)
    assert _records(lease) == _records(fedit)
    assert [r["phase"] for r in lease.history.rounds] == ["init", "train", "train"]  # no warmup
    p_e = 4 * 2 * (2 * multiplier) * HIDDEN
    assert all(r["bytes_up"] == 4 * p_e for r in lease.history.records if r["round"] >= 1)


def test_item28_single_shared_algorithm_shape(tiny_cfg):
    """`experts = single_shared` builds the single expert at rank r × multiplier; the default builds
    FedLEASE."""
    alg = get_algorithm(tiny_cfg(method="fedlease", experts="single_shared", single_rank_multiplier=4, rank=4))
    assert isinstance(alg, SingleSharedExpert) and alg.lora_rank() == 16
    assert isinstance(get_algorithm(tiny_cfg(method="fedlease")), FedLEASE)


# ---------------------------------------------------------------------------------------------- ablation: one expert per client
def test_item29_per_client_experts_equal_their_single_member(tiny_cfg, tiny_backbone):
    """With one expert per client (M = N, routers of 2N-1 slots, no warmup or clustering) each client trains
    its own expert, and after aggregation that expert and router equal its single member's upload."""
    cfg = tiny_cfg(method="fedlease", tasks=TASKS4, experts="per_client", global_rounds=2)
    alg, clients = _setup(cfg, tiny_backbone)
    state = alg.init()
    assert alg.warmup_rounds == 0 and alg.phase(1) == "train"
    assert state["num_experts"] == 4 and state["cluster_of"] == {0: 0, 1: 1, 2: 2, 3: 3}
    assert all(t.shape == (7, HIDDEN) for t in state["routers"][0].values())  # 2N-1 slots
    for rnd in (1, 2):
        ins, replies, state = _play(alg, clients, state, rnd)
        for c in clients:
            assert ins[c.cid].config["own_expert"] == c.cid
            up = unprefixed(MOE_PREFIX, replies[c.cid].tensors)
            assert {parse_moe_key(k)[2] for k in up} == {c.cid, None}
            for k, v in up.items():
                got = state["routers"][c.cid][k] if k.endswith(".router") else state["experts"][k]
                assert torch.equal(got, v), (rnd, c.cid, k)


# ---------------------------------------------------------------------------------------------- end to end, resume
def _e2e_cfg(out, **kw):
    from fedpeft.config import RunConfig

    base = dict(method="fedlease", tasks=TASKS4, train_samples=24, test_samples=16, warmup_rounds=2,
                global_rounds=4, local_epochs=1, batch_size=8, eval_batch_size=32, max_length=32, rank=2,
                lr=5e-3, quiet=True, device="cpu", precision="fp32", output_dir=str(out))
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def e2e(tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return run(_e2e_cfg(root / "a"), backbone=tiny_backbone), run(_e2e_cfg(root / "b"), backbone=tiny_backbone)


def test_router_logs_script_tabulates_the_last_rounds_logs(e2e, tmp_path, capsys):
    """benchmarks/router_logs.py (the router study's tables) reads a bench suite folder: per run the last
    round's router logs, means over the clients and modules as the history holds them; a folder without
    such runs is one error line and status 2."""
    import shutil

    from conftest import load_benchmark

    first, _ = e2e
    suite = tmp_path / "paper-cpu"
    shutil.copytree(first.run_dir, suite / "fedlease-seed7")
    bench = load_benchmark("router_logs")
    assert bench.main([str(suite), "--out", str(tmp_path / "router.md")]) == 0
    last = [r for r in first.history.records if r["round"] == 4]
    want = [f"{np.mean([r[k] for r in last]):.3f}" for k in bench.LOGS]
    m = json.loads((first.run_dir / "clustering.json").read_text())["num_clusters"]
    row = f"| fedlease | 7 | 4 | {m} | {100 * first.headline['overall']:.2f} | " + " | ".join(want) + " |"
    assert row in (tmp_path / "router.md").read_text()
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert bench.main([str(tmp_path / "router.md")]) == 2 and bench.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("fedpeft: error: ") for e in err)


def test_item31_tiny_end_to_end(e2e, tiny_backbone):
    """A tiny end-to-end run is deterministic (a second run gives identical records), scores every client
    every round, writes its clustering files, takes the last round as the headline and counts bytes as the
    closed form says."""
    first, second = e2e
    assert _records(first) == _records(second)  # same seed, same numbers
    recs = first.history.records
    for rnd in range(1, 5):
        got = sorted(r["client"] for r in recs if r["round"] == rnd)
        assert got == [0, 1, 2, 3], rnd
    for r in recs:
        if r["round"] >= 1:
            assert r["phase"] == ("warmup" if r["round"] <= 2 else "train")
            assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["loss"]) and r["train_loss"] is not None
        if r["round"] >= 3:
            assert 1.0 <= r["experts_per_token"] <= 2.0 + 1e-9
            # router logs, overall and per module (M = 1 when the clustering finds one cluster: all 1)
            for name in ("gamma_own", "own_only_share", "single_expert_share"):
                assert 0.0 <= r[name] <= 1.0, name
                assert all(0.0 <= r[k] <= 1.0 for k in r if k.startswith(name + "/")), name
            assert r["router_entropy"] >= 0.0
            assert len([k for k in r if k.startswith("gamma_own/")]) == len(
                [k for k in r if k.startswith("experts_per_token/")]) > 0
        elif r["round"] == 1:  # scored with its warmup LoRA: no router
            assert "gamma_own" not in r and "experts_per_token" not in r
    assert first.headline["round"] == 4
    run_dir = first.run_dir
    for name in ("lora_client_map_round_2.json", "clustering.json", "dendrogram.png", "mds.png",
                 "distance_heatmap.png", "summary.md", "metrics.csv"):
        assert (run_dir / name).is_file(), name
    cmap = json.loads((run_dir / "lora_client_map_round_2.json").read_text())
    m = cmap["num_experts"]
    assert sorted(cmap["client_to_expert"]) == ["0", "1", "2", "3"]
    assert set(cmap["client_to_expert"].values()) == set(range(m))
    assert json.loads((run_dir / "clustering.json").read_text())["num_clusters"] == m
    assert [e["round"] for e in first.history.events if e["kind"] == "clustering"] == [2]
    _check_bytes(first, first.config, m, tiny_backbone)


@pytest.mark.parametrize("stop", [1, 3])  # in the middle of warmup (AdamW state in the store) / of Phase 2
def test_resume_reaches_the_same_numbers(stop, e2e, tiny_backbone, tmp_path, no_plots):
    full, _ = e2e
    stopped = run(_e2e_cfg(tmp_path / "c"), backbone=tiny_backbone, stop_after=stop)
    assert max(r["round"] for r in stopped.history.rounds) == stop
    resumed = run(_e2e_cfg(tmp_path / "c", resume=str(tmp_path / "c")), backbone=tiny_backbone)
    assert _records(resumed) == _records(full)


# ---------------------------------------------------------------------------------------------- failures
def _spy_states(monkeypatch, replies_seen=None):
    """Record a copy of the server state after each round's aggregation (and the replies it got)."""
    states = {}
    original = FedLEASE.aggregate

    def spy(self, state, rnd, replies):
        if replies_seen is not None:
            replies_seen[rnd] = copy.deepcopy(replies)
        out = original(self, state, rnd, replies)
        states[rnd] = copy.deepcopy(out)
        return out

    monkeypatch.setattr(FedLEASE, "aggregate", spy)
    return states


def test_failed_phase2_client_leaves_its_singleton_expert_unchanged(tiny_cfg, tiny_backbone, force_clusters,
                                                                    monkeypatch, no_plots):
    cfg = tiny_cfg(method="fedlease", tasks=TASKS3, warmup_rounds=1, global_rounds=3)
    force_clusters([0, 0, 1])  # client 2 is the only member of cluster 1
    states = _spy_states(monkeypatch)
    result = run(cfg, backbone=tiny_backbone, fail={(2, 2): RuntimeError("x")})
    assert sorted(states) == [1, 2, 3]  # the round completed, and the next one ran
    _assert_same(_expert(states[2], 1), _expert(states[1], 1))
    _assert_same(states[2]["routers"][1], states[1]["routers"][1])
    assert all(not torch.equal(states[2]["experts"][k], states[1]["experts"][k]) for k in _expert(states[1], 0))
    assert all(not torch.equal(states[3]["experts"][k], states[2]["experts"][k]) for k in _expert(states[2], 1))
    assert [e["clients"] for e in result.history.events if e["kind"] == "missing_clients"] == [[2]]
    rec = {(r["round"], r["client"]): r for r in result.history.records}
    assert rec[(2, 2)]["participated"] is False and rec[(2, 2)]["bytes_up"] == 0 and "accuracy" in rec[(2, 2)]
    assert rec[(3, 2)]["participated"] is True and rec[(3, 2)]["bytes_up"] > 0


def test_client_failing_at_the_warmup_upload_joins_late(tiny_cfg, tiny_backbone, monkeypatch, no_plots):
    cfg = tiny_cfg(method="fedlease", tasks=TASKS4, warmup_rounds=2, global_rounds=4)
    replies = {}
    states = _spy_states(monkeypatch, replies)
    result = run(cfg, backbone=tiny_backbone, fail={(2, 3): RuntimeError("x")})
    events = result.history.events
    clustered = [e for e in events if e["kind"] == "clustering"]
    assert len(clustered) == 1 and sorted(clustered[0]["client_to_expert"]) == ["0", "1", "2"]
    late = [e for e in events if e["kind"] == "late_join"]
    assert [(e["round"], e["client"]) for e in late] == [(3, 3)]
    j = late[0]["expert"]
    assert 0 <= j < states[2]["num_experts"] and states[3]["cluster_of"][3] == j
    assert states[3]["num_experts"] == states[2]["num_experts"]  # a late join does not change M
    # j* = argmin_j of the mean Eq. 2 distance to C_j's members, from the B matrices the server kept.
    b = states[3]["warmup_b"]
    members = sorted(states[2]["cluster_of"])
    assert sorted(b) == [0, 1, 2, 3] and members == [0, 1, 2]
    d = clustering.b_distance_matrix([b[3]] + [b[c] for c in members])[0, 1:]
    means = {k: np.mean([d[i] for i, c in enumerate(members) if states[2]["cluster_of"][c] == k])
             for k in set(states[2]["cluster_of"].values())}
    assert j == min(means, key=lambda k: (means[k], k))
    assert len(set(means.values())) == len(means)  # no tie: the check above is decisive
    rec = {(r["round"], r["client"]): r for r in result.history.records}
    p_e = 4 * 2 * 2 * HIDDEN
    assert rec[(3, 3)]["bytes_up"] == 4 * p_e  # its warmup LoRA, A and B of every module
    assert sorted(replies[3]) == [0, 1, 2, 3] and "own_expert" not in replies[3][3].config  # upload only
    assert rec[(4, 3)]["participated"] and rec[(4, 3)]["train_loss"] is not None and "accuracy" in rec[(4, 3)]
    # Round 4: it trains expert j, and its upload enters expert j with the other members of C_j.
    assert replies[4][3].config["own_expert"] == j
    m = states[2]["num_experts"]
    dims = lora_module_dims(tiny_backbone.model, ["query", "value"])
    assert rec[(4, 3)]["bytes_up"] == closed_form_bytes(dims, rank=2, num_experts=m).round_up
    cluster = [c for c in range(4) if states[4]["cluster_of"][c] == j]
    assert 3 in cluster and len(cluster) >= 2
    mean = weighted_mean([unprefixed(MOE_PREFIX, replies[4][c].tensors) for c in cluster],
                         [replies[4][c].config["num_examples"] for c in cluster])
    for k, v in mean.items():
        got = states[4]["routers"][j][k] if k.endswith(".router") else states[4]["experts"][k]
        assert torch.equal(got, v), k
    # Its warmup optimiser state is freed like everyone else's once the warmup LoRA is uploaded.
    stores = load_checkpoint(result.run_dir)["client_stores"]
    assert all("warmup_optimizer" not in s for s in stores.values())


def test_task_oracle_clustering_groups_clients_by_task(tiny_cfg, tiny_backbone):
    """`--clustering task` (a diagnostic): one expert per task whatever the B matrices say."""
    import numpy as np

    from fedpeft.algorithms.fedlease.clustering import task_clusters
    from fedpeft.run import run

    res = task_clusters(["qnli", "sst2", "qnli", "cola", "sst2"], np.zeros((5, 5)))
    assert res.labels == [0, 1, 0, 2, 1] and res.num_clusters == 3 and res.clusters() == [[0, 2], [1, 4], [3]]
    tasks = ["demo-topic", "demo-sentiment", "demo-topic", "demo-sentiment"]
    out = run(tiny_cfg(method="fedlease", tasks=tasks, warmup_rounds=1, global_rounds=2, clustering="task"),
              backbone=tiny_backbone)
    event = next(e for e in out.history.events if e["kind"] == "clustering")
    assert event["num_experts"] == 2
    assert event["client_to_expert"] == {"0": 0, "1": 1, "2": 0, "3": 1}


@pytest.mark.parametrize("matrices, clusters, joins", [("b", 1, 0), ("delta_w", 2, 1)])
def test_clustering_matrices_choose_what_eq2_compares(matrices, clusters, joins, tiny_cfg, tiny_backbone):
    """--clustering-matrices: four warmup uploads whose B matrices all point the same way while the A of
    clients 2, 3 (and of the late client 4) has the opposite sign. On B (the paper's choice) all four are
    one cluster; on ΔW = B·A the pairs are opposite updates and separate, and the late client joins the
    pair its update matches."""
    cfg = tiny_cfg(method="fedlease", tasks=TASKS4 + ["demo-topic"], warmup_rounds=1, global_rounds=3,
                   clustering_matrices=matrices)
    alg, _ = _setup(cfg, tiny_backbone)
    state = alg.init()
    signs = [1.0, 1.0, -1.0, -1.0, -1.0]
    ups = {cid: _warm_upload(state, signs[cid] * (1.0 + cid), 2.0 + cid, 4) for cid in range(4)}
    state = alg.aggregate(state, 1, ups)
    assert state["num_experts"] == clusters
    assert [state["cluster_of"][c] for c in range(4)] == ([0, 0, 0, 0] if clusters == 1 else [0, 0, 1, 1])
    kept = {k[len(LORA_PREFIX):] for k in ups[0].tensors}  # the server keeps what Eq. 2 compared, for late joins
    assert set(state["warmup_b"][0]) == ({k for k in kept if k.endswith(".B")} if matrices == "b" else kept)
    state = alg.aggregate(state, 2, {4: _warm_upload(state, -3.0, 1.5, 4)})
    assert state["cluster_of"][4] == joins
