"""`partition="dirichlet_cut"` (LEFF's label skew, docs/methods/leff.md#data-partition): the task's train
pool (less the server's reserved examples, uniformly subsampled to `train_samples` × clients) is cut
class by class: q_c ~ Dir(α·1_N) over the task's N clients, class c's shuffled examples split by q_c, so
every example of the subsample lands in exactly one client and client sizes vary. Every client must get
at least `min_train` examples (one local batch); otherwise the draw is repeated, up to 100 times, then
an error names the task, α, N and the smallest size. Test sets are IID samples of `test_samples` each
(the LEFF family scores the global model). Generation tasks are cut on `GenExample.group` (E2E: the MR's
`food`, or the attribute `e2e_key` names; WebNLG: the category).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from fedpeft.data.partition.client import ClientData
from fedpeft.data.partition.common import _class_of, _class_proportions, take
from fedpeft.data.tasks import get_task
from fedpeft.errors import FedPeftError


def dirichlet_cut_ids(labels: Sequence[int], num_classes: int, n_clients: int, alpha: float,
                      rng: np.random.Generator) -> list[list[int]]:
    """One draw of the Dirichlet cut: for each class c, q_c ~ Dir(α·1_N); class c's shuffled positions are
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
        if spec.is_regression:  # STS-B: partition on 5 label bins, floor(score) clipped to 0..4
            labels, n_classes = [min(4, max(0, int(math.floor(train_pool[j].label)))) for j in sub], 5
        elif spec.is_generation:  # E2E: the MR attribute (`food` by default), WebNLG: the category
            groups = sorted({train_pool[j].group or "" for j in sub})
            index = {g: c for c, g in enumerate(groups)}
            labels, n_classes = [index[train_pool[j].group or ""] for j in sub], len(groups)
        else:
            ids = getattr(train_pool, "label_ids", None)  # a dataset's pool has them as an array
            labels = [int(ids[j]) if ids is not None else _class_of(spec, train_pool[j]) for j in sub]
            n_classes = spec.num_labels
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
            results[i] = ClientData(i, task, take(train_pool, train_ids), take(test_pool, test_ids),
                                    tuple(train_ids), tuple(test_ids), pool_props)
    return [results[i] for i in range(len(tasks))]
