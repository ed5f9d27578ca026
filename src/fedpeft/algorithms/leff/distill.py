"""LEFF step 2: server-side compression of the unselected layers by distillation (Eq. 7;
docs/methods/leff.md#students, #distillation).

A contiguous segment [a, b] of n teacher blocks becomes a student of m = ⌈n·r_c⌉ blocks of the same
class, initialised from evenly spaced teacher blocks and distilled on proxy text with
E = (1 − α_d)·MSE(H_t, H_s) + α_d·KL(A_t ‖ A_s): hidden state after the segment and the last
block's attention probabilities, no labels. Attention probabilities need eager attention, so
teacher and student run eagerly during distillation. m = n (always for n = 1 or r_c = 1) is an
exact copy and no step runs.

Blocks run as BERT-style encoder layers `layer(hidden, additive_mask)`, through a DeBERTa-v2
encoder (relative positions), or as causal decoder layers (`owner` a GPT2Model or a Llama-style
model): a causal mask combined with the key padding, GPT-2's position table added by the embedding
stage (`causal_embed`, frozen wpe), Llama's rotary (cos, sin) from the model's own `rotary_emb`,
positions 0..S-1 as the models' own forward uses them when no position ids are given.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fedpeft.data.batching import Encoded, collate
from fedpeft.models.varlen import attention_implementation


def student_depth(n: int, rate: float) -> int:
    """m = ⌈n·r_c⌉ blocks for a segment of n; a float guard keeps e.g. 10 × 0.3 from becoming 4."""
    return max(1, math.ceil(n * rate - 1e-9)) if n > 0 else 0


def student_init_layers(n: int, m: int) -> list[int]:
    """Segment positions the student's blocks copy: ⌊(j + ½)·n/m⌋ for j < m (n = 11, m = 6 → 0, 2, …, 10)."""
    return [int((j + 0.5) * n / m) for j in range(m)]


def init_student(teacher: Sequence[nn.Module], rate: float) -> list[nn.Module]:
    """Deep copies of evenly spaced teacher blocks, frozen."""
    m = student_depth(len(teacher), rate)
    student = [copy.deepcopy(teacher[i]) for i in student_init_layers(len(teacher), m)]
    for block in student:
        for p in block.parameters():
            p.requires_grad_(False)
    return student


def additive_mask(attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, S) 0/1 mask → (B, 1, 1, S) additive mask for eager attention."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def self_attention_module(block: nn.Module) -> nn.Module:
    """BERT's *SelfAttention, else a decoder's attention (GPT2Attention, LlamaAttention): eager
    attention returns (output, probabilities) from it."""
    modules = list(block.modules())
    for suffix in ("SelfAttention", "Attention"):
        for module in modules:
            if type(module).__name__.endswith(suffix):
                return module
    raise TypeError(f"no self-attention module in {type(block).__name__}")


def is_causal_stack(owner: nn.Module | None) -> bool:
    """A decoder's base model (GPT2Model: wte + wpe; Llama-style: embed_tokens + rotary_emb)."""
    return owner is not None and (hasattr(owner, "wpe") or hasattr(owner, "rotary_emb"))


def causal_additive_mask(attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, S) 0/1 key mask → (B, 1, S, S) additive mask: query q sees keys k ≤ q that are not padding."""
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def causal_embed(owner: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The embedding stage of a decoder: GPT-2 token + position tables (then its dropout), or Llama's
    token table (its positions are rotary, applied inside every layer)."""
    if hasattr(owner, "wpe"):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return owner.drop(owner.wte(input_ids) + owner.wpe(positions))
    return owner.embed_tokens(input_ids)


def _causal_layer_kwargs(owner: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict:
    kwargs = {"attention_mask": causal_additive_mask(mask, hidden.dtype)}
    if hasattr(owner, "rotary_emb"):
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        kwargs["position_embeddings"] = owner.rotary_emb(hidden, position_ids=positions)
        kwargs["position_ids"] = positions
    return kwargs


def eager_attention(modules: Sequence[nn.Module]):
    """Switch every config reachable from `modules` to eager attention (probabilities are returned)."""
    return attention_implementation(modules, "eager")


def run_blocks(blocks: Sequence[nn.Module], hidden: torch.Tensor, mask: torch.Tensor,
               want_attention: bool = False, owner: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden state after `blocks`, and the last block's attention probabilities (B, heads, S, S).

    BERT-style blocks are called as `block(hidden, additive_mask)`, the probabilities taken by a hook
    on the last block's self-attention (eager attention returns them). A DeBERTa-v2 encoder `owner`
    runs the blocks itself, with its relative-position table and LayerNorm (the global model's).
    A decoder `owner` (`is_causal_stack`) runs them as causal layers (module docstring)."""
    if owner is not None and hasattr(owner, "get_rel_pos"):
        if not blocks:
            return hidden, None
        original = owner.layer
        owner.layer = nn.ModuleList(blocks)
        try:
            out = owner(hidden, mask, output_hidden_states=False, output_attentions=want_attention)
        finally:
            owner.layer = original
        return out.last_hidden_state, out.attentions[-1] if want_attention else None
    captured = {}
    handle = None
    if want_attention and blocks:
        handle = self_attention_module(blocks[-1]).register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("a", out[1]))
    try:
        if is_causal_stack(owner):
            args, kwargs = (), _causal_layer_kwargs(owner, hidden, mask)
        else:
            args, kwargs = (additive_mask(mask, hidden.dtype),), {}
        for block in blocks:
            out = block(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
    finally:
        if handle is not None:
            handle.remove()
    return hidden, captured.get("a")


def distill_loss(h_t: torch.Tensor, a_t: torch.Tensor, h_s: torch.Tensor, a_s: torch.Tensor,
                 mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 7: (1 − α)·MSE + α·KL(A_t ‖ A_s), on proxy text, no labels.

    MSE: mean over non-padding tokens and hidden units. KL: over non-padding keys for each head and
    non-padding query row, A_s clamped at 1e-12 inside the log; mean over heads, rows and batch."""
    m = mask.to(h_t.dtype)
    mse = ((h_t - h_s).pow(2) * m[..., None]).sum() / (m.sum() * h_t.shape[-1])
    keys = m[:, None, None, :]
    rows = m[:, None, :].expand(-1, a_t.shape[1], -1)  # (B, heads, S)
    pt = a_t * keys
    log_ratio = torch.log(pt.clamp_min(1e-30)) - torch.log(a_s.clamp_min(1e-12))
    kl_rows = torch.where(pt > 0, pt * log_ratio, torch.zeros_like(pt)).sum(-1)
    kl = (kl_rows * rows).sum() / rows.sum()
    return (1 - alpha) * mse + alpha * kl


def prefix_hidden(embeddings: nn.Module, blocks: Sequence[nn.Module], batch: dict[str, torch.Tensor],
                  owner: nn.Module | None = None) -> torch.Tensor:
    """Hidden states entering block len(blocks): the embedding output run through `blocks`.
    For a decoder, `embeddings` is unused: the embedding stage is the `owner`'s (`causal_embed`)."""
    import inspect

    if is_causal_stack(owner):
        return run_blocks(blocks, causal_embed(owner, batch["input_ids"]), batch["attention_mask"], owner=owner)[0]
    kwargs = {"input_ids": batch["input_ids"]}
    params = inspect.signature(embeddings.forward).parameters
    if "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    if "mask" in params:  # DeBERTa's embeddings zero the padding positions
        kwargs["mask"] = batch["attention_mask"]
    hidden = embeddings(**kwargs)
    return run_blocks(blocks, hidden, batch["attention_mask"], owner=owner)[0]


class TeacherCache:
    """`--distill-teacher cached`: the global model's outputs on the whole distillation pool, computed
    once per round, for every segment of the round to read instead of running the prefix and the
    teacher on each step's batch.

    The pool runs in chunks of `chunk` texts (sorted by length, so a chunk pads little; each chunk padded
    to its own longest text)
    through the embeddings and the global blocks, one block at a time, keeping the hidden states entering
    the blocks in `starts` and leaving the blocks in `ends`, and the attention probabilities of the
    blocks in `ends`, in tensors padded to the pool's longest text W. `batch(idx, a, b)` returns a step's
    (mask, hidden in, teacher hidden out, teacher attention) cut to the batch's own width, as `collate`
    pads it: the real tokens' values equal what the per-step path computes on that batch up to float
    rounding (the matmuls see other shapes); padding positions hold other values, which no real token
    reads (keys are masked) and the loss masks. BERT-style encoders and decoders; DeBERTa's encoder
    (relative positions, a convolution after its first block) keeps the per-step path."""

    def __init__(self, embeddings: nn.Module, global_blocks: Sequence[nn.Module], proxy: Encoded, *,
                 starts: set[int], ends: set[int], chunk: int, owner: nn.Module | None = None):
        modules = [m for m in (embeddings, owner) if m is not None] + list(global_blocks)
        device = next(global_blocks[0].parameters()).device
        n = len(proxy)
        lengths = [len(proxy.input_ids[i]) for i in range(n)]
        width = max(lengths)
        self.mask = torch.zeros(n, width, dtype=torch.long, device=device)
        self.hidden: dict[int, torch.Tensor] = {}  # boundary l (entering block l) → [N, W, H]
        self.attention: dict[int, torch.Tensor] = {}  # block l → [N, heads, W, W]
        self.lengths = torch.tensor(lengths)
        keep = set(starts) | {e + 1 for e in ends}
        was_training = {m: m.training for mod in modules for m in mod.modules()}
        try:
            for mod in modules:
                mod.eval()
            with torch.no_grad(), eager_attention(modules):
                order = sorted(range(n), key=lambda i: lengths[i])
                for lo in range(0, n, chunk):
                    idx = order[lo:lo + chunk]
                    rows = torch.tensor(idx, dtype=torch.long, device=device)
                    batch = {k: v.to(device) for k, v in collate(proxy, idx).items()}
                    mask, w = batch["attention_mask"], batch["attention_mask"].shape[1]
                    self.mask[rows, :w] = mask
                    hidden = prefix_hidden(embeddings, [], batch, owner)
                    top = max(keep)  # the deepest boundary a segment needs: no block runs past it
                    for layer in range(top + 1):
                        if layer in keep:
                            self._put(self.hidden, layer, hidden, rows, (n, width, hidden.shape[-1]))
                        if layer == top:
                            break
                        hidden, att = run_blocks([global_blocks[layer]], hidden, mask, layer in ends, owner)
                        if layer in ends:
                            self._put(self.attention, layer, att, rows, (n, att.shape[1], width, width))
        finally:
            for m, mode in was_training.items():
                m.train(mode)

    @staticmethod
    def _put(store: dict[int, torch.Tensor], key: int, value: torch.Tensor, rows: torch.Tensor, shape: tuple) -> None:
        """Write a chunk's [c, w, H] states or [c, heads, w, w] probabilities into the pool's rows."""
        if key not in store:
            store[key] = value.new_zeros(shape)
        if value.dim() == 3:
            store[key][rows, :value.shape[1]] = value
        else:
            store[key][rows, :, :value.shape[2], :value.shape[3]] = value

    def batch(self, idx, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        w = int(self.lengths[rows].max())
        rows = rows.to(self.mask.device)
        return (self.mask[rows, :w], self.hidden[a][rows, :w], self.hidden[b + 1][rows, :w],
                self.attention[b][rows, :, :w, :w])


def caches_teacher(owner: nn.Module | None) -> bool:
    """Can `TeacherCache` serve this architecture? (Not DeBERTa's encoder: see TeacherCache.)"""
    return not (owner is not None and hasattr(owner, "get_rel_pos"))


def distill_segment(embeddings: nn.Module, global_blocks: Sequence[nn.Module], a: int, b: int, proxy: Encoded, *,
                    rate: float, alpha: float, steps: int, lr: float, batch_size: int, seed: int,
                    owner: nn.Module | None = None, teacher_cache: TeacherCache | None = None) -> tuple[list[nn.Module], dict]:
    """The student of global blocks a..b (0-based, inclusive), distilled for `steps` AdamW steps
    (lr, weight decay 0) on batches of proxy text drawn by a generator seeded for (seed, round, a, b).
    With a `teacher_cache` (--distill-teacher cached) the step's inputs and targets come from it
    (the same batches: the draws do not change). Returns the frozen student blocks and what the run
    measured."""
    teacher = list(global_blocks[a:b + 1])
    student = init_student(teacher, rate)
    info = {"segment": [a, b], "student_layers": len(student), "steps": 0, "loss_first": None, "loss_last": None}
    if len(student) == len(teacher) or steps == 0:
        return student, info
    params = [p for blk in student for p in blk.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = params[0].device  # the run's device: students are copies of the global model's blocks
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    modules = [m for m in (embeddings, owner) if m is not None] + [*global_blocks, *student]
    was_training = {m: m.training for mod in modules for m in mod.modules()}
    try:
        for mod in modules:
            mod.eval()  # no dropout: the targets are the teacher's deterministic outputs
        with eager_attention(modules):
            for step in range(steps):
                idx = rng.choice(len(proxy), size=min(batch_size, len(proxy)), replace=False)
                if teacher_cache is not None:
                    mask, h_in, h_t, a_t = teacher_cache.batch(idx, a, b)
                else:
                    batch = {k: v.to(device) for k, v in collate(proxy, idx).items()}  # to the teacher's device
                    mask = batch["attention_mask"]
                    with torch.no_grad():
                        h_in = prefix_hidden(embeddings, global_blocks[:a], batch, owner)
                        h_t, a_t = run_blocks(teacher, h_in, mask, True, owner)
                h_s, a_s = run_blocks(student, h_in, mask, True, owner)
                loss = distill_loss(h_t, a_t, h_s, a_s, mask, alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                info["loss_last"] = float(loss.detach())
                if step == 0:
                    info["loss_first"] = float(loss.detach())
        info["steps"] = steps
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for m, mode in was_training.items():
            m.train(mode)
    return student, info
