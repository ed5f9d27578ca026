"""Paired comparisons of a bench's methods: is an ordering of two methods resolved by the test data?

For a method A and a reference R (FedLEASE, FedIT), on every seed both ran:
- the per-seed difference of the overall score, overall(A) − overall(R), where overall is the mean
  over tasks of the task's primary metric averaged over its clients (the run's own definition,
  fedpeft.metrics.summarize), computed from the runs' predictions.npz (the last scored round);
- a 95 % interval for the mean of those differences over the seeds, from a paired bootstrap over
  the clients' test examples: each replicate resamples, with replacement, the test examples of every
  (seed, client) independently, uses the SAME resample for A and R (they were scored on the same
  examples: the data split depends only on the seed), recomputes each client's task metric on it
  (accuracy, F1, Matthews correlation, Pearson / Spearman: the metric itself, not a per-example
  proxy, so MCC and F1 tasks are resampled correctly), then the task means and their mean, and
  averages the per-seed differences. The interval is the 2.5 / 97.5 percentiles of the replicates.
- "resolved" when the interval excludes 0 and no seed's difference has the other sign; "not resolved"
  otherwise. The interval alone can exclude 0 on the strength of one seed whose training went another way
  (leff-cpu, benchmarks/results/leff-cpu-sampling-2026-12-07.md: +0.00, +6.25, −0.59 gave [+0.46, +3.32]):
  it covers the test examples, not the training seeds, so seeds that disagree leave an ordering open;
  and one seed alone resolves nothing (`MIN_SEEDS`): it cannot show whether another seed agrees (paper-cpu's
  first seed put FedIT 4.2 points under FedLEASE with an interval of [−6.9, −1.5], while FedLEASE's own
  overall moves by 3.0 points, one std, from seed to seed).

What it measures: how much the ordering could be an accident of which test examples were drawn.
It does not cover the variation between training seeds beyond the seeds that ran; the per-seed
differences are listed so a reader sees whether their signs agree. The bootstrap is seeded
(`boot_seed`, and the (seed, client) of each resample), so a report is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fedpeft.data.tasks import get_task
from fedpeft.records.predictions import RoundOutcomes, read_predictions

REFERENCES = ("fedlease", "fedit")
N_BOOT = 2000
BOOT_SEED = 0
_CHUNK = 250  # replicates computed at once (memory: chunk x examples per client)


# ------------------------------------------------------------------ metrics over many resamples
def metric_replicates(name: str, predictions: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`name` (a fedpeft.metrics metric) on each resample: row b of `idx` (shape (B, n)) indexes the
    examples of replicate b. Degenerate resamples give 0.0, as compute_metrics does."""
    p, g = np.asarray(predictions)[idx], np.asarray(labels)[idx]
    n = idx.shape[1]
    if n == 0:
        return np.zeros(idx.shape[0])
    if name == "accuracy":
        return (p == g).mean(axis=1)
    if name in ("pearson", "spearman"):
        p, g = p.astype(float), g.astype(float)
        if name == "spearman":
            from scipy.stats import rankdata

            p, g = rankdata(p, axis=1), rankdata(g, axis=1)
        return _pearson_rows(p, g)
    p, g = p.astype(np.int64), g.astype(np.int64)
    classes = int(max(np.max(predictions, initial=0), np.max(labels, initial=0))) + 1
    if name == "f1":
        tp = ((p == 1) & (g == 1)).sum(axis=1)
        wrong = ((p == 1) != (g == 1)).sum(axis=1)  # false positives + false negatives
        return _ratio(2 * tp, 2 * tp + wrong)
    if name == "f1_macro":
        scores, present = np.zeros(idx.shape[0]), np.zeros(idx.shape[0])
        for k in range(classes):
            tp = ((p == k) & (g == k)).sum(axis=1)
            both = (p == k).sum(axis=1) + (g == k).sum(axis=1)
            scores += _ratio(2 * tp, both)
            present += both > 0
        return _ratio(scores, present)
    if name == "matthews":  # multi-class MCC (Gorodkin), sklearn's matthews_corrcoef
        s = float(n)
        c = (p == g).sum(axis=1).astype(float)
        t = np.stack([(g == k).sum(axis=1) for k in range(classes)], axis=1).astype(float)
        q = np.stack([(p == k).sum(axis=1) for k in range(classes)], axis=1).astype(float)
        cov_pt = c * s - (q * t).sum(axis=1)
        cov_pp = s * s - (q * q).sum(axis=1)
        cov_tt = s * s - (t * t).sum(axis=1)
        return _ratio(cov_pt, np.sqrt(cov_pp * cov_tt))
    raise ValueError(f"no bootstrap for metric {name!r}")


def _ratio(num, den) -> np.ndarray:
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    return np.clip(_ratio((x * y).sum(axis=1), den * (den > 1e-12)), -1.0, 1.0)


def overall_replicates(outcomes: RoundOutcomes, idx: dict[int, np.ndarray]) -> np.ndarray:
    """The overall score (mean over tasks of the mean over the task's clients of its primary metric)
    on each resample; idx[client] is that client's (B, n) index array."""
    by_task: dict[str, list[np.ndarray]] = {}
    for cid, c in sorted(outcomes.clients.items()):
        task = get_task(c.task)
        by_task.setdefault(task.name, []).append(
            metric_replicates(task.primary_metric, c.predictions, c.labels, idx[cid]))
    return np.mean([np.mean(v, axis=0) for v in by_task.values()], axis=0)


def overall(outcomes: RoundOutcomes) -> float:
    """The overall score on the saved test examples themselves (no resampling)."""
    idx = {cid: np.arange(len(c.labels))[None, :] for cid, c in outcomes.clients.items()}
    return float(overall_replicates(outcomes, idx)[0])


# ------------------------------------------------------------------ one comparison
# An ordering needs this many paired seeds: one seed says nothing of the training-seed noise.
MIN_SEEDS = 2


@dataclass(frozen=True)
class Comparison:
    label: str
    reference: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]  # overall(label) - overall(reference), per seed
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def dissenting_seeds(self) -> tuple[int, ...]:
        """Seeds whose difference has the other sign than the mean (ties are not dissent)."""
        return tuple(s for s, d in zip(self.seeds, self.differences) if d * self.mean < 0)

    @property
    def resolved(self) -> bool:
        return len(self.seeds) >= MIN_SEEDS and self.excludes_zero and not self.dissenting_seeds


def unpaired_reason(a: RoundOutcomes, b: RoundOutcomes) -> str | None:
    """Why two runs' outcomes cannot be paired example by example (None: they can)."""
    if set(a.clients) != set(b.clients):
        return "different clients scored"
    for cid, ca in a.clients.items():
        cb = b.clients[cid]
        if ca.task != cb.task or len(ca.labels) != len(cb.labels) or not np.array_equal(ca.labels, cb.labels):
            return f"client {cid} was scored on different test examples"
    return None


def paired_bootstrap(label: str, reference: str, runs: dict[int, RoundOutcomes], refs: dict[int, RoundOutcomes],
                     *, n_boot: int = N_BOOT, boot_seed: int = BOOT_SEED) -> Comparison:
    """Compare `runs` (seed -> outcomes of `label`) with `refs` (seed -> outcomes of `reference`)
    on the seeds both have; every pair must be scored on the same examples (unpaired_reason)."""
    seeds = sorted(set(runs) & set(refs))
    if not seeds:
        raise ValueError(f"{label} and {reference} share no seed")
    diffs, total = [], np.zeros(n_boot)
    for seed in seeds:
        a, r = runs[seed], refs[seed]
        reason = unpaired_reason(a, r)
        if reason:
            raise ValueError(f"{label} vs {reference}, seed {seed}: {reason}")
        diffs.append(overall(a) - overall(r))
        for start in range(0, n_boot, _CHUNK):
            size = min(_CHUNK, n_boot - start)
            idx = {}
            for cid, c in a.clients.items():
                rng = np.random.default_rng([boot_seed, seed, cid, start])
                idx[cid] = rng.integers(0, len(c.labels), size=(size, len(c.labels)))
            total[start:start + size] += overall_replicates(a, idx) - overall_replicates(r, idx)
    total /= len(seeds)
    low, high = np.percentile(total, [2.5, 97.5])
    return Comparison(label, reference, tuple(seeds), tuple(diffs), float(np.mean(diffs)), float(low), float(high))


# ------------------------------------------------------------------ a bench's rows
def compare_rows(rows: Iterable[dict[str, Any]], *, references: Iterable[str] = REFERENCES,
                 n_boot: int = N_BOOT, boot_seed: int = BOOT_SEED) -> tuple[list[Comparison], list[str]]:
    """Every label of a bench's rows (results.csv rows with run_dir) against each reference present;
    returns the comparisons and notes on the labels left out, and why."""
    outcomes: dict[str, dict[int, RoundOutcomes]] = {}
    missing: list[str] = []
    for row in rows:
        saved = read_predictions(Path(row.get("run_dir", ""))) if row.get("run_dir") else None
        if saved is None:
            missing.append(f"{row['label']} seed {row['seed']}")
            continue
        outcomes.setdefault(row["label"], {})[int(row["seed"])] = saved
    notes = []
    if missing:
        notes.append("no predictions.npz (a run made before fedpeft saved them, a Flower run, or generation "
                     "tasks), left out: " + ", ".join(missing))
    out = []
    for ref in references:
        if ref not in outcomes:
            continue
        for label, runs in outcomes.items():
            if label == ref:
                continue
            if not set(runs) & set(outcomes[ref]):
                notes.append(f"{label} vs {ref}: no common seed")
                continue
            try:
                out.append(paired_bootstrap(label, ref, runs, outcomes[ref], n_boot=n_boot, boot_seed=boot_seed))
            except ValueError as exc:
                notes.append(str(exc))
    return out, notes


def markdown_lines(comparisons: list[Comparison], notes: list[str], *, n_boot: int = N_BOOT) -> list[str]:
    """The results.md section: one table per reference."""
    if not comparisons and not notes:
        return []
    lines = ["", "## Paired comparisons", "",
             f"Overall(method) − overall(reference) × 100 on each seed both ran, their mean, and a 95 % interval "
             f"for that mean from a paired bootstrap over the clients' test examples ({n_boot} resamples; the "
             "task metric recomputed on each; bench/stats.py). *Resolved*: at least two seeds, the interval excludes "
             "0 and no seed's difference has the other sign. The interval covers which test examples were drawn, not training seeds "
             "beyond those listed."]
    for ref in dict.fromkeys(c.reference for c in comparisons):
        lines += ["", f"Against **{ref}**:", "",
                  "| method | per-seed differences | mean | 95 % interval | ordering |", "|---|---|---|---|---|"]
        for c in (c for c in comparisons if c.reference == ref):
            per_seed = ", ".join(f"s{s}: {d * 100:+.2f}" for s, d in zip(c.seeds, c.differences))
            if c.resolved:
                verdict = f"resolved ({c.label} {'above' if c.mean > 0 else 'below'} {ref})"
            elif len(c.seeds) < MIN_SEEDS:
                verdict = "not resolved: one seed (its interval covers the test examples only)"
            elif c.excludes_zero:
                verdict = "not resolved: seed " + ", ".join(map(str, c.dissenting_seeds)) + " goes the other way"
            else:
                verdict = "not resolved"
            lines.append(f"| {c.label} | {per_seed} | {c.mean * 100:+.2f} | [{c.low * 100:+.2f}, {c.high * 100:+.2f}] "
                         f"| {verdict} |")
    for note in notes:
        lines += ["", f"Note: {note}."]
    return lines


def csv_rows(comparisons: list[Comparison]) -> list[dict[str, Any]]:
    return [{"label": c.label, "reference": c.reference, "seeds": " ".join(map(str, c.seeds)),
             "differences": " ".join(f"{d:.6g}" for d in c.differences), "mean": f"{c.mean:.6g}",
             "low": f"{c.low:.6g}", "high": f"{c.high:.6g}", "resolved": c.resolved}
            for c in comparisons if not math.isnan(c.mean)]
