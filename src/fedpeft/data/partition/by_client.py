"""A natural partition (`--client-column`, data/custom.py): one client per distinct value of a column
of the user's dataset, holding that value's rows. Client k of the task (the k-th client whose task it
is) is the k-th value in sorted order; it gets at most `train_samples` of its training rows and at most
`test_samples` of its test rows, a uniform sample drawn from (seed, task, k) when it has more. Client
sizes differ as the data's do; the label split and the Dirichlet partitions do not apply.
"""

from __future__ import annotations

import zlib

import numpy as np

from fedpeft.data.partition.client import ClientData
from fedpeft.data.partition.common import _class_proportions, take
from fedpeft.errors import FedPeftError


def _partition_by_client(spec, clients, pools, n_train: int, n_test: int, seed: int) -> dict[int, ClientData]:
    train_pool, test_pool = pools
    if len(clients) != train_pool.num_clients:
        column = train_pool.spec.client_column
        raise FedPeftError(f"the dataset {spec.name} has {train_pool.num_clients} clients by its column {column!r}, "
                           f"but the run lists {len(clients)} {spec.name} clients; leave --tasks out with "
                           "--client-column (one client per value)")
    pool_props = () if spec.is_regression or spec.is_generation else tuple(_class_proportions(spec, train_pool))
    rows_of = [_rows_by_client(pool) for pool in (train_pool, test_pool)]
    out = {}
    for k, i in enumerate(clients):
        ids = []
        for split_id, (pool, n) in enumerate(((train_pool, n_train), (test_pool, n_test))):
            mine = rows_of[split_id](k)
            rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode()), 0xC11E, k, split_id])
            ids.append([int(j) for j in mine[rng.permutation(len(mine))[:n]]])
        out[i] = ClientData(client_id=i, task=spec.name, train=take(train_pool, ids[0]), test=take(test_pool, ids[1]),
                            train_ids=tuple(ids[0]), test_ids=tuple(ids[1]), pool_proportions=pool_props)
    return out


def _rows_by_client(pool):
    """k → the pool positions of client k, ascending (one sort for all clients)."""
    order = np.argsort(pool.client_ids, kind="stable")
    bounds = np.searchsorted(pool.client_ids[order], np.arange(pool.num_clients + 1))
    return lambda k: order[bounds[k]:bounds[k + 1]]
