"""--decoder-path varlen (models/decoder_varlen.py): the padding-free decoder forward computes what the
padded one does, switches the decoder's dropout to FastDropout, and old decoder runs stay padded."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from decoder_helpers import make_clients, register
from fedpeft.algorithms.lora_runtime import build_lora_runtime
from fedpeft.config import RunConfig
from fedpeft.data.batching import collate_lm
from fedpeft.errors import FedPeftError
from fedpeft.models.causal_model import CausalLM
from fedpeft.models.decoder_varlen import compact_varlen, supports_decoder_varlen
from fedpeft.models.varlen import FastDropout
from tiny_models import tiny_gpt2, tiny_llama


def _runtime(backbone, path: str, dropout: float = 0.0):
    cfg = RunConfig(method="fedit", tasks=["tiny-copy"], rank=2, lora_alpha=4.0, lora_dropout=dropout,
                    decoder_path=path, device="cpu", precision="fp32", quiet=True,
                    target_modules=backbone.default_targets())
    rt = build_lora_runtime(cfg, backbone, rank=2)
    torch.manual_seed(3)
    for name, p in rt.model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.3)  # B ≠ 0, so LoRA takes part in the forward and the gradients
            p.requires_grad_(True)
    return rt.model


def _loss_and_grads(model, batch):
    model.zero_grad()
    logits, targets = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss = F.cross_entropy(logits.float(), targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), targets, grads


def test_varlen_loss_targets_and_lora_gradients_equal_the_padded_forward(monkeypatch):
    """Without dropout the two paths are the same function (row-major targets, grouped-query heads
    repeated, rotary positions from the padded columns): loss, target ids and every LoRA gradient
    agree to float rounding on a batch whose sentences differ in length."""
    register(monkeypatch)
    backbone = tiny_llama()
    _, clients = make_clients(backbone.tokenizer, tasks=("tiny-copy",), n_train=6)
    batch = collate_lm(clients[0].train, list(range(6)))
    assert (batch["attention_mask"] == 0).any(), "the batch must have padding for the test to mean anything"
    padded, varlen = _runtime(backbone, "padded"), _runtime(backbone, "varlen")
    assert varlen.varlen and not padded.varlen
    loss_p, targets_p, grads_p = _loss_and_grads(padded.train(), batch)
    loss_v, targets_v, grads_v = _loss_and_grads(varlen.train(), batch)
    assert torch.equal(targets_p, targets_v)
    torch.testing.assert_close(loss_v, loss_p, rtol=1e-5, atol=1e-6)
    assert grads_p.keys() == grads_v.keys() and any("lora_A" in k for k in grads_p)
    for key in grads_p:
        torch.testing.assert_close(grads_v[key], grads_p[key], rtol=1e-4, atol=1e-6)
    with varlen.padded():  # the block FedDPA-style code uses: the model's own forward
        assert not varlen.varlen
        loss_b, _, _ = _loss_and_grads(varlen, batch)
    assert varlen.varlen
    torch.testing.assert_close(loss_b, loss_p, rtol=1e-5, atol=1e-6)


def test_varlen_loss_equals_the_padded_forward_under_bf16_autocast(monkeypatch):
    """The path --precision bf16 takes (autocast; the fused causal kernel in bf16): the same loss to bf16 rounding."""
    register(monkeypatch)
    backbone = tiny_llama()
    _, clients = make_clients(backbone.tokenizer, tasks=("tiny-reverse",), n_train=6)
    batch = collate_lm(clients[0].train, list(range(6)))
    losses = []
    for path in ("padded", "varlen"):
        model = _runtime(backbone, path).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits, targets = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        losses.append(F.cross_entropy(logits.float(), targets))
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=1e-3)


def _varlen_loss_and_grads(checkpointing: bool):
    from fedpeft.models.placement import enable_gradient_checkpointing

    backbone = tiny_llama()
    model = _runtime(backbone, "varlen", dropout=0.3)
    if checkpointing:
        enable_gradient_checkpointing(model.encoder)
    calls = []
    attn = model.lm.model.layers[0].self_attn
    handle = attn.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 0, 0, 0]])
    labels = ids.clone()
    labels[:, 0] = -100
    labels[1, 3:] = -100
    torch.manual_seed(7)  # the dropout draws: a recomputation must replay them
    logits, targets = model.train()(ids, (ids != 0).long(), labels)
    loss = F.cross_entropy(logits.float(), targets)
    loss.backward()
    handle.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), [p.grad.clone() for p in params], len(calls), targets.tolist()


def test_a_checkpointed_varlen_decoder_recomputes_each_layer_and_gives_the_same_loss_and_gradients():
    """--gradient-checkpointing with --decoder-path varlen: the backward pass recomputes every layer through
    the varlen attention (before the fix, torch.utils.checkpoint refused the recomputation, which ran the
    model's own attention), replaying the dropout masks, so loss and gradients equal the plain varlen
    forward's."""
    loss0, grads0, calls0, targets0 = _varlen_loss_and_grads(False)
    loss1, grads1, calls1, targets1 = _varlen_loss_and_grads(True)
    assert (calls0, calls1) == (1, 2)  # with checkpointing the layer runs again in the backward pass
    assert targets0 == targets1 == [6, 7, 8, 9, 10, 6, 7]
    assert torch.equal(loss0, loss1)
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8)
    assert all(g.abs().sum() > 0 for g in grads0)


def test_compact_layout_puts_each_sentence_at_the_start_of_its_row_whatever_the_padding_side():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    v = compact_varlen(mask)
    assert v.width == 5 and v.batch == 3
    assert v.rows.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert v.cols.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]
    assert v.index.tolist() == [2, 3, 4, 5, 6, 10, 11, 12, 13, 14]


def test_varlen_switches_the_decoders_dropout_and_padded_keeps_torchs():
    backbone = tiny_llama()
    fast = _runtime(backbone, "varlen", dropout=0.1)
    ref = _runtime(backbone, "padded", dropout=0.1)
    kinds = lambda m: {type(x) for x in m.modules() if isinstance(x, torch.nn.Dropout)}  # noqa: E731
    assert kinds(fast) == {FastDropout} and kinds(ref) == {torch.nn.Dropout}


def test_an_unknown_decoder_path_and_gpt2_are_handled():
    backbone = tiny_llama()
    with pytest.raises(FedPeftError, match="decoder path"):
        CausalLM(backbone.model, backbone.tokenizer, backbone.hidden_size, "packed")
    gpt2 = tiny_gpt2()
    assert not supports_decoder_varlen(gpt2.model) and supports_decoder_varlen(backbone.model)
    model = CausalLM(gpt2.model, gpt2.tokenizer, gpt2.hidden_size, "varlen")
    assert not model.varlen  # GPT-2 (learned positions) keeps its own forward


def test_a_decoder_run_saved_before_the_setting_counts_as_padded_in_the_bench(tmp_path, monkeypatch):
    """bench's check_same_settings: a generation run's config.json without decoder_path ran padded, so
    the default (varlen) refuses it; an encoder run without it is not a decoder run and stays reusable."""
    from fedpeft.bench.matrix import check_same_settings

    register(monkeypatch)
    for tasks, model, refused in ((["e2e"], "smollm2", True), (["sst2"], "minilm", False)):
        cfg = RunConfig(method="fedit", tasks=tasks, model_name=model, device="cpu", precision="fp32", quiet=True)
        raw = cfg.to_dict()
        del raw["decoder_path"]
        run_dir = tmp_path / tasks[0]
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps(raw))
        if refused:
            with pytest.raises(FedPeftError, match="decoder_path"):
                check_same_settings(run_dir, cfg)
            cfg.decoder_path = "padded"
        check_same_settings(run_dir, cfg)
        if not refused:  # whatever an encoder run's config.json says of it (a resume writes the field)
            (run_dir / "config.json").write_text(json.dumps({**raw, "decoder_path": "padded"}))
            cfg.decoder_path = "varlen"
            check_same_settings(run_dir, cfg)
