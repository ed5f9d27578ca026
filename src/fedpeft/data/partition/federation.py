"""Partitioning: which examples each client holds.

One client per entry of `tasks`; client i works on task `tasks[i]`. Each task has a train pool and a
test pool (`pools.load_federation_pools`: the train and validation splits, or a carve-out). Clients of
the same task draw **disjoint** samples from these pools: train from the train pool, test from the test
pool, so train ∩ test = ∅ by construction and no example is used twice: clients' data stay private to
them and test data unseen (docs/methods/fedlease.md#data-split).

`partition` and `label_split` choose how many examples of each class a client gets: `"task"`,
`"dirichlet"` and `"iid"` are described in `classification.py` (classification and regression
tasks) and `generation.py` (generation tasks), `"dirichlet_cut"` in `dirichlet_cut.py`.

Determinism: everything comes from numpy Generators seeded from (seed, task, split) and
(seed, client); there is no global random state. Same arguments, same federation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from fedpeft.data.partition.by_client import _partition_by_client
from fedpeft.data.partition.classification import _partition_classification
from fedpeft.data.partition.client import ClientData
from fedpeft.data.partition.common import _without_reserved
from fedpeft.data.partition.dirichlet_cut import _dirichlet_cut
from fedpeft.data.partition.generation import _partition_generation, regroup_e2e
from fedpeft.data.pools import load_federation_pools
from fedpeft.data.tasks import Example, get_task
from fedpeft.errors import FedPeftError

PARTITIONS = ("task", "dirichlet", "iid", "dirichlet_cut")
LABEL_SPLITS = ("class_balanced", "natural", "dirichlet")

Samples = int | Mapping[str, int]


def build_federation(
    tasks: list[str],
    *,
    train_samples: Samples,
    test_samples: Samples,
    partition: str = "task",
    label_split: str = "class_balanced",
    alpha: float = 0.5,
    seed: int = 42,
    data_dir: str | os.PathLike | None = None,
    carve_out: bool = False,
    reserve: int = 0,
    min_train: int = 1,
    e2e_key: str = "food",
    test_source: str = "validation",
) -> list[ClientData]:
    """Build one `ClientData` per entry of `tasks` (client i has task `tasks[i]`).

    `test_source="train"`: every task's test pool is carved out of its train split, sized for its
    clients' test examples (`pools.test_pool_from_train`), disjoint from every training example.

    `e2e_key`: the MR attribute E2E examples are grouped on for a label-skew partition (LEFF's
    Dirichlet cut, `e2e_partition_key`; an MR without it is the group "missing").

    `train_samples` / `test_samples` are examples per client: an int for every task, or a mapping
    task → int (e.g. the FedLEASE preset's MRPC override of 500 / 64, since MRPC's class pools are
    too small for 1000 / 200; docs/methods/fedlease.md#mrpc-sizes). Pools come from
    `load_federation_pools(task, data_dir, carve_out=carve_out)`. See the module docstring for
    `partition`, `label_split` and `alpha`. An infeasible request raises a `FedPeftError` naming
    the task, split, class, need and supply.
    """
    _validate(tasks, train_samples, test_samples, partition, label_split, alpha, seed)
    def need(task: str) -> int:
        per_client = test_samples[task] if isinstance(test_samples, Mapping) else test_samples
        return tasks.count(task) * int(per_client)

    pools = {
        task: load_federation_pools(task, data_dir, carve_out=carve_out, test_source=test_source, test_need=need(task))
        for task in dict.fromkeys(tasks)
    }
    if e2e_key != "food":
        pools = {task: regroup_e2e(task, pool, e2e_key) for task, pool in pools.items()}
    return partition_pools(
        tasks,
        pools,
        train_samples=train_samples,
        test_samples=test_samples,
        partition=partition,
        label_split=label_split,
        alpha=alpha,
        seed=seed,
        reserve=reserve,
        min_train=min_train,
    )


def partition_pools(
    tasks: list[str],
    pools: Mapping[str, tuple[Sequence[Example], Sequence[Example]]],
    *,
    train_samples: Samples,
    test_samples: Samples,
    partition: str = "task",
    label_split: str = "class_balanced",
    alpha: float = 0.5,
    seed: int = 42,
    reserve: int = 0,
    min_train: int = 1,
) -> list[ClientData]:
    """`build_federation` on given pools: `pools[task] = (train_pool, test_pool)`.

    `reserve` train examples per task (`reserved_ids`) are removed from the pool before drawing."""
    _validate(tasks, train_samples, test_samples, partition, label_split, alpha, seed)
    if reserve > 0:
        pools = {task: _without_reserved(task, *pools[task], reserve, seed) for task in dict.fromkeys(tasks)
                 if task in pools}
    natural = [t for t in dict.fromkeys(tasks) if t in pools and getattr(pools[t][0], "client_ids", None) is not None]
    if natural and partition != "task":
        raise FedPeftError(f"the dataset {natural[0]} is split by its client column, one client per value: "
                           f"--partition {partition} does not apply; leave --partition at task")
    if partition == "dirichlet_cut":
        return _dirichlet_cut(tasks, pools, train_samples, test_samples, alpha, seed, min_train)
    mode = "dirichlet" if partition == "dirichlet" or label_split == "dirichlet" else label_split
    if partition == "iid":
        mode = "iid"

    results: dict[int, ClientData] = {}
    for task in dict.fromkeys(tasks):
        spec = get_task(task)
        if task not in pools:
            raise FedPeftError(f"No data pools were given for task {task}; load them first.")
        clients = [i for i, t in enumerate(tasks) if t == task]
        if task in natural:  # --client-column: one client per value of the column (partition/by_client.py)
            n_train, n_test = (int(x[task]) if isinstance(x, Mapping) else int(x) for x in (train_samples, test_samples))
            results.update(_partition_by_client(spec, clients, pools[task], n_train, n_test, seed))
            continue
        if spec.is_generation:
            n_train, n_test = (int(x[task]) if isinstance(x, Mapping) else int(x) for x in (train_samples, test_samples))
            gen_mode = "dirichlet" if mode == "dirichlet" else "iid"
            results.update(_partition_generation(spec, clients, pools[task], n_train, n_test, gen_mode, alpha, seed))
            continue
        results.update(_partition_classification(spec, task, clients, pools, train_samples, test_samples, mode,
                                                 alpha, seed))
    return [results[i] for i in range(len(tasks))]


# ----------------------------------------------------------------------------------------------
# internals


def _validate(tasks, train_samples, test_samples, partition, label_split, alpha, seed) -> None:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise FedPeftError("Give at least one task, one per client, as a list (e.g. ['sst2', 'sst2']).")
    for task in tasks:
        get_task(task)
    if partition not in PARTITIONS:
        raise FedPeftError(f"Unknown partition {partition!r}; choose one of: {', '.join(PARTITIONS)}.")
    if label_split not in LABEL_SPLITS:
        raise FedPeftError(
            f"Unknown label split {label_split!r}; choose one of: {', '.join(LABEL_SPLITS)}."
        )
    for name, samples in (("train", train_samples), ("test", test_samples)):
        values = samples.items() if isinstance(samples, Mapping) else [(None, samples)]
        if isinstance(samples, Mapping):
            missing = [t for t in dict.fromkeys(tasks) if t not in samples]
            if missing:
                raise FedPeftError(
                    f"The {name} samples per client are not given for task {missing[0]}; "
                    "give an int or a value for every task."
                )
        for task, value in values:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                where = f" for task {task}" if task else ""
                raise FedPeftError(
                    f"The {name} samples per client{where} must be a whole number ≥ 1, got {value!r}."
                )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
        math.isfinite(alpha) and alpha > 0
    ):
        raise FedPeftError(f"The Dirichlet alpha must be a positive number, got {alpha!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FedPeftError(f"The seed must be a whole number ≥ 0, got {seed!r}.")
