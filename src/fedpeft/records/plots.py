"""The learning curves of a run folder (learning_curves.png): per-task and overall metric per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from fedpeft.errors import FedPeftError
from fedpeft.figures import figure as _figure, save as _save

def plot_learning_curves(history: Mapping[str, Any], path: str | Path, metric_key: str = "primary") -> Path:
    """Per-task and overall metric vs round from `training_history.json`; warmup rounds dashed and shaded."""
    rounds = sorted(history.get("rounds", []), key=lambda r: r["round"])
    if not rounds:
        raise FedPeftError("The training history has no rounds to plot.")
    tasks = sorted({t for r in rounds for t in (r.get("per_task") or {})})

    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    warmup = [r["round"] for r in rounds if r.get("phase") == "warmup"]
    if warmup:
        ax.axvspan(min(warmup) - 0.5, max(warmup) + 0.5, color="0.9", label="warmup (local LoRA only)")

    def value(v: Any) -> float | None:  # a float, or a {metric: float} mapping
        return v.get(metric_key) if isinstance(v, Mapping) else v

    def draw(get, label: str, color: str, width: float) -> None:
        segments = {}
        for phase in ("warmup", "train"):
            pts = [(r["round"], value(get(r))) for r in rounds if r.get("phase", "train") == phase]
            segments[phase] = [(x, y) for x, y in pts if y is not None]
        legend_phase = "train" if segments["train"] else "warmup"  # one legend entry per curve
        for phase, style in (("warmup", "--"), ("train", "-")):
            if segments[phase]:
                x, y = zip(*segments[phase])
                ax.plot(x, y, style, marker="o", markersize=3, color=color, linewidth=width,
                        label=label if phase == legend_phase else None)

    for i, task in enumerate(tasks):
        draw(lambda r, t=task: (r.get("per_task") or {}).get(t), task, f"C{i % 10}", 1.2)
    draw(lambda r: r.get("overall"), "overall (mean of tasks)", "black", 2.2)

    ax.set_title(f"Learning curves ({metric_key} metric; warmup dashed)")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric_key} metric")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)
