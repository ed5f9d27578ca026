"""The (train pool, test pool) pair a federation draws from, for any task: a classification task's
from `sources.py` (its train and validation splits, or a carve-out), a generation task's from
`nlg_sources.py` (fixed train and evaluation files), a dataset of the user's from `custom.py`
(its file and a test file or hold-out; `ArrowPool`s, whose examples are made when drawn)."""

from __future__ import annotations

import os

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
        return load_generation_pools(spec.name, data_dir)
    return load_classification_pools(spec.name, data_dir, carve_out=carve_out, seed=seed)
