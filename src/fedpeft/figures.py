"""Figures without pyplot: a Figure on the Agg canvas, saved as PNG.

Drawing on the canvas directly changes no process-wide backend and leaks no open figure, so any
layer (a method's plots, the run's learning curves, bench reports) can draw safely; matplotlib is
imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedpeft.atomic import atomic_write_with
from fedpeft.errors import FedPeftError


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    return atomic_write_with(path, lambda fh: fig.savefig(fh, format="png"))


def square(distance: Any, labels: Sequence[str] | None = None) -> np.ndarray:
    """A square distance matrix as float64, checked against its row labels."""
    d = np.asarray(distance, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise FedPeftError(f"A client distance matrix must be square, but it has shape {d.shape}.")
    if labels is not None and len(labels) != d.shape[0]:
        raise FedPeftError(f"Got {len(labels)} client labels for a {d.shape[0]}x{d.shape[0]} distance matrix.")
    return d
