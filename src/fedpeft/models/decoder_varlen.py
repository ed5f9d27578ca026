"""A padding-free training forward for Llama-family decoders (`--decoder-path varlen`).

A decoder training batch arrives right-padded, [B, S] tokens with a 0/1 mask. As in the encoders'
varlen path (models/varlen.py), every operation of a decoder layer except attention treats each
token on its own (RMSNorm, the projections, LoRA or FedLEASE's mixture, the gated MLP), so
`decode_varlen` runs them on the T real tokens only, [1, T, H]: padding costs no matmul. Rotary
positions are each token's column in the padded batch, the positions the padded forward gives it.

Attention is where tokens meet. The queries, keys and values (rotated already) are scattered into a
[B, heads, L, d] layout in which row b holds sentence b's real tokens in columns 0 .. len_b − 1 and
L is the longest sentence; there causal attention alone is the right mask (every key a real query
may see is its own sentence's, earlier in the row), so torch's fused causal SDPA kernel runs with no
mask tensor at all; grouped-query heads are repeated as transformers' SDPA path repeats them. The
result is gathered back to the T tokens.

With dropout off the outputs equal the padded forward's at the real positions up to float rounding
(tests/test_decoder_varlen.py compares losses and gradients); in training the LoRA dropout masks are
drawn over [1, T, H] by `FastDropout`, the same Bernoulli keep probability as torch's dropout from
other draws, so a seed's numbers differ from the padded path's by dropout noise only.

With `--gradient-checkpointing` each layer is recomputed in the backward pass, after `decode_varlen`
has returned and the model's own attention is back in its config; a recomputation through that
attention saves other tensors than the forward did (torch.utils.checkpoint's CheckpointError). So
`_run_layer` checkpoints a function that sets the varlen attention itself: the recomputation runs
exactly the forward's ops, dropout masks included (the checkpoint replays torch's RNG state, from
which FastDropout seeds its draws).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.models.varlen import Varlen, attention_implementation, base_encoder

ATTENTION = "fedpeft_varlen_causal"


def compact_varlen(attention_mask: torch.Tensor) -> Varlen:
    """Where the real tokens of a [B, S] batch sit, and where they go in the compact causal layout:
    row b, columns 0 .. len_b − 1 in their order (any padding side). `key_bias` / `key_mask` are not
    used there (the causal kernel needs no mask), so they are None."""
    b, s = attention_mask.shape
    real = attention_mask != 0
    index = real.reshape(-1).nonzero().squeeze(1)
    rows = torch.div(index, s, rounding_mode="floor")
    cols = (real.cumsum(1) - 1).reshape(-1).index_select(0, index)
    width = int(real.sum(1).max()) if b else 0
    return Varlen(index, rows, cols, b, width, None, None)  # type: ignore[arg-type]


def causal_varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, varlen: Varlen | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention of each sentence over its own real tokens, for the T real tokens' queries,
    keys and values ([1, heads, T, d]); registered with transformers as `ATTENTION`."""
    if varlen is None:
        raise RuntimeError(f"the {ATTENTION!r} attention runs only inside decode_varlen")
    q, k, v = varlen.pad(query), varlen.pad(key), varlen.pad(value)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0)
    return varlen.unpad(out), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, causal_varlen_attention)


_register()


def supports_decoder_varlen(lm: nn.Module) -> bool:
    """A Llama-style causal LM: its decoder has `embed_tokens`, `layers`, `norm` and `rotary_emb`
    (Llama, Mistral, Qwen2, SmolLM2). GPT-2 (learned positions, `h` blocks) keeps the padded forward."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    return decoder is not None and all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))


def _run_layer(layer: nn.Module, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
    """One decoder layer on the compact tokens, checkpointed as transformers would when gradient
    checkpointing is on, but around a function that sets the varlen attention for itself (see the
    module docstring). transformers wraps a layer's `forward` with its checkpointing; `__wrapped__`
    is the plain forward, run inside the checkpoint as transformers runs it."""
    plain = getattr(type(layer).forward, "__wrapped__", None)
    if plain is None or not (getattr(layer, "gradient_checkpointing", False) and layer.training
                             and torch.is_grad_enabled()):
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def run(h: torch.Tensor) -> torch.Tensor:
        with attention_implementation([layer], ATTENTION):
            out = plain(layer, h, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return layer._gradient_checkpointing_func(run, hidden)


def decode_varlen(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Varlen]:
    """The decoder's final hidden states of the real tokens, [T, H] (row-major order of the padded
    batch), and where they sit in it. `lm` (a *ForCausalLM, PEFT-wrapped or not) must satisfy
    `supports_decoder_varlen`."""
    decoder = base_encoder(lm).get_decoder()
    varlen = compact_varlen(attention_mask)
    index = varlen.index
    ids = input_ids.reshape(-1).index_select(0, index)[None]
    positions = (index % input_ids.shape[1])[None]
    hidden = decoder.embed_tokens(ids)
    rotary = decoder.rotary_emb(hidden, position_ids=positions)
    layers = list(decoder.layers)
    with attention_implementation(layers, ATTENTION):
        for layer in layers:
            hidden = _run_layer(layer, hidden, attention_mask=None, position_ids=positions,
                                position_embeddings=rotary, varlen=varlen)
    return decoder.norm(hidden)[0], varlen
