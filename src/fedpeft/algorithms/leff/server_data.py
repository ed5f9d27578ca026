"""What the LEFF server holds besides the model: the importance batch and the proxy texts
(docs/methods/leff.md#server-importance-batch, #proxy-dataset).

Classification: the importance batch is labelled train examples held out of every client. Causal LM:
it is proxy text, the `importance_examples` texts after the distillation subset of the same seeded
order, so the two subsets are disjoint."""

from __future__ import annotations

import numpy as np

from fedpeft.config import RunConfig
from fedpeft.data.batching import Encoded, EncodedLM, encode, encode_generation
from fedpeft.data.tasks import Example, GenExample, get_task
from fedpeft.errors import FedPeftError
from fedpeft.seeding import derive_seed


def importance_batch(cfg: RunConfig, task: str, tokenizer) -> Encoded:
    """The `importance_examples` labelled train examples held out of every client (`reserved_ids`)."""
    from fedpeft.data.partition.common import reserved_ids
    from fedpeft.data.pools import load_federation_pools

    pool = load_federation_pools(task, cfg.resolved_data_dir(), carve_out=cfg.carve_out)[0]
    ids = reserved_ids(task, len(pool), cfg.importance_examples, cfg.seed)
    return encode([pool[j] for j in ids], tokenizer, cfg.max_length, regression=get_task(task).is_regression)


PROXY_DATASETS = ("auto", "wnli", "webnlg", "demo")


def proxy_corpus(cfg: RunConfig) -> list[str]:
    """Every distinct public proxy text, in an order fixed by the seed (never labels): WNLI's train
    sentences (GLUE), WebNLG's train references (E2E on a decoder) or the bundled demo texts."""
    from fedpeft.data.sources import has_local_split, load_examples

    name = cfg.proxy_dataset
    if name == "auto":
        raise RuntimeError("proxy_dataset is 'auto': the run's settings must be resolved (RunConfig.resolved) first")
    if name == "demo":
        from fedpeft.data.tasks import DEMO_TASKS

        examples = [e for t in DEMO_TASKS for e in load_examples(t, "train")]
        texts = [t for e in examples for t in (e.text_a, e.text_b) if t]
    elif name == "webnlg":
        texts = _webnlg_texts(cfg)
    else:
        try:
            spec = get_task(name)
        except FedPeftError:
            raise FedPeftError(f"unknown --proxy-dataset {name!r}: use {', '.join(PROXY_DATASETS)}") from None
        if spec.source != "glue" or not has_local_split(name, "train", cfg.resolved_data_dir()):
            where = cfg.resolved_data_dir() or "$FEDPEFT_DATA_DIR (not set)"
            raise FedPeftError(f"the proxy dataset {name!r} has no local train split under {where}: point "
                               f"--data-dir at a folder with glue/{spec.glue_dir}/train.tsv, or use --proxy-dataset demo")
        examples = load_examples(name, "train", cfg.resolved_data_dir())
        texts = [t for e in examples for t in (e.text_a, e.text_b) if t]
    texts = list(dict.fromkeys(texts))
    order = np.random.default_rng(derive_seed(cfg.seed, "leff-proxy")).permutation(len(texts))
    return [texts[i] for i in order]


def _webnlg_texts(cfg: RunConfig) -> list[str]:
    """WebNLG's train references, read from the local data root only (the proxy never goes online)."""
    from pathlib import Path

    from fedpeft.data.nlg_sources import load_gen_examples

    root = cfg.resolved_data_dir()
    if not root or not any((Path(root) / sub).is_dir() for sub in ("webnlg/v2.0/en/train", "webnlg/train")):
        where = root or "$FEDPEFT_DATA_DIR (not set)"
        raise FedPeftError(f"the proxy dataset 'webnlg' has no local train split under {where}: point --data-dir "
                           "at a folder with webnlg/v2.0/en/train/<N>triples/*.xml, or use --proxy-dataset demo")
    return [r for e in load_gen_examples("webnlg", "train", root) for r in e.references if r.strip()]


def proxy_texts(cfg: RunConfig) -> list[str]:
    """The distillation subset: the first `distill_examples` texts of the proxy corpus."""
    return proxy_corpus(cfg)[:cfg.distill_examples]


def importance_texts(cfg: RunConfig) -> list[str]:
    """A decoder's importance batch: the `importance_examples` proxy texts right after the
    distillation subset, so the two never share a text."""
    corpus = proxy_corpus(cfg)
    need = cfg.distill_examples + cfg.importance_examples
    if len(corpus) < need:
        raise FedPeftError(f"the proxy dataset {cfg.proxy_dataset!r} has {len(corpus)} distinct texts, fewer than "
                           f"--distill-examples {cfg.distill_examples} + --importance-examples "
                           f"{cfg.importance_examples} (two disjoint subsets): lower one of them")
    return corpus[cfg.distill_examples:need]


def importance_lm_batch(cfg: RunConfig, tokenizer) -> EncodedLM:
    """The importance texts as LM examples: every token (and the EOS after it) is a target."""
    examples = [GenExample("", t, (t,)) for t in importance_texts(cfg)]
    return encode_generation(examples, tokenizer, cfg.max_length)


def encode_texts(texts: list[str], tokenizer, max_length: int) -> Encoded:
    return encode([Example(t, None, 0) for t in texts], tokenizer, max_length)
