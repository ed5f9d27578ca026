"""The runtime of the LoRA methods: a private copy of the backbone with PEFT LoRA on the run's targets."""

from __future__ import annotations

import copy

import torch

from fedpeft.algorithms.base import Runtime
from fedpeft.hardware import half_dtype
from fedpeft.models.placement import is_quantized
from fedpeft.models.adapters import inject_lora, lora_sites


def frozen_linears_to(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """Store the frozen backbone's Linear layers in `dtype` (bfloat16 for `--precision bf16`,
    float16 for `fp16`).

    Autocast would cast these weights to the half dtype on every forward anyway (it caches only
    tensors that require grad), so the matmuls see the same values; only the repeated casts go away.
    LayerNorms and embeddings stay float32; adapters are created in float32 afterwards. A decoder's
    LM head tied to its input embeddings (SmolLM2) stays float32 too: converting it would convert
    the shared embedding matrix, and with it the residual stream.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in embeddings:
            module.to(dtype)


def wrap_model(peft_model, backbone, encoder_path: str = "padded", decoder_path: str = "padded"):
    """The model the methods drive: an encoder + heads (`TaskModel`, run the `encoder_path` way:
    `--encoder-path`), or a decoder (`CausalLM`, run the `decoder_path` way: `--decoder-path`)."""
    if getattr(backbone, "kind", "encoder") == "causal":
        from fedpeft.models.causal_model import CausalLM

        return CausalLM(peft_model, backbone.tokenizer, backbone.hidden_size, decoder_path)
    from fedpeft.models.task_model import TaskModel

    return TaskModel(peft_model, backbone.hidden_size, backbone.pooling, encoder_path)


def build_lora_runtime(cfg, backbone, *, rank: int, adapter_names: tuple[str, ...] = ("default",)) -> Runtime:
    """Backbone copy (the cached backbone stays pristine) + LoRA of `rank` on cfg.target_modules,
    every parameter frozen; the methods switch on what they train."""
    encoder = copy.deepcopy(backbone.model)
    half = half_dtype(cfg.precision)
    if half is not None and not is_quantized(encoder):
        frozen_linears_to(encoder, half)
    peft_model = inject_lora(encoder, rank=rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             targets=list(cfg.target_modules), adapter_names=adapter_names)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return Runtime(wrap_model(peft_model, backbone, cfg.encoder_path, cfg.decoder_path), lora_sites(peft_model))


def export_lora(backbone, cfg, lora_state: dict[str, torch.Tensor], folder, base_path: str) -> None:
    """One LoRA state (structured keys) as a PEFT adapter folder loadable with PeftModel.from_pretrained."""
    from fedpeft.models.adapters import set_lora_state

    rank = next(v for k, v in lora_state.items() if k.endswith(".A")).shape[0]
    model = inject_lora(copy.deepcopy(backbone.model), rank=rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        targets=list(cfg.target_modules))
    set_lora_state(lora_sites(model), lora_state)
    model.peft_config["default"].base_model_name_or_path = base_path
    with torch.no_grad():
        model.save_pretrained(str(folder))
