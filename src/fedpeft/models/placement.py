"""Putting a model on its device, gradient checkpointing, and preparing a k-bit decoder for training.

A runtime model is built on the CPU (a copy of the cached backbone, with the method's adapters) and
moved to the run's device once, whole: `nn.Module.to` keeps every Parameter object, so references a
runtime holds (LEFF's blocks and trainable set, FedBitFit's biases, SLoRA's sparse deltas) stay
valid. A decoder loaded in 8 or 4 bits is already on its GPU (bitsandbytes places it at loading) and
is not moved.
"""

from __future__ import annotations

from torch import nn

from fedpeft.errors import FedPeftError


def is_quantized(model: nn.Module) -> bool:
    """True for a model loaded through bitsandbytes (or another transformers quantizer)."""
    return any(getattr(m, "is_loaded_in_8bit", False) or getattr(m, "is_loaded_in_4bit", False)
               or getattr(m, "hf_quantizer", None) is not None for m in model.modules())


def place(model: nn.Module, device) -> nn.Module:
    """`model` on `device` (in place); a quantized model stays where its loader put it."""
    if is_quantized(model):
        return model
    return model.to(device)


def hf_models(model: nn.Module) -> list[nn.Module]:
    """The Hugging Face PreTrainedModels inside `model` (outermost first)."""
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Hugging Face gradient checkpointing (non-reentrant, so frozen inputs need no grad hook) on the
    backbone inside `model`: every transformer block recomputes its activations in the backward pass.
    torch.utils.checkpoint restores the RNG state for the recomputation, so dropout draws the same
    masks and the loss and gradients are those of the plain forward."""
    found = hf_models(model)
    if not found:
        raise FedPeftError("--gradient-checkpointing needs a Hugging Face transformers model; this backbone is "
                           f"a {type(model).__name__}")
    backbone = found[0]
    if not getattr(backbone, "supports_gradient_checkpointing", False):
        raise FedPeftError(f"--gradient-checkpointing: {type(backbone).__name__} does not support gradient "
                           "checkpointing; run without it")
    kwargs = {"use_reentrant": False}
    enable = getattr(backbone, "activation_checkpointing_enable", None)  # transformers >= 5.2x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_kbit(model: nn.Module) -> nn.Module:
    """PEFT's `prepare_model_for_kbit_training` for a decoder loaded in 8 or 4 bits: every weight
    frozen, the non-quantized half-precision ones (norms, embeddings) cast to float32 so LoRA trains
    against stable values. Gradient checkpointing is the run's choice (--gradient-checkpointing),
    enabled on the runtime model, not here."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
