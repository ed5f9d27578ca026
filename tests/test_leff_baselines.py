"""The LEFF paper's baselines: Table 5 trainable counts from real configs (meta device, no download),
and what FedLoRA, SLoRA and FedBitFit train, send and average (docs/methods/baselines.md#leff-paper-baselines,
#fedlora-targets, #fedbitfit; LEFF's own counts: docs/methods/leff.md#trainable-set)."""

from __future__ import annotations


import pytest
import torch

from fedpeft.algorithms.leff.structure import (bitfit_trainable_names, count, fedavg_trainable_names,
                                               leff_trainable_names, lora_count)

DEBERTA_LORA = ["query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense", "pooler.dense"]
GPT2_LORA = ["c_attn", "attn.c_proj", "mlp.c_proj"]


def deberta_v3(hidden, layers, heads, inter):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    cfg = DebertaV2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=inter, vocab_size=128100, relative_attention=True, position_buckets=256,
                          norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                          position_biased_input=False, share_att_key=True, type_vocab_size=0, num_labels=2,
                          pooler_hidden_size=hidden)
    with torch.device("meta"):
        return DebertaV2ForSequenceClassification(cfg)


def gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(**kw))


def classifier(model):
    return [n for n, _ in model.named_parameters() if n.startswith("classifier.")]


# Table 5 of the paper (trainable parameters), with L_i = 1 for LEFF.
@pytest.mark.parametrize("build,leff,fedavg,fedlora,bitfit,lora_targets", [
    (lambda: deberta_v3(768, 12, 12, 3072), 7_681_538, 85_648_130, 1_340_930, 102_914, DEBERTA_LORA),
    (lambda: deberta_v3(1024, 24, 16, 4096), 13_649_922, 303_363_074, 3_557_378, 272_386, DEBERTA_LORA),
    (lambda: gpt2(), 7_089_408, 85_056_000, 811_008, 102_144, GPT2_LORA),
    (lambda: gpt2(n_embd=1280, n_layer=36, n_head=20), 19_680_000, 708_390_400, 4_055_040, 508_160, GPT2_LORA),
], ids=["deberta-v3-base", "deberta-v3-large", "gpt2", "gpt2-large"])
def test_table5_trainable_counts(build, leff, fedavg, fedlora, bitfit, lora_targets):
    model = build()
    assert count(model, leff_trainable_names(model, [0])) == leff
    assert count(model, fedavg_trainable_names(model)) == fedavg
    assert lora_count(model, lora_targets, 8) + count(model, classifier(model)) == fedlora
    assert count(model, bitfit_trainable_names(model)) == bitfit


def test_gpt2_medium_leff_count_and_frozen_parts():
    model = gpt2(n_embd=1024, n_layer=24, n_head=16)
    names = leff_trainable_names(model, [5])
    assert count(model, names) == 12_598_272
    assert not any("wte" in n or "wpe" in n or "lm_head" in n for n in names)  # embeddings and tied head frozen
    deb = deberta_v3(768, 12, 12, 3072)
    assert "deberta.encoder.rel_embeddings.weight" not in fedavg_trainable_names(deb)
    assert "deberta.encoder.LayerNorm.weight" in leff_trainable_names(deb, [0])


def test_llama_counts_from_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert count(model, leff_trainable_names(model, [0])) == 743_452_672
    assert lora_count(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 8) == 20_971_520


# ------------------------------------------------------------------------------------ runtime behaviour
@pytest.fixture(scope="module")
def bb3():
    from tiny_models import tiny_bert

    return tiny_bert(seed=1, layers=3)


@pytest.fixture
def make(tiny_cfg, bb3):
    def build(method, **kw):
        from fedpeft.run.assemble import build_algorithm
        from fedpeft.run.federation import prepare_clients

        cfg = tiny_cfg(method=method, tasks=["demo-sentiment"] * 2, partition="dirichlet_cut", alpha=1.0,
                       importance_examples=16, rank=4, global_rounds=4, **kw)
        infos, clients = prepare_clients(cfg, bb3.tokenizer)
        alg = build_algorithm(cfg, bb3, infos)
        return alg, clients

    return build


def one_round(alg, clients, rnd, state):
    msgs = alg.configure(state, rnd, list(range(len(alg.federation))))
    before = {n: p.detach().clone() for n, p in alg.runtime.model.named_parameters()}
    replies = {c.cid: alg.fit(msgs[c.cid], c) for c in clients}
    return msgs, replies, before


def test_fedbitfit_trains_and_sends_biases_and_classifier_only(make):
    alg, clients = make("fedbitfit")
    state = alg.init()
    msgs = alg.configure(state, 1, list(range(len(alg.federation))))
    alg.load_for_eval(msgs[0], clients[0])
    frozen = {n: p.detach().clone() for n, p in alg.runtime.model.named_parameters()}
    reply = alg.fit(msgs[0], clients[0])
    changed = {n for n, p in alg.runtime.model.named_parameters() if not torch.equal(p, frozen[n])}
    assert changed and all(n.endswith(".bias") and ".layer." in n or ".out_proj." in n for n in changed)
    assert not any(".dense." in n and n.startswith("heads.") for n in changed)  # the pooler stays frozen
    biases = [n for n in frozen if n.startswith("encoder.encoder.layer.") and n.endswith(".bias")]
    assert set(reply.tensors) == {"bias." + n[len("encoder."):] for n in biases} | {"head.out_proj.weight", "head.out_proj.bias"}
    r2 = alg.fit(msgs[1], clients[1])
    n0, n1 = len(clients[0].train), len(clients[1].train)
    state = alg.aggregate(state, 1, {0: reply, 1: r2})
    key = next(k for k in reply.tensors if k.startswith("bias."))
    expected = (reply.tensors[key].double() * n0 + r2.tensors[key].double() * n1) / (n0 + n1)
    torch.testing.assert_close(state["bias"][key[len("bias."):]], expected.float(), rtol=0, atol=1e-7)


def test_fedlora_puts_lora_on_every_block_linear_and_averages_the_classifier(make):
    alg, clients = make("fedlora")
    sites = {(s.layer, s.module) for s in alg.runtime.sites}
    assert sites == {(l, m) for l in range(3) for m in ("query", "key", "value", "attention_output_dense",
                                                         "intermediate_dense", "output_dense")}
    state = alg.init()
    msgs, replies, _ = one_round(alg, clients, 1, state)
    lora_keys = {k for k in replies[0].tensors if k.startswith("lora.")}
    assert len(lora_keys) == 2 * len(sites)
    assert {k for k in replies[0].tensors if k.startswith("head.")} == {"head.out_proj.weight", "head.out_proj.bias"}
    assert "head.dense.weight" in msgs[0].tensors  # the frozen pooler goes down once
    state = alg.aggregate(state, 1, replies)
    assert "head.dense.weight" not in alg.configure(state, 2, list(range(len(alg.federation))))[0].tensors
    n = [len(c.train) for c in clients]
    for key in ("head.out_proj.weight",):
        expected = (replies[0].tensors[key].double() * n[0] + replies[1].tensors[key].double() * n[1]) / sum(n)
        torch.testing.assert_close(state["heads"][("all", 2)]["out_proj.weight"], expected.float(), rtol=0, atol=1e-7)


def test_slora_svd_init_reproduces_the_truncation():
    from fedpeft.algorithms.slora import svd_lora_init

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 9, generator=g, dtype=torch.float64)
    rank, scaling = 3, 16 / 3
    a, b = svd_lora_init(delta, rank, scaling)
    u, s, vh = torch.linalg.svd(delta)
    truncation = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    torch.testing.assert_close(scaling * b @ a, truncation, rtol=0, atol=1e-10)
    assert a.shape == (rank, 9) and b.shape == (12, rank)


def test_slora_stages(make):
    alg, clients = make("slora", slora_stage1_fraction=0.5, slora_density=0.05)
    assert [alg.phase(r) for r in (1, 2, 3, 4)] == ["sparse", "sparse", "train", "train"]
    state = alg.init()
    sites = alg.runtime.sites
    nnz = sum(max(1, round(0.05 * s.lora.base_layer.parametrizations.weight.original.numel())) for s in sites)
    msgs, replies, before = one_round(alg, clients, 1, state)
    sparse_up = {k: v for k, v in replies[0].tensors.items() if k.startswith("sparse.")}
    assert sum(v.numel() for v in sparse_up.values()) == nnz  # only the masked entries go up
    assert not any(k.startswith("lora.") for k in replies[0].tensors)
    w0 = {s.path: s.lora.base_layer.parametrizations.weight.original.detach().clone() for s in sites}
    state = alg.aggregate(state, 1, replies)
    msgs, replies, _ = one_round(alg, clients, 2, state)
    state = alg.aggregate(state, 2, replies)  # the last stage-1 round: the transition runs
    assert all(float(v.abs().sum()) == 0.0 for v in state["sparse"].values())  # W reset to W_0
    assert any(float(v.abs().sum()) > 0 for k, v in state["lora"].items() if k.endswith(".B"))
    msgs = alg.configure(state, 3, list(range(len(alg.federation))))
    assert not any(k.startswith("sparse.") for k in msgs[0].tensors)
    reply = alg.fit(msgs[0], clients[0])
    assert {k for k in reply.tensors if k.startswith("lora.")} == {"lora." + k for k in state["lora"]}
    for s in sites:  # the frozen base weights never moved, and the sparse delta is off in stage 2
        assert torch.equal(s.lora.base_layer.parametrizations.weight.original, w0[s.path])
        assert float(s.lora.base_layer.parametrizations.weight[0].delta.abs().sum()) == 0.0


@pytest.mark.parametrize("method", ["fedlora", "slora", "fedbitfit", "fedavg-full"])
def test_baselines_run_end_to_end(tiny_cfg, bb3, method, tmp_path):
    from fedpeft.run import run

    cfg = tiny_cfg(method=method, tasks=["demo-sentiment"] * 2, partition="dirichlet_cut", alpha=1.0,
                   importance_examples=16, rank=4, global_rounds=2, output_dir=str(tmp_path / method))
    result = run(cfg, backbone=bb3)
    rounds = result.history.to_json()["rounds"]
    assert rounds[-1]["round"] == 2 and rounds[-1]["overall"] is not None
    assert all(r["bytes_up"] > 0 for r in rounds if r["round"] >= 1)


def test_leff_suite_and_report(bb3, tmp_path):
    from fedpeft.bench.matrix import bench
    from fedpeft.bench.suites import Entry, Suite, get_suite

    suite = get_suite("leff-cpu")
    assert {suite.config(e, 1).method for e in suite.entries} == {"leff", "fedavg-full", "fedlora", "fedbitfit", "slora"}
    plan = suite.plan([1, 2, 3])
    # four main methods and the two sampling variants x 3 seeds, three extra entries on seed 1
    assert len(plan) == 6 * 3 + 3
    variants = {e.label: suite.config(e, 1) for e in suite.entries if e.label.startswith("leff-")}
    assert variants["leff-uniform"].sampling == "random" and variants["leff-eq6-raw"].importance_normalise == "none"
    assert [e.label for e, s in plan if s == 3] == ["leff", "fedavg-full", "fedlora", "fedbitfit", "leff-uniform",
                                                    "leff-eq6-raw"]
    for entry, seed in plan:
        cfg = suite.config(entry, seed, output_dir="x")
        cfg.check_runnable()
        assert cfg.partition == "dirichlet_cut" and cfg.alpha == 0.05 and set(cfg.tasks) == {"sst2"}
    long = get_suite("leff-cpu-200")  # the paper's 200 steps; the same federation and the sampling pair
    assert [(e.label, s) for e, s in long.plan([1, 2])] == [
        (label, seed) for label in ("leff", "fedavg-full", "leff-uniform") for seed in (1, 2)]
    for entry in long.entries:
        cfg, short = long.config(entry, 1, output_dir="x"), suite.config(entry, 1, output_dir="x")
        cfg.check_runnable()
        assert cfg.distill_steps == 200 and cfg.distill_teacher == "cached" and cfg.sampling == short.sampling
        assert (cfg.tasks, cfg.alpha, cfg.global_rounds, cfg.train_samples) == (
            short.tasks, short.alpha, short.global_rounds, short.train_samples)
    tiny = Suite(name="leff-tiny", description="tiny", extra={"report": "leff"},
                 base=dict(tasks=["demo-sentiment"] * 2, partition="dirichlet_cut", alpha=1.0, train_samples=24,
                           test_samples=16, global_rounds=2, batch_size=8, max_length=32, proxy_dataset="demo",
                           distill_steps=1, importance_examples=16, rank=2, quiet=True, layer_budgets=["1"]),
                 entries=(Entry("leff", {"method": "leff"}), Entry("fedavg-full", {"method": "fedavg-full"}),
                          Entry("fedlora", {"method": "fedlora"})))
    files = bench(tiny, [1], tmp_path, backbone=bb3, say=lambda _m: None)
    text = files["md"].read_text()
    assert "client memory MB" in text and "Ranking by metric" in text
    import csv

    rows = {r["label"]: r for r in csv.DictReader(open(files["csv"]))}
    mem = {k: float(v["peak_client_memory_bytes"]) for k, v in rows.items()}
    assert mem["leff"] < mem["fedavg-full"]  # one block + a 1-layer student instead of 3 blocks
    assert all(float(v["client_compute_seconds"]) > 0 for v in rows.values())
