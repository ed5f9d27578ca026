"""LEFF's runtime: ONE model, the global one, whose block list is swapped to assemble a client model.

A client model is [prefix student] + [global blocks 𝓛_i] + [suffix student] for the duration of a
local run (`assembled`); students live in scratch blocks a client loads from its instruction. On an
encoder 𝒜 (the trainable set besides the blocks) is the backbone's non-block, non-embedding
parameters on the forward path plus the classification head; on a decoder it is the final norm
(+ an untied lm_head), with the embeddings (and a tied LM head) frozen (structure.py).
"""

from __future__ import annotations

import contextlib
import copy

from torch import nn

from fedpeft.algorithms.base import Runtime
from fedpeft.algorithms.leff.distill import is_causal_stack
from fedpeft.algorithms.leff.structure import block_list, embedding_parameters, head_set_parameters, parameter_role
from fedpeft.algorithms.lora_runtime import wrap_model
from fedpeft.errors import FedPeftError


def build_leff_runtime(backbone, method: str, encoder_path: str = "padded") -> Runtime:
    encoder = copy.deepcopy(backbone.model)  # the cached backbone stays pristine
    for p in encoder.parameters():
        p.requires_grad_(False)
    owner, attr = block_list(encoder)
    blocks = list(getattr(owner, attr))
    if getattr(backbone, "kind", "encoder") == "causal":
        return _decoder_runtime(encoder, backbone, owner, attr, blocks, method)
    embeddings = getattr(encoder, "embeddings", None)
    if embeddings is None:
        raise FedPeftError(f"{method} runs on encoder models with an `embeddings` module (BERT family) "
                           f"in this version; {backbone.model_type} is not supported yet")
    # 𝒜 inside the backbone: non-block, non-embedding parameters on the forward path (the
    # backbone's own pooler is not: TaskModel's head replaces it).
    aset = {n: p for n, p in encoder.named_parameters()
            if parameter_role(n)[0] == "head_set" and not n.startswith("pooler.")}
    return Runtime(wrap_model(encoder, backbone, encoder_path), blocks, {
        "tokenizer": backbone.tokenizer, "block_owner": (owner, attr), "embeddings": embeddings,
        "emb_params": dict(embeddings.named_parameters()), "scratch": [], "aset": aset, "causal": False})


def _decoder_runtime(lm, backbone, owner, attr, blocks, method: str) -> Runtime:
    """A causal LM: embeddings → blocks → final norm (→ lm_head), all inside the decoder's own
    forward, which runs whatever block list `assembled` puts in place."""
    if not is_causal_stack(owner):
        raise FedPeftError(f"{method} runs on GPT-2- and Llama-style decoders; the blocks of "
                           f"{backbone.model_type} sit in {type(owner).__name__}, which has neither a GPT-2 "
                           "position table nor rotary position embeddings: use another method")
    return Runtime(wrap_model(lm, backbone), blocks, {
        "tokenizer": backbone.tokenizer, "block_owner": (owner, attr), "embeddings": None,
        "emb_params": embedding_parameters(lm), "scratch": [], "aset": head_set_parameters(lm), "causal": True})


@contextlib.contextmanager
def assembled(runtime: Runtime, modules: list[nn.Module]):
    """The runtime model with its block list replaced by `modules` (shared, not copied)."""
    owner, attr = runtime.extra["block_owner"]
    original = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList(modules))
    try:
        yield
    finally:
        setattr(owner, attr, original)


def scratch_blocks(runtime: Runtime, count: int, offset: int) -> list[nn.Module]:
    """`count` spare blocks (copies of block 0, frozen) starting at `offset` of the runtime's pool:
    where a client loads the students of its instruction."""
    pool = runtime.extra["scratch"]
    while len(pool) < offset + count:
        blk = copy.deepcopy(runtime.sites[0])
        for p in blk.parameters():
            p.requires_grad_(False)
        pool.append(blk)
    return pool[offset:offset + count]
