"""Invariants of the adaptive top-M mixture-of-LoRA layer (docs/methods/fedlease.md#mixture-layer): plain
LoRA at M = 1, the router's slots, top-M selection and gates, one evaluation per expert, the float32
router on the un-dropped input, gradient isolation and the fixed top-k ablation.

Everything runs on CPU with tiny random models built from configs. Tolerances are atol 1e-6 unless a
check is exact (`torch.equal`).
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

from fedpeft.errors import FedPeftError
from fedpeft.models.adapters import layer_index_of
from fedpeft.models.moe.export import export_expert_as_peft, load_routers, save_routers
from fedpeft.models.moe.layer import (
    MoELoRALinear,
    inject_moe_lora,
    moe_disabled,
    moe_layers,
    remove_moe_lora,
    set_own_expert,
    set_record_usage,
)
from fedpeft.models.moe.state import load_moe_state, moe_key, moe_state, parse_moe_key

D = 16
R = 2
ALPHA = 4.0  # s = ALPHA / R = 2
TARGETS = ["query", "value"]


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def bert_config(layers: int = 2) -> BertConfig:
    return BertConfig(
        hidden_size=D,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=100,
        num_labels=2,
    )


def tiny_bert(layers: int = 2, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(bert_config(layers)).eval()


def tiny_bert_cls(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config()).eval()


def make_layer(m: int, own: int = 0, d_out: int = 12, seed: int = 0, **kw) -> MoELoRALinear:
    """A standalone layer with random experts (B ≠ 0) and a random router."""
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(D, d_out), m, own, R, ALPHA, kw.pop("lora_dropout", 0.1), **kw).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for a in layer.lora_A:
            a.copy_(torch.randn(a.shape, generator=g) * 0.3)
        for b in layer.lora_B:
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
    return layer


def randomize_moe(model: nn.Module, seed: int, b_scale: float = 0.3, router_scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in moe_layers(model):
            for a in layer.lora_A:
                a.copy_(torch.randn(a.shape, generator=g) * 0.3)
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * b_scale)
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) * router_scale)


def f2_layout(m: int, own: int) -> list[int]:
    """π, the slot → expert map (own expert on slots 0..M-1, the others ascending), written out
    independently of the implementation."""
    return [own] * m + sorted(set(range(m)) - {own})


def plain_lora(layer: MoELoRALinear, x: torch.Tensor, expert: int) -> torch.Tensor:
    """W0 x + s · B_e A_e x, the way PEFT computes it."""
    a, b = layer.lora_A[expert], layer.lora_B[expert]
    return layer.base_layer(x) + F.linear(F.linear(x, a), b) * (ALPHA / R)


def reference_forward(layer: MoELoRALinear, x: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The layer's five steps done naively: one token at a time, one selected slot at a time (float64
    expert sums)."""
    m, own, s = layer.num_experts, layer.own_expert, ALPHA / R
    pi = f2_layout(m, own)
    rows = []
    for t in x.reshape(-1, x.shape[-1]):
        y = layer.base_layer(t).double()
        if m == 1:
            terms = [(0, 1.0)]
        else:
            probs = torch.softmax(layer.router.weight @ t, dim=0).double()
            order = sorted(range(2 * m - 1), key=lambda q: (-probs[q].item(), q))[:m]
            total = sum(probs[q].item() for q in order)
            terms = [(pi[q], probs[q].item() / total if renormalize else probs[q].item()) for q in order]
        for e, w in terms:
            a, b = layer.lora_A[e].double(), layer.lora_B[e].double()
            y = y + w * s * (b @ (a @ t.double()))
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------------------------------
# the mixture layer: slots, selection, gates, expert evaluation, router precision
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["adaptive_topM", "fixed_topk"])
def test_item1_m1_is_plain_lora_for_any_router(routing):
    """M = 1 is exactly plain LoRA, W0 x + s·B A x, whatever the router's weights, for 3-D and 2-D input."""
    layer = make_layer(1, 0, routing=routing, top_k=1)
    assert layer.router.out_features == 1
    x = torch.randn(3, 5, D)
    expected = plain_lora(layer, x, 0)
    assert not torch.equal(expected, layer.base_layer(x))  # the adapter does something
    for scale in (1.0, -50.0, 0.0):
        with torch.no_grad():
            layer.router.weight.normal_().mul_(scale)
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer(x[0]), expected[0])  # 2-D input too


@pytest.mark.parametrize("m", [2, 3, 4, 5, 6])
def test_item2_router_layout(m):
    """The router has 2M-1 slots: slots 0..M-1 belong to the own expert, the rest to the other experts in
    ascending order, and the forward uses that layout."""
    for own in range(m):
        layer = MoELoRALinear(nn.Linear(D, D), m, own, R, ALPHA)
        assert layer.router.out_features == 2 * m - 1
        layout = layer.slot_experts()
        assert layout == f2_layout(m, own)
        assert layout.count(own) == m
        assert all(layout.count(e) == 1 for e in range(m) if e != own)
        assert layer.slot_to_expert.tolist() == layout  # what the forward uses


@pytest.mark.parametrize("m", [2, 3, 5])
def test_item3_own_expert_always_selected(m):
    """Every token selects its own expert (it holds M of the 2M-1 slots) and uses between 1 and M distinct
    experts."""
    for own in range(m):
        layer = make_layer(m, own, seed=own)
        with torch.no_grad():
            layer.router.weight.mul_(3.0)  # peaked distributions: other experts often win slots
        gamma = layer.gate(torch.randn(1000, D))
        distinct = (gamma > 0).sum(dim=-1)
        assert bool((gamma[:, own] > 0).all())
        assert int(distinct.min()) >= 1 and int(distinct.max()) <= m
        assert int(distinct.max()) > 1  # not vacuous: other experts do get selected


@pytest.mark.parametrize("m", [2, 3, 5])
def test_item4_gate_sums(m):
    """With renormalisation the gates sum to 1; without it they sum to the top-M probability mass."""
    x = torch.randn(500, D)
    on = make_layer(m, 1, renormalize=True)
    assert torch.allclose(on.gate(x).sum(-1), torch.ones(500), atol=1e-6, rtol=0)
    off = make_layer(m, 1, renormalize=False)
    probs = torch.softmax((x.double() @ off.router.weight.double().t()), dim=-1)
    top_sum = probs.topk(m, dim=-1).values.sum(-1)
    got = off.gate(x).sum(-1).double()
    assert torch.allclose(got, top_sum, atol=1e-6, rtol=0)
    assert bool((got < 1 - 1e-3).any())  # not renormalised


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_item5_zero_router_ties_go_to_own_expert(m):
    """A zero router makes every slot tie; the stable sort gives the M own slots, γ_own = 1, and the layer
    equals the own expert's plain LoRA (to float rounding: the fused expert matmul sums M·r terms, of
    which the other experts' are exact zeros)."""
    for own in range(m):
        layer = make_layer(m, own, seed=10 + own)
        with torch.no_grad():
            layer.router.weight.zero_()
        x = torch.randn(4, 7, D)
        slots, _ = layer.select(layer.router_probs(x.reshape(-1, D)))
        assert torch.equal(slots, torch.arange(m).expand(28, m))
        gamma = layer.gate(x.reshape(-1, D))
        assert torch.equal(gamma, F.one_hot(torch.full((28,), own), m).float())
        torch.testing.assert_close(layer(x), plain_lora(layer, x, own), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(x[1]), plain_lora(layer, x[1], own), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("renormalize", [True, False])
def test_item6_vectorised_equals_reference_loop(m, renormalize):
    """The vectorised layer equals a naive per-token, per-slot reference of the five steps (float64), with
    and without renormalisation."""
    layer = make_layer(m, m // 2, seed=m, renormalize=renormalize)
    for x in (torch.randn(6, D), torch.randn(2, 4, D)):
        got = layer(x)
        assert got.shape == (*x.shape[:-1], 12)
        ref = reference_forward(layer, x, renormalize)
        # float32 forward against a float64 reference: outputs are O(1) and sum over D, r and M terms, so
        # rounding alone reaches ~1e-6 on some CPUs (1.02e-6 measured on a Xeon); a wrong slot, gate or
        # expert is off by O(0.1)
        assert torch.allclose(got.double(), ref, atol=1e-5, rtol=0), (got.double() - ref).abs().max()


def test_item7_each_expert_evaluated_once_per_forward():
    """Each expert is evaluated once per forward: one expert call per layer and forward, and FLOPs linear in
    M (never M² expert products)."""
    model = tiny_bert()
    inject_moe_lora(model, TARGETS, 4, 1, R, ALPHA, 0.0)
    ids = torch.randint(0, 100, (2, 5))
    model(input_ids=ids)
    model(input_ids=ids)
    assert [layer.expert_calls for _, layer in moe_layers(model)] == [2, 2, 2, 2]

    # FLOPs are linear in M: base + router + one (A_e, B_e) pair per expert, never M² products.
    from torch.utils.flop_counter import FlopCounterMode

    n, d_out = 40, 12
    for m in (2, 4, 6):
        layer = make_layer(m, 0, d_out=d_out)
        with FlopCounterMode(display=False) as counter:
            layer(torch.randn(n, D))
        expected = 2 * n * (D * d_out + D * (2 * m - 1) + m * R * (D + d_out))
        assert counter.get_total_flops() == expected


def test_item8_zero_b_gives_base_logits_exactly():
    """With every B = 0 the adapted model gives the base model's logits exactly; a non-zero B changes them."""
    base = tiny_bert_cls()
    model = copy.deepcopy(base)
    inject_moe_lora(model, TARGETS, 3, 1, R, ALPHA, 0.05)
    randomize_moe(model, seed=3, b_scale=0.0)
    ids = torch.randint(0, 100, (3, 6))
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with torch.no_grad():
        moe_layers(model)[0][1].lora_B[2].fill_(0.5)  # control: a non-zero B changes the logits
    assert not torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_item9_router_float32_under_bf16_autocast():
    """The router's logits and probabilities stay float32 under bf16 autocast (so half precision cannot
    create ties), the gates equal those without autocast, and the rest of the layer runs in bf16."""
    layer = make_layer(3, 1).train()
    seen = {}
    select = layer.select

    def spy(probs):
        seen["probs"] = probs.dtype
        return select(probs)

    layer.select = spy
    layer.router.register_forward_hook(lambda mod, inp, out: seen.__setitem__("logits", out.dtype))
    x = torch.randn(2, 5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        gamma_autocast = layer.gate(x.reshape(-1, D))
    assert y.dtype == torch.bfloat16  # the rest of the layer did run under autocast
    assert seen == {"probs": torch.float32, "logits": torch.float32}
    assert torch.equal(gamma_autocast, layer.gate(x.reshape(-1, D)))
    y.float().sum().backward()
    assert layer.router.weight.grad is not None and layer.lora_A[1].grad.dtype == torch.float32


def test_item9_router_sees_undropped_input():
    """The router reads the un-dropped input, so LoRA dropout (active on the expert path) does not change the
    routing."""
    layer = make_layer(3, 0, lora_dropout=0.9).train()
    seen = {}
    layer.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    layer.router.register_forward_pre_hook(lambda mod, args: seen.__setitem__("router_in", args[0]))
    x = torch.randn(4, 6, D)
    torch.manual_seed(0)
    y_train = layer(x)
    assert torch.equal(seen["router_in"], seen["x"].reshape(-1, D))
    layer.eval()
    assert not torch.allclose(y_train, layer(x))  # dropout p = 0.9 was active on the expert path


# ----------------------------------------------------------------------------------------------------
# gradient isolation and switching the own expert
# ----------------------------------------------------------------------------------------------------


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def expected_trainable(model: nn.Module, own: int, head: bool) -> set[str]:
    names = set()
    for path, _ in moe_layers(model):
        names |= {f"{path}.lora_A.{own}", f"{path}.lora_B.{own}", f"{path}.router.weight"}
    if head:
        names |= {"classifier.weight", "classifier.bias"}
    return names


def train_step(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (4, 8), generator=g)
    labels = torch.randint(0, 2, (4,), generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    F.cross_entropy(model(input_ids=ids).logits, labels).backward()
    return before


@pytest.mark.parametrize("head", [True, False])
def test_item10_gradient_isolation(head):
    """Only the own expert, the routers and (when unfrozen) the head get gradients and move under AdamW with
    weight decay; the other experts and the backbone get no gradient and stay bit-identical."""
    model = tiny_bert_cls()
    inject_moe_lora(model, TARGETS, 3, 1, R, ALPHA, 0.05)
    randomize_moe(model, seed=5)
    if head:  # head_policy local/shared: the caller unfreezes the head
        model.classifier.requires_grad_(True)
    want = expected_trainable(model, 1, head)
    assert trainable_names(model) == want
    before = train_step(model, seed=1)
    for name, p in model.named_parameters():
        if name in want:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        else:
            assert p.grad is None, name
    torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05).step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in want), name


@pytest.mark.parametrize("own", [0, 2])
def test_gradients_match_plain_autograd(own):
    """The fused expert op's hand-written backward agrees with autograd on the textbook formula."""
    layer = make_layer(3, own, lora_dropout=0.0).train()
    x = torch.randn(3, 5, D, requires_grad=True)
    weights = torch.randn(3, 5, 12)
    (layer(x) * weights).sum().backward()
    got = [x.grad, layer.lora_A[own].grad, layer.lora_B[own].grad, layer.router.weight.grad]
    assert all(g is not None for g in got)

    ref = copy.deepcopy(layer)
    for p in ref.parameters():
        p.grad = None
    xr = x.detach().clone().requires_grad_(True)
    gamma = ref.gate(xr.reshape(-1, D)).reshape(3, 5, 3)
    y = ref.base_layer(xr) + sum(
        gamma[..., e : e + 1] * F.linear(F.linear(xr, ref.lora_A[e]), ref.lora_B[e]) * (ALPHA / R) for e in range(3)
    )
    (y * weights).sum().backward()
    want = [xr.grad, ref.lora_A[own].grad, ref.lora_B[own].grad, ref.router.weight.grad]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-5)
    assert all(layer.lora_A[e].grad is None for e in range(3) if e != own)


def test_set_own_expert_switches_trainable_set():
    model = tiny_bert_cls()
    inject_moe_lora(model, TARGETS, 4, 0, R, ALPHA, 0.0)
    randomize_moe(model, seed=6)
    train_step(model, seed=2)
    old = [layer.lora_A[0] for _, layer in moe_layers(model)]
    assert all(p.grad is not None for p in old)
    set_own_expert(model, 3)
    assert trainable_names(model) == expected_trainable(model, 3, head=False)
    assert all(p.grad is None for p in old)  # stale gradients of the previous own expert are dropped
    assert all(layer.slot_experts() == f2_layout(4, 3) for _, layer in moe_layers(model))
    for _, layer in moe_layers(model):
        layer.router.weight.grad = None
    train_step(model, seed=3)
    for _, layer in moe_layers(model):
        assert [layer.lora_A[e].grad is not None for e in range(4)] == [False, False, False, True]
        assert [layer.lora_B[e].grad is not None for e in range(4)] == [False, False, False, True]
    with pytest.raises(FedPeftError, match="own_expert"):
        set_own_expert(model, 4)


# ----------------------------------------------------------------------------------------------------
# the fixed top-k routing ablation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_item30_fixed_topk(k):
    """The fixed top-k routing ablation: a router of M slots (slot e is expert e), exactly k experts per
    token, gates renormalised to 1, the own expert not forced, ties to the lowest expert ids."""
    m, own = 4, 2
    layer = make_layer(m, own, routing="fixed_topk", top_k=k)
    assert layer.router.out_features == m
    assert layer.slot_experts() == list(range(m))
    x = torch.randn(600, D)
    gamma = layer.gate(x)
    assert bool(((gamma > 0).sum(-1) == k).all())
    assert torch.allclose(gamma.sum(-1), torch.ones(600), atol=1e-6, rtol=0)
    assert bool((gamma[:, own] == 0).any())  # the own expert is not forced
    ref = torch.softmax(x @ layer.router.weight.t(), -1).topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal((gamma > 0).nonzero()[:, 1].view(600, k), ref)
    with torch.no_grad():
        layer.router.weight.zero_()  # ties go to the lowest expert ids
    assert torch.equal(layer.gate(x[:5]) > 0, (torch.arange(m) < k).expand(5, m))


def test_fixed_topk_larger_than_m_is_clamped_with_warning():
    with pytest.warns(UserWarning, match="top_k"):
        layer = MoELoRALinear(nn.Linear(D, D), 2, 0, R, ALPHA, routing="fixed_topk", top_k=3)
    assert layer.top_k == 2


# ----------------------------------------------------------------------------------------------------
# structured keys, strict loads, injection
# ----------------------------------------------------------------------------------------------------


def test_moe_key_format_and_parse():
    assert moe_key(10, "query", 12, "A") == "layer.10.query.expert.12.A"
    assert moe_key(10, "query", 12, "B") == "layer.10.query.expert.12.B"
    assert moe_key(10, "query", None, "router") == "layer.10.query.router"
    assert parse_moe_key("layer.10.query.expert.12.A") == (10, "query", 12, "A")
    assert parse_moe_key("layer.3.q_proj.router") == (3, "q_proj", None, "router")
    for bad in ("layer.1g.query.expert.0.A", "layer.01.query.router", "layer.1.query.expert.1.C",
                "layer.1.self.query.router", "layer.1.query.expert.2", "base.layer.1.query.router"):
        with pytest.raises(FedPeftError):
            parse_moe_key(bad)
    with pytest.raises(ValueError):
        moe_key(1, "query", 3, "router")
    with pytest.raises(ValueError):
        moe_key(1, "self.query", 3, "A")
    assert layer_index_of("encoder.layer.10.attention.self.query") == 10
    assert layer_index_of("model.layers.3.self_attn.q_proj") == 3
    assert layer_index_of("classifier") is None


def test_keys_round_trip_m12_with_layers_past_ten():
    src = tiny_bert(layers=12, seed=1)
    inject_moe_lora(src, TARGETS, 12, 11, R, ALPHA, 0.0)
    randomize_moe(src, seed=7)
    state = moe_state(src)
    expected = {moe_key(layer, mod, e, f) for layer in range(12) for mod in TARGETS for e in range(12) for f in "AB"}
    expected |= {moe_key(layer, mod, None, "router") for layer in range(12) for mod in TARGETS}
    assert set(state) == expected and len(state) == 12 * 2 * 25
    assert all(moe_key(*parse_moe_key(k)) == k for k in state)
    layer10 = src.get_submodule("encoder.layer.10.attention.self.query")
    assert torch.equal(state["layer.10.query.expert.11.A"], layer10.lora_A[11])
    assert torch.equal(state["layer.10.query.router"], layer10.router.weight)

    dst = tiny_bert(layers=12, seed=2)
    inject_moe_lora(dst, TARGETS, 12, 0, R, ALPHA, 0.0)
    assert not torch.equal(moe_state(dst)["layer.1.value.expert.10.B"], state["layer.1.value.expert.10.B"])
    load_moe_state(dst, state)
    assert all(torch.equal(v, state[k]) for k, v in moe_state(dst).items())

    upload = moe_state(src, experts=[1], include_router=True)
    assert {parse_moe_key(k)[2] for k in upload} == {1, None}
    assert len(upload) == 12 * 2 * 3
    assert not any(".expert.1" in k and ".expert.1." not in k for k in upload)
    assert len(moe_state(src, experts=[10, 11], include_router=False)) == 12 * 2 * 4


def test_strict_load_errors_name_the_key():
    model = tiny_bert()
    inject_moe_lora(model, TARGETS, 3, 0, R, ALPHA, 0.0)
    state = moe_state(model)
    snapshot = moe_state(model)

    missing = dict(state)
    del missing["layer.1.value.expert.2.B"]
    with pytest.raises(FedPeftError, match=r"layer\.1\.value\.expert\.2\.B"):
        load_moe_state(model, missing)
    load_moe_state(model, missing, strict=False)  # explicitly partial: allowed

    extra = dict(state)
    extra["layer.0.query.expert.3.A"] = torch.zeros(R, D)
    with pytest.raises(FedPeftError, match=r"layer\.0\.query\.expert\.3\.A"):
        load_moe_state(model, extra)
    with pytest.raises(FedPeftError, match=r"layer\.0\.query\.expert\.3\.A"):
        load_moe_state(model, extra, strict=False)
    with pytest.raises(FedPeftError, match="not a mixture-of-LoRA state key"):
        load_moe_state(model, {**state, "encoder.layer.0.query.lora_A": torch.zeros(R, D)})

    bad_shape = {k: v + 1 for k, v in state.items()}
    bad_shape["layer.0.query.router"] = torch.zeros(4, D)
    with pytest.raises(FedPeftError, match=r"layer\.0\.query\.router"):
        load_moe_state(model, bad_shape)
    # nothing was written by the failed loads
    assert all(torch.equal(v, snapshot[k]) for k, v in moe_state(model).items())

    # a subset load is strict against the declared subset
    own_only = moe_state(model, experts=[0], include_router=False)
    load_moe_state(model, own_only, experts=[0], include_router=False)
    with pytest.raises(FedPeftError, match=r"layer\.0\.query\.router"):
        load_moe_state(model, own_only, experts=[0], include_router=True)


def test_inject_and_remove():
    base = tiny_bert()
    model = copy.deepcopy(base)
    ids = torch.randint(0, 100, (2, 5))
    out = inject_moe_lora(model, TARGETS, 2, 0, R, ALPHA, 0.0)
    assert [name for name, _ in out] == [f"encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in TARGETS]
    addresses = [(layer.layer_index, layer.module_name) for _, layer in out]
    assert addresses == [(0, "query"), (0, "value"), (1, "query"), (1, "value")]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "router" not in n)
    with pytest.raises(FedPeftError, match="already"):
        inject_moe_lora(model, TARGETS, 2, 0, R, ALPHA, 0.0)
    randomize_moe(model, seed=1)
    with moe_disabled(model):
        assert torch.equal(model(input_ids=ids).last_hidden_state, base(input_ids=ids).last_hidden_state)
    assert not torch.equal(model(input_ids=ids).last_hidden_state, base(input_ids=ids).last_hidden_state)
    remove_moe_lora(model)
    assert not moe_layers(model)
    assert type(model.encoder.layer[1].attention.self.query) is nn.Linear
    assert torch.equal(model(input_ids=ids).last_hidden_state, base(input_ids=ids).last_hidden_state)
    with pytest.raises(FedPeftError, match="no nn.Linear"):
        inject_moe_lora(model, ["q_proj"], 2, 0, R, ALPHA, 0.0)


def test_merge_path_equals_one_hot_mixture():
    model = tiny_bert()
    inject_moe_lora(model, TARGETS, 3, 2, R, ALPHA, 0.0)
    randomize_moe(model, seed=4, router_scale=0.0)  # zero routers: γ_own = 1
    ids = torch.randint(0, 100, (2, 5))
    want = model(input_ids=ids).last_hidden_state
    base_w = model.encoder.layer[0].attention.self.query.base_layer.weight.clone()
    remove_moe_lora(model, merge_expert=2)
    assert torch.allclose(model(input_ids=ids).last_hidden_state, want, atol=1e-5, rtol=0)
    assert not torch.equal(model.encoder.layer[0].attention.self.query.weight, base_w)


def test_usage_record():
    layer = make_layer(4, 1)
    x = torch.randn(300, D)
    layer(x)
    assert layer.mean_distinct_experts is None  # recording is off by default
    layer.record_usage = True
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
    layer(x.view(3, 100, D))
    gamma = layer.gate(x)
    assert layer.usage_tokens == 300
    assert layer.mean_distinct_experts == pytest.approx(float((gamma > 0).sum()) / 300)
    assert 1.0 < layer.mean_distinct_experts <= 4.0
    assert layer.usage_expert_tokens == (gamma > 0).sum(0).tolist() and layer.usage_expert_tokens[1] == 300

    model = tiny_bert()
    inject_moe_lora(model, TARGETS, 3, 0, R, ALPHA, 0.0)
    randomize_moe(model, seed=2, router_scale=0.0)
    set_record_usage(model, True)
    model(input_ids=torch.randint(0, 100, (2, 5)))
    assert [layer.mean_distinct_experts for _, layer in moe_layers(model)] == [1.0] * 4


def _router_reference(layer: MoELoRALinear, x: torch.Tensor) -> dict[str, float]:
    """The router logs computed token by token from γ and ω̂, independently of the layer's counters."""
    gamma, probs = layer.gate(x), torch.softmax(layer.router(x).float(), dim=-1)
    own = gamma[:, layer.own_expert]
    one_hot = (gamma > 0).sum(-1) == 1
    return {"gamma_own": own.mean().item(), "own_only_share": (one_hot & (own > 0)).float().mean().item(),
            "single_expert_share": one_hot.float().mean().item(),
            "router_entropy": (-(probs * probs.log()).sum(-1)).mean().item()}


@pytest.mark.parametrize("m,routing,k", [(4, "adaptive_topM", 2), (3, "fixed_topk", 2), (3, "fixed_topk", 1)])
def test_router_logs_are_in_range_and_match_a_token_by_token_count(m, routing, k):
    layer = make_layer(m, 1, routing=routing, top_k=k)
    x = torch.randn(200, D)
    assert layer.router_stats() is None  # nothing recorded yet
    layer.record_usage = True
    layer(x.view(4, 50, D))
    got = layer.router_stats()
    for name, value in _router_reference(layer, x).items():
        assert got[name] == pytest.approx(value, abs=1e-5), name
    for name in ("gamma_own", "own_only_share", "single_expert_share"):
        assert 0.0 <= got[name] <= 1.0, name
    width = layer.router.out_features
    assert 0.0 < got["router_entropy"] <= math.log(width) + 1e-6
    assert got["own_only_share"] <= got["single_expert_share"] and got["own_only_share"] <= got["gamma_own"]
    if routing == "fixed_topk" and k == 1:  # one expert per token: the router never gets a gradient
        assert got["single_expert_share"] == 1.0
        assert got["own_only_share"] == pytest.approx(got["gamma_own"])  # γ_own is 0 or 1 per token
    else:
        assert got["single_expert_share"] < 1.0


def test_router_logs_at_the_extremes():
    # a sharp router whose own slots always win: every token routed to the own expert alone
    layer = make_layer(3, 2, routing="fixed_topk", top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 1e4  # slot 2 = expert 2 (own) for every token with x_0 > 0
    layer.record_usage = True
    layer(torch.randn(100, D).abs())
    got = layer.router_stats()
    assert got["gamma_own"] == 1.0 and got["own_only_share"] == 1.0 and got["single_expert_share"] == 1.0
    assert got["router_entropy"] == pytest.approx(0.0, abs=1e-6)
    # a zero router (uniform ω̂): adaptive top-M keeps the own slots (ties), entropy log(2M - 1)
    layer = make_layer(3, 1)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer.record_usage = True
    layer(torch.randn(10, D))
    got = layer.router_stats()
    assert got["own_only_share"] == 1.0 and got["gamma_own"] == 1.0
    assert got["router_entropy"] == pytest.approx(math.log(5), abs=1e-6)
    # one expert: plain LoRA, γ_own = 1, no routing choice
    layer = make_layer(1, 0)
    layer.record_usage = True
    layer(torch.randn(7, D))
    assert layer.router_stats() == {"gamma_own": 1.0, "own_only_share": 1.0, "single_expert_share": 1.0,
                                    "router_entropy": 0.0}


def test_routers_save_and_load(tmp_path):
    src, dst = tiny_bert(), tiny_bert()
    inject_moe_lora(src, TARGETS, 3, 1, R, ALPHA, 0.0)
    inject_moe_lora(dst, TARGETS, 3, 1, R, ALPHA, 0.0)
    save_routers(src, tmp_path / "routers.safetensors")
    assert set(load_file(str(tmp_path / "routers.safetensors"))) == {
        moe_key(i, t, None, "router") for i in range(2) for t in TARGETS
    }
    load_routers(dst, tmp_path / "routers.safetensors")
    for (_, a), (_, b) in zip(moe_layers(src), moe_layers(dst)):
        assert torch.equal(a.router.weight, b.router.weight)
        assert not torch.equal(a.lora_A[0], b.lora_A[0])


# ----------------------------------------------------------------------------------------------------
# PEFT export
# ----------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_export_expert_loads_in_peft_and_matches(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    base = tiny_bert(seed=3)
    model = copy.deepcopy(base)
    inject_moe_lora(model, TARGETS, 3, 2, R, ALPHA, 0.05)
    randomize_moe(model, seed=9, router_scale=0.0)  # zero routers: γ_2 = 1 by the tie rule
    model.eval()
    ids = torch.randint(0, 100, (2, 7))
    want = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(want, base(input_ids=ids).last_hidden_state, atol=1e-3)

    export_expert_as_peft(model, 2, tmp_path, "tiny-bert", TARGETS)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (R, ALPHA, "LORA")
    assert sorted(config["target_modules"]) == TARGETS and config["base_model_name_or_path"] == "tiny-bert"
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    assert set(saved) == set(get_peft_model_state_dict(reference))
    assert torch.equal(saved["base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"],
                       model.encoder.layer[1].attention.self.value.lora_B[2])

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*adapter keys.*")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    got = peft_model(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
