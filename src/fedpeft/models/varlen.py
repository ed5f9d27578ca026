"""A padding-free forward for BERT-style encoders, and a cheaper dropout with the same semantics.

**Padding-free ("varlen") forward.** A batch arrives padded, [B, S] tokens with a 0/1 mask. Every
operation of an encoder layer except attention treats each token on its own (the projections, LoRA,
the feed-forward block, LayerNorm, dropout), so `encode_varlen` runs them on the T real tokens only,
[1, T, H], and pads nothing: padding costs no matmul. Attention is the one place tokens meet; there
the queries, keys and values are scattered back into the padded [B, heads, S, d] layout, each
sentence attends to its own real tokens only (an additive key mask, as HF's eager path builds it),
and the result is gathered back to the T tokens. Positions are the column indices the padded batch
would use (BERT's absolute positions; RoBERTa's start at padding_idx + 1), so each token's embedding
is the one the padded forward computes. With dropout off (evaluation), the output equals the padded
forward's real-token states up to float rounding (the matmuls see a different number of rows);
`tests/test_speed.py` checks it. In training the dropout masks are drawn over [1, T, H] instead of
[B, S, H]: every real token still gets an independent mask of the same probability, but from
different draws of the seeded generator, so losses differ from the padded path's by dropout noise.

The encoder's own layer modules run unchanged (PEFT LoRA layers, FedLEASE's mixture layers and
LEFF's swapped-in blocks included): only the attention function is swapped, through transformers'
attention interface, for the duration of the call. The pooler is skipped (the task head reads the
last hidden state). Other encoders (DeBERTa: relative positions) keep the padded forward.

**Dropout.** `torch.nn.functional.dropout` on CPU draws its mask with `bernoulli_` (one mt19937
call per element) then scales it in two more passes: on a MiniLM step that is 10-14 % of the time.
`dropout` here keeps an element when a 32-bit uniform word is >= ⌊p·2³²⌋ (`keep_mask`): the same
Bernoulli(1 − p) keep mask and the same 1/(1 − p) scale, about 3× faster, seeded from torch's
generator (a different stream of draws, so not the same masks). `use_fast_dropout` switches every
`nn.Dropout` of a model to it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.hardware import CPU

ATTENTION = "fedpeft_varlen"
VARLEN_MODEL_TYPES = ("bert", "roberta")


# ---------------------------------------------------------------------------------------------- dropout
_U32 = 2 ** 32


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, True with probability 1 − p, independently per element.

    On the CPU the uniforms are 32-bit words of a fresh numpy SFC64 generator seeded with one draw
    from torch's default generator (so `torch.manual_seed` fixes the masks, as it fixes F.dropout's),
    compared with ⌊p·2³²⌋: P(drop) is p to within 2⁻³² (torch's own float32 uniforms resolve 2⁻²⁴).
    It is 3× faster than torch's per-element mt19937 draws. Elsewhere: torch.rand on the device."""
    if device.type != CPU:
        return torch.rand(shape, device=device) >= p
    n = math.prod(shape)
    seed = int(torch.randint(0, 2 ** 62, (1,)))
    words = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    return torch.from_numpy(words >= np.uint32(int(p * _U32))).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: keep each element with probability 1 − p (`keep_mask`), scale by 1/(1 − p)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return x.mul(keep_mask(x.shape, p, x.device)).mul_(1.0 / (1.0 - p))


_dropout = dropout  # for varlen_attention, whose `dropout` argument (transformers' name) shadows it


class FastDropout(nn.Dropout):
    """`nn.Dropout` with the mask drawn by `dropout` above (same p, same train/eval behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # never used by the models here; keep the stock behaviour for it
            return super().forward(x)
        return dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Turn every plain `nn.Dropout` of `model` into a `FastDropout` in place; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = FastDropout
            n += 1
    return n


# ---------------------------------------------------------------------------------------------- varlen
class PaddedSwitch:
    """`model.padded()` for a model whose padding-free forward is on while `self.varlen` is True
    (TaskModel, CausalLM)."""

    varlen: bool

    @contextlib.contextmanager
    def padded(self):
        """Run the padded [B, S] forward inside this block: for code that shapes per-sentence tensors
        against [B, S, H] activations (FedDPA's per-instance LoRA scaling)."""
        before = self.varlen
        self.varlen = False
        try:
            yield
        finally:
            self.varlen = before


@dataclass
class Varlen:
    """Where the T real tokens of a padded [B, S] batch are, for the attention function."""

    index: torch.Tensor  # [T] flat positions (row * S + column) of the real tokens, row-major
    rows: torch.Tensor  # [T] row (sentence) of each real token
    cols: torch.Tensor  # [T] column (position) of each real token
    batch: int
    width: int
    key_bias: torch.Tensor  # [B, 1, 1, S] additive: 0 on real keys, float32's min on padding
    key_mask: torch.Tensor  # [B, 1, 1, S] bool: True on real keys (for the fused SDPA kernel)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Varlen":
        b, s = attention_mask.shape
        real = attention_mask.reshape(-1) != 0
        index = real.nonzero().squeeze(1)
        keys = (attention_mask != 0)[:, None, None, :]
        bias = torch.zeros(keys.shape, dtype=torch.float32, device=attention_mask.device)
        bias.masked_fill_(~keys, torch.finfo(torch.float32).min)
        rows = torch.div(index, s, rounding_mode="floor")
        return cls(index, rows, index - rows * s, b, s, bias, keys)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[1, heads, T, d] (the projections of the real tokens) → [B, heads, S, d] contiguous, zeros
        on padding (written through a [B, S, heads, d] view, so no transpose copy follows)."""
        _, h, _, d = x.shape
        out = x.new_zeros(self.batch, h, self.width, d)
        out.permute(0, 2, 1, 3).index_put_((self.rows, self.cols), x[0].transpose(0, 1))
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, heads, S, d] → [1, T, heads, d], the layout transformers' attention functions return."""
        return x.permute(0, 2, 1, 3)[self.rows, self.cols].unsqueeze(0)


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     varlen: Varlen | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of each sentence over its own real tokens, for queries/keys/values of the T real
    tokens ([1, heads, T, d]); registered with transformers as `ATTENTION`.

    With dropout (training) the probabilities are computed as transformers' eager path does
    (scores · scaling + key bias, softmax, dropout, · V) with this module's dropout; without it,
    torch's fused SDPA kernel."""
    if varlen is None:
        raise RuntimeError(f"the {ATTENTION!r} attention runs only inside encode_varlen")
    q, k, v = varlen.pad(query), varlen.pad(key), varlen.pad(value)
    if scaling is None:
        scaling = q.shape[-1] ** -0.5
    if dropout > 0.0 and module.training:
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling + varlen.key_bias.to(q.dtype)
        probs = _dropout(torch.softmax(scores, dim=-1), dropout, True)
        out = torch.matmul(probs.to(v.dtype), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=varlen.key_mask, scale=scaling)
    return varlen.unpad(out), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, varlen_attention)


_register()


def base_encoder(encoder: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the module itself)."""
    get_base = getattr(encoder, "get_base_model", None)
    return get_base() if callable(get_base) else encoder


def supports_varlen(encoder: nn.Module) -> bool:
    """A BERT-style encoder: absolute positions, `embeddings` + `encoder.layer`, not a decoder."""
    base = base_encoder(encoder)
    cfg = getattr(base, "config", None)
    return (cfg is not None and getattr(cfg, "model_type", None) in VARLEN_MODEL_TYPES
            and not getattr(cfg, "is_decoder", False)
            and getattr(cfg, "position_embedding_type", "absolute") in ("absolute", None)
            and hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer"))


@contextlib.contextmanager
def attention_implementation(layers, name: str):
    """Every config reachable from `layers` set to attention `name` for the block (LEFF's students
    are deep copies with configs of their own; LEFF's distillation asks for "eager" to get attention
    probabilities)."""
    configs = {}
    for layer in layers:
        for module in layer.modules():
            cfg = getattr(module, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                configs[id(cfg)] = cfg
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def encode_varlen(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Varlen]:
    """The last hidden states of the real tokens, [T, H] (row-major order of the padded batch), and
    where they sit in it. `encoder` must satisfy `supports_varlen`."""
    base = base_encoder(encoder)
    varlen = Varlen.from_mask(attention_mask)
    index = varlen.index
    ids = input_ids.reshape(-1).index_select(0, index)[None]
    positions = (index % varlen.width)[None]
    if base.config.model_type == "roberta":
        positions = positions + base.embeddings.padding_idx + 1
    kwargs = {"input_ids": ids, "position_ids": positions}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids.reshape(-1).index_select(0, index)[None]
    else:
        kwargs["token_type_ids"] = torch.zeros_like(ids)
    hidden = base.embeddings(**kwargs)
    layers = list(base.encoder.layer)
    with attention_implementation(layers, ATTENTION):
        for layer in layers:
            out = layer(hidden, None, varlen=varlen)
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden[0], varlen


def pool_varlen(hidden: torch.Tensor, varlen: Varlen, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[T, H] real-token states → [B, H]: the first token of each sentence, or the mean of its tokens."""
    rows = varlen.rows
    if pooling == "mean":
        sums = hidden.new_zeros(varlen.batch, hidden.shape[-1]).index_add(0, rows, hidden)
        counts = attention_mask.sum(1, keepdim=True).to(hidden.dtype).clamp_min(1.0)
        return sums / counts
    firsts = torch.searchsorted(rows, torch.arange(varlen.batch, device=rows.device))
    return hidden.index_select(0, firsts)
