"""Tokenize once, then serve length-grouped, dynamically padded batches.

Padding is pure waste on CPU: batches are built from examples of similar length (shuffled within
"mega-batches" of 50 batches, as HF's LengthGroupedSampler does), padded only to their own longest
example, and the batch order is shuffled so training still sees a random order.

Generation tasks (`EncodedLM`): each example is prompt + target + EOS; its token labels are -100 on
the prompt and on padding, so the loss covers the target tokens (and the EOS that ends them) only.
When an example is longer than `max_length`, the target is kept and the prompt is cut from the LEFT
(its end, next to the target, is what the target depends on most); only a target that alone fills
`max_length` is itself cut, from the right, leaving one prompt token. Generation reads the same
(possibly left-cut) prompt, LEFT-padded so every row's next token sits in the last column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

MEGABATCH = 50


class _RaggedTokens:
    """Length bookkeeping shared by the tokenized datasets (`input_ids`: one array per example)."""

    input_ids: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass
class Encoded(_RaggedTokens):
    """A tokenized dataset: ragged token id lists plus labels."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray
    pad_id: int


def encode(examples: Sequence, tokenizer, max_length: int, *, regression: bool = False) -> Encoded:
    """Tokenize a list of `Example`s in one call (fast tokenizers batch internally)."""
    texts = [e.text_a for e in examples]
    pairs = [e.text_b or "" for e in examples] if any(e.text_b for e in examples) else None
    out = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
    ids = [np.asarray(x, dtype=np.int64) for x in out["input_ids"]]
    types = out.get("token_type_ids")
    types = [np.asarray(x, dtype=np.int64) for x in types] if types is not None else None
    labels = np.asarray([e.label for e in examples], dtype=np.float32 if regression else np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(ids, types, labels, pad)


IGNORE_INDEX = -100  # label of positions the loss skips (prompt, padding): PyTorch's and HF's convention


@dataclass
class EncodedLM(_RaggedTokens):
    """A tokenized generation dataset: prompt + target + EOS per example, and the references."""

    input_ids: list[np.ndarray]
    prompt_lengths: np.ndarray  # tokens of input_ids[i] that are prompt; the rest is target + EOS
    references: list[tuple[str, ...]]
    pad_id: int

    @property
    def target_tokens(self) -> int:
        return int(self.lengths.sum() - self.prompt_lengths.sum())

    def prompt(self, i: int) -> np.ndarray:
        return self.input_ids[i][: self.prompt_lengths[i]]


def encode_generation(examples: Sequence, tokenizer, max_length: int) -> EncodedLM:
    """Tokenize `GenExample`s: prompt (with the tokenizer's own special tokens, e.g. Llama's BOS) +
    target + EOS, cut to `max_length` as the module docstring says."""
    if max_length < 2:
        raise ValueError("max_length must leave room for a prompt token and a target token")
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True, padding=False)["input_ids"]
    targets = tokenizer([e.target for e in examples], add_special_tokens=False, padding=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return assemble_lm(examples, prompts, [list(t) + [eos] for t in targets], tokenizer, max_length)


def assemble_lm(examples: Sequence, prompts, targets, tokenizer, max_length: int) -> EncodedLM:
    """Prompt + target token ids per example (targets already end with their EOS), cut to
    `max_length`: the target keeps its first max_length - 1 tokens and the prompt loses its start."""
    ids, prompt_lengths = [], []
    for p, t in zip(prompts, targets):
        t = list(t)[: max_length - 1]
        p = list(p)[-(max_length - len(t)):] if p else []
        ids.append(np.asarray(p + t, dtype=np.int64))
        prompt_lengths.append(len(p))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return EncodedLM(ids, np.asarray(prompt_lengths, dtype=np.int64),
                     [tuple(e.references) or (e.target,) for e in examples], pad)


def collate_lm(data: EncodedLM, idx: Sequence[int]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + target + EOS with token labels: -100 on the prompt and the padding."""
    width = max(len(data.input_ids[i]) for i in idx)
    n = len(idx)
    ids = np.full((n, width), data.pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    for row, i in enumerate(idx):
        x, p = data.input_ids[i], data.prompt_lengths[i]
        ids[row, :len(x)] = x
        mask[row, :len(x)] = 1
        labels[row, p:len(x)] = x[p:]
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


def collate_prompts(data: EncodedLM, idx: Sequence[int]) -> dict[str, torch.Tensor]:
    """Prompts only, LEFT-padded (generation appends on the right)."""
    prompts = [data.prompt(i) for i in idx]
    width = max(len(p) for p in prompts)
    ids = np.full((len(idx), width), data.pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p):] = p
            mask[row, width - len(p):] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def prompt_batches(data: EncodedLM, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Left-padded prompt batches sorted by prompt length; yields the original indices with each batch."""
    order = np.argsort(data.prompt_lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, collate_prompts(data, idx)


def collate(data: Encoded | EncodedLM, idx: Sequence[int]) -> dict[str, torch.Tensor]:
    if isinstance(data, EncodedLM):
        return collate_lm(data, idx)
    width = max(len(data.input_ids[i]) for i in idx)
    n = len(idx)
    ids = np.full((n, width), data.pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64) if data.token_type_ids is not None else None
    for row, i in enumerate(idx):
        length = len(data.input_ids[i])
        ids[row, :length] = data.input_ids[i]
        mask[row, :length] = 1
        if types is not None:
            types[row, :length] = data.token_type_ids[i]
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
             "labels": torch.from_numpy(data.labels[list(idx)])}
    if types is not None:
        batch["token_type_ids"] = torch.from_numpy(types)
    return batch


def train_batches(data: Encoded, batch_size: int, rng: np.random.Generator,
                  group_by_length: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of shuffled batches; with grouping, similar lengths share a batch."""
    order = rng.permutation(len(data))
    if group_by_length:
        lengths = data.lengths
        mega = batch_size * MEGABATCH
        groups = []
        for start in range(0, len(order), mega):
            chunk = order[start:start + mega]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            groups += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        order_of_batches = rng.permutation(len(groups))
        batches = [groups[i] for i in order_of_batches]
    else:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in batches:
        yield collate(data, idx)


def eval_batches(data: Encoded, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Batches sorted by length (least padding); yields the original indices with each batch."""
    order = np.argsort(data.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, collate(data, idx)


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size
