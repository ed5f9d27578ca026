"""Generation tasks (`GenExample`s) have no classes: under `task` and `iid` every client gets a
uniform random disjoint sample of the pool (the label split does not apply); `dirichlet` is keyed
on `GenExample.group` instead of the label (E2E: the MR's `food` value, as LEFF partitions E2E;
WebNLG: the category): q_i ~ Dir(α) over the train pool's groups in sorted order, drawn like the
classification q_i, and the test sample uses the same q_i (test examples of groups the train pool
lacks, e.g. WebNLG's unseen categories, are then never drawn).
"""

from __future__ import annotations

import zlib

import numpy as np

from fedpeft.data.partition.classification import _draw
from fedpeft.data.partition.client import ClientData
from fedpeft.data.partition.common import _SPLIT_NAMES, largest_remainder, take
from fedpeft.data.tasks import get_task
from fedpeft.errors import FedPeftError

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
            train=take(train_pool, out_ids[0][k]),
            test=take(test_pool, out_ids[1][k]),
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
