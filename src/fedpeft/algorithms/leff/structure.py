"""Where a transformer's parts are: embeddings (frozen), blocks (LEFF's "layers"), the always-trainable set 𝒜.

One rule for every architecture, the one that reproduces Table 5's LEFF counts
(docs/methods/leff.md#trainable-set): a parameter whose name contains "embeddings" (or is a GPT-2/Llama
token or position table) is frozen; a parameter inside the block list (`…layer.<i>.…`, `…h.<i>.…`,
`…layers.<i>.…`) belongs to block i; everything else on the forward path is 𝒜. For DeBERTa that
leaves pooler dense, classifier and the encoder-level LayerNorm of the relative embeddings; for
GPT-2, ln_f (the tied LM head is the frozen wte); for Llama, the final norm and, only when it is not
tied to embed_tokens, lm_head (a tied head is the same Parameter as the embedding, so
`named_parameters` lists it once, under the embedding's name, and it stays frozen).

fedpeft's BERT runtime maps 𝒜 onto its own head: `TaskModel.heads` (dense → tanh → out_proj) plays
DeBERTa's pooler dense + classifier; BERT has no encoder-level LayerNorm (its norms are inside the
blocks), and the backbone's own BertPooler is not on TaskModel's forward path, so it is left out.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from fedpeft.errors import FedPeftError

_BLOCK = re.compile(r"(?:^|\.)(?:layer|h|layers)\.(\d+)\.")
_EMBEDDING_NAMES = ("embeddings", "wte.", "wpe.", "embed_tokens.", "embed_positions.")
_BLOCK_LISTS = ("encoder.layer", "h", "layers")


def block_of(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def is_embedding(name: str) -> bool:
    return any(key in name for key in _EMBEDDING_NAMES)


def parameter_role(name: str) -> tuple[str, int | None]:
    """("embedding", None), ("block", i) or ("head_set", None) for a parameter name."""
    if is_embedding(name):
        return "embedding", None
    i = block_of(name)
    if i is not None:
        return "block", i
    return "head_set", None


def block_list(model: nn.Module) -> tuple[nn.Module, str]:
    """(owner, attribute) of the model's ModuleList of transformer blocks, e.g. (bert.encoder, "layer")."""
    best = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(path == p or path.endswith("." + p) for p in _BLOCK_LISTS):
            if best is None or len(module) > len(best[1]):
                best = (path, module)
    if best is None:
        raise FedPeftError(f"cannot find the transformer blocks of {type(model).__name__}: LEFF supports "
                           "BERT- and DeBERTa-style encoders and GPT-2- and Llama-style decoders; use another method")
    path = best[0]
    owner_path, _, attr = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    return owner, attr


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The frozen embedding tables (a tied output embedding is the same Parameter, listed once)."""
    return {n: p for n, p in model.named_parameters() if parameter_role(n)[0] == "embedding"}


def head_set_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """𝒜 inside a decoder: GPT-2's ln_f; Llama's final norm, plus lm_head when untied."""
    return {n: p for n, p in model.named_parameters() if parameter_role(n)[0] == "head_set"}


def count(model: nn.Module, names: Iterable[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def leff_trainable_names(model: nn.Module, blocks: Iterable[int]) -> list[str]:
    """LEFF's trained set for a client holding `blocks`: those blocks' parameters plus 𝒜."""
    blocks = set(blocks)
    out = []
    for name, _ in model.named_parameters():
        role, i = parameter_role(name)
        if (role == "block" and i in blocks) or role == "head_set":
            out.append(name)
    return out


def fedavg_trainable_names(model: nn.Module) -> list[str]:
    """FedAvg-full: every block and 𝒜, embeddings frozen."""
    return [n for n, _ in model.named_parameters() if parameter_role(n)[0] != "embedding"]


def bitfit_trainable_names(model: nn.Module) -> list[str]:
    """FedBitFit (docs/methods/baselines.md#fedbitfit): every bias inside the blocks, plus the
    classifier when there is one (pooler not trained), otherwise the final norm's bias (GPT-2's ln_f)."""
    names = [n for n, _ in model.named_parameters()]
    out = [n for n in names if parameter_role(n)[0] == "block" and n.endswith(".bias")]
    classifier = [n for n in names if n.startswith("classifier.")]
    if classifier:
        return out + classifier
    return out + [n for n in names if parameter_role(n)[0] == "head_set" and n.endswith(".bias")
                  and ("ln_f" in n or "norm" in n.lower())]


def lora_count(model: nn.Module, targets: Iterable[str], rank: int) -> int:
    """LoRA parameters r·(d_in + d_out) over the Linear / Conv1D modules whose path ends with a target."""
    targets = tuple(targets)
    total = 0
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or not any(path == t or path.endswith("." + t) for t in targets):
            continue
        total += rank * (weight.shape[0] + weight.shape[1])
    return total
