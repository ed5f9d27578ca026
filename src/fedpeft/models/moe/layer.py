"""The adaptive top-M mixture-of-LoRA-experts layer of FedLEASE (docs/methods/fedlease.md#mixture-layer).

One `MoELoRALinear` wraps a frozen `nn.Linear` W0 and holds M LoRA experts (A_e, B_e) and a router G.
For every token x, in five steps:

    (1) ω̂ = softmax(G x)                     float32, also under autocast; G sees the UN-dropped x
    (2) slot p → expert π(p): slots 0..M−1 → own expert j; slots M..2M−2 → the other experts, ascending
    (3) S = the M largest slots (stable descending sort: ties go to the lower slot, i.e. to own slots)
    (4) γ_e = Σ_{p∈S, π(p)=e} ω̂_p, renormalised to Σ_e γ_e = 1 when `renormalize` (the default)
    (5) y = W0 x + s · Σ_e γ_e · B_e A_e dropout(x),  s = lora_alpha / r

The own expert holds M of the 2M−1 slots, so every token selects it. `routing="fixed_topk"` is the
fixed top-k routing ablation (docs/methods/fedlease.md#ablations): a router of width M (slot e → expert e),
exactly `top_k` experts per token, the own expert not forced.

Every expert is evaluated once per forward (one fused call, `_MixExperts`): the gate is applied in rank
space, y = Σ_e B_e (γ_e · A_e x), so nothing of size M² or [M, tokens, d_out] is formed. The forward runs
one matmul pair per expert, so a one-hot γ reproduces that expert's plain LoRA bit for bit (with equal
probabilities, e.g. a zero router, the own slots win and γ_own = 1); the backward works on the concatenated
factors and skips weight gradients of frozen experts. M = 1 takes the plain LoRA path
(W0 x + s·B A dropout(x)), so it is plain LoRA exactly.

Gradient isolation (Phase 2 trains only the own expert, docs/methods/fedlease.md#phase-2-training): each
expert factor is its own `nn.Parameter` in an `nn.ParameterList`; only the own expert has
`requires_grad=True`, so the others get `grad is None` and no optimiser can move them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.errors import FedPeftError
from fedpeft.models.adapters import layer_index_of

__all__ = [
    "ROUTER_STATS",
    "ROUTINGS",
    "MoELoRALinear",
    "inject_moe_lora",
    "moe_disabled",
    "moe_layers",
    "remove_moe_lora",
    "set_own_expert",
    "set_record_usage",
    "solo_expert",
]

ROUTINGS = ("adaptive_topM", "fixed_topk")
# The router logs a layer keeps while recording usage (MoELoRALinear.router_stats)
ROUTER_STATS = ("gamma_own", "own_only_share", "single_expert_share", "router_entropy")


# ----------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------


class MoELoRALinear(nn.Module):
    """A frozen `nn.Linear` plus M LoRA experts mixed per token by an adaptive top-M router."""

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        own_expert: int,
        rank: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        routing: str = "adaptive_topM",
        top_k: int = 2,
        renormalize: bool = True,
        *,
        layer_index: int | None = None,
        module_name: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise FedPeftError(f"MoELoRALinear wraps torch.nn.Linear, got {type(base_layer).__name__}.")
        _check_int("num_experts", num_experts, 1)
        _check_int("rank", rank, 1)
        if routing not in ROUTINGS:
            raise FedPeftError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}.")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise FedPeftError(f"lora_dropout must lie in [0, 1), got {lora_dropout}.")
        if routing == "fixed_topk":
            _check_int("top_k", top_k, 1)
            if top_k > num_experts:
                warnings.warn(
                    f"top_k = {top_k} exceeds the number of experts M = {num_experts}; using top_k = {num_experts}.",
                    stacklevel=2,
                )
                top_k = num_experts

        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_experts = int(num_experts)
        self.rank = int(rank)
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / rank
        self.lora_dropout_p = float(lora_dropout)
        self.routing = routing
        self.top_k = int(top_k)
        self.renormalize = bool(renormalize)
        self.layer_index = layer_index
        self.module_name = module_name
        # Experts are counted once per forward (one batched evaluation of all of them).
        self.expert_calls = 0
        self.record_usage = False
        self.adapters_enabled = True
        self.solo: int | None = None  # set: expert `solo` alone, as plain LoRA (solo_expert below)
        self.reset_usage()

        device = base_layer.weight.device
        kw = {"device": device, "dtype": torch.float32}
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(rank, self.in_features, **kw)) for _ in range(num_experts)]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(self.out_features, rank, **kw)) for _ in range(num_experts)]
        )
        width = 2 * num_experts - 1 if routing == "adaptive_topM" else num_experts
        self.router = nn.Linear(self.in_features, width, bias=False, **kw)
        self.register_buffer("slot_to_expert", torch.zeros(width, dtype=torch.long, device=device), persistent=False)
        self.own_expert = -1
        self.reset_parameters()
        self.set_own_expert(own_expert)

    # -- set-up ---------------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """A Kaiming-uniform (a = √5), B = 0 (PEFT's LoRA init); the router Kaiming-uniform (a = √5) too."""
        with torch.no_grad():
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            for b in self.lora_B:
                b.zero_()
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    def set_own_expert(self, own_expert: int) -> None:
        """Make `own_expert` the trainable expert and lay the router slots out: own expert first (cheap)."""
        _check_int("own_expert", own_expert, 0)
        if own_expert >= self.num_experts:
            raise FedPeftError(f"own_expert must be below num_experts = {self.num_experts}, got {own_expert}.")
        self.own_expert = int(own_expert)
        for e in range(self.num_experts):
            trainable = e == own_expert
            for p in (self.lora_A[e], self.lora_B[e]):
                p.requires_grad_(trainable)
                if not trainable:
                    p.grad = None
        self.slot_to_expert.copy_(torch.tensor(self.slot_experts(), dtype=torch.long))

    def slot_experts(self) -> list[int]:
        """π as a list: π[p] is the expert behind router slot p (step 2; identity under fixed_topk)."""
        m, j = self.num_experts, self.own_expert
        if self.routing == "fixed_topk":
            return list(range(m))
        return [j] * m + [e for e in range(m) if e != j]

    def reset_usage(self) -> None:
        self.usage_distinct_sum = 0
        self.usage_tokens = 0
        self.usage_expert_tokens = [0] * self.num_experts
        # router logs (docs/methods/fedlease.md#router-logs): sums over the recorded tokens
        self.usage_gamma_own = 0.0  # γ_own, the own expert's gate mass
        self.usage_own_only = 0  # tokens with γ_own = 1: routed to the own expert alone
        self.usage_single = 0  # tokens whose γ is one-hot (any expert): a renormalised router gets no gradient
        self.usage_entropy = 0.0  # entropy (nats) of the router's softmax ω̂ over its slots

    def router_stats(self) -> dict[str, float] | None:
        """Means over the tokens recorded since the last reset: `gamma_own`, `own_only_share`,
        `single_expert_share` (each in [0, 1]) and `router_entropy` (nats, in [0, log(slots)]); None if none seen."""
        if self.usage_tokens == 0:
            return None
        n = self.usage_tokens
        return {"gamma_own": self.usage_gamma_own / n, "own_only_share": self.usage_own_only / n,
                "single_expert_share": self.usage_single / n, "router_entropy": self.usage_entropy / n}

    @property
    def mean_distinct_experts(self) -> float | None:
        """Mean number of distinct experts with γ > 0 per token since the last reset (None if none seen)."""
        if self.usage_tokens == 0:
            return None
        return self.usage_distinct_sum / self.usage_tokens

    def stacked_lora_A(self) -> torch.Tensor:
        """All experts' A as one [M, r, d_in] tensor (a copy)."""
        return torch.stack(tuple(self.lora_A))

    def stacked_lora_B(self) -> torch.Tensor:
        """All experts' B as one [M, d_out, r] tensor (a copy)."""
        return torch.stack(tuple(self.lora_B))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"own_expert={self.own_expert}, rank={self.rank}, scaling={self.scaling}, routing={self.routing}"
            + (f", top_k={self.top_k}" if self.routing == "fixed_topk" else "")
            + f", renormalize={self.renormalize}"
        )

    # -- routing (steps 1–4) --------------------------------------------------------------------------

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Step 1: float32 softmax of the router logits, autocast disabled, so half precision cannot create
        ties; x: [..., d_in], un-dropped, so dropout does not change the routing."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.router(x.to(self.router.weight.dtype))
        return torch.softmax(logits.float(), dim=-1)

    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: the k largest slots by a stable descending sort (ties → lower slot, i.e. own slots);
        returns (slots, probs)."""
        k = self.num_experts if self.routing == "adaptive_topM" else self.top_k
        values, slots = torch.sort(probs, dim=-1, descending=True, stable=True)
        return slots[..., :k], values[..., :k]

    def gates(self, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Step 4: γ ∈ [..., M], selected weights scatter-added per expert, then optionally renormalised.

        Renormalising γ after the scatter equals renormalising the selected weights first and
        makes a one-hot γ exactly 1.
        """
        experts = self.slot_to_expert[slots]
        gamma = weights.new_zeros(*weights.shape[:-1], self.num_experts).scatter_add(-1, experts, weights)
        if self.renormalize:
            gamma = gamma / gamma.sum(dim=-1, keepdim=True)
        return gamma

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """γ for every token of x [..., d_in] → [..., M] (float32). For M = 1 this is all ones."""
        if self.num_experts == 1:
            return torch.ones(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
        return self.gates(*self.select(self.router_probs(x)))

    # -- forward (step 5) -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.adapters_enabled:
            return result
        if self.num_experts == 1 or self.solo is not None:  # plain LoRA, exactly
            e = 0 if self.solo is None else self.solo
            a, b = self.lora_A[e], self.lora_B[e]
            self.expert_calls += 1
            if self.record_usage:
                self._record(torch.ones(x.shape[:-1].numel(), 1, device=x.device))
            lora = F.linear(F.linear(self.lora_dropout(x.to(a.dtype)), a), b) * self.scaling
            return result + lora.to(result.dtype)

        x2 = x.reshape(-1, self.in_features)
        if self.record_usage:  # the same γ as gate(x2), keeping ω̂ for the router's entropy
            probs = self.router_probs(x2)
            gamma = self.gates(*self.select(probs))
            self._record(gamma, probs)
        else:
            gamma = self.gate(x2)  # router on the un-dropped x
        dx = self.lora_dropout(x2.to(self.lora_A[0].dtype))
        lora = self._experts(dx, gamma)
        return result + lora.reshape(*x.shape[:-1], self.out_features).to(result.dtype)

    def _experts(self, dx: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """s · Σ_e γ_e B_e A_e dx for all tokens [N, d_in] → [N, d_out]: one call evaluates every expert once."""
        self.expert_calls += 1
        if torch.is_autocast_enabled(dx.device.type):
            compute_dtype = torch.get_autocast_dtype(dx.device.type)
        else:
            compute_dtype = dx.dtype
        out = _MixExperts.apply(dx, gamma, compute_dtype, self.num_experts, *self.lora_A, *self.lora_B)
        return out * self.scaling

    @torch.no_grad()
    def _record(self, gamma: torch.Tensor, probs: torch.Tensor | None = None) -> None:
        """Count the tokens of one forward: γ [N, M]; ω̂ [N, slots] (None on the plain-LoRA path: one
        expert, a router of one slot or none, entropy 0)."""
        used = gamma > 0
        self.usage_distinct_sum += int(used.sum())
        self.usage_tokens += int(used.shape[0])
        counts = used.sum(dim=0).tolist()
        self.usage_expert_tokens = [a + int(c) for a, c in zip(self.usage_expert_tokens, counts)]
        own = gamma[:, self.own_expert if gamma.shape[1] > 1 else 0].float()
        one_hot = (used.sum(dim=-1) == 1)
        self.usage_gamma_own += float(own.sum())
        self.usage_own_only += int((one_hot & (own > 0)).sum())
        self.usage_single += int(one_hot.sum())
        if probs is not None:
            p = probs.float()
            self.usage_entropy += float(-(p * torch.log(p.clamp_min(1e-30))).sum())

    # -- merge ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def merged_linear(self, expert: int) -> nn.Linear:
        """A new `nn.Linear` with W0 + s·B_e A_e (the base layer is left untouched)."""
        _check_int("expert", expert, 0)
        if expert >= self.num_experts:
            raise FedPeftError(f"expert must be below num_experts = {self.num_experts}, got {expert}.")
        base = self.base_layer
        w0 = base.weight
        delta = (self.lora_B[expert] @ self.lora_A[expert]) * self.scaling
        merged = nn.Linear(
            self.in_features, self.out_features, bias=base.bias is not None, device=w0.device, dtype=w0.dtype
        )
        merged.weight.copy_((w0.to(torch.float32) + delta).to(w0.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
        return merged


class _MixExperts(torch.autograd.Function):
    """Σ_e γ_e B_e A_e dx over all M experts, each evaluated once, gated in rank space.

    The M experts run as ONE pair of matmuls on the concatenated factors: H = dx · [A_0; …; A_{M−1}]ᵀ
    ([N, M·r]), each rank block scaled by its γ_e, then out = [B_0 … B_{M−1}] · G. That reads the
    tokens once and writes the output once, where a loop over experts reads dx and rewrites the
    output M times; on a CPU, where these skinny matmuls are memory-bound, that is what the mixture
    costs over plain LoRA. An expert with γ_e = 0 contributes exact zeros, so a one-hot γ gives that
    expert's plain LoRA up to float rounding (the matmul sums M·r terms instead of r, in its own order).
    Backward likewise: two matmuls for the activations, and weight gradients only for the factors
    that require them (the own expert), so frozen experts cost nothing.
    All matmuls run in `compute_dtype` (the autocast dtype when autocast is on) with autocast off.
    Inputs: dx [N, d_in], gamma [N, M], compute_dtype, M, A_0..A_{M−1} [r, d_in], B_0..B_{M−1} [d_out, r].
    """

    @staticmethod
    def forward(ctx, dx, gamma, compute_dtype, m, *factors):  # type: ignore[override]
        a_list, b_list = factors[:m], factors[m:]
        cd = compute_dtype
        with torch.autocast(device_type=dx.device.type, enabled=False):
            a_cat = torch.cat([a.to(cd) for a in a_list], dim=0)  # [M·r, d_in]
            b_cat = torch.cat([b.to(cd) for b in b_list], dim=1)  # [d_out, M·r]
            n, r = dx.shape[0], a_list[0].shape[0]
            h = F.linear(dx.to(cd), a_cat).view(n, m, r)  # A_e dx for every expert: [N, M, r]
            g = (h * gamma.to(cd).unsqueeze(-1)).view(n, m * r)
            out = F.linear(g, b_cat)
        ctx.m, ctx.cd = m, cd
        ctx.save_for_backward(dx, gamma, h, *factors)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        dx, gamma, h, *factors = ctx.saved_tensors
        m, cd = ctx.m, ctx.cd
        a_list, b_list = factors[:m], factors[m:]
        need = ctx.needs_input_grad
        n, _, r = h.shape
        grads: list[torch.Tensor | None] = [None] * (2 * m)
        with torch.autocast(device_type=dx.device.type, enabled=False):
            go = grad_out.to(cd)
            gam = gamma.to(cd).unsqueeze(-1)  # [N, M, 1]
            grad_g = (go @ torch.cat([b.to(cd) for b in b_list], dim=1)).view(n, m, r)
            trained_b = [e for e in range(m) if need[4 + m + e]]
            if trained_b:  # one matmul for every trained B_e: go^T · G, split into rank blocks
                g = (h * gam).view(n, m * r)
                grad_b = go.t() @ g  # [d_out, M·r]
                for e in trained_b:
                    grads[m + e] = grad_b[:, e * r:(e + 1) * r].to(b_list[e].dtype)
            grad_gamma = (grad_g * h).sum(dim=-1).to(gamma.dtype) if need[1] else None
            grad_h = (grad_g * gam).view(n, m * r)
            grad_dx = None
            if need[0]:
                a_cat = torch.cat([a.to(cd) for a in a_list], dim=0)
                grad_dx = (grad_h @ a_cat).to(dx.dtype)
            trained_a = [e for e in range(m) if need[4 + e]]
            if trained_a:
                grad_a = grad_h.t() @ dx.to(cd)  # [M·r, d_in]
                for e in trained_a:
                    grads[e] = grad_a[e * r:(e + 1) * r].to(a_list[e].dtype)
        return (grad_dx, grad_gamma, None, None, *grads)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FedPeftError(f"{name} must be an integer ≥ {minimum}, got {value!r}.")


# ----------------------------------------------------------------------------------------------------
# Model-level helpers
# ----------------------------------------------------------------------------------------------------


def moe_layers(model: nn.Module) -> list[tuple[str, MoELoRALinear]]:
    """Every MoELoRALinear of `model` with its module path, in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MoELoRALinear)]


def _require_layers(model: nn.Module) -> list[tuple[str, MoELoRALinear]]:
    layers = moe_layers(model)
    if not layers:
        raise FedPeftError("the model has no mixture-of-LoRA layers; call inject_moe_lora first.")
    return layers


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def inject_moe_lora(
    model: nn.Module,
    target_modules: list[str],
    num_experts: int,
    own_expert: int,
    rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    routing: str = "adaptive_topM",
    top_k: int = 2,
    renormalize: bool = True,
) -> list[tuple[str, MoELoRALinear]]:
    """Replace every `nn.Linear` whose last name component is in `target_modules` by a MoELoRALinear.

    Every parameter of `model` is frozen first; afterwards only the own expert and the routers train
    (the caller unfreezes a head itself). Returns ``[(module path, layer), ...]`` in module order.
    """
    targets = set(target_modules)
    if not targets:
        raise FedPeftError("target_modules is empty; name the linear modules to adapt, e.g. ['query', 'value'].")
    if moe_layers(model):
        raise FedPeftError("the model already has mixture-of-LoRA layers; call remove_moe_lora first.")
    found: list[tuple[str, nn.Linear]] = []
    for name, mod in model.named_modules():
        if name.rpartition(".")[2] not in targets:
            continue
        if not isinstance(mod, nn.Linear):
            raise FedPeftError(
                f"module '{name}' is a {type(mod).__name__}, not torch.nn.Linear; remove other adapters first "
                "or target different modules."
            )
        found.append((name, mod))
    if not found:
        raise FedPeftError(f"no nn.Linear module is named {sorted(targets)} in the model; check target_modules.")
    seen: dict[tuple[int, str], str] = {}
    addresses = []
    for name, _ in found:
        layer = layer_index_of(name)
        if layer is None:
            raise FedPeftError(
                f"module '{name}' has no layer index in its path; target modules inside numbered layers."
            )
        module = name.rpartition(".")[2]
        if (layer, module) in seen:
            raise FedPeftError(
                f"modules '{seen[(layer, module)]}' and '{name}' share the structured address "
                f"(layer {layer}, {module}); target modules that are unique per layer."
            )
        seen[(layer, module)] = name
        addresses.append((layer, module))

    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    for (name, base), (layer, module) in zip(found, addresses):
        moe = MoELoRALinear(
            base,
            num_experts,
            own_expert,
            rank,
            lora_alpha,
            lora_dropout,
            routing=routing,
            top_k=top_k,
            renormalize=renormalize,
            layer_index=layer,
            module_name=module,
        )
        _set_submodule(model, name, moe)
        out.append((name, moe))
    return out


def remove_moe_lora(model: nn.Module, merge_expert: int | None = None) -> nn.Module:
    """Put the plain base `nn.Linear` modules back (requires_grad flags are left as they are).

    With `merge_expert=e`, each module becomes a new Linear holding W0 + s·B_e A_e instead (the merge
    path; the original base weights are not modified).
    """
    for name, moe in moe_layers(model):
        new = moe.base_layer if merge_expert is None else moe.merged_linear(merge_expert)
        _set_submodule(model, name, new)
    return model


@contextlib.contextmanager
def solo_expert(model: nn.Module, expert: int) -> Iterator[list[nn.Parameter]]:
    """Inside this block every MoELoRALinear computes W0 x + s·B_e A_e dropout(x) with e = `expert`
    alone: the plain LoRA forward, router unused. Yields expert e's factors (A then B of every layer).
    FedLEASE trains a late joiner's warmup LoRA this way on a model that already holds the mixture."""
    layers = _require_layers(model)
    try:
        for _, m in layers:
            m.solo = int(expert)
        yield [m.lora_A[expert] for _, m in layers] + [m.lora_B[expert] for _, m in layers]
    finally:
        for _, m in layers:
            m.solo = None


def set_own_expert(model: nn.Module, own_expert: int) -> None:
    """Switch the trainable expert of every module to `own_expert` (requires_grad and slot layout)."""
    for _, moe in _require_layers(model):
        moe.set_own_expert(own_expert)


def set_record_usage(model: nn.Module, on: bool = True, reset: bool = True) -> None:
    """Turn per-layer expert-usage recording on or off (and zero the counts when `reset`)."""
    for _, moe in moe_layers(model):
        moe.record_usage = bool(on)
        if reset:
            moe.reset_usage()


@contextlib.contextmanager
def moe_disabled(model: nn.Module) -> Iterator[None]:
    """Run the bare backbone: inside this block every MoELoRALinear returns W0 x only."""
    layers = moe_layers(model)
    before = [m.adapters_enabled for _, m in layers]
    try:
        for _, m in layers:
            m.adapters_enabled = False
        yield
    finally:
        for (_, m), flag in zip(layers, before):
            m.adapters_enabled = flag
