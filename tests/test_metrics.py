"""GLUE metrics against scikit-learn / scipy, and the per-round aggregates: per-task means over clients,
the mean of task means and the client-macro mean (docs/methods/fedlease.md#metrics-and-aggregates)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from fedpeft.metrics import compute_metrics, summarize

LABELS = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1])
PREDS = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1])
SCORES = np.array([0.0, 1.2, 2.5, 3.1, 4.8, 2.2, 0.4, 3.9])
SCORE_PREDS = np.array([0.3, 1.0, 2.0, 3.5, 4.1, 2.9, 1.1, 3.0])


def test_classification_metrics_equal_sklearn():
    mrpc = compute_metrics("mrpc", PREDS, LABELS)
    assert set(mrpc) == {"accuracy", "f1"}
    assert mrpc["accuracy"] == pytest.approx(skm.accuracy_score(LABELS, PREDS), abs=1e-12)
    assert mrpc["f1"] == pytest.approx(skm.f1_score(LABELS, PREDS), abs=1e-12)
    assert mrpc["accuracy"] == pytest.approx(9 / 12)
    cola = compute_metrics("cola", PREDS, LABELS)
    assert list(cola) == ["matthews", "accuracy"]
    assert cola["matthews"] == pytest.approx(skm.matthews_corrcoef(LABELS, PREDS), abs=1e-12)
    assert compute_metrics("sst2", PREDS, LABELS) == {"accuracy": pytest.approx(0.75)}
    # f1 is for the positive class: flipping labels and predictions changes it
    flipped = compute_metrics("qqp", 1 - PREDS, 1 - LABELS)["f1"]
    assert flipped == pytest.approx(skm.f1_score(1 - LABELS, 1 - PREDS)) and flipped != mrpc["f1"]


def test_regression_metrics_equal_scipy():
    result = compute_metrics("stsb", SCORE_PREDS, SCORES)
    assert set(result) == {"pearson", "spearman"}
    assert result["pearson"] == pytest.approx(stats.pearsonr(SCORE_PREDS, SCORES)[0], abs=1e-12)
    assert result["spearman"] == pytest.approx(stats.spearmanr(SCORE_PREDS, SCORES)[0], abs=1e-12)
    assert result["pearson"] != pytest.approx(result["spearman"])
    column = compute_metrics("stsb", SCORE_PREDS[:, None], SCORES)
    assert column == result


def test_logits_are_argmaxed():
    logits = np.stack([1 - PREDS, PREDS], axis=1) * 2.0 - 0.5
    assert compute_metrics("mrpc", logits, LABELS) == compute_metrics("mrpc", PREDS, LABELS)
    three = np.array([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert compute_metrics("mnli", three, [1, 0, 0])["accuracy"] == pytest.approx(2 / 3)


def test_degenerate_inputs_give_zero_not_nan():
    constant = compute_metrics("stsb", np.full(8, 2.0), SCORES)
    assert constant == {"pearson": 0.0, "spearman": 0.0}
    assert compute_metrics("stsb", [1.0], [2.0]) == {"pearson": 0.0, "spearman": 0.0}
    no_positive = compute_metrics("mrpc", np.zeros(12, dtype=int), LABELS)
    assert no_positive["f1"] == 0.0 and no_positive["accuracy"] == pytest.approx(5 / 12)
    assert compute_metrics("cola", np.ones(12, dtype=int), LABELS)["matthews"] == 0.0
    empty = compute_metrics("cola", [], [])
    assert empty == {"matthews": 0.0, "accuracy": 0.0}
    for value in [*constant.values(), *no_positive.values(), *empty.values()]:
        assert not math.isnan(value)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="do not line up"):
        compute_metrics("sst2", [1, 0], [1, 0, 1])


RECORDS = [
    {"client": 0, "task": "sst2", "accuracy": 0.90, "round": 3},
    {"client": 1, "task": "sst2", "accuracy": 0.80, "round": 3},
    {"client": 2, "task": "mrpc", "accuracy": 0.70, "f1": 0.75, "round": 3},
    {"client": 3, "task": "mrpc", "accuracy": 0.60, "f1": 0.65, "round": 3},
    {"client": 4, "task": "mrpc", "accuracy": 0.80, "f1": 0.85, "round": 3},
    {"client": 5, "task": "cola", "matthews": 0.30, "accuracy": 0.72, "round": 3},
]


def test_summarize_per_task_overall_and_client_macro():
    summary = summarize(RECORDS)
    per_task = summary["per_task"]
    assert list(per_task) == ["sst2", "mrpc", "cola"]
    assert per_task["sst2"] == {"accuracy": pytest.approx(0.85)}
    assert per_task["mrpc"] == {"accuracy": pytest.approx(0.70), "f1": pytest.approx(0.75)}
    assert per_task["cola"] == {"matthews": pytest.approx(0.30), "accuracy": pytest.approx(0.72)}
    # overall = mean of task means of the primary metric (cola: matthews), not a mean over clients
    assert summary["overall"] == pytest.approx((0.85 + 0.70 + 0.30) / 3)
    assert summary["client_macro"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.6 + 0.8 + 0.3) / 6)
    assert summary["overall"] != pytest.approx(summary["client_macro"])
    assert summary["primary"] == {"sst2": "accuracy", "mrpc": "accuracy", "cola": "matthews"}


def test_summarize_from_compute_metrics():
    records = [
        {"client": i, "task": "mrpc", **compute_metrics("mrpc", PREDS[i:], LABELS[i:])} for i in range(3)
    ]
    summary = summarize(records)
    expected = np.mean([skm.accuracy_score(LABELS[i:], PREDS[i:]) for i in range(3)])
    assert summary["overall"] == pytest.approx(expected)
    assert summary["per_task"]["mrpc"]["f1"] == pytest.approx(
        np.mean([skm.f1_score(LABELS[i:], PREDS[i:]) for i in range(3)])
    )


def test_summarize_rejects_bad_records():
    with pytest.raises(ValueError, match="appears twice"):
        summarize(RECORDS + [dict(RECORDS[0])])
    with pytest.raises(ValueError, match="primary metric 'matthews'"):
        summarize([{"client": 0, "task": "cola", "accuracy": 0.5}])
    with pytest.raises(ValueError):
        summarize([])
