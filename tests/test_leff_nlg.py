"""LEFF and its baselines on decoders and E2E (docs/methods/leff.md#decoders): the trainable set, causal
blocks and students, importance on proxy texts, the client's training, bytes, runs, the E2E Dirichlet cut
and the LEFF paper's baselines, on tiny GPT-2 (4 layers, hidden 32, 2 heads) and tiny Llama built in code,
with a few E2E rows and WebNLG texts written by the tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.algorithms.leff.runtime import assembled as assembled_model
from fedpeft.algorithms.leff.distill import (causal_embed, distill_loss, distill_segment, eager_attention,
                                             prefix_hidden, run_blocks)
from fedpeft.errors import FedPeftError
from tests.leff_helpers import bound, final_state

L = 4
FOODS = ["Chinese", "English", "French", None]
NAMES = ["Aromi", "Alimentum", "Zizzi", "Cotto", "Wildwood", "Strada"]


# ----------------------------------------------------------------------------------------- fixtures
def write_data(root: Path, n_dev: int = 72, n_test: int = 12, n_webnlg: int = 40) -> Path:
    """E2E (dev = train pool, test = evaluation pool) and WebNLG train files, laid out as --data-dir expects
    (e2e/*.csv, webnlg/v2.0/en/...)."""
    from test_nlg_data import entry, write_e2e, write_webnlg

    def rows(n, kind, offset):
        out = []
        for i in range(n):
            food, name = FOODS[i % 4], NAMES[(i + offset) % 6]
            mr = f"name[{name}], eatType[{kind}]" + (f", food[{food}]" if food else "") + \
                 f", area[{'riverside' if i % 3 else 'city centre'}]"
            out.append((mr, f"{name} is a {kind}" + (f" serving {food} food." if food else ".")))
        return out

    write_e2e(root, rows(n_dev, "pub", 0), rows(n_test, "coffee shop", 1))
    write_webnlg(root, "train", "Airport", [
        entry("Airport", f"Id{i}", [f"A{i} | cityServed | B{i}"], [f"Airport A{i} serves the city B{i}.",
                                                                   f"B{i} is served by airport A{i}."])
        for i in range(n_webnlg)])
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("nlgdata"))


@pytest.fixture(scope="module")
def gpt2():
    from tiny_models import tiny_gpt2

    return tiny_gpt2(seed=0, layers=L)


def tiny_llama4(tied: bool = True):
    """Tiny Llama with 4 layers, hidden 32, 2 heads (the test decoder), tied or untied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpeft.models.backbone import Backbone
    from tiny_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name="tiny-llama4", model=model, tokenizer=tok, model_type="llama", hidden_size=32,
                    num_layers=L, kind="causal")


@pytest.fixture(scope="module")
def llama():
    return tiny_llama4(tied=True)


@pytest.fixture(params=["gpt2", "llama"])
def decoder(request, gpt2, llama):
    return {"gpt2": gpt2, "llama": llama}[request.param]


@pytest.fixture
def nlg_cfg(tmp_path, data_root):
    from fedpeft.config import RunConfig

    def make(**kw):
        base = dict(method="leff", tasks=["e2e"] * 3, model_name="tiny_models:tiny_gpt2", data_dir=str(data_root),
                    partition="dirichlet_cut", alpha=1.0, train_samples=16, test_samples=3, global_rounds=2,
                    batch_size=4, eval_batch_size=8, max_length=48, max_new_tokens=6, proxy_dataset="webnlg",
                    distill_steps=2, distill_examples=40, distill_batch_size=8, importance_examples=12,
                    layer_budgets=["1"], lr=1e-3, rank=4, quiet=True, device="cpu", precision="fp32",
                    output_dir=str(tmp_path / "run"))
        base.update(kw)
        return RunConfig(**base).validate()

    return make




def texts_batch(tok, texts, side="right"):
    """A batch of texts padded on `side` (input_ids, attention_mask)."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tok.pad_token_id)
    m = torch.zeros((len(ids), width), dtype=torch.long)
    for r, row in enumerate(ids):
        sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        x[r, sl] = torch.tensor(row)
        m[r, sl] = 1
    return {"input_ids": x, "attention_mask": m}


TEXTS = ["The Eagle is a pub.", "Aromi serves Chinese food near the river.", "Zizzi."]


def stack(bb):
    from fedpeft.algorithms.leff.structure import block_list

    owner, attr = block_list(bb.model)
    return owner, list(getattr(owner, attr))


# ----------------------------------------------------------------------------------------- structure: the always-trainable set
def test_gpt2_structure_blocks_frozen_embeddings_and_head_set(nlg_cfg, gpt2):
    alg, _ = bound(nlg_cfg(), gpt2)
    extra = alg.runtime.extra
    assert extra["causal"] and len(alg.blocks()) == L
    assert extra["block_owner"][1] == "h" and type(extra["block_owner"][0]).__name__ == "GPT2Model"
    assert set(extra["emb_params"]) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert set(alg.aset()) == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    lm = alg.runtime.model.lm
    assert lm.lm_head.weight is lm.transformer.wte.weight  # the tied LM head is the frozen wte


@pytest.mark.parametrize("tied", [True, False])
def test_llama_head_set_has_lm_head_only_when_untied(nlg_cfg, tied):
    bb = tiny_llama4(tied)
    alg, _ = bound(nlg_cfg(), bb)
    assert alg.runtime.extra["block_owner"][1] == "layers" and len(alg.blocks()) == L
    assert set(alg.runtime.extra["emb_params"]) == {"model.embed_tokens.weight"}
    assert set(alg.aset()) == {"model.norm.weight"} | ({"lm_head.weight"} if not tied else set())


def test_real_gpt2_client_trains_table5_count():
    """The LEFF runtime on GPT-2 small (meta device): one block + ln_f = 7,089,408 (Table 5)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedpeft.algorithms.leff.algorithm import LEFF
    from fedpeft.config import RunConfig
    from fedpeft.models.backbone import Backbone
    from tiny_tokenizer import byte_tokenizer

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    bb = Backbone("gpt2", model, byte_tokenizer(), "gpt2", 768, 12, kind="causal")
    alg = LEFF(RunConfig(method="leff", tasks=["e2e"]))
    rt = alg.build_runtime(bb)
    assert sum(p.numel() for p in rt.sites[0].parameters()) + sum(p.numel() for p in rt.extra["aset"].values()) == 7_089_408
    assert sum(p.numel() for p in rt.extra["emb_params"].values()) == 50257 * 768 + 1024 * 768


def test_decoder_without_known_positions_is_a_clear_error():
    from torch import nn

    from fedpeft.algorithms.leff.algorithm import LEFF
    from fedpeft.config import RunConfig
    from fedpeft.models.backbone import Backbone

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(2, 2)

    alg = LEFF(RunConfig(method="leff", tasks=["e2e"]))
    with pytest.raises(FedPeftError, match="neither a GPT-2 position table nor rotary"):
        alg.build_runtime(Backbone("odd", Stack(), None, "odd", 2, 3, kind="causal"))
    with pytest.raises(FedPeftError, match="cannot find the transformer blocks"):
        alg.build_runtime(Backbone("odd", NoBlocks(), None, "odd", 2, 3, kind="causal"))


# ----------------------------------------------------------------------------------------- causal blocks, distillation
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("eager", [False, True])
def test_causal_blocks_reproduce_the_model_forward(decoder, side, eager):
    """Embedding stage + every block + final norm = the decoder's own last hidden state, at every
    non-padding position, for right and left padding, eager and SDPA attention."""
    owner, blocks = stack(decoder)
    batch = texts_batch(decoder.tokenizer, TEXTS, side)
    norm = owner.ln_f if hasattr(owner, "ln_f") else owner.norm
    with torch.no_grad(), (eager_attention([decoder.model]) if eager else torch.no_grad()):
        ours = norm(prefix_hidden(None, blocks, batch, owner))
        ref = decoder.model.get_decoder()(**batch, use_cache=False).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], ref[keep], rtol=0, atol=1e-5)


def test_gpt2_embedding_stage_adds_the_frozen_position_table(gpt2):
    owner, _ = stack(gpt2)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(causal_embed(owner, ids), owner.wte(ids) + owner.wpe.weight[:3][None])


def test_causal_attention_covers_visible_keys_only(decoder):
    owner, blocks = stack(decoder)
    batch = texts_batch(decoder.tokenizer, TEXTS, "right")
    mask = batch["attention_mask"]
    with torch.no_grad(), eager_attention([decoder.model]):
        h = prefix_hidden(None, blocks[:1], batch, owner)
        _, att = run_blocks(blocks[1:], h, mask, True, owner)
    b, heads, s, _ = att.shape
    visible = torch.ones(s, s).tril().bool()[None, None] & mask[:, None, None, :].bool()
    rows = mask.bool()[:, None, :, None].expand(b, heads, s, s)
    assert torch.all(att[~visible & rows] == 0)
    sums = att.sum(-1)[mask.bool()[:, None, :].expand(b, heads, s)]
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_causal_distill_loss_is_zero_for_the_teacher_and_ignores_padding(decoder):
    from fedpeft.algorithms.leff.distill import init_student

    owner, blocks = stack(decoder)
    batch = texts_batch(decoder.tokenizer, TEXTS, "right")
    student = init_student(blocks[1:], 0.5)

    def loss(b, s):
        with torch.no_grad(), eager_attention([decoder.model] + s):
            h = prefix_hidden(None, blocks[:1], b, owner)
            ht, at = run_blocks(blocks[1:], h, b["attention_mask"], True, owner)
            hs, as_ = run_blocks(s, h, b["attention_mask"], True, owner)
        return distill_loss(ht, at, hs, as_, b["attention_mask"], 0.5)

    assert float(loss(batch, list(blocks[1:]))) == pytest.approx(0.0, abs=1e-7)
    base = loss(batch, student)
    assert float(base) > 0
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][changed["attention_mask"] == 0] = 7
    torch.testing.assert_close(loss(changed, student), base, rtol=0, atol=1e-6)


def test_causal_distillation_reduces_the_loss_and_freezes_the_teacher(decoder, nlg_cfg):
    from fedpeft.algorithms.leff.distill import init_student
    from fedpeft.algorithms.leff.server_data import encode_texts, proxy_texts
    from fedpeft.data.batching import collate

    owner, blocks = stack(decoder)
    before = [p.clone() for p in decoder.model.parameters()]
    proxy = encode_texts(proxy_texts(nlg_cfg()), decoder.tokenizer, 32)
    batch = collate(proxy, list(range(len(proxy))))

    def full_loss(student):  # on every proxy text, not one step's batch
        with torch.no_grad(), eager_attention([decoder.model] + student):
            h = prefix_hidden(None, blocks[:1], batch, owner)
            ht, at = run_blocks(blocks[1:], h, batch["attention_mask"], True, owner)
            hs, as_ = run_blocks(student, h, batch["attention_mask"], True, owner)
        return float(distill_loss(ht, at, hs, as_, batch["attention_mask"], 0.5))

    student, info = distill_segment(None, blocks, 1, 3, proxy, rate=0.5, alpha=0.5, steps=20, lr=1e-3,
                                    batch_size=8, seed=0, owner=owner)
    assert len(student) == 2 and info["steps"] == 20
    assert full_loss(student) < full_loss(init_student(blocks[1:], 0.5))
    assert all(torch.equal(p, q) for p, q in zip(before, decoder.model.parameters()))
    assert not any(p.requires_grad for blk in student for p in blk.parameters())


# ----------------------------------------------------------------------------------------- importance on proxy texts
def test_lm_importance_uses_proxy_texts_disjoint_from_distillation_and_has_no_side_effects(nlg_cfg, decoder):
    from fedpeft.algorithms.leff.server_data import importance_texts, proxy_texts

    cfg = nlg_cfg()
    imp, dist = importance_texts(cfg), proxy_texts(cfg)
    assert len(imp) == cfg.importance_examples and len(dist) == cfg.distill_examples
    assert not set(imp) & set(dist)
    alg, _ = bound(cfg, decoder)
    state = alg.init()
    alg.load_global(state)
    before = {n: p.clone() for n, p in alg.runtime.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in alg.runtime.model.named_parameters()}
    scores = alg.importance(state)
    assert len(scores) == L and all(s > 0 for s in scores)
    for n, p in alg.runtime.model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n]
    # The micro-batch parts add up to the mean LM loss over the batch's target tokens ...
    from fedpeft.training import lm_mean_loss

    with torch.no_grad():
        parts = sum(float(x) for x in alg._lm_losses(alg._server_batch))
    assert parts == pytest.approx(lm_mean_loss(alg.runtime.model, alg._server_batch, batch_size=64), rel=1e-5)
    # ... and to the whole batch's gradient: one batch of all gives the same scores.
    alg2, _ = bound(nlg_cfg(eval_batch_size=64), decoder)
    np.testing.assert_allclose(alg2.importance(alg2.init()), scores, rtol=1e-4)


def test_webnlg_proxy_errors(tmp_path, data_root):
    from fedpeft.algorithms.leff.server_data import importance_texts, proxy_texts
    from fedpeft.config import RunConfig

    with pytest.raises(FedPeftError, match="'webnlg' has no local train split"):
        proxy_texts(RunConfig(proxy_dataset="webnlg", data_dir=str(tmp_path)))
    with pytest.raises(FedPeftError, match="fewer than --distill-examples 70 \\+ --importance-examples 20"):
        importance_texts(RunConfig(proxy_dataset="webnlg", data_dir=str(data_root), distill_examples=70,
                                   importance_examples=20))
    with pytest.raises(FedPeftError, match="unknown --proxy-dataset 'sst3'"):
        proxy_texts(RunConfig(proxy_dataset="sst3", data_dir=str(data_root)))
    # auto (the default) is the paper's pairing: WebNLG for generation tasks, WNLI for GLUE
    assert RunConfig().proxy_dataset == "auto"
    with pytest.raises(FedPeftError, match="'webnlg' has no local train split"):
        proxy_texts(RunConfig(method="leff", tasks=["e2e", "e2e"], data_dir=str(tmp_path)).resolved())
    with pytest.raises(FedPeftError, match="WNLI"):
        proxy_texts(RunConfig(method="leff", tasks=["sst2", "sst2"], data_dir=str(tmp_path)).resolved())


# ----------------------------------------------------------------------------------------- client: gradient flow, edge blocks, upload
@pytest.mark.parametrize("k", [0, 1, L - 1])
def test_rate_one_client_model_equals_the_global_model(nlg_cfg, decoder, k):
    alg, clients = bound(nlg_cfg(compression_rate=1.0), decoder)
    state = alg.init()
    alg.load_global(state)
    batch = texts_batch(decoder.tokenizer, TEXTS)
    ref = alg.runtime.model.full_logits(**batch)
    pre = alg.student(state, 1, 0, k - 1, []) if k > 0 else []
    suf = alg.student(state, 1, k + 1, L - 1, []) if k + 1 < L else []
    assert len(pre) + len(suf) == L - 1
    with assembled_model(alg.runtime, pre + alg.blocks()[k:k + 1] + suf):
        got = alg.runtime.model.full_logits(**batch)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("budgets,start", [(["1"], 0), (["1"], 1), (["1"], L - 1), ([str(L)], 0)])
def test_client_trains_its_block_through_the_frozen_students(nlg_cfg, decoder, budgets, start):
    alg, clients = bound(nlg_cfg(layer_budgets=budgets, sampling="round_robin", global_rounds=20), decoder)
    state = alg.init()
    msgs = alg.configure(state, start + 1, list(range(len(alg.federation))))
    msg = msgs[0]
    b = msg.config["budget"]
    assert msg.config["block_start"] == start
    reply = alg.fit(msg, clients[0])
    trained = set(range(start, start + b))
    blocks = {int(k.split(".")[1]) for k in reply.tensors if k.startswith("block.")}
    assert blocks == trained
    assert {k for k in reply.tensors if not k.startswith("block.")} == {"aset." + n for n in alg.aset()}
    for l in trained:  # trained (gradients reach a non-last block through the suffix student)
        assert any(not torch.equal(reply.tensors[f"block.{l}.{n}"], t) for n, t in state["blocks"][l].items())
    for n, p in alg.runtime.extra["emb_params"].items():
        assert torch.equal(p, msg.tensors["emb." + n])
    scratch = alg.runtime.extra["scratch"]
    students = [("pre", j, scratch[j]) for j in range(msg.config["m_pre"])] + \
               [("suf", j, scratch[msg.config["m_pre"] + j]) for j in range(msg.config["m_suf"])]
    for tag, j, blk in students:  # the students the client held are unchanged
        for n, p in blk.named_parameters():
            assert torch.equal(p, msg.tensors[f"{tag}.{j}.{n}"])


def test_a_round_leaves_untrained_layers_bitwise(nlg_cfg, gpt2):
    alg, clients = bound(nlg_cfg(sampling="round_robin"), gpt2)
    state = alg.init()
    old = {l: {n: t.clone() for n, t in blk.items()} for l, blk in state["blocks"].items()}
    msgs = alg.configure(state, 1, list(range(len(alg.federation))))  # round robin: every client trains block 0
    replies = {c.cid: alg.fit(msgs[c.cid], c) for c in clients}
    state = alg.aggregate(state, 1, replies)
    for l in range(1, L):
        assert all(torch.equal(t, old[l][n]) for n, t in state["blocks"][l].items())
    assert any(not torch.equal(t, old[0][n]) for n, t in state["blocks"][0].items())
    sizes = [r.config["num_examples"] for r in replies.values()]
    for n, t in state["aset"].items():  # 𝒜 averaged over every participant
        want = sum(r.tensors["aset." + n].double() * s for r, s in zip(replies.values(), sizes)) / sum(sizes)
        torch.testing.assert_close(t, want.float())


@pytest.mark.parametrize("start", [0, 1, L - 1])
def test_decoder_bytes_match_the_closed_form(nlg_cfg, gpt2, start):
    """Counted bytes equal the closed form: down = 4((L_i + m_pre + m_suf)·P_blk + P_𝒜) (+ 4·P_emb the
    first time), up = 4(L_i·P_blk + P_𝒜)."""
    alg, clients = bound(nlg_cfg(sampling="round_robin", global_rounds=20), gpt2)
    state = alg.init()
    p_blk = sum(p.numel() for p in alg.blocks()[0].parameters())
    p_aset = sum(p.numel() for p in alg.aset().values())
    p_emb = 259 * 32 + 512 * 32  # wte + wpe of the tiny GPT-2 (the tied LM head is wte: counted once)
    assert sum(p.numel() for p in alg.runtime.extra["emb_params"].values()) == p_emb
    m_pre, m_suf = math.ceil(start * 0.5), math.ceil((L - start - 1) * 0.5)
    for rnd, first in ((start + 1, True), (start + 1 + L, False)):
        msgs = alg.configure(state, rnd, list(range(len(alg.federation))))
        assert msgs[0].config["block_start"] == start
        assert msgs[0].nbytes == 4 * ((1 + m_pre + m_suf) * p_blk + p_aset) + (4 * p_emb if first else 0)
        replies = {c.cid: alg.fit(msgs[c.cid], c) for c in clients}
        assert replies[0].nbytes == 4 * (p_blk + p_aset)
        state = alg.aggregate(state, rnd, replies)


# ----------------------------------------------------------------------------------------- runs: FedAvg-full, the global model
def test_leff_with_full_budgets_is_fedavg_full_bitwise_on_gpt2(nlg_cfg, gpt2, tmp_path):
    from fedpeft.run import run

    a = run(nlg_cfg(layer_budgets=[str(L)], output_dir=str(tmp_path / "leff")), backbone=gpt2)
    b = run(nlg_cfg(method="fedavg-full", output_dir=str(tmp_path / "fedavg")), backbone=gpt2)
    sa, sb = final_state(a.run_dir), final_state(b.run_dir)
    for l in range(L):
        assert all(torch.equal(t, sb["blocks"][l][n]) for n, t in sa["blocks"][l].items())
    assert all(torch.equal(t, sb["aset"][n]) for n, t in sa["aset"].items())
    ha, hb = a.history.to_json(), b.history.to_json()
    assert [r["overall"] for r in ha["rounds"]] == [r["overall"] for r in hb["rounds"]]
    assert [r["bytes_up"] for r in ha["rounds"]] == [r["bytes_up"] for r in hb["rounds"]]


def test_tiny_e2e_run_scores_the_global_model_by_generation_every_round(nlg_cfg, gpt2, tmp_path):
    from fedpeft.run import run

    cfg = nlg_cfg(layer_budgets=["1", "2"], output_dir=str(tmp_path / "a"))
    a = run(cfg, backbone=gpt2)
    b = run(nlg_cfg(layer_budgets=["1", "2"], output_dir=str(tmp_path / "b")), backbone=gpt2)
    ha, hb = a.history.to_json(), b.history.to_json()
    for x, y in zip(ha["rounds"], hb["rounds"]):
        assert x["overall"] == y["overall"] and x["bytes_up"] == y["bytes_up"] and x["bytes_down"] == y["bytes_down"]
    for rnd in (1, 2):
        records = [r for r in a.history.records if r["round"] == rnd]
        assert len(records) == 3
        for r in records:
            assert {"bleu", "nist", "meteor", "rouge_l", "cider"} <= set(r)
            assert all(math.isfinite(r[m]) for m in ("bleu", "nist", "rouge_l", "cider", "loss"))
    trained = [r for r in ha["rounds"] if r["round"] >= 1]
    assert all(len(r["blocks"]) == 3 and r["distilled"] is not None for r in trained)


def test_leff_evaluates_the_global_model_not_the_client_model(nlg_cfg, gpt2):
    """Every client is scored with Θ_g: the same generations whichever client asks."""
    alg, clients = bound(nlg_cfg(), gpt2)
    state = alg.init()
    msgs = alg.configure(state, 1, list(range(len(alg.federation))))
    alg.fit(msgs[0], clients[0])  # leaves a client's blocks in the runtime
    alg.load_for_eval(alg.configure_evaluate(state, 1, list(range(len(alg.federation))), msgs)[1], clients[1])
    batch = texts_batch(gpt2.tokenizer, TEXTS)
    got = alg.runtime.model.full_logits(**batch)
    ref_alg, _ = bound(nlg_cfg(), gpt2)
    ref_alg.load_global(ref_alg.init())
    torch.testing.assert_close(got, ref_alg.runtime.model.full_logits(**batch), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- partition: the Dirichlet cut on E2E
def test_e2e_dirichlet_cut_on_food_and_on_another_attribute(data_root):
    from fedpeft.data.partition.federation import build_federation
    from fedpeft.data.partition.generation import regroup_e2e
    from fedpeft.data.pools import load_federation_pools

    kw = dict(train_samples=12, test_samples=2, partition="dirichlet_cut", alpha=0.1, seed=3,
              data_dir=str(data_root), reserve=8, min_train=2)
    parts = build_federation(["e2e"] * 3, **kw)
    ids = [j for p in parts for j in p.train_ids]
    assert len(ids) == len(set(ids)) == 36  # every drawn example in exactly one client
    skew = [len({e.group for e in p.train}) for p in parts]
    assert min(skew) < 4  # alpha = 0.1 over 4 food groups (one of them "missing")
    assert build_federation(["e2e"] * 3, **kw)[0].train_ids == parts[0].train_ids
    by_area = build_federation(["e2e"] * 3, e2e_key="area", **kw)
    assert {e.group for p in by_area for e in p.train} <= {"riverside", "city centre"}
    train, _ = regroup_e2e("e2e", load_federation_pools("e2e", str(data_root)), "familyFriendly")
    assert {e.group for e in train} == {"missing"}
    with pytest.raises(FedPeftError, match="--e2e-partition-key 'colour' is not an E2E MR attribute"):
        build_federation(["e2e"] * 3, e2e_key="colour", **kw)


# ----------------------------------------------------------------------------------------- baselines of the LEFF paper
def test_fedlora_targets_on_decoders(nlg_cfg, gpt2, llama):
    alg, _ = bound(nlg_cfg(method="fedlora"), gpt2)
    assert {s.module for s in alg.runtime.sites} == {"c_attn", "attn_c_proj", "mlp_c_proj"}
    assert len(alg.runtime.sites) == 3 * L
    alg, _ = bound(nlg_cfg(method="fedlora"), llama)
    assert {s.module for s in alg.runtime.sites} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"}


def test_slora_transition_on_conv1d_reproduces_the_stage1_model(nlg_cfg, gpt2):
    """Conv1D stores W as (d_in, d_out): at full rank, s·B·A must equal ΔWᵀ exactly and the stage-2
    model must compute what the stage-1 model (W_0 + scatter(δ)) computed."""
    from fedpeft.models.adapters import lora_key, set_lora_state

    alg, _ = bound(nlg_cfg(method="slora", rank=32, lora_alpha=16.0, slora_density=0.3, global_rounds=4), gpt2)
    state = alg.init()
    gen = torch.Generator().manual_seed(0)
    state["sparse"] = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in state["sparse"].items()}
    batch = texts_batch(gpt2.tokenizer, TEXTS)
    alg.runtime.model.eval()  # no LoRA dropout
    alg.set_sparse(state["sparse"])
    alg.set_zero_lora()
    stage1 = alg.runtime.model.full_logits(**batch)
    deltas = {k: v.clone() for k, v in state["sparse"].items()}
    alg.transition(state)
    scaling = 16.0 / 32
    for site in alg.runtime.sites:
        mod = alg.sparse()[lora_key(site.layer, site.module, "delta")]
        shape = site.lora.base_layer.parametrizations.weight.original.shape
        dw = torch.zeros(shape).reshape(-1).index_add(0, mod.index, deltas[lora_key(site.layer, site.module, "delta")]).view(shape)
        a, b = state["lora"][lora_key(site.layer, site.module, "A")], state["lora"][lora_key(site.layer, site.module, "B")]
        assert a.shape == (32, shape[0]) and b.shape == (shape[1], 32)  # (r, d_in), (d_out, r)
        torch.testing.assert_close(scaling * b @ a, dw.T, rtol=0, atol=1e-5)
    assert all(torch.count_nonzero(v) == 0 for v in state["sparse"].values())  # W reset to W_0
    alg.set_sparse({})
    set_lora_state(alg.runtime.sites, state["lora"])
    torch.testing.assert_close(alg.runtime.model.full_logits(**batch), stage1, rtol=0, atol=1e-4)


def test_fedbitfit_on_decoders(nlg_cfg, gpt2, llama):
    alg, clients = bound(nlg_cfg(method="fedbitfit"), gpt2)
    names = set(alg.biases())
    assert "transformer.ln_f.bias" in names and all(n.endswith(".bias") for n in names)
    per_block = 3 * 32 + 32 + 4 * 32 + 32 + 32 + 32  # c_attn, attn.c_proj, c_fc, mlp.c_proj, ln_1, ln_2
    assert alg.trained_numel(1) == L * per_block + 32
    state = alg.init()
    msgs = alg.configure(state, 1, list(range(len(alg.federation))))
    reply = alg.fit(msgs[0], clients[0])
    assert set(reply.tensors) == {"bias." + n for n in names}
    with pytest.raises(FedPeftError, match="has none \\(Llama-style models have no biases\\)"):
        bound(nlg_cfg(method="fedbitfit"), llama)


def test_fedbitfit_gpt2_small_count_is_table5():
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedpeft.algorithms.fedbitfit import FedBitFit
    from fedpeft.config import RunConfig
    from fedpeft.models.backbone import Backbone
    from tiny_tokenizer import byte_tokenizer

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    alg = FedBitFit(RunConfig(method="fedbitfit", tasks=["e2e"]))
    alg.runtime = alg.build_runtime(Backbone("gpt2", model, byte_tokenizer(), "gpt2", 768, 12, kind="causal"))
    assert alg.trained_numel(1) == 102_144


@pytest.mark.parametrize("method", ["fedlora", "slora", "fedbitfit", "fedavg-full"])
def test_baselines_run_end_to_end_on_gpt2(nlg_cfg, gpt2, method, tmp_path):
    from fedpeft.run import run

    result = run(nlg_cfg(method=method, global_rounds=2, slora_stage1_fraction=0.5), backbone=gpt2)
    rounds = result.history.to_json()["rounds"]
    assert all(r["bytes_up"] > 0 and r["peak_client_memory_bytes"] > 0 for r in rounds if r["round"] >= 1)
    assert math.isfinite(rounds[-1]["overall"])


# ----------------------------------------------------------------------------------------- CLI
def test_cli_runs_leff_on_tiny_llama_e2e_offline(tmp_path, data_root, capsys, monkeypatch):
    from fedpeft.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["run", "--method", "leff", "--tasks", "e2e", "e2e", "e2e", "e2e", "--model_name", "tiny_models:tiny_llama",
            "--data-dir", str(data_root), "--partition", "dirichlet_cut", "--alpha", "1.0", "--train-samples", "12",
            "--test-samples", "2", "--global-rounds", "1", "--batch-size", "4", "--max-length", "48",
            "--max-new-tokens", "4", "--proxy-dataset", "webnlg", "--distill-steps", "1", "--distill-examples", "20",
            "--importance-examples", "8", "--output_dir", str(tmp_path / "run"), "--quiet", "--threads", "1"]
    assert main(args) in (0, None)
    assert (tmp_path / "run" / "training_history.json").is_file()
    bad = [a if a != str(data_root) else str(tmp_path / "nowhere") for a in args]
    bad[bad.index("--output_dir") + 1] = str(tmp_path / "run2")
    (tmp_path / "nowhere" / "e2e").mkdir(parents=True)
    for name in ("devel-fixed.no-ol.csv", "test-fixed.csv"):
        (tmp_path / "nowhere" / "e2e" / name).write_bytes((data_root / "e2e" / name).read_bytes())
    capsys.readouterr()
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert "'webnlg' has no local train split" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------- bench
def test_leff_nlg_suite_and_its_e2e_report(gpt2, data_root, tmp_path):
    from fedpeft.bench.matrix import bench
    from fedpeft.bench.suites import Entry, Suite, get_suite

    suite = get_suite("leff-nlg")
    assert [suite.config(e, 1).method for e in suite.entries] == ["leff", "fedavg-full", "fedlora", "leff"]
    assert len(suite.plan([1, 2])) == 3 * 2 + 1
    for entry, seed in suite.plan([1]):
        cfg = suite.config(entry, seed, output_dir="x")
        cfg.check_runnable()
        assert (cfg.tasks, cfg.model_name, cfg.proxy_dataset, cfg.partition, cfg.e2e_partition_key) == (
            ["e2e"] * 4, "smollm2", "webnlg", "dirichlet_cut", "food")
    tiny = Suite(name="leff-nlg-tiny", description="tiny", extra={"report": "leff"},
                 base=dict(tasks=["e2e"] * 3, data_dir=str(data_root), partition="dirichlet_cut", alpha=1.0,
                           train_samples=12, test_samples=2, global_rounds=1, batch_size=4, max_length=48,
                           max_new_tokens=4, proxy_dataset="webnlg", distill_steps=1, distill_examples=20,
                           importance_examples=8, rank=2, quiet=True),
                 entries=(Entry("leff", {"method": "leff"}), Entry("fedavg-full", {"method": "fedavg-full"}),
                          Entry("fedlora", {"method": "fedlora"})))
    files = bench(tiny, [1], tmp_path, backbone=gpt2, say=lambda _m: None)
    text = files["md"].read_text()
    assert "| label | BLEU | NIST | METEOR | ROUGE-L | CIDEr | Avg |" in text
    assert "0.5799/8.0296/0.4064/0.6346/1.7521" in text  # the paper's LEFF row next to ours
    row = next(line for line in text.splitlines() if line.startswith("| leff |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    values = [float(c) for c in cells[1:6]]
    assert float(cells[6]) == pytest.approx(sum(values) / 5, abs=1e-4)  # Avg = mean of the five raw values
