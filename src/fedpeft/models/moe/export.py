"""Files out of a mixture-of-LoRA model: one expert as a standard PEFT LoRA adapter folder, and the
routers as a safetensors file under the structured keys of `state.py`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fedpeft.errors import FedPeftError
from fedpeft.models.moe.layer import _require_layers
from fedpeft.models.moe.state import load_moe_state, moe_state

__all__ = [
    "export_expert_as_peft",
    "load_routers",
    "save_routers",
]


def save_routers(model: nn.Module, path: str | Path) -> None:
    """Write every module's router to a safetensors file under structured keys."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in moe_state(model, experts=[], include_router=True).items()}
    save_file(state, str(path))


def load_routers(model: nn.Module, path: str | Path) -> None:
    """Strictly load routers written by `save_routers`."""
    from safetensors.torch import load_file

    load_moe_state(model, load_file(str(path)), strict=True, experts=[], include_router=True)


def export_expert_as_peft(
    model: nn.Module,
    expert: int,
    out_dir: str | Path,
    base_model_name_or_path: str | None,
    target_modules: list[str] | None = None,
    task_type: str | None = None,
) -> Path:
    """Write expert `expert` as a standard PEFT LoRA adapter folder (adapter_config.json and
    adapter_model.safetensors), loadable by `peft.PeftModel.from_pretrained(base, out_dir)`.

    Keys follow PEFT's saved format, ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``,
    with module paths relative to `model`. `target_modules` defaults to the adapted module names.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = _require_layers(model)
    first = layers[0][1]
    for name, moe in layers:
        if (moe.rank, moe.lora_alpha, moe.lora_dropout_p) != (first.rank, first.lora_alpha, first.lora_dropout_p):
            raise FedPeftError(
                f"module '{name}' has a different rank, alpha or dropout; PEFT export needs one setting."
            )
        if not 0 <= expert < moe.num_experts:
            raise FedPeftError(f"expert {expert} does not exist; the model has {moe.num_experts} experts.")
    names = sorted({moe.module_name for _, moe in layers}) if target_modules is None else list(target_modules)
    config = LoraConfig(
        r=first.rank,
        lora_alpha=first.lora_alpha,
        lora_dropout=first.lora_dropout_p,
        target_modules=names,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors = {}
    for name, moe in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = moe.lora_A[expert].detach().contiguous().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = moe.lora_B[expert].detach().contiguous().clone()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
