"""predictions.npz: every client's per-example outcome at the last scored round of a run.

For each scored client of that round: its task, the predicted class id (or score, for a regression
task) of every test example in test order, and the gold label. `fedpeft bench` reads it to bootstrap
paired comparisons over the test examples (bench/stats.py). The engine rewrites the file after
every scored round (atomically, before the history), so it always holds the latest one; its
`round` says which. Generation tasks are not saved (their outcomes are texts).

Arrays (no pickled objects): `round` (scalar), `clients` (int), `tasks` (str), and per client
`pred_<cid>`, `label_<cid>`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedpeft.atomic import atomic_write
from fedpeft.errors import FedPeftError

FILENAME = "predictions.npz"


@dataclass(frozen=True)
class ClientOutcome:
    task: str
    predictions: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class RoundOutcomes:
    round: int
    clients: dict[int, ClientOutcome]


def write_predictions(run_dir: str | Path, rnd: int, outcomes: Mapping[int, Mapping[str, Any]]) -> Path | None:
    """Save `outcomes` ({client: {"task", "predictions", "labels"}}) as the run's predictions.npz."""
    if not outcomes:
        return None
    cids = sorted(outcomes)
    arrays: dict[str, np.ndarray] = {"round": np.asarray(rnd, dtype=np.int64),
                                     "clients": np.asarray(cids, dtype=np.int64),
                                     "tasks": np.asarray([str(outcomes[c]["task"]) for c in cids])}
    for c in cids:
        arrays[f"pred_{c}"] = np.asarray(outcomes[c]["predictions"])
        arrays[f"label_{c}"] = np.asarray(outcomes[c]["labels"])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write(Path(run_dir) / FILENAME, buf.getvalue())


def read_predictions(run_dir: str | Path) -> RoundOutcomes | None:
    """The run's saved outcomes, or None when it has no predictions.npz (a run made before fedpeft
    wrote one, a Flower run, or generation tasks only)."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            cids = [int(c) for c in z["clients"]]
            clients = {c: ClientOutcome(str(t), z[f"pred_{c}"], z[f"label_{c}"]) for c, t in zip(cids, z["tasks"])}
            return RoundOutcomes(int(z["round"]), clients)
    except (OSError, KeyError, ValueError) as exc:
        raise FedPeftError(f"cannot read {path}: {exc}") from None
