"""LEFF's tensors: structured block keys, copying tensors in and out of modules, and the two
server-side reductions over blocks (layer-wise aggregation, Eq. 8; data-free importance)."""

from __future__ import annotations

import re

import torch
from torch import nn

from fedpeft.algorithms.tensors import on_wire, weighted_mean
from fedpeft.errors import FedPeftError

EMB_PREFIX = "emb."
ASET_PREFIX = "aset."  # 𝒜 members inside the backbone (DeBERTa's encoder-level LayerNorm); the head is "head."
_BLOCK_KEY = re.compile(r"^block\.(\d+)\.(.+)$")


def block_key(layer: int, name: str) -> str:
    return f"block.{layer}.{name}"


def parse_block_key(key: str) -> tuple[int, str]:
    m = _BLOCK_KEY.match(key)
    if not m:
        raise FedPeftError(f"{key!r} is not a block tensor key (block.<layer>.<parameter>)")
    return int(m.group(1)), m.group(2)


def module_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a module's parameters on the wire device (server state and messages)."""
    return on_wire(dict(module.named_parameters()))


def load_params(module: nn.Module | dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy tensors into exactly the module's parameters (or a name → Parameter dict): same names, same shapes."""
    own = dict(module) if isinstance(module, dict) else dict(module.named_parameters())
    if set(own) != set(tensors):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise FedPeftError(f"{what} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in own.items():
            if tensors[name].shape != p.shape:
                raise FedPeftError(f"{what} tensor {name} has shape {tuple(tensors[name].shape)}, "
                                   f"the model expects {tuple(p.shape)}")
            p.copy_(tensors[name])


def layerwise_mean(blocks: dict[int, dict[str, torch.Tensor]], uploads: dict[int, dict[int, dict[str, torch.Tensor]]],
                   sizes: dict[int, float]) -> dict[int, dict[str, torch.Tensor]]:
    """Eq. 8: each layer l becomes the D_i-weighted mean over S_l (the clients that uploaded it),
    w_i = D_i / Σ_{j∈S_l} D_j, in float64; a layer nobody trained is returned as it was (the same tensors)."""
    out = dict(blocks)
    for layer in blocks:
        contributors = sorted(c for c in uploads if layer in uploads[c])
        if contributors:
            out[layer] = weighted_mean([uploads[c][layer] for c in contributors], [sizes[c] for c in contributors])
    return out


def update_importance(old: dict[int, dict[str, torch.Tensor]], new: dict[int, dict[str, torch.Tensor]],
                      lr: float) -> list[float]:
    """The data-free importance option, for a server without a batch: I_l = Σ (g·θ)² with
    g ≈ −ΔΘ_l / η from the last aggregation, θ the new global."""
    scores = []
    for layer in sorted(new):
        total = 0.0
        for name, theta in new[layer].items():
            g = -(theta.double() - old[layer][name].double()) / lr
            total += float((g * theta.double()).pow(2).sum())
        scores.append(total)
    return scores
