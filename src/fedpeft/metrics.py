"""GLUE metrics, the generation metrics' entry point and the per-round aggregates (per-task means over
clients, the mean of task means; docs/methods/fedlease.md#metrics-and-aggregates).

`compute_metrics(task, predictions, labels)` returns every metric the task reports (see
`TaskSpec.metrics`), computed with scikit-learn and scipy:

- "accuracy": `sklearn.metrics.accuracy_score`;
- "f1": `sklearn.metrics.f1_score` of the positive class (label 1; MRPC, QQP);
- "f1_macro": the unweighted mean of every class's F1 (a multi-class dataset of the user's);
- "matthews": `sklearn.metrics.matthews_corrcoef` (CoLA);
- "pearson", "spearman": `scipy.stats.pearsonr` / `spearmanr` (STS-B).

Degenerate inputs give 0.0, never NaN: an empty input, a correlation with fewer than two points or
with a constant vector (e.g. a model that predicts the same score everywhere), an F1 with no
predicted or true positives (`zero_division=0`), and MCC with a single class (sklearn's own 0.0).

`summarize(records)` turns one round's per-client records into the reported aggregates: per-task
means over that task's clients, the overall mean of the per-task primary metrics (the paper's "Avg"
column) and the client-macro mean of the clients' primary metrics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from fedpeft.data.tasks import get_task

METRIC_NAMES = ("accuracy", "f1", "f1_macro", "matthews", "pearson", "spearman")

# The key under which an evaluation also returns its per-example outcome (not a metric, never a
# record field): {"task", "predictions", "labels"}, numpy arrays in test order. The in-process engine
# saves the scored round's outcomes as the run folder's predictions.npz (records/predictions.py), which
# `fedpeft bench` bootstraps for its paired comparisons; a Flower client keeps them (they describe its
# test data, which stays on the client).
EXAMPLES = "_examples"


def example_outcome(task: str, predictions, labels) -> dict:
    """What `EXAMPLES` holds: the class ids (argmax of logits) or scores, and the gold labels."""
    preds = np.asarray(predictions)
    if preds.ndim == 2 and not get_task(task).is_regression:
        preds = preds.argmax(axis=-1)
    return {"task": task, "predictions": preds.reshape(len(preds)), "labels": np.asarray(labels).reshape(len(preds))}


def _finite(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


def _correlation(fn, predictions: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _finite(fn(predictions, labels)[0])


def _metric(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    from scipy import stats
    from sklearn import metrics as skm

    if len(labels) == 0:
        return 0.0
    if name == "accuracy":
        return _finite(skm.accuracy_score(labels, predictions))
    if name == "f1":
        return _finite(skm.f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0))
    if name == "f1_macro":
        return _finite(skm.f1_score(labels, predictions, average="macro", zero_division=0))
    if name == "matthews":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _finite(skm.matthews_corrcoef(labels, predictions))
    if name == "pearson":
        return _correlation(stats.pearsonr, predictions, labels)
    if name == "spearman":
        return _correlation(stats.spearmanr, predictions, labels)
    raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)}")


def compute_metrics(task: str, predictions, labels) -> dict[str, float]:
    """Every metric of `task` for `predictions` against `labels`, as plain floats.

    For a generation task, `predictions` are the generated texts and `labels` the reference
    tuples (`GenExample.references`); see `nlg_metrics.py` (METEOR, ROUGE-L and CIDEr are left out
    when Java is missing). For a classification task, `predictions` are class ids, or a (n, C) array of logits or
    probabilities (argmax is taken). For a regression task (stsb) they are scores, shape (n,) or
    (n, 1).
    """
    spec = get_task(task)
    if spec.is_generation:
        from fedpeft.nlg_metrics import generation_metrics

        return generation_metrics(spec.metrics, predictions, labels)
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if spec.is_regression:
        preds = preds.reshape(-1) if preds.ndim == 2 and preds.shape[1] == 1 else preds
        preds, gold = preds.astype(float), gold.astype(float)
    else:
        if preds.ndim == 2:
            preds = preds.argmax(axis=-1)
        preds, gold = preds.astype(int), gold.astype(int)
    if preds.ndim != 1 or gold.ndim != 1 or len(preds) != len(gold):
        raise ValueError(
            f"predictions {tuple(np.shape(predictions))} and labels {tuple(np.shape(labels))} "
            "do not line up"
        )
    return {name: _metric(name, preds, gold) for name in spec.metrics}


def summarize(records: Sequence[dict]) -> dict:
    """Aggregate one round's per-client records: per-task means, then the mean of task means.

    Each record is `{"client": int, "task": str, <metric>: float, ...}`; other keys (e.g.
    "round", "loss") are ignored. Returns

    - "per_task": {task: {metric: mean over that task's clients}} for the task's registered
      metrics (those present in every record of the task);
    - "overall": mean over tasks of each task's per-task primary metric;
    - "client_macro": mean over clients of their own primary metric;
    - "primary": {task: name of its primary metric}.

    Tasks appear in order of first appearance. A client may appear only once.
    """
    if not records:
        raise ValueError("summarize needs at least one record")
    by_task: dict[str, list[dict]] = {}
    seen = set()
    for record in records:
        client = record["client"]
        if client in seen:
            raise ValueError(f"client {client} appears twice; summarize one round at a time")
        seen.add(client)
        by_task.setdefault(get_task(record["task"]).name, []).append(record)

    per_task: dict[str, dict[str, float]] = {}
    primary: dict[str, str] = {}
    client_scores = []
    for task, task_records in by_task.items():
        spec = get_task(task)
        if any(spec.primary_metric not in r for r in task_records):
            raise ValueError(f"a {task} record lacks its primary metric {spec.primary_metric!r}")
        names = [m for m in spec.metrics if all(m in r for r in task_records)]
        per_task[task] = {m: float(np.mean([float(r[m]) for r in task_records])) for m in names}
        primary[task] = spec.primary_metric
        client_scores.extend(float(r[spec.primary_metric]) for r in task_records)
    overall = float(np.mean([per_task[t][primary[t]] for t in per_task]))
    return {
        "per_task": per_task,
        "overall": overall,
        "client_macro": float(np.mean(client_scores)),
        "primary": primary,
    }
