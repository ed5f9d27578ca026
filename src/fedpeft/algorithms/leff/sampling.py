"""LEFF step 1: layer importance (Eqs. 3-4), block scores (Eq. 5), sampling distribution (Eq. 6).

Layers are 1-based in the paper; here every index is 0-based: layer l ∈ [0, L), a block is the
window [k, k + L_i). All draws use generators seeded by (seed, round, client, purpose), so every
engine draws the same blocks.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from fedpeft.errors import FedPeftError
from fedpeft.hardware import accumulation_dtype
from fedpeft.seeding import derive_seed


def block_starts(num_layers: int, budget: int, mode: str = "sliding") -> list[int]:
    """Candidate starts k (0-based) of blocks of `budget` consecutive layers.

    sliding: every k in [0, L − L_i]; disjoint: 0, L_i, 2L_i, …, the last clipped to L − L_i."""
    if not 1 <= budget <= num_layers:
        raise FedPeftError(f"a layer budget must be between 1 and the model's {num_layers} layers, got {budget}")
    last = num_layers - budget
    if mode == "sliding":
        return list(range(last + 1))
    if mode == "disjoint":
        return sorted({min(k, last) for k in range(0, num_layers, budget)})
    raise FedPeftError(f"unknown block mode {mode!r}: choose sliding or disjoint")


def block_scores(layer_scores: Sequence[float], starts: Sequence[int], budget: int) -> np.ndarray:
    """Eq. 5: s_k = Σ_{l=k}^{k+L_i−1} I(Θ_l)."""
    scores = np.asarray(layer_scores, dtype=np.float64)
    return np.array([scores[k:k + budget].sum() for k in starts], dtype=np.float64)


def block_probabilities(scores: Sequence[float], *, normalise: str = "max", temperature: float = 1.0) -> np.ndarray:
    """Eq. 6 made scale-free: p_k ∝ exp(s̃_k / τ) with s̃ = s / max s, so p depends only on relative
    importance, not on the model or loss scale (docs/methods/leff.md#sampling-distribution); uniform
    when max s ≤ 0.

    `normalise="none"` applies the literal Eq. 6 to the raw scores (stabilised by subtracting the max)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no candidate blocks")
    if normalise == "max":
        top = s.max()
        if not top > 0 or not math.isfinite(top):
            return np.full(s.size, 1.0 / s.size)
        s = s / top
    elif normalise != "none":
        raise FedPeftError(f"unknown importance normalisation {normalise!r}: choose max or none")
    z = s / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def draw_block(strategy: str, starts: Sequence[int], probabilities: np.ndarray | None, *, seed: int, rnd: int,
               client: int) -> int:
    """k_i for one client and round, by one of the paper's three strategies. round_robin: index
    (rnd − 1) mod n_blocks, deterministic; random: uniform; importance: from `probabilities`. Each
    (seed, round, client) has its own generator."""
    n = len(starts)
    if strategy == "round_robin":
        return starts[(rnd - 1) % n]
    rng = np.random.default_rng(derive_seed(seed, "leff-block", rnd, client))
    if strategy == "random":
        return starts[int(rng.integers(n))]
    if strategy == "importance":
        if probabilities is None or len(probabilities) != n:
            raise ValueError("importance sampling needs one probability per candidate block")
        return starts[int(rng.choice(n, p=probabilities))]
    raise FedPeftError(f"unknown block sampling {strategy!r}: choose importance, round_robin or random")


def layer_importance(model: torch.nn.Module, layer_params: Sequence[Sequence[torch.nn.Parameter]],
                     loss_fn: Callable[[], torch.Tensor | Iterable[torch.Tensor]]) -> list[float]:
    """Eqs. 3-4 on the server batch: I_l = Σ_{m ∈ layer l} (g_m · θ_m)², one forward and backward pass,
    float32, eval mode, no optimiser step, so the pass changes nothing.

    `loss_fn` returns the loss, or parts of it (micro-batches) that sum to it, each backpropagated
    as it comes, so a large server batch needs the memory of one part.
    Only the layers' parameters get gradients (embeddings and the head set are not scored). Afterwards
    every `.grad` is None and train/eval mode and requires-grad flags are as before; parameters are
    untouched because nothing writes to them.
    """
    was_training = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    scored = {p for ps in layer_params for p in ps}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(p in scored)
            p.grad = None
        losses = loss_fn()
        for loss in [losses] if isinstance(losses, torch.Tensor) else losses:
            loss.float().backward()  # micro-batches: their gradients add up in .grad
        out = []
        with torch.no_grad():
            for ps in layer_params:
                total = 0.0
                for p in ps:
                    if p.grad is not None:  # float64 on the parameter's device (float32 where it has none: MPS)
                        acc = accumulation_dtype(p.device)
                        total += float((p.grad.to(acc) * p.to(acc)).pow(2).sum())
                out.append(total)
        return out
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags[p])
        for m, mode in was_training.items():
            m.train(mode)
