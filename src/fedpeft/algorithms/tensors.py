"""Named-tensor helpers every method uses: key prefixes in messages, the data-size-weighted mean and
its robust siblings (coordinate-wise trimmed mean and median, `--aggregation`)."""

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


def coordinate_median(states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018): per key and per coordinate, the median of the clients' values (the
    mean of the two middle ones for an even count). Unweighted: a client's claimed data size cannot
    buy it more say. Computed in float64, stored in the parameter dtype."""
    return _per_coordinate(states, lambda s, n: (s[(n - 1) // 2] + s[n // 2]) / 2)


def trimmed_mean(states: list[Mapping[str, torch.Tensor]], trim: float = 0.1) -> dict[str, torch.Tensor]:
    """The coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the floor(trim·n)
    largest and smallest values and average the rest (unweighted). trim = 0 is the plain mean."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")

    def cut(s, n):
        k = int(trim * n)
        return s[k:n - k].mean(dim=0)

    return _per_coordinate(states, cut)


def _per_coordinate(states, reduce) -> dict[str, torch.Tensor]:
    if not states:
        raise ValueError("robust aggregation needs at least one state")
    n = len(states)
    out = {}
    for key in states[0]:
        stacked = torch.stack([s[key].to(torch.float64) for s in states])
        out[key] = reduce(stacked.sort(dim=0).values, n).to(states[0][key].dtype)
    return out


def aggregate_states(states: list[Mapping[str, torch.Tensor]], weights: Iterable[float], how: str = "mean",
                     trim: float = 0.1) -> dict[str, torch.Tensor]:
    """`--aggregation`: "mean" (data-size-weighted), "trimmed-mean" or "median" (coordinate-wise,
    unweighted, Yin et al. 2018)."""
    if how == "mean":
        return weighted_mean(states, weights)
    if how == "median":
        return coordinate_median(states)
    if how == "trimmed-mean":
        return trimmed_mean(states, trim)
    raise ValueError(f"unknown aggregation {how!r}")


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
