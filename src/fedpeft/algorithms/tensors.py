"""Named-tensor helpers every method uses: key prefixes in messages and the data-size-weighted mean."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from fedpeft.hardware import WIRE_DEVICE


def weighted_mean(states: list[Mapping[str, torch.Tensor]], weights: Iterable[float]) -> dict[str, torch.Tensor]:
    """Σ w_i x_i / Σ w_i per key, accumulated in float64 and stored in the parameter dtype."""
    weights = [float(w) for w in weights]
    total = sum(weights)
    if not states or total <= 0:
        raise ValueError("weighted_mean needs at least one state with positive weight")
    out = {}
    for key in states[0]:
        acc = torch.zeros(states[0][key].shape, dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += s[key].to(torch.float64) * (w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out


def on_wire(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of `tensors` on `hardware.WIRE_DEVICE`, whatever device they are on: what a
    message, the server state or a client's store holds (never a view of a model parameter)."""
    return {k: v.detach().to(WIRE_DEVICE, copy=True) for k, v in tensors.items()}


def prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def is_synced(state: dict, cid: int) -> bool:
    """Has this client replied at least once, so that it holds the one-time common initialisation
    (docs/methods/fedlease.md#common-initialisation)? Until then its instructions carry it."""
    return cid in state.get("synced", [])


def mark_synced(state: dict, cids: Iterable[int]) -> None:
    state["synced"] = sorted(set(state.get("synced", [])) | set(cids))
