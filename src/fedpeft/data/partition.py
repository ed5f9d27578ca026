"""Partitioning: which examples each client holds.

One client per entry of `tasks`; client i works on task `tasks[i]`. Each task has a train pool and
a test pool (`pools.load_federation_pools`: the train and validation splits, or a carve-out).
Clients of the same task draw **disjoint** samples from these pools: train from the train pool,
test from the test pool, so train ∩ test = ∅ by construction and no example is used twice (D15).

How many examples of each class a client gets (`partition`, `label_split`):

- `partition="task"` (task non-IID; the FedLEASE setting), with `label_split`:
  - `"class_balanced"` (default, as in the official FedLEASE code): n / C per class;
  - `"natural"`: the pool's own class proportions;
  - `"dirichlet"`: same as `partition="dirichlet"` (D15 lists it as a label split).
- `partition="dirichlet"`: q_i ~ Dir(α·1_C), drawn once per client from its own seeded generator;
  train and test both use q_i (label skew on top of task skew).
- `partition="dirichlet_cut"` (the LEFF spec's L13): the task's train pool (less the server's
  reserved examples, uniformly subsampled to `train_samples` × clients) is cut class by class:
  q_c ~ Dir(α·1_N) over the task's N clients, class c's shuffled examples split by q_c, so every
  example of the subsample lands in exactly one client and client sizes vary. Every client must get
  at least `min_train` examples (one local batch); otherwise the draw is repeated, up to 100
  times, then an error names the task, α, N and the smallest size. Test sets are IID samples of
  `test_samples` each (the LEFF family scores the global model). Generation tasks are cut on
  `GenExample.group` (E2E: the MR's `food`, or the attribute `e2e_key` names; WebNLG: the category).
- `partition="iid"`: a uniform random sample of the pool, ignoring labels (natural proportions in
  expectation).

Per-class counts are n·p rounded by largest remainder (ties go to classes in the order
c_i, c_i + 1, …, starting at class `i mod C` for client i, so no class is always favoured).
Regression tasks (stsb) have no classes: they are always sampled uniformly ("natural"/"iid");
asking for `class_balanced` or `dirichlet` on one logs a warning and samples uniformly.

Generation tasks (`GenExample`s) have no classes: under `task` and `iid` every client gets a
uniform random disjoint sample of the pool (the label split does not apply); `dirichlet` is keyed
on `GenExample.group` instead of the label (E2E: the MR's `food` value, as LEFF partitions E2E;
WebNLG: the category): q_i ~ Dir(α) over the train pool's groups in sorted order, drawn like the
classification q_i, and the test sample uses the same q_i (test examples of groups the train pool
lacks, e.g. WebNLG's unseen categories, are then never drawn).

Determinism: everything comes from numpy Generators seeded from (seed, task, split) and
(seed, client); there is no global random state. Same arguments, same federation.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import rel_entr

from fedpeft.data.pools import load_federation_pools
from fedpeft.data.tasks import Example, TaskSpec, get_task
from fedpeft.errors import FedPeftError

logger = logging.getLogger(__name__)

PARTITIONS = ("task", "dirichlet", "iid", "dirichlet_cut")
LABEL_SPLITS = ("class_balanced", "natural", "dirichlet")

_SPLIT_NAMES = {0: "train", 1: "validation"}


@dataclass
class ClientData:
    """One client's data.

    `train` / `test` hold `Example`s, or `GenExample`s for a generation task.
    `train_ids` / `test_ids` are the positions of the client's examples in its task's train and
    test pools (same order as `train` / `test`); `pool_proportions` are the class proportions of
    the task's train pool (empty for regression), used by `label_skew`.
    """

    client_id: int
    task: str
    train: list[Example]
    test: list[Example]
    train_ids: tuple[int, ...] = field(default=(), repr=False)
    test_ids: tuple[int, ...] = field(default=(), repr=False)
    pool_proportions: tuple[float, ...] = field(default=(), repr=False)


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
) -> list[ClientData]:
    """Build one `ClientData` per entry of `tasks` (client i has task `tasks[i]`).

    `e2e_key`: the MR attribute E2E examples are grouped on for a label-skew partition (L13's
    `e2e_partition_key`; an MR without it is the group "missing").

    `train_samples` / `test_samples` are examples per client: an int for every task, or a mapping
    task → int (e.g. D15's MRPC override of 500 / 64). Pools come from
    `load_federation_pools(task, data_dir, carve_out=carve_out)`. See the module docstring for
    `partition`, `label_split` and `alpha`. An infeasible request raises a `FedPeftError` naming
    the task, split, class, need and supply.
    """
    _validate(tasks, train_samples, test_samples, partition, label_split, alpha, seed)
    pools = {
        task: load_federation_pools(task, data_dir, carve_out=carve_out) for task in dict.fromkeys(tasks)
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


E2E_ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")


def regroup_e2e(task: str, pools, key: str):
    """E2E pools with each example's group set to the value of its MR's `key` slot ("missing" when
    the MR has none); other tasks' pools unchanged. The MR is in the prompt (prompts.py), as
    `key[value]` after the start, a comma or a newline."""
    import dataclasses
    import re

    if get_task(task).source != "e2e":
        return pools
    if key not in E2E_ATTRIBUTES:
        raise FedPeftError(f"--e2e-partition-key {key!r} is not an E2E MR attribute: choose one of "
                           f"{', '.join(E2E_ATTRIBUTES)}")
    slot = re.compile(rf"(?:^|[,\n])\s*{re.escape(key)}\[([^\]]*)\]")

    def group(prompt: str) -> str:  # a repeated slot: the last value, as `nlg_sources.parse_mr` keeps
        found = slot.findall(prompt)
        return found[-1].strip() if found else "missing"

    return tuple([dataclasses.replace(ex, group=group(ex.prompt)) for ex in pool] for pool in pools)


def reserved_ids(task: str, pool_size: int, n: int, seed: int) -> list[int]:
    """Train-pool positions held out of every client for the server (LEFF's importance batch, L4):
    the first n of a permutation seeded by (seed, task); clients never receive them."""
    if n <= 0:
        return []
    if n >= pool_size:
        raise FedPeftError(f"{task}: the server needs {n} train examples but the pool has only {pool_size}; "
                           "lower --importance-examples")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), 0x5E7])
    return sorted(int(j) for j in rng.permutation(pool_size)[:n])


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
        if spec.is_generation:
            n_train, n_test = (int(x[task]) if isinstance(x, Mapping) else int(x) for x in (train_samples, test_samples))
            gen_mode = "dirichlet" if mode == "dirichlet" else "iid"
            results.update(_partition_generation(spec, clients, pools[task], n_train, n_test, gen_mode, alpha, seed))
            continue
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
                train=[pools[task][0][j] for j in train_ids],
                test=[pools[task][1][j] for j in test_ids],
                train_ids=tuple(train_ids),
                test_ids=tuple(test_ids),
                pool_proportions=pool_props,
            )
    return [results[i] for i in range(len(tasks))]


def _without_reserved(task, train_pool, test_pool, reserve, seed):
    held = set(reserved_ids(task, len(train_pool), reserve, seed))
    return [ex for j, ex in enumerate(train_pool) if j not in held], test_pool


def dirichlet_cut_ids(labels: Sequence[int], num_classes: int, n_clients: int, alpha: float,
                      rng: np.random.Generator) -> list[list[int]]:
    """One draw of the L13 cut: for each class c, q_c ~ Dir(α·1_N); class c's shuffled positions are
    split at the cumulative q_c boundaries. Returns each client's positions (every one exactly once)."""
    labels = np.asarray(labels, dtype=np.int64)
    out: list[list[int]] = [[] for _ in range(n_clients)]
    for c in range(num_classes):
        ids = np.flatnonzero(labels == c)
        ids = ids[rng.permutation(len(ids))]
        q = rng.dirichlet(np.full(n_clients, float(alpha)))
        if not np.all(np.isfinite(q)) or q.sum() <= 0:  # tiny alpha underflow: everything to one client
            q = np.zeros(n_clients)
            q[rng.integers(n_clients)] = 1.0
        cuts = (np.cumsum(q / q.sum())[:-1] * len(ids)).astype(int)
        for i, part in enumerate(np.split(ids, cuts)):
            out[i].extend(int(j) for j in part)
    return out


def _dirichlet_cut(tasks, pools, train_samples, test_samples, alpha, seed, min_train) -> list[ClientData]:
    results: dict[int, ClientData] = {}
    for task in dict.fromkeys(tasks):
        spec = get_task(task)
        clients = [i for i, t in enumerate(tasks) if t == task]
        train_pool, test_pool = pools[task]
        n_train = int(train_samples[task]) if isinstance(train_samples, Mapping) else int(train_samples)
        n_test = int(test_samples[task]) if isinstance(test_samples, Mapping) else int(test_samples)
        rng = np.random.default_rng([seed, zlib.crc32(task.encode()), 0xC07])
        sub = rng.permutation(len(train_pool))[: n_train * len(clients)]
        if spec.is_regression:  # STS-B: partition on 5 label bins, floor(score) clipped to 0..4 (L13)
            labels, n_classes = [min(4, max(0, int(math.floor(train_pool[j].label)))) for j in sub], 5
        elif spec.is_generation:  # E2E: the MR attribute (`food` by default), WebNLG: the category (L13)
            groups = sorted({train_pool[j].group or "" for j in sub})
            index = {g: c for c, g in enumerate(groups)}
            labels, n_classes = [index[train_pool[j].group or ""] for j in sub], len(groups)
        else:
            labels, n_classes = [_class_of(spec, train_pool[j]) for j in sub], spec.num_labels
        for _attempt in range(100):
            parts = dirichlet_cut_ids(labels, n_classes, len(clients), alpha, rng)
            smallest = min(len(p) for p in parts)
            if smallest >= min_train:
                break
        else:
            raise FedPeftError(
                f"{task}: the Dirichlet cut with alpha={alpha} over N={len(clients)} clients left a client with "
                f"{smallest} train examples (fewer than one batch of {min_train}) in 100 draws; raise --alpha, "
                "use fewer clients, more --train-samples or a smaller --batch-size")
        need = n_test * len(clients)
        if need > len(test_pool):
            raise FedPeftError(f"{task}/validation: need {need} ({len(clients)} clients × {n_test}), have "
                               f"{len(test_pool)}; request fewer test samples per client")
        test_order = np.random.default_rng([seed, zlib.crc32(task.encode()), 1]).permutation(len(test_pool))
        pool_props = () if spec.is_regression or spec.is_generation else tuple(_class_proportions(spec, train_pool))
        for k, i in enumerate(clients):
            train_ids = [int(sub[j]) for j in rng.permutation(parts[k])]
            test_ids = [int(j) for j in test_order[k * n_test:(k + 1) * n_test]]
            results[i] = ClientData(i, task, [train_pool[j] for j in train_ids], [test_pool[j] for j in test_ids],
                                    tuple(train_ids), tuple(test_ids), pool_props)
    return [results[i] for i in range(len(tasks))]


def label_skew(clients: Sequence[ClientData]) -> float:
    """Mean over clients of KL(client's train label distribution ‖ its task's train-pool distribution).

    Regression clients (no classes) are left out. 0 means every client looks like its pool.
    """
    values = []
    for client in clients:
        if not client.pool_proportions or not client.train:
            continue
        counts = np.bincount(
            [int(ex.label) for ex in client.train], minlength=len(client.pool_proportions)
        )
        p = counts / counts.sum()
        values.append(float(rel_entr(p, np.asarray(client.pool_proportions)).sum()))
    if not values:
        raise ValueError("label_skew needs at least one classification client with train data")
    return float(np.mean(values))


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


def _class_proportions(spec: TaskSpec, pool: Sequence[Example]) -> np.ndarray:
    counts = np.bincount([_class_of(spec, ex) for ex in pool], minlength=spec.num_labels)
    total = counts.sum()
    return counts / total if total else np.full(spec.num_labels, 1.0 / spec.num_labels)


def _class_of(spec: TaskSpec, ex: Example) -> int:
    label = ex.label
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < spec.num_labels:
        raise ValueError(f"{spec.name}: label {label!r} is not a class id in 0..{spec.num_labels - 1}")
    return int(label)


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
    by_class = [[] for _ in range(C)]
    for j, ex in enumerate(pool):
        by_class[_class_of(spec, ex)].append(j)
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
            )
            raise FedPeftError(
                f"{spec.name}/{split} class {c}: need {need} ({how}), have {len(by_class[c])}; "
                f"request fewer {kind} samples per client, fewer {spec.name} clients or another "
                "label split."
            )
    shuffled = [[by_class[c][j] for j in rng.permutation(len(by_class[c]))] for c in range(C)]
    taken = [0] * C
    out = []
    for cnt in counts:
        ids = []
        for c in range(C):
            ids.extend(shuffled[c][taken[c] : taken[c] + cnt[c]])
            taken[c] += cnt[c]
        out.append([ids[j] for j in rng.permutation(len(ids))])
    return out


def _partition_generation(spec, clients, pools, n_train, n_test, mode, alpha, seed) -> dict[int, ClientData]:
    """Disjoint draws of `GenExample`s for `clients` (see the module docstring)."""
    train_pool, test_pool = pools
    out_ids = []
    if mode == "iid":
        for split_id, (pool, n) in enumerate(((train_pool, n_train), (test_pool, n_test))):
            out_ids.append(_draw(spec, _SPLIT_NAMES[split_id], split_id, pool, clients, n, "iid", None, seed))
    else:
        groups = sorted({ex.group or "" for ex in train_pool})
        props = {}
        for i in clients:  # the same generator scheme as the classification Dirichlet draw
            rng = np.random.default_rng([seed, 0xD1C, i])
            q = rng.dirichlet(np.full(len(groups), float(alpha)))
            if not np.all(np.isfinite(q)) or q.sum() <= 0:
                q = np.zeros(len(groups))
                q[rng.integers(len(groups))] = 1.0
            props[i] = q / q.sum()
        for split_id, (pool, n) in enumerate(((train_pool, n_train), (test_pool, n_test))):
            out_ids.append(_draw_by_group(spec, split_id, pool, clients, n, groups, props, seed))
    return {
        i: ClientData(
            client_id=i,
            task=spec.name,
            train=[train_pool[j] for j in out_ids[0][k]],
            test=[test_pool[j] for j in out_ids[1][k]],
            train_ids=tuple(out_ids[0][k]),
            test_ids=tuple(out_ids[1][k]),
        )
        for k, i in enumerate(clients)
    }


def _draw_by_group(spec, split_id, pool, clients, n, groups, props, seed) -> list[list[int]]:
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode()), split_id])
    index = {g: c for c, g in enumerate(groups)}
    by_group = [[] for _ in groups]
    for j, ex in enumerate(pool):
        c = index.get(ex.group or "")
        if c is not None:
            by_group[c].append(j)
    counts = [largest_remainder(n, props[i], start=i) for i in clients]
    split, kind = _SPLIT_NAMES[split_id], "train" if split_id == 0 else "test"
    for c, g in enumerate(groups):
        need = sum(cnt[c] for cnt in counts)
        if need > len(by_group[c]):
            raise FedPeftError(
                f"{spec.name}/{split} group {g!r}: need {need} (summed over {len(clients)} clients' "
                f"Dirichlet shares), have {len(by_group[c])}; request fewer {kind} samples per client, "
                "a larger --alpha or another partition."
            )
    shuffled = [[members[j] for j in rng.permutation(len(members))] for members in by_group]
    taken = [0] * len(groups)
    out = []
    for cnt in counts:
        ids = []
        for c in range(len(groups)):
            ids.extend(shuffled[c][taken[c] : taken[c] + cnt[c]])
            taken[c] += cnt[c]
        out.append([ids[j] for j in rng.permutation(len(ids))])
    return out


def hold_out_validation(part: ClientData, fraction: float, seed: int, num_labels: int) -> ClientData:
    """Split a client's training examples into (train, validation), stratified by class.

    The validation examples replace the client's test set, so hyperparameters can be chosen
    without looking at test data. Each class keeps round(fraction · n_c) examples for validation
    (at least one when the class has two or more); regression tasks split unstratified.
    """
    rng = np.random.default_rng([seed, part.client_id, zlib.crc32(b"validation")])
    if num_labels > 1:
        groups: dict[int, list[int]] = {}
        for i, ex in enumerate(part.train):
            groups.setdefault(int(ex.label), []).append(i)
    else:
        groups = {0: list(range(len(part.train)))}
    val: list[int] = []
    for _, idx in sorted(groups.items()):
        k = int(round(fraction * len(idx)))
        if k == 0 and len(idx) >= 2:
            k = 1
        k = min(k, len(idx) - 1)
        val += [idx[j] for j in rng.permutation(len(idx))[:k]]
    if not val:
        raise FedPeftError(f"client {part.client_id} ({part.task}) has too few training examples "
                           f"({len(part.train)}) to hold out a validation set: raise --train-samples")
    val_set = set(val)
    keep = [i for i in range(len(part.train)) if i not in val_set]
    val = sorted(val)
    ids = part.train_ids or tuple(range(len(part.train)))
    return ClientData(part.client_id, part.task, [part.train[i] for i in keep], [part.train[i] for i in val],
                      train_ids=tuple(ids[i] for i in keep), test_ids=tuple(ids[i] for i in val),
                      pool_proportions=part.pool_proportions)
