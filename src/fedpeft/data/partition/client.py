"""What one client holds (`ClientData`) and how far the clients' label distributions are from their
tasks' pools (`label_skew`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import rel_entr

from fedpeft.data.tasks import Example


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
