"""Helpers shared by the partition schemes: largest-remainder counts, class proportions and the
train examples reserved for the server."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from fedpeft.data.tasks import Example, TaskSpec
from fedpeft.errors import FedPeftError

_SPLIT_NAMES = {0: "train", 1: "validation"}


def reserved_ids(task: str, pool_size: int, n: int, seed: int) -> list[int]:
    """Train-pool positions held out of every client for the server (LEFF's importance batch, so it is
    disjoint from all client data; docs/methods/leff.md#server-importance-batch):
    the first n of a permutation seeded by (seed, task); clients never receive them."""
    if n <= 0:
        return []
    if n >= pool_size:
        raise FedPeftError(f"{task}: the server needs {n} train examples but the pool has only {pool_size}; "
                           "lower --importance-examples")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), 0x5E7])
    return sorted(int(j) for j in rng.permutation(pool_size)[:n])


def _without_reserved(task, train_pool, test_pool, reserve, seed):
    held = set(reserved_ids(task, len(train_pool), reserve, seed))
    if hasattr(train_pool, "subset"):  # a dataset's pool (data/custom.py): no example is made
        return train_pool.subset([j for j in range(len(train_pool)) if j not in held]), test_pool
    return [ex for j, ex in enumerate(train_pool) if j not in held], test_pool


def take(pool: Sequence, ids: Sequence[int]) -> list:
    """pool[j] for every j of `ids`; a dataset's pool (data/custom.py) makes them in one gather."""
    return pool.take(ids) if hasattr(pool, "take") else [pool[j] for j in ids]


def class_ids(spec: TaskSpec, pool: Sequence[Example]) -> np.ndarray:
    """The class id of every example of `pool`; a dataset's pool holds them as an array already."""
    ids = getattr(pool, "label_ids", None)
    if ids is not None:
        return ids
    return np.fromiter((_class_of(spec, ex) for ex in pool), dtype=np.int64, count=len(pool))


def _class_proportions(spec: TaskSpec, pool: Sequence[Example]) -> np.ndarray:
    counts = np.bincount(class_ids(spec, pool), minlength=spec.num_labels)
    total = counts.sum()
    return counts / total if total else np.full(spec.num_labels, 1.0 / spec.num_labels)


def _class_of(spec: TaskSpec, ex: Example) -> int:
    label = ex.label
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < spec.num_labels:
        raise ValueError(f"{spec.name}: label {label!r} is not a class id in 0..{spec.num_labels - 1}")
    return int(label)


def largest_remainder(n: int, proportions: Sequence[float], start: int = 0) -> list[int]:
    """Split n into integer counts proportional to `proportions` (largest-remainder method).

    Equal remainders are broken in class order starting at class `start` (cyclically).
    """
    p = np.asarray(proportions, dtype=float)
    quotas = n * p / p.sum()
    counts = np.floor(quotas).astype(int)
    remainder = n - int(counts.sum())
    fractions = quotas - counts
    size = len(p)
    order = sorted(range(size), key=lambda c: (-fractions[c], (c - start) % size))
    for c in order[:remainder]:
        counts[c] += 1
    return [int(c) for c in counts]
