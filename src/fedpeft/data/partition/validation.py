"""A validation set held out of a client's train set, for choosing hyperparameters without test data."""

from __future__ import annotations

import zlib

import numpy as np

from fedpeft.data.partition.client import ClientData
from fedpeft.errors import FedPeftError


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
