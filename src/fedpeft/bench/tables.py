"""The columns of a bench results table (results.csv) and the helpers the reports share to tabulate
them: which columns are tasks, and the mean ± sample std over seeds."""

from __future__ import annotations

import math
from typing import Any

FIXED_COLUMNS = ["label", "method", "seed"]
TAIL_COLUMNS = ["overall", "best_round", "best_overall", "bytes_up_per_client_round",
                "bytes_down_per_client_round", "seconds_per_round", "total_seconds", "rounds", "precision",
                "device", "run_dir",
                "peak_client_memory_bytes", "client_compute_seconds", "steady_bytes_up_per_client_round",
                "steady_bytes_down_per_client_round"]


def task_columns(rows: list[dict[str, Any]]) -> list[str]:
    known = set(FIXED_COLUMNS) | set(TAIL_COLUMNS)
    tasks: list[str] = []
    for row in rows:
        tasks += [k for k in row if k not in known and k not in tasks]
    return tasks


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof = 1); std is None for a single value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return math.nan, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
