"""bench/stats.py: paired bootstrap comparisons of methods over the clients' test examples, and the
predictions.npz a run writes for them."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.bench import stats
from fedpeft.metrics import compute_metrics
from fedpeft.records.predictions import ClientOutcome, RoundOutcomes, read_predictions, write_predictions


def _labels(n: int, seed: int, classes: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _outcomes(preds: dict[int, np.ndarray], labels: dict[int, np.ndarray], tasks: dict[int, str]) -> RoundOutcomes:
    return RoundOutcomes(5, {c: ClientOutcome(tasks[c], np.asarray(preds[c]), np.asarray(labels[c])) for c in preds})


TASKS = {0: "sst2", 1: "sst2", 2: "cola", 3: "mrpc"}


def _fed(seed: int, n: int = 120):
    return {c: _labels(n, 100 * seed + c) for c in TASKS}


def _corrupt(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Labels with a share of them flipped (a weaker model's predictions)."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    flip = rng.choice(len(labels), int(share * len(labels)), replace=False)
    out[flip] = 1 - out[flip]
    return out


@pytest.mark.parametrize("task,metric", [("sst2", "accuracy"), ("mrpc", "f1"), ("cola", "matthews"),
                                         ("stsb", "pearson"), ("stsb", "spearman")])
def test_metric_replicates_equal_the_task_metric_on_each_resample(task, metric):
    rng = np.random.default_rng(3)
    n = 50
    if task == "stsb":
        labels = rng.uniform(0, 5, n)
        preds = labels + rng.normal(0, 1.5, n)
    else:
        labels = rng.integers(0, 2, n)
        preds = np.where(rng.random(n) < 0.7, labels, 1 - labels)
    idx = rng.integers(0, n, size=(20, n))
    idx[0] = 0  # a degenerate resample: one example repeated (0.0, as compute_metrics says)
    got = stats.metric_replicates(metric, preds, labels, idx)
    want = [compute_metrics(task, preds[i], labels[i])[metric] for i in idx]
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_macro_f1_and_multiclass_mcc_equal_sklearn():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 60)
    preds = np.where(rng.random(60) < 0.6, labels, rng.integers(0, 3, 60))
    idx = rng.integers(0, 60, size=(10, 60))
    from sklearn.metrics import f1_score, matthews_corrcoef

    np.testing.assert_allclose(stats.metric_replicates("f1_macro", preds, labels, idx),
                               [f1_score(labels[i], preds[i], average="macro", zero_division=0) for i in idx])
    np.testing.assert_allclose(stats.metric_replicates("matthews", preds, labels, idx),
                               [matthews_corrcoef(labels[i], preds[i]) for i in idx])


def test_overall_is_the_mean_of_task_means():
    labels = _fed(1)
    preds = {0: labels[0], 1: 1 - labels[1], 2: labels[2], 3: labels[3]}  # sst2: 1.0 and 0.0
    out = _outcomes(preds, labels, TASKS)
    assert stats.overall(out) == pytest.approx((0.5 + 1.0 + 1.0) / 3)


def test_identical_predictions_are_not_resolved():
    runs, refs = {}, {}
    for seed in (1, 2, 3):
        labels = _fed(seed)
        preds = {c: _corrupt(labels[c], 0.3, seed + c) for c in labels}
        runs[seed] = _outcomes(preds, labels, TASKS)
        refs[seed] = _outcomes(preds, labels, TASKS)
    c = stats.paired_bootstrap("a", "b", runs, refs, n_boot=300)
    assert c.differences == (0.0, 0.0, 0.0)
    assert c.low <= 0.0 <= c.high
    assert not c.resolved


def test_a_method_right_on_strictly_more_examples_is_resolved():
    runs, refs = {}, {}
    for seed in (1, 2):
        labels = _fed(seed)
        weak = {c: _corrupt(labels[c], 0.35, seed * 10 + c) for c in labels}
        strong = {}
        for c in labels:  # right wherever the weak one is, and on half of the examples it gets wrong
            wrong = np.flatnonzero(weak[c] != labels[c])
            strong[c] = weak[c].copy()
            strong[c][wrong[: len(wrong) // 2]] = labels[c][wrong[: len(wrong) // 2]]
        runs[seed], refs[seed] = _outcomes(strong, labels, TASKS), _outcomes(weak, labels, TASKS)
    better = stats.paired_bootstrap("strong", "weak", runs, refs, n_boot=500)
    assert all(d > 0 for d in better.differences)
    assert better.low > 0 and better.resolved
    worse = stats.paired_bootstrap("weak", "strong", refs, runs, n_boot=500)
    assert worse.high < 0 and worse.resolved
    assert worse.mean == pytest.approx(-better.mean)


def test_an_interval_that_excludes_zero_on_one_seeds_strength_is_not_resolved_when_a_seed_dissents():
    """Seeds that go the other way leave the ordering open, whatever the test-example interval says (the
    leff-cpu sampling ablation: +0.00, +6.25, −0.59 gave [+0.46, +3.32]); a tie is no dissent."""
    dissent = stats.Comparison("leff-uniform", "leff", (1, 2, 3), (0.0, 0.0625, -0.0059), 0.0189, 0.0046, 0.0332)
    assert dissent.excludes_zero and dissent.dissenting_seeds == (3,) and not dissent.resolved
    tie = stats.Comparison("a", "b", (1, 2), (0.0, 0.03), 0.015, 0.004, 0.026)
    assert tie.resolved and tie.dissenting_seeds == ()
    text = "\n".join(stats.markdown_lines([dissent, tie], []))
    assert "| leff-uniform | s1: +0.00, s2: +6.25, s3: -0.59 | +1.89 | [+0.46, +3.32] | not resolved: seed 3 goes the other way |" in text
    assert "resolved (a above b)" in text


def test_one_seed_resolves_no_ordering_whatever_its_interval():
    one = stats.Comparison("fedit", "fedlease", (1,), (-0.0422,), -0.0422, -0.0687, -0.0154)
    assert one.excludes_zero and not one.dissenting_seeds and not one.resolved
    text = "\n".join(stats.markdown_lines([one], []))
    assert "| fedit | s1: -4.22 | -4.22 | [-6.87, -1.54] | not resolved: one seed" in text


def test_differences_are_paired_by_seed():
    """Each seed's difference is between the two runs of THAT seed; seeds only one side ran are left out."""
    runs, refs = {}, {}
    for seed, (sa, sr) in {1: (0.1, 0.3), 2: (0.2, 0.2), 3: (0.3, 0.1)}.items():
        labels = {0: _labels(100, seed)}
        runs[seed] = _outcomes({0: _corrupt(labels[0], sa, seed)}, labels, {0: "sst2"})
        refs[seed] = _outcomes({0: _corrupt(labels[0], sr, seed + 7)}, labels, {0: "sst2"})
    refs[4] = refs[3]  # a seed only the reference has
    c = stats.paired_bootstrap("a", "r", runs, refs, n_boot=200)
    assert c.seeds == (1, 2, 3)
    assert c.differences == pytest.approx((0.2, 0.0, -0.2))
    assert c.mean == pytest.approx(0.0)


def test_unpaired_test_sets_are_refused():
    labels = _fed(1)
    other = {c: _labels(120, 999 + c) for c in labels}
    a = _outcomes(labels, labels, TASKS)
    b = _outcomes(other, other, TASKS)
    with pytest.raises(ValueError, match="different test examples"):
        stats.paired_bootstrap("a", "b", {1: a}, {1: b}, n_boot=50)


def test_the_bootstrap_is_seeded():
    labels = _fed(1)
    a = _outcomes({c: _corrupt(labels[c], 0.2, c) for c in labels}, labels, TASKS)
    b = _outcomes({c: _corrupt(labels[c], 0.3, c + 50) for c in labels}, labels, TASKS)
    first = stats.paired_bootstrap("a", "b", {1: a}, {1: b}, n_boot=400, boot_seed=7)
    again = stats.paired_bootstrap("a", "b", {1: a}, {1: b}, n_boot=400, boot_seed=7)
    other = stats.paired_bootstrap("a", "b", {1: a}, {1: b}, n_boot=400, boot_seed=8)
    assert (first.low, first.high) == (again.low, again.high)
    assert (first.low, first.high) != (other.low, other.high)


def test_predictions_file_round_trip_and_compare_rows(tmp_path):
    rows = []
    for label, share in (("fedit", 0.4), ("fedlease", 0.1), ("other", 0.4)):
        for seed in (1, 2):
            labels = _fed(seed, 80)
            run = tmp_path / f"{label}-seed{seed}"
            run.mkdir()
            write_predictions(run, 4, {c: {"task": TASKS[c], "predictions": _corrupt(labels[c], share, seed + c),
                                           "labels": labels[c]} for c in TASKS})
            rows.append({"label": label, "seed": seed, "run_dir": str(run)})
    rows.append({"label": "old", "seed": 1, "run_dir": str(tmp_path / "nothing")})
    back = read_predictions(tmp_path / "fedit-seed1")
    assert back.round == 4 and sorted(back.clients) == [0, 1, 2, 3] and back.clients[2].task == "cola"
    comparisons, notes = stats.compare_rows(rows, n_boot=200)
    pairs = {(c.label, c.reference): c for c in comparisons}
    assert set(pairs) == {("fedit", "fedlease"), ("other", "fedlease"), ("fedlease", "fedit"), ("other", "fedit")}
    assert pairs[("fedit", "fedlease")].resolved and pairs[("fedit", "fedlease")].mean < 0
    assert any("old seed 1" in n for n in notes)
    text = "\n".join(stats.markdown_lines(comparisons, notes, n_boot=200))
    assert "resolved (fedlease above fedit)" in text and "| other |" in text
