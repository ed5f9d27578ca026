"""Structured keys and the mixture state of FedLEASE's mixture-of-LoRA layers (`layer.py`).

State is exchanged under structured keys built only by `moe_key` and parsed only by `parse_moe_key`:
``layer.<L>.<module>.expert.<e>.<A|B>`` and ``layer.<L>.<module>.router``. Loads are strict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fedpeft.errors import FedPeftError
from fedpeft.hardware import WIRE_DEVICE
from fedpeft.models.moe.layer import _require_layers

__all__ = [
    "load_moe_state",
    "moe_key",
    "moe_state",
    "parse_moe_key",
]

_FACTORS = ("A", "B")
_MODULE_RE = r"[A-Za-z_][A-Za-z0-9_]*"
_KEY_RE = re.compile(
    rf"^layer\.(0|[1-9][0-9]*)\.({_MODULE_RE})\.(?:expert\.(0|[1-9][0-9]*)\.(A|B)|(router))$"
)


# ----------------------------------------------------------------------------------------------------
# Structured keys
# ----------------------------------------------------------------------------------------------------


def moe_key(layer: int, module: str, expert: int | None, factor: str) -> str:
    """The one place where a state key is built.

    `moe_key(10, "query", 12, "A")` → ``"layer.10.query.expert.12.A"``;
    `moe_key(10, "query", None, "router")` → ``"layer.10.query.router"``.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    if not isinstance(module, str) or not re.fullmatch(_MODULE_RE, module):
        raise ValueError(f"module must be a plain identifier without dots, got {module!r}")
    if factor == "router":
        if expert is not None:
            raise ValueError("a router key has no expert index (pass expert=None)")
        return f"layer.{layer}.{module}.router"
    if factor not in _FACTORS:
        raise ValueError(f"factor must be 'A', 'B' or 'router', got {factor!r}")
    if isinstance(expert, bool) or not isinstance(expert, int) or expert < 0:
        raise ValueError(f"expert must be a non-negative int for factor {factor!r}, got {expert!r}")
    return f"layer.{layer}.{module}.expert.{expert}.{factor}"


def parse_moe_key(key: str) -> tuple[int, str, int | None, str]:
    """Inverse of `moe_key`: ``(layer, module, expert or None, factor)``; anything else is an error."""
    m = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        raise FedPeftError(
            f"'{key}' is not a mixture-of-LoRA state key; expected 'layer.<L>.<module>.expert.<e>.<A|B>' "
            "or 'layer.<L>.<module>.router'."
        )
    layer, module, expert, factor, router = m.groups()
    if router is not None:
        return int(layer), module, None, "router"
    return int(layer), module, int(expert), factor


# ----------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------


def _expected(
    model: nn.Module, experts: Iterable[int] | None, include_router: bool
) -> dict[str, nn.Parameter]:
    """Structured key → parameter for the requested subset of the model's mixture state."""
    layers = _require_layers(model)
    wanted = None if experts is None else sorted(set(int(e) for e in experts))
    out: dict[str, nn.Parameter] = {}
    for _, moe in layers:
        if moe.layer_index is None or moe.module_name is None:
            raise ValueError("a MoELoRALinear without layer_index/module_name has no state keys; use inject_moe_lora")
        ids = range(moe.num_experts) if wanted is None else wanted
        for e in ids:
            if not 0 <= e < moe.num_experts:
                raise FedPeftError(f"expert {e} does not exist; the model has {moe.num_experts} experts.")
            out[moe_key(moe.layer_index, moe.module_name, e, "A")] = moe.lora_A[e]
            out[moe_key(moe.layer_index, moe.module_name, e, "B")] = moe.lora_B[e]
        if include_router:
            out[moe_key(moe.layer_index, moe.module_name, None, "router")] = moe.router.weight
    return out


def moe_state(
    model: nn.Module, experts: Iterable[int] | None = None, include_router: bool = True
) -> dict[str, torch.Tensor]:
    """Detached copies of the mixture state under structured keys.

    `experts=None` gives all experts; `experts=[j]` only expert j (e.g. the upload). Routers are
    included unless `include_router=False`.
    """
    # Messages carry wire-device (CPU) tensors whatever device the model computes on.
    return {k: p.detach().to(WIRE_DEVICE, copy=True) for k, p in _expected(model, experts, include_router).items()}


@torch.no_grad()
def load_moe_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    strict: bool = True,
    experts: Iterable[int] | None = None,
    include_router: bool = True,
) -> None:
    """Copy `state` into the model. Every key must exist with the same shape.

    The expected key set is the one `moe_state(model, experts, include_router)` would produce; with
    `strict=True` (the default) `state` must hold exactly those keys. `strict=False` only tolerates
    missing keys: unexpected keys and shape mismatches are always errors. Nothing is written unless
    the whole state is valid.
    """
    expected = _expected(model, experts, include_router)
    for key in state:
        if key not in expected:
            parse_moe_key(key)  # a malformed key gets the format message
            raise FedPeftError(f"unexpected key '{key}' in the mixture-of-LoRA state; the model has no such tensor.")
    if strict:
        missing = [k for k in expected if k not in state]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FedPeftError(f"missing key '{missing[0]}'{more} in the mixture-of-LoRA state.")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise FedPeftError(f"key '{key}' holds a {type(value).__name__}, not a tensor.")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise FedPeftError(
                f"shape mismatch for key '{key}': the state has {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key].shape)}."
            )
    for key, value in state.items():
        expected[key].copy_(value)
