"""The speed paths compute what the plain paths compute.

- The padding-free (varlen) encoder forward gives the padded forward's outputs: logits within 1e-5
  in evaluation (dropout off), on BERT and RoBERTa, with PEFT LoRA and with FedLEASE's mixture
  layers, first-token and mean pooling; LoRA and head gradients within 1e-5 in training with every
  dropout at p = 0 (with dropout on, only the random draws differ).
- The cheaper dropout keeps each element with probability 1 − p, scales kept elements by 1/(1 − p),
  zeroes the others, is the identity in evaluation, follows the seeded generator, and its gradient
  is the same mask.
- Encoders without absolute positions (DeBERTa) keep the padded path.

Everything runs on CPU with tiny random models built from configs, one thread.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedpeft.models.adapters import inject_lora, lora_parameters, lora_sites
from fedpeft.models.task_model import TaskModel
from fedpeft.models.varlen import FastDropout, dropout, supports_varlen, use_fast_dropout

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_encoder(kind: str, hidden: int = 16, layers: int = 2):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=2 * hidden, vocab_size=100, max_position_embeddings=64)
        model = BertModel(cfg)
    else:
        cfg = RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=2 * hidden, vocab_size=100, max_position_embeddings=70,
                            pad_token_id=1, type_vocab_size=1)
        model = RobertaModel(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def padded_batch(lengths, vocab=100, pad_id=0, types=True, seed=1):
    """Right-padded random sentences; real tokens never equal the pad id."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if types:
        tt = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            tt[i, n // 2:n] = 1
        batch["token_type_ids"] = tt
    return batch


def task_model(kind: str, pooling: str, *, lora_dropout: float = 0.1) -> TaskModel:
    enc = inject_lora(tiny_encoder(kind), rank=2, alpha=4.0, dropout=lora_dropout, targets=["query", "value"])
    model = TaskModel(enc, 16, pooling)
    model.use_head(3, {k: v.clone() for k, v in model.head(3).state_dict().items()}, trainable=True)
    with torch.no_grad():  # non-zero B, so the LoRA path matters
        for p in lora_parameters(lora_sites(enc)):
            p.normal_(0, 0.3)
    return model


def both_paths(model: TaskModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.varlen = True
    a = model(**batch)
    model.varlen = False
    b = model(**batch)
    model.varlen = True
    return a, b


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_varlen_forward_equals_padded_forward_in_evaluation(kind, pooling):
    model = task_model(kind, pooling).eval()
    assert supports_varlen(model.encoder)
    pad = 0 if kind == "bert" else 1
    batch = padded_batch([7, 3, 12, 1, 9, 12, 2], pad_id=pad, types=kind == "bert")
    with torch.no_grad():
        a, b = both_paths(model, batch)
    assert a.shape == b.shape == (7, 3)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_varlen_forward_equals_padded_forward_without_padding():
    model = task_model("bert", "mean").eval()
    with torch.no_grad():
        a, b = both_paths(model, padded_batch([5, 5, 5]))
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def _zero_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "attention_probs_dropout_prob"):
            cfg.attention_probs_dropout_prob = 0.0


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_varlen_gradients_equal_padded_gradients_without_dropout(pooling):
    model = task_model("bert", pooling)
    _zero_dropout(model)
    model.train()
    params = lora_parameters(lora_sites(model.encoder)) + model.head_parameters()
    for p in params:
        p.requires_grad_(True)
    batch = padded_batch([6, 2, 11, 4])
    labels = torch.tensor([0, 2, 1, 2])
    grads = []
    for flag in (True, False):
        model.varlen = flag
        for p in params:
            p.grad = None
        loss = nn.functional.cross_entropy(model(**batch), labels)
        loss.backward()
        grads.append([p.grad.clone() for p in params])
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, atol=ATOL, rtol=0)


def test_varlen_forward_with_mixture_layers():
    """FedLEASE's MoE layers (M = 3, a trained router) sit where LoRA sits: same outputs on both paths."""
    from fedpeft.models.moe.layer import inject_moe_lora, moe_layers

    enc = tiny_encoder("bert")
    inject_moe_lora(enc, ["query", "value"], num_experts=3, own_expert=1, rank=2, lora_alpha=4.0, lora_dropout=0.1)
    with torch.no_grad():
        for _, layer in moe_layers(enc):
            for b in layer.lora_B:
                b.normal_(0, 0.3)
            layer.router.weight.normal_(0, 1.0)
    model = TaskModel(enc, 16, "mean")
    model.use_head(2, {k: v.clone() for k, v in model.head(2).state_dict().items()}, trainable=False)
    model.eval()
    with torch.no_grad():
        a, b = both_paths(model, padded_batch([4, 10, 7]))
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_varlen_follows_a_swapped_layer_list():
    """LEFF assembles a client model by swapping the encoder's layer list (deep-copied blocks with
    configs of their own): the padding-free path runs whatever list is in place."""
    model = task_model("bert", "mean").eval()
    base = model.encoder.get_base_model()
    original = base.encoder.layer
    base.encoder.layer = nn.ModuleList([copy.deepcopy(original[1])])
    try:
        with torch.no_grad():
            a, b = both_paths(model, padded_batch([3, 8]))
    finally:
        base.encoder.layer = original
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_deberta_keeps_the_padded_path():
    from tiny_models import tiny_deberta

    assert not supports_varlen(tiny_deberta().model)


def test_fast_dropout_keeps_with_probability_one_minus_p_and_scales():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    p = 0.1
    y = dropout(x, p, True)
    kept = y != 0
    n = x.numel()
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(int(kept.sum()) - n * (1 - p)) < 5 * sigma
    assert torch.all(y[kept] == torch.tensor(1 / (1 - p)))
    assert torch.equal(dropout(x, p, False), x)
    assert torch.equal(dropout(x, 0.0, True), x)


def test_fast_dropout_follows_the_seeded_generator_and_its_gradient_is_the_mask():
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(5)
    a = dropout(x, 0.3, True)
    torch.manual_seed(5)
    b = dropout(x, 0.3, True)
    assert torch.equal(a, b)
    a.sum().backward()
    expected = (a != 0).float() / 0.7
    torch.testing.assert_close(x.grad, expected)


def test_use_fast_dropout_switches_plain_dropout_modules():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.5)))
    assert use_fast_dropout(m) == 2
    assert all(type(d) is FastDropout for d in (m[1], m[2][0]))
    assert m[1].p == 0.2 and m[2][0].p == 0.5
    m.eval()
    x = torch.randn(3, 4)
    assert torch.equal(m[1](x), x)


# ---------------------------------------------------------------------------------------------- the setting
def _dropouts(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.Dropout)}


def test_encoder_path_padded_is_the_reference_and_varlen_switches_both_levers():
    """--encoder-path padded: the encoder's own forward and torch's dropout everywhere (heads made
    later included); varlen: the padding-free forward and FastDropout everywhere."""
    enc = inject_lora(tiny_encoder("bert"), rank=2, alpha=4.0, dropout=0.1, targets=["query", "value"])
    padded = TaskModel(enc, 16, "mean")  # TaskModel's own default: the reference
    padded.head(2)
    assert padded.varlen is False and _dropouts(padded) == {nn.Dropout}
    enc = inject_lora(tiny_encoder("bert"), rank=2, alpha=4.0, dropout=0.1, targets=["query", "value"])
    fast = TaskModel(enc, 16, "mean", "varlen")
    fast.head(2)
    assert fast.varlen is True and _dropouts(fast) == {FastDropout}


def test_encoder_path_rejects_an_unknown_value():
    from fedpeft.errors import FedPeftError

    with pytest.raises(FedPeftError, match="encoder path"):
        TaskModel(tiny_encoder("bert"), 16, "mean", "packed")


def test_run_config_encoder_path_reaches_the_model():
    """RunConfig(encoder_path=...) → the LoRA runtime's TaskModel; varlen by default (the comparison in docs/benchmarks.md)."""
    from fedpeft.algorithms.lora_runtime import build_lora_runtime
    from fedpeft.config import RunConfig
    from tiny_models import tiny_bert

    bb = tiny_bert()
    for path, varlen in ((None, True), ("padded", False)):
        cfg = RunConfig(method="fedit", target_modules=["query", "value"], precision="fp32",
                        **({} if path is None else {"encoder_path": path}))
        rt = build_lora_runtime(cfg, bb, rank=2)
        assert rt.model.varlen is varlen


# ---------------------------------------------------------------------------------------------- benchmarks/throughput.py
def test_throughput_quick_writes_the_headline_keys(tmp_path, capsys):
    """--quick on a tiny setting (MiniLM, 32 real SST-2 sentences, one pass): the headline keys of
    results.json exist and are plain numbers in (0, 1], or null for bf16 without native bf16."""
    import dataclasses
    import json

    from conftest import data_dir_or_skip, load_benchmark

    data = data_dir_or_skip()
    tp = load_benchmark("throughput")
    tiny = dataclasses.replace(tp.QUICK, reps=1, matmul_square=128, matmul_min_seconds=0.005, local_examples=32)
    assert tp.main(["--quick", "--threads", "1", "--data-dir", data, "--out", str(tmp_path), "--reps", "2",
                    "--sections", "matmul", "training"], settings=tiny) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert all(len(p) == 2 for p in res["local"]["passes"].values())  # --reps replaced the settings' 1
    for m in res["local"]["by_precision"].values():
        fastest, slowest = m["share_of_own_peak_range"]
        assert fastest >= slowest > 0 and m["share_of_adjacent_peak"] > 0
    # every pass bracketed by two probes of its own dtype; the spread is fastest over slowest fp32 probe
    assert all(len(r["probe_gflops"]) == 2 for runs in res["local"]["passes"].values() for r in runs)
    lo, mid, hi = res["host_speed"]["float32"]
    assert 0 < lo <= mid <= hi and res["host_speed_spread"] == pytest.approx(hi / lo)
    assert type(res["fp32_share_of_adjacent_peak"]) is float
    assert isinstance(res["native_bf16"], bool)
    assert type(res["fp32_share_of_fp32_peak"]) is float and 0 < res["fp32_share_of_fp32_peak"] <= 1
    bf16 = res["bf16_share_of_bf16_peak"]
    if res["native_bf16"]:
        assert type(bf16) is float and 0 < bf16 <= 1
    else:
        assert bf16 is None
    assert set(res["fp32_share_of_fp32_peak_by_encoder_path"]) == {"padded", "varlen"}
    assert res["status"].startswith("quick")  # a smoke check is never called final
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "threads 1" in out and "load average" in out


def test_throughput_without_data_says_one_line(tmp_path, monkeypatch, capsys):
    from conftest import load_benchmark

    tp = load_benchmark("throughput")
    monkeypatch.delenv("FEDPEFT_DATA_DIR", raising=False)
    assert tp.main(["--quick", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedpeft: error: SST-2 not found") and "\n" not in err
    assert tp.main(["--quick", "--reps", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "fedpeft: error: --reps must be at least 1, got 0"
