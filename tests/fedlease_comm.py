"""FedLEASE communication accounting: the closed form of docs/methods/fedlease.md#communication, per client.

With b bytes per element, P_A = Σ_l r·d_in^l, P_B = Σ_l r·d_out^l, P_E = P_A + P_B (one expert),
P_R = Σ_l (2M−1)·d_in^l (`adaptive_topM`) or M·d_in^l (`fixed_topk`), P_H the head's parameters,
ρ = 1 if routers are aggregated and h = 1 if the head policy is `shared`:

    warmup start (round 0)        down = b·(P_E + P_H)             (the common LoRA and head init)
    warmup end (round W)          up   = b·(P_E + h·P_H)
    transition (round W's down)   down = b·(M·P_E + ρ·P_R + h·P_H)
    Phase-2 round t ≥ 1           up   = b·(P_E + ρ·P_R + h·P_H);  down = b·(M·P_E + ρ·P_R + h·P_H)

Warmup rounds before W exchange nothing. Everything here is pure arithmetic on module shapes, so
it works on a model built on the meta device (e.g. RoBERTa-large from its config, no weights).

The tests check the bytes the algorithm counts against it (tests/test_fedlease.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

ROUTINGS = ("adaptive_topM", "fixed_topk")


@dataclass(frozen=True)
class ParamCounts:
    lora_a: int  # P_A
    lora_b: int  # P_B
    router: int  # P_R

    @property
    def expert(self) -> int:  # P_E
        return self.lora_a + self.lora_b


@dataclass(frozen=True)
class CommBytes:
    """Bytes per client for each kind of exchange of a FedLEASE run."""

    init_down: int  # warmup start: common LoRA init + common head init
    warmup_up: int  # warmup end: the client's LoRA (+ head under `shared`)
    transition_down: int  # the broadcast after clustering (Phase-2 round 0)
    round_up: int  # Phase-2 round t ≥ 1
    round_down: int  # Phase-2 round t ≥ 1 (the post-aggregation broadcast)


def lora_module_dims(model: nn.Module, targets: Iterable[str]) -> list[tuple[int, int]]:
    """(d_in, d_out) of every `nn.Linear` whose last name component is a target, in module order."""
    targets = set(targets)
    return [(m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets]


def head_param_count(hidden: int, num_labels: int) -> int:
    """Parameters of the RoBERTa-style head: dense (hidden × hidden + bias) + out_proj (labels × hidden + bias)."""
    return hidden * hidden + hidden + num_labels * hidden + num_labels


def param_counts(module_dims: Sequence[tuple[int, int]], *, rank: int, num_experts: int,
                 routing: str = "adaptive_topM") -> ParamCounts:
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    width = 2 * num_experts - 1 if routing == "adaptive_topM" else num_experts
    return ParamCounts(lora_a=sum(rank * d_in for d_in, _ in module_dims),
                       lora_b=sum(rank * d_out for _, d_out in module_dims),
                       router=sum(width * d_in for d_in, _ in module_dims))


def closed_form_bytes(module_dims: Sequence[tuple[int, int]], *, rank: int, num_experts: int,
                      routing: str = "adaptive_topM", router_aggregation: str = "cluster",
                      head_policy: str = "local", head_params: int = 0, bytes_per_element: int = 4) -> CommBytes:
    """The closed form for one client: `head_params` is P_H of that client's head shape."""
    if router_aggregation not in ("cluster", "local"):
        raise ValueError(f"router_aggregation must be 'cluster' or 'local', got {router_aggregation!r}")
    p = param_counts(module_dims, rank=rank, num_experts=num_experts, routing=routing)
    b = bytes_per_element
    rho = 1 if router_aggregation == "cluster" else 0
    h = 1 if head_policy == "shared" else 0
    down = b * (num_experts * p.expert + rho * p.router + h * head_params)
    return CommBytes(init_down=b * (p.expert + head_params),
                     warmup_up=b * (p.expert + h * head_params),
                     transition_down=down,
                     round_up=b * (p.expert + rho * p.router + h * head_params),
                     round_down=down)
