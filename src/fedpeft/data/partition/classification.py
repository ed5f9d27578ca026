"""Classification and regression tasks: how many examples of each class a client gets
(`partition`, `label_split`):

- `partition="task"` (task non-IID; the FedLEASE setting), with `label_split`:
  - `"class_balanced"` (default, as in the official FedLEASE code): n / C per class;
  - `"natural"`: the pool's own class proportions;
  - `"dirichlet"`: same as `partition="dirichlet"` (the FedLEASE data split lists it among the label
    splits, docs/methods/fedlease.md#data-split).
- `partition="dirichlet"`: q_i ~ Dir(α·1_C), drawn once per client from its own seeded generator;
  train and test both use q_i (label skew on top of task skew).
- `partition="iid"`: a uniform random sample of the pool, ignoring labels (natural proportions in
  expectation).

Per-class counts are n·p rounded by largest remainder (ties go to classes in the order
c_i, c_i + 1, …, starting at class `i mod C` for client i, so no class is always favoured).
Regression tasks (stsb) have no classes: they are always sampled uniformly ("natural"/"iid");
asking for `class_balanced` or `dirichlet` on one logs a warning and samples uniformly.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping

import numpy as np

from fedpeft.data.partition.client import ClientData
from fedpeft.data.partition.common import _SPLIT_NAMES, _class_proportions, class_ids, largest_remainder, take
from fedpeft.errors import FedPeftError

logger = logging.getLogger(__package__)  # fedpeft.data.partition, the logger's name before the split


def _partition_classification(spec, task, clients, pools, train_samples, test_samples, mode, alpha,
                              seed) -> dict[int, ClientData]:
    """Disjoint draws of `Example`s for the clients of `task` (see the module docstring)."""
    results: dict[int, ClientData] = {}
    task_mode = mode
    if spec.is_regression and mode in ("class_balanced", "dirichlet"):
        logger.warning(
            "Task %s is a regression task with no classes, so its clients are sampled uniformly "
            "(natural proportions) instead of %s.",
            task,
            mode,
        )
    if spec.is_regression:
        task_mode = "iid"

    proportions = _client_proportions(spec, clients, task_mode, alpha, seed)
    drawn = []
    for split_id, (pool, samples) in enumerate(zip(pools[task], (train_samples, test_samples))):
        n = int(samples[task]) if isinstance(samples, Mapping) else int(samples)
        drawn.append(
            _draw(spec, _SPLIT_NAMES[split_id], split_id, pool, clients, n, task_mode, proportions, seed)
        )
    train_pool = pools[task][0]
    pool_props = () if spec.is_regression else tuple(_class_proportions(spec, train_pool))
    for k, i in enumerate(clients):
        train_ids, test_ids = drawn[0][k], drawn[1][k]
        results[i] = ClientData(
            client_id=i,
            task=task,
            train=take(pools[task][0], train_ids),
            test=take(pools[task][1], test_ids),
            train_ids=tuple(train_ids),
            test_ids=tuple(test_ids),
            pool_proportions=pool_props,
        )
    return results


def _client_proportions(spec, clients, mode, alpha, seed) -> dict[int, np.ndarray] | None:
    """Per-client target proportions for dirichlet and class_balanced (None: per split / uniform)."""
    if mode == "dirichlet":
        out = {}
        for i in clients:
            rng = np.random.default_rng([seed, 0xD1C, i])
            q = rng.dirichlet(np.full(spec.num_labels, float(alpha)))
            if not np.all(np.isfinite(q)) or q.sum() <= 0:  # tiny alpha underflow: a one-hot draw
                q = np.zeros(spec.num_labels)
                q[rng.integers(spec.num_labels)] = 1.0
            out[i] = q / q.sum()
        return out
    if mode == "class_balanced":
        return {i: np.full(spec.num_labels, 1.0 / spec.num_labels) for i in clients}
    return None


def _draw(spec, split, split_id, pool, clients, n, mode, proportions, seed) -> list[list[int]]:
    """Pool positions for each client in `clients` (disjoint), in a seeded shuffled order."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode()), split_id])
    k = len(clients)
    kind = "train" if split_id == 0 else "test"
    if mode == "iid":
        need = n * k
        if need > len(pool):
            raise FedPeftError(
                f"{spec.name}/{split}: need {need} ({k} clients × {n}), have {len(pool)}; "
                f"request fewer {kind} samples per client or fewer {spec.name} clients."
            )
        order = rng.permutation(len(pool))
        return [[int(j) for j in order[m * n : (m + 1) * n]] for m in range(k)]

    C = spec.num_labels
    labels = class_ids(spec, pool)
    by_class = [np.flatnonzero(labels == c) for c in range(C)]  # arrays: a pool may have millions of rows
    if mode == "natural":
        natural = _class_proportions(spec, pool)
        counts = [largest_remainder(n, natural, start=i) for i in clients]
    else:
        counts = [largest_remainder(n, proportions[i], start=i) for i in clients]
    for c in range(C):
        per_client = [cnt[c] for cnt in counts]
        need = sum(per_client)
        if need > len(by_class[c]):
            how = (
                f"{k} clients × {per_client[0]}"
                if len(set(per_client)) == 1
                else f"summed over {k} clients: {' + '.join(map(str, per_client))}"
                if k <= 16
                else f"summed over {k} clients' label shares, {min(per_client)} to {max(per_client)} each"
            )
            raise FedPeftError(
                f"{spec.name}/{split} class {c}: need {need} ({how}), have {len(by_class[c])}; "
                f"request fewer {kind} samples per client, fewer {spec.name} clients or another "
                "label split."
            )
    shuffled = [by_class[c][rng.permutation(len(by_class[c]))] for c in range(C)]
    taken = [0] * C
    out = []
    for cnt in counts:
        ids = []
        for c in range(C):
            ids.extend(shuffled[c][taken[c] : taken[c] + cnt[c]].tolist())
            taken[c] += cnt[c]
        out.append([ids[j] for j in rng.permutation(len(ids))])
    return out
