"""Backbone + classification head, with the head's weights swapped per client.

One `TaskModel` serves the whole federation in the in-process engine: clients differ only in
adapter tensors and head tensors, which the engine swaps in. Heads of different shapes (tasks with
different label counts) live side by side, one module per number of labels.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpeft.errors import FedPeftError
from fedpeft.hardware import WIRE_DEVICE
from fedpeft.models.varlen import (FastDropout, PaddedSwitch, encode_varlen, pool_varlen, supports_varlen,
                                   use_fast_dropout)


class ClassificationHead(nn.Module):
    """RoBERTa-style head on the first token: dense → tanh → dropout → out_proj."""

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1, *, fast_dropout: bool = False):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = FastDropout(dropout) if fast_dropout else nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden, num_labels)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        x = self.dropout(first_token)
        x = torch.tanh(self.dense(x))
        return self.out_proj(self.dropout(x))


def init_head_state(hidden: int, num_labels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The common head initialisation for one head shape: same seed, same tensors, so every client
    starts from the same head (docs/methods/fedlease.md#common-initialisation)."""
    std = 0.02
    return {
        "dense.weight": torch.randn(hidden, hidden, generator=generator) * std,
        "dense.bias": torch.zeros(hidden),
        "out_proj.weight": torch.randn(num_labels, hidden, generator=generator) * std,
        "out_proj.bias": torch.zeros(num_labels),
    }


POOLINGS = ("first", "mean")
ENCODER_PATHS = ("padded", "varlen")  # config.ENCODER_PATHS: --encoder-path


class TaskModel(PaddedSwitch, nn.Module):
    """`encoder` (possibly PEFT-wrapped) + one head per label count; `num_labels` picks the head.

    `pooling` is how a sequence becomes the head's input: the first token (BERT/RoBERTa
    classification) or the mean over real tokens (sentence-transformers encoders such as MiniLM,
    whose first token was never trained to summarise the sentence).

    `encoder_path` (`--encoder-path`): `padded` runs the encoder's own forward on the padded batch
    with torch's dropout (the reference); `varlen` runs a BERT-style encoder padding-free
    (models/varlen.py) and switches every dropout of the encoder and the heads to `FastDropout`.
    """

    def __init__(self, encoder: nn.Module, hidden: int, pooling: str = "first", encoder_path: str = "padded"):
        super().__init__()
        if pooling not in POOLINGS:
            raise FedPeftError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        if encoder_path not in ENCODER_PATHS:
            raise FedPeftError(f"unknown encoder path {encoder_path!r}: choose one of {', '.join(ENCODER_PATHS)}")
        self.encoder = encoder
        self.hidden = hidden
        self.pooling = pooling
        self.heads = nn.ModuleDict()
        self.num_labels: int | None = None
        self.fast = encoder_path == "varlen"
        self.varlen = self.fast  # padding-free forward where the encoder supports it (models/varlen.py)
        if self.fast:
            use_fast_dropout(self.encoder)

    # ---------------------------------------------------------------- heads
    def head(self, num_labels: int) -> ClassificationHead:
        key = str(num_labels)
        if key not in self.heads:  # made when first needed, on the device the encoder computes on
            device = next(self.encoder.parameters()).device
            self.heads[key] = ClassificationHead(self.hidden, num_labels, fast_dropout=self.fast).to(device)
        return self.heads[key]

    def use_head(self, num_labels: int, state: dict[str, torch.Tensor], *, trainable: bool) -> None:
        head = self.head(num_labels)
        load_strict(head, state, what="head")
        for p in head.parameters():
            p.requires_grad_(trainable)
        self.num_labels = num_labels

    def head_state(self) -> dict[str, torch.Tensor]:
        """Copies of the current head's tensors on the wire device (a client keeps them, or sends them)."""
        return {k: v.detach().to(WIRE_DEVICE, copy=True) for k, v in self.head(self._current()).state_dict().items()}

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head(self._current()).parameters())

    def _current(self) -> int:
        if self.num_labels is None:
            raise RuntimeError("no head selected: call use_head first")
        return self.num_labels

    # ---------------------------------------------------------------- forward
    def pooled(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The sequence representation the head reads (first token or masked mean).

        A BERT-style encoder runs padding-free (models/varlen.py) unless `self.varlen` is False."""
        if self.varlen and supports_varlen(self.encoder):
            hidden, where = encode_varlen(self.encoder, input_ids, attention_mask, token_type_ids)
            return pool_varlen(hidden, where, attention_mask, self.pooling)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return hidden[:, 0]

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self.head(self._current())(self.pooled(input_ids, attention_mask, token_type_ids)).float()


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Copy tensors into a module's parameters; any missing, extra or mis-shaped key is an error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise FedPeftError(f"{what} state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, target in own.items():
            src = state[key]
            if src.shape != target.shape:
                raise FedPeftError(f"{what} tensor {key} has shape {tuple(src.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(src)
