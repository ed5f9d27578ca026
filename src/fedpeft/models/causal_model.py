"""A causal LM behind the interface the methods use on `TaskModel`, for generation tasks.

The methods swap adapters in and out of `model.encoder` and call `use_head` / `head_state` /
`head_parameters`. A causal LM has no classification head (its LM head is part of the frozen
backbone), so those are no-ops here and `has_head` is False; the head policies then do nothing.
The attribute keeps the name `encoder` so FedLEASE replaces the PEFT LoRA layers by its mixture
layers the same way on both kinds of model.

`forward(input_ids, attention_mask, labels)` returns the logits of the target positions only,
[N, vocab] for the N tokens whose label is not -100 (shifted: position t predicts token t + 1), and
the N target ids. Projecting only those hidden states through the LM head saves the vocabulary
matmul on every prompt and padding position, which on SmolLM2 (49 152 × 576) is most of it.

`decoder_path` (`--decoder-path`): `varlen` runs a Llama-style decoder's training and loss forward
padding-free (models/decoder_varlen.py) and turns its dropouts (LoRA's) into `FastDropout`; `padded`
runs the model's own forward on the padded batch with torch's dropout (the reference, and what runs
made before the setting used). Generation always runs the model's own forward with its KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpeft.data.batching import IGNORE_INDEX
from fedpeft.errors import FedPeftError
from fedpeft.models.decoder_varlen import decode_varlen, supports_decoder_varlen
from fedpeft.models.varlen import PaddedSwitch, use_fast_dropout

DECODER_PATHS = ("padded", "varlen")  # config.DECODER_PATHS: --decoder-path


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class CausalLM(PaddedSwitch, nn.Module):
    has_head = False

    def __init__(self, encoder: nn.Module, tokenizer, hidden: int, decoder_path: str = "padded"):
        super().__init__()
        if decoder_path not in DECODER_PATHS:
            raise FedPeftError(f"unknown decoder path {decoder_path!r}: choose one of {', '.join(DECODER_PATHS)}")
        self.encoder = encoder  # the (PEFT-wrapped or MoE-injected) *ForCausalLM
        self.tokenizer = tokenizer
        self.hidden = hidden
        # `fast`: FedLEASE gives its mixture's new modules the same dropout (as on TaskModel)
        self.fast = decoder_path == "varlen" and supports_decoder_varlen(unwrap(encoder))
        self.varlen = self.fast
        if self.fast:
            use_fast_dropout(self.encoder)

    @property
    def lm(self) -> nn.Module:
        return unwrap(self.encoder)

    # ---------------------------------------------------------------- no classification head
    def use_head(self, num_labels: int, state: dict, *, trainable: bool) -> None:
        pass

    def head_state(self) -> dict[str, torch.Tensor]:
        return {}

    def head_parameters(self) -> list[nn.Parameter]:
        return []

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the target positions [N, V], their target ids [N]), N in row-major order."""
        lm = self.lm
        if self.varlen:
            hidden, where = decode_varlen(lm, input_ids, attention_mask)  # [T, H], real tokens only
            following = torch.full_like(labels, IGNORE_INDEX)
            following[:, :-1] = labels[:, 1:]  # the token each position predicts (-100 past a row's end)
            targets = following.reshape(-1).index_select(0, where.index)
            keep = targets != IGNORE_INDEX
            return lm.get_output_embeddings()(hidden[keep]), targets[keep]
        hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        picked = hidden[:, :-1][keep]  # [N, H]: the states that predict a target token
        return lm.get_output_embeddings()(picked), targets[keep]

    @torch.inference_mode()
    def full_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits at every position [B, T, V] (tests and reference decoding)."""
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
