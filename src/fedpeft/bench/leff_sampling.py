"""The block-sampling distribution a LEFF run actually used, beside the paper's literal Eq. 6 on the same
scores (issue: does the spec's max-normalised softmax leave importance sampling any different from
uniform?).

Each LEFF round records, in training_history.json, the layer importances I_l it computed ("importance") and
the distribution every budget sampled from ("block_probabilities", docs/methods/leff.md#sampling-distribution).
From those this module reports, per bench label over its seeds and rounds: the ratio p_max / p_min of the
distribution used (at τ = 1 with max-normalisation it is at most e), the most likely block's probability, and
what the literal Eq. 6 (softmax of the raw block scores, `--importance-normalise none`) would have given the
most likely block on the same scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.algorithms.leff.sampling import block_probabilities, block_scores, block_starts


def run_sampling(run_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per (round, budget) of a LEFF run that sampled from a distribution: the probabilities used
    and, where the round computed importances, the literal Eq. 6's on the same block scores."""
    run_dir = Path(run_dir)
    try:
        history = json.loads((run_dir / "training_history.json").read_text())
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for rec in history.get("rounds", []):
        probs, layer_scores = rec.get("block_probabilities"), rec.get("importance")
        for budget, p in (probs or {}).items():
            p = np.asarray(p, dtype=np.float64)
            if p.size < 2:
                continue
            entry = {"round": rec.get("round"), "budget": int(budget), "used": p, "literal": None}
            if layer_scores is not None:
                starts = block_starts(len(layer_scores), int(budget), cfg.get("blocks", "sliding"))
                entry["literal"] = block_probabilities(block_scores(layer_scores, starts, int(budget)), normalise="none")
            out.append(entry)
    return out


def _spread(values: list[float]) -> str:
    if not values:
        return "—"
    v = np.asarray(values)
    return f"{np.median(v):.3g} [{v.min():.3g}, {v.max():.3g}]"


def sampling_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The results.md section for the LEFF rows of a bench (rows with `method` leff and a `run_dir`)."""
    table = []
    for label in dict.fromkeys(r["label"] for r in rows if r.get("method") == "leff" and r.get("run_dir")):
        runs = [r for r in rows if r["label"] == label and r.get("run_dir")]
        cfg = _config(runs[0]["run_dir"])
        entries = [e for r in runs for e in run_sampling(r["run_dir"])]
        if not entries:
            continue
        used = [e["used"] for e in entries]
        literal = [e["literal"] for e in entries if e["literal"] is not None]
        how = cfg.get("sampling", "?")
        if how == "importance":
            how += f", {cfg.get('importance_normalise', 'max')}-normalised, τ = {cfg.get('importance_temperature', 1.0):g}"
        table.append(
            f"| {label} | {how} | {len(runs)} | {len(entries)} | {len(used[0])} | "
            f"{_spread([p.max() / p.min() for p in used])} | {_spread([p.max() for p in used])} | "
            f"{_spread([p.max() for p in literal])} |")
    if not table:
        return []
    return ["", "## Block sampling: the distribution used", "",
            "Per (seed, round) of each LEFF label, from training_history.json: p_max / p_min and the most likely "
            "block's probability of the distribution the clients drew from, and the most likely block's probability "
            "under the paper's literal Eq. 6 (softmax of the raw block scores) on the same importances; median "
            "[min, max] over seeds and rounds. Uniform over n blocks is 1/n.", "",
            "| label | sampling | seeds | draws (round, budget) | candidate blocks n | p_max / p_min used | p_max used "
            "| p_max, literal Eq. 6 |", "|---|---|---|---|---|---|---|---|", *table]


def _config(run_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
