"""LoRA through PEFT, with adapter tensors read and written by structured keys.

A LoRA module is addressed by (layer index, module name), e.g. (10, "query"); its factors are
"A" (r × d_in) and "B" (d_out × r). Key strings are built and parsed only here
(`lora_key` / `parse_lora_key`), never by editing parameter names.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from fedpeft.errors import FedPeftError
from fedpeft.hardware import WIRE_DEVICE

FACTORS = ("A", "B")
_KEY = re.compile(r"^layer\.(\d+)\.([A-Za-z_][\w]*)\.(A|B)$")


def lora_key(layer: int, module: str, factor: str) -> str:
    return f"layer.{layer}.{module}.{factor}"


def parse_lora_key(key: str) -> tuple[int, str, str]:
    m = _KEY.match(key)
    if not m:
        raise FedPeftError(f"{key!r} is not a LoRA tensor key (layer.<i>.<module>.<A|B>)")
    return int(m.group(1)), m.group(2), m.group(3)


def select_factors(state: dict[str, torch.Tensor], factors: Iterable[str]) -> dict[str, torch.Tensor]:
    """The entries of a LoRA state whose factor (A or B) is in `factors`."""
    factors = tuple(factors)
    return {k: v for k, v in state.items() if parse_lora_key(k)[2] in factors}


def layer_index_of(module_path: str) -> int | None:
    """Transformer layer of a module: the first all-digit component of its dotted path
    (``encoder.layer.10.attention.self.query`` → 10), or None when there is none."""
    for part in module_path.split("."):
        if part.isdigit():
            return int(part)
    return None


def layer_index(module_path: str) -> int:
    index = layer_index_of(module_path)
    if index is None:
        raise FedPeftError(f"cannot tell the layer of module {module_path!r}")
    return index


@dataclass
class LoraSite:
    layer: int
    module: str
    path: str
    lora: nn.Module  # peft.tuners.lora.LoraLayer


def inject_lora(encoder: nn.Module, *, rank: int, alpha: float, dropout: float, targets: list[str],
                adapter_names: Iterable[str] = ("default",)):
    """Wrap `encoder` with PEFT LoRA adapters (A Kaiming-uniform, B = 0); everything else frozen."""
    from peft import LoraConfig, get_peft_model

    names = list(adapter_names)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", init_lora_weights=True)
    with warnings.catch_warnings():  # PEFT 0.21 calls a transformers 5 deprecated property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            model = get_peft_model(encoder, config, adapter_name=names[0])
        except ValueError as exc:
            raise FedPeftError(f"cannot put LoRA on modules {targets}: {exc}") from None
        for name in names[1:]:
            model.add_adapter(name, config)
    return model


def lora_sites(model: nn.Module) -> list[LoraSite]:
    from peft.tuners.lora import LoraLayer

    found = [(path, module) for path, module in model.named_modules() if isinstance(module, LoraLayer)]
    last = [(layer_index(p), p.rsplit(".", 1)[-1]) for p, _ in found]
    sites = []
    for (path, module), (layer, name) in zip(found, last):
        if last.count((layer, name)) > 1:  # e.g. BERT's three `dense`: name them by their path in the layer
            name = _path_in_layer(path, layer)
        sites.append(LoraSite(layer, name, path, module))
    if not sites:
        raise FedPeftError("the model has no LoRA modules")
    keys = [(s.layer, s.module) for s in sites]
    if len(set(keys)) != len(keys):
        raise FedPeftError("two LoRA modules share a (layer, module) address; pass distinct --target-modules")
    return sites


def _path_in_layer(path: str, layer: int) -> str:
    """`encoder.layer.3.attention.output.dense` → `attention_output_dense` (a key-safe module name)."""
    parts = path.split(".")
    i = parts.index(str(layer))
    return "_".join(parts[i + 1:])


def _factor(site: LoraSite, factor: str, adapter: str) -> nn.Parameter:
    table = site.lora.lora_A if factor == "A" else site.lora.lora_B
    return table[adapter].weight


def get_lora_state(sites: list[LoraSite], *, factors: Iterable[str] = FACTORS,
                   adapter: str = "default") -> dict[str, torch.Tensor]:
    # Copies on the wire device whatever device the model is on: these tensors travel in messages.
    return {lora_key(s.layer, s.module, f): _factor(s, f, adapter).detach().to(WIRE_DEVICE, copy=True)
            for s in sites for f in factors}


def set_lora_state(sites: list[LoraSite], state: dict[str, torch.Tensor], *,
                   factors: Iterable[str] = FACTORS, adapter: str = "default") -> None:
    """Strict: exactly the keys of `factors` on every site, with matching shapes."""
    factors = tuple(factors)
    expected = {lora_key(s.layer, s.module, f) for s in sites for f in factors}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise FedPeftError(f"LoRA state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for s in sites:
            for f in factors:
                target, src = _factor(s, f, adapter), state[lora_key(s.layer, s.module, f)]
                if src.shape != target.shape:
                    raise FedPeftError(f"LoRA tensor {lora_key(s.layer, s.module, f)} has shape "
                                       f"{tuple(src.shape)}, the model expects {tuple(target.shape)}")
                target.copy_(src)


def lora_parameters(sites: list[LoraSite], *, factors: Iterable[str] = FACTORS,
                    adapter: str = "default") -> list[nn.Parameter]:
    return [_factor(s, f, adapter) for s in sites for f in factors]


def init_lora_state(sites: list[LoraSite], generator: torch.Generator, *, rank: int | None = None,
                    b_std: float = 0.0) -> dict[str, torch.Tensor]:
    """A fresh LoRA initialisation from a seed: A Kaiming-uniform (a = √5), B = 0 (or N(0, b_std²))."""
    state = {}
    for s in sites:
        a = _factor(s, "A", "default")
        b = _factor(s, "B", "default")
        r = rank or a.shape[0]
        d_in, d_out = a.shape[1], b.shape[0]
        bound = 1.0 / d_in ** 0.5  # kaiming_uniform_(a=sqrt(5)) on (r, d_in): bound = 1/sqrt(fan_in)
        state[lora_key(s.layer, s.module, "A")] = (torch.rand(r, d_in, generator=generator) * 2 - 1) * bound
        state[lora_key(s.layer, s.module, "B")] = (
            torch.randn(d_out, r, generator=generator) * b_std if b_std > 0 else torch.zeros(d_out, r))
    return state
