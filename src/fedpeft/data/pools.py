"""The (train pool, test pool) pair a federation draws from, for any task: a classification task's
from `sources.py` (its train and validation splits, or a carve-out), a generation task's from
`nlg_sources.py` (fixed train and evaluation files), a dataset of the user's from `custom.py`
(its file and a test file or hold-out; `ArrowPool`s, whose examples are made when drawn).

`test_source="train"` carves the test pool out of the train pool instead (test_pool_from_train):
for federations whose clients together need more test examples than a validation split holds
(SST-2's has 872 sentences; 1,000 clients × 8 test examples need 8,000)."""

from __future__ import annotations

import math
import os
import zlib

import numpy as np

from fedpeft.data import custom
from fedpeft.data.nlg_sources import load_generation_pools
from fedpeft.data.sources import CARVE_OUT_SEED, load_classification_pools
from fedpeft.data.tasks import Example, get_task


def load_federation_pools(
    task: str,
    data_dir: str | os.PathLike | None = None,
    *,
    carve_out: bool = False,
    seed: int = CARVE_OUT_SEED,
    test_source: str = "validation",
    test_need: int = 0,
) -> tuple[list[Example], list[Example]]:
    """Return (train_pool, test_pool) for `task`: the pools clients draw their train and test sets from.

    Normally the train pool is the train split and the test pool the validation split. A
    generation task's pools are `GenExample`s from `nlg_sources.load_generation_pools`. The
    carve-out (`carve_out`, `seed`) is described at `sources.load_classification_pools`.
    """
    spec = get_task(task)
    dataset = custom.dataset_of(spec.name)
    if dataset is not None and not dataset.builtin:  # --dataset: its own test file or hold-out
        return custom.load_pools(dataset, data_dir)
    if spec.is_generation:  # fixed train/evaluation files, no carve-out (see nlg_sources.py)
        pools = load_generation_pools(spec.name, data_dir)
    else:
        pools = load_classification_pools(spec.name, data_dir, carve_out=carve_out, seed=seed)
    if test_source == "train":
        return test_pool_from_train(spec, pools[0], test_need, seed=seed)
    return pools


def test_pool_from_train(spec, train: list, need: int, *, seed: int = CARVE_OUT_SEED) -> tuple[list, list]:
    """(train pool, test pool), both from the train split and disjoint: the test pool holds about
    `need` examples (5 % more, so a class-balanced draw finds its share), taken per class in
    proportion max(the class's share, 1 / number of classes) and never more than half a class, in
    an order seeded by (seed, task). Both pools keep file order."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode()), 1])
    if spec.is_generation or spec.is_regression:
        groups = [list(range(len(train)))]
    else:
        groups = [[i for i, ex in enumerate(train) if ex.label == c] for c in range(spec.num_labels)]
    test_ids: set[int] = set()
    for members in groups:
        share = max(len(members) / max(1, len(train)), 1.0 / len(groups))
        n = min(len(members) // 2, math.ceil(1.05 * need * share))
        order = rng.permutation(len(members))
        test_ids.update(members[j] for j in order[:n])
    return ([ex for i, ex in enumerate(train) if i not in test_ids],
            [ex for i, ex in enumerate(train) if i in test_ids])
