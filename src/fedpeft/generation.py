"""Batched greedy and beam-search generation with a KV cache, and the scoring of what was generated.

Generation runs Hugging Face `generate` on the causal LM inside `CausalLM` (LoRA or FedLEASE's
mixture layers included: `MoELoRALinear` routes every token it sees, so with a KV cache each decoding
step routes its one new token, exactly as the full-sequence forward would route it). Prompts are
LEFT-padded (`collate_prompts`); only the new tokens are decoded, cut at the first EOS. Prompts go
to the device the model is on and generation runs under the run's autocast there.

`score_generation` is the one place generated text meets a metric: the task's registered metrics
through `fedpeft.metrics.compute_metrics(task, hypotheses, references)` when that function knows
them, else `token_f1` and `exact_match` (`fallback_metrics`, below): a bag-of-words F1 and a
normalised exact match against the best reference, named for what they are (not BLEU).
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fedpeft.data.batching import EncodedLM, prompt_batches
from fedpeft.errors import FedPeftError

log = logging.getLogger("fedpeft")


@dataclass(frozen=True)
class GenerationSettings:
    num_beams: int = 1
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 16
    use_cache: bool = True

    def __post_init__(self):
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise FedPeftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.no_repeat_ngram_size < 0:
            raise FedPeftError(f"--no-repeat-ngram-size must be 0 (off) or more, got {self.no_repeat_ngram_size}")

    @classmethod
    def from_config(cls, cfg) -> "GenerationSettings":
        return cls(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, length_penalty=cfg.length_penalty,
                   no_repeat_ngram_size=cfg.no_repeat_ngram_size, batch_size=cfg.gen_batch_size)


def _generation_config(settings: GenerationSettings, tokenizer):
    from transformers import GenerationConfig

    # Every decoding choice is explicit, so a model's own generation_config.json (sampling,
    # temperature, its own max_length) cannot change what fedpeft measures.
    return GenerationConfig(
        do_sample=False, num_beams=settings.num_beams, num_return_sequences=1,
        max_new_tokens=settings.max_new_tokens, length_penalty=settings.length_penalty,
        no_repeat_ngram_size=settings.no_repeat_ngram_size, early_stopping=settings.num_beams > 1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, use_cache=settings.use_cache)


@torch.inference_mode()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 settings: GenerationSettings, precision: str = "fp32") -> list[list[int]]:
    """New token ids per row of a LEFT-padded prompt batch, cut before the first EOS."""
    import warnings

    from fedpeft.training import autocast, model_device

    lm = model.lm
    lm.eval()
    device = getattr(lm, "device", None) or model_device(lm)  # the run's device (a k-bit decoder: its GPU)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    eos = model.tokenizer.eos_token_id
    with autocast(precision, device), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "generation flags are not valid" for flags we set to their defaults
        out = lm.generate(input_ids=input_ids, attention_mask=attention_mask,
                          generation_config=_generation_config(settings, model.tokenizer))
    new = out[:, input_ids.shape[1]:].tolist()  # .tolist() copies to the host
    return [row[: row.index(eos)] if eos in row else row for row in new]


def generate(model, data: EncodedLM, settings: GenerationSettings, precision: str = "fp32") -> list[str]:
    """Generated text for every example of `data`, in its original order."""
    texts: list[str] = [""] * len(data)
    for idx, batch in prompt_batches(data, settings.batch_size):
        for i, ids in zip(idx, generate_ids(model, batch["input_ids"], batch["attention_mask"], settings, precision)):
            texts[i] = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return texts


# ------------------------------------------------------------------------------------------ scoring
def score_generation(task: str, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The task's metrics when `fedpeft.metrics` implements them, else `fallback_metrics`."""
    from fedpeft import metrics
    from fedpeft.data.tasks import get_task
    from fedpeft.nlg_metrics import NLG_METRIC_NAMES

    spec = get_task(task)
    known = set(NLG_METRIC_NAMES) if spec.is_generation else set(metrics.METRIC_NAMES)
    if spec.metrics and set(spec.metrics) <= known:
        return metrics.compute_metrics(task, list(hypotheses), [list(r) for r in references])
    if not set(spec.metrics) <= set(FALLBACK_METRICS) and task not in _warned:
        _warned.add(task)
        log.warning("task %s declares metrics %s that fedpeft does not implement: scoring "
                    "it with %s instead", task, ", ".join(spec.metrics), " and ".join(FALLBACK_METRICS))
    return fallback_metrics(hypotheses, references)


FALLBACK_METRICS = ("token_f1", "exact_match")
_warned: set[str] = set()


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def _words(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def token_f1(hypothesis: str, reference: str) -> float:
    """Bag-of-words F1 of lower-cased, punctuation-free words (SQuAD's answer F1)."""
    h, r = _words(hypothesis), _words(reference)
    if not h or not r:
        return float(h == r)
    common = sum((Counter(h) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(h), common / len(r)
    return 2 * precision * recall / (precision + recall)


def fallback_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean over examples of the best `token_f1` and of exact match (normalised words) over the references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
    if not hypotheses:
        return {"token_f1": 0.0, "exact_match": 0.0}
    f1 = [max(token_f1(h, r) for r in refs) for h, refs in zip(hypotheses, references)]
    em = [float(any(_words(h) == _words(r) for r in refs)) for h, refs in zip(hypotheses, references)]
    return {"token_f1": float(np.mean(f1)), "exact_match": float(np.mean(em))}
