"""Partitioning invariants on synthetic pools and the bundled demo tasks: clients' samples are disjoint,
class counts exact, the split deterministic, Dirichlet skew applied and infeasible requests refused with
the need and the supply (docs/methods/fedlease.md#data-split)."""

from __future__ import annotations

import collections
import logging

import numpy as np
import pytest

from fedpeft.data.partition.client import ClientData, label_skew
from fedpeft.data.partition.common import largest_remainder
from fedpeft.data.partition.federation import build_federation, partition_pools
from fedpeft.data.tasks import Example
from fedpeft.errors import FedPeftError


def pool(task: str, split: str, counts: list[int]) -> list[Example]:
    """A synthetic pool with `counts[c]` examples of class c, each with a unique text."""
    rows = [Example(f"{task}-{split}-{c}-{i}", None, c) for c, n in enumerate(counts) for i in range(n)]
    rng = np.random.default_rng(0)
    return [rows[i] for i in rng.permutation(len(rows))]


POOLS = {
    "sst2": (pool("sst2", "train", [700, 500]), pool("sst2", "val", [300, 260])),
    "mrpc": (pool("mrpc", "train", [1194, 2474]), pool("mrpc", "val", [129, 279])),
    "mnli": (pool("mnli", "train", [400, 400, 400]), pool("mnli", "val", [120, 120, 120])),
}
TASKS = ["sst2", "mrpc", "sst2", "mnli", "sst2", "mrpc", "mnli", "sst2"]


def federation(tasks=TASKS, **kwargs) -> list[ClientData]:
    args = dict(train_samples=101, test_samples=40, seed=7)
    args.update(kwargs)
    return partition_pools(tasks, POOLS, **args)


def label_counts(examples, num_labels):
    counts = collections.Counter(e.label for e in examples)
    return [counts.get(c, 0) for c in range(num_labels)]


@pytest.mark.parametrize("partition", ["task", "dirichlet", "iid"])
def test_disjoint_across_clients_and_splits(partition):
    clients = federation(partition=partition, alpha=1.0)
    assert [c.client_id for c in clients] == list(range(len(TASKS)))
    assert [c.task for c in clients] == TASKS
    for task in POOLS:
        mine = [c for c in clients if c.task == task]
        for split in ("train", "test"):
            ids = [i for c in mine for i in getattr(c, f"{split}_ids")]
            assert len(ids) == len(set(ids)), (task, split)
            texts = [e.text_a for c in mine for e in getattr(c, split)]
            assert len(texts) == len(set(texts))
        train_texts = {e.text_a for c in mine for e in c.train}
        test_texts = {e.text_a for c in mine for e in c.test}
        assert train_texts.isdisjoint(test_texts)
    for c in clients:
        assert len(c.train) == 101 and len(c.test) == 40
        train_pool, test_pool = POOLS[c.task]
        assert [train_pool[i] for i in c.train_ids] == c.train
        assert [test_pool[i] for i in c.test_ids] == c.test


def test_class_balanced_counts_are_exact():
    clients = federation()
    sst2 = [c for c in clients if c.task == "sst2"]  # clients 0, 2, 4, 7
    # 101 = 50.5 + 50.5: the extra example rotates with the client id (ties start at class i mod C)
    assert [label_counts(c.train, 2) for c in sst2] == [[51, 50], [51, 50], [51, 50], [50, 51]]
    assert all(label_counts(c.test, 2) == [20, 20] for c in sst2)
    mnli = [c for c in clients if c.task == "mnli"]  # clients 3, 6
    assert [label_counts(c.train, 3) for c in mnli] == [[34, 34, 33], [34, 34, 33]]
    assert [label_counts(c.test, 3) for c in mnli] == [[14, 13, 13], [14, 13, 13]]


def test_natural_label_split_follows_the_pool():
    clients = federation(label_split="natural", train_samples=100, test_samples=50)
    mrpc = [c for c in clients if c.task == "mrpc"]
    # train pool 1194 / 2474 → 32.55 / 67.45; validation 129 / 279 → 15.81 / 34.19
    assert all(label_counts(c.train, 2) == [33, 67] for c in mrpc)
    assert all(label_counts(c.test, 2) == [16, 34] for c in mrpc)


def test_largest_remainder():
    assert largest_remainder(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert largest_remainder(7, [1, 1, 1]) == [3, 2, 2]
    assert largest_remainder(7, [1, 1, 1], start=1) == [2, 3, 2]
    assert largest_remainder(10, [0.66, 0.34]) == [7, 3]
    assert sum(largest_remainder(1000, np.random.default_rng(1).dirichlet([0.3] * 5))) == 1000


def test_deterministic_given_seed():
    for partition in ("task", "dirichlet", "iid"):
        a = federation(partition=partition, seed=3)
        b = federation(partition=partition, seed=3)
        c = federation(partition=partition, seed=4)
        assert [(x.train_ids, x.test_ids) for x in a] == [(x.train_ids, x.test_ids) for x in b]
        assert [x.train_ids for x in a] != [x.train_ids for x in c]


def test_dirichlet_skew_decreases_with_alpha():
    balanced = {"mnli": (pool("mnli", "train", [600, 600, 600]), pool("mnli", "val", [300, 300, 300]))}
    tasks = ["mnli"] * 10

    def skew(alpha):
        values = []
        for seed in range(4):
            clients = partition_pools(
                tasks, balanced, train_samples=50, test_samples=20, partition="dirichlet", alpha=alpha, seed=seed
            )
            values.append(label_skew(clients))
        return float(np.mean(values))

    s_small, s_mid, s_large = skew(0.05), skew(1.0), skew(50.0)
    assert s_small > s_mid > s_large
    assert s_small > 0.5 and s_large < 0.05


def test_dirichlet_train_and_test_share_proportions():
    balanced = {"mnli": (pool("mnli", "train", [900, 900, 900]), pool("mnli", "val", [900, 900, 900]))}
    clients = partition_pools(
        ["mnli"] * 3, balanced, train_samples=200, test_samples=200, partition="dirichlet", alpha=0.3, seed=1
    )
    for c in clients:
        assert label_counts(c.train, 3) == label_counts(c.test, 3)
    # label_split="dirichlet" (the label-split spelling) is the same partition
    same = partition_pools(
        ["mnli"] * 3, balanced, train_samples=200, test_samples=200, label_split="dirichlet", alpha=0.3, seed=1
    )
    assert [c.train_ids for c in same] == [c.train_ids for c in clients]


def test_class_balanced_has_no_skew_on_balanced_pool():
    balanced = {"mnli": (pool("mnli", "train", [300, 300, 300]), pool("mnli", "val", [90, 90, 90]))}
    clients = partition_pools(["mnli"] * 3, balanced, train_samples=90, test_samples=30)
    assert label_skew(clients) == pytest.approx(0.0, abs=1e-12)


def test_iid_matches_natural_proportions():
    skewed = {"sst2": (pool("sst2", "train", [1400, 600]), pool("sst2", "val", [700, 300]))}
    clients = partition_pools(["sst2"] * 5, skewed, train_samples=300, test_samples=150, partition="iid", seed=2)
    train_fraction = np.mean([e.label == 0 for c in clients for e in c.train])
    test_fraction = np.mean([e.label == 0 for c in clients for e in c.test])
    assert train_fraction == pytest.approx(0.7, abs=0.03)
    assert test_fraction == pytest.approx(0.7, abs=0.04)
    # not forced to exact proportions: per-client counts vary
    assert len({label_counts(c.train, 2)[0] for c in clients}) > 1


def test_infeasible_request_names_task_split_class_need_and_supply():
    with pytest.raises(FedPeftError) as info:
        partition_pools(["mrpc"] * 4, POOLS, train_samples=500, test_samples=200)
    message = str(info.value)
    assert "mrpc/validation class 0: need 400 (4 clients × 100), have 129" in message
    assert "\n" not in message and message.endswith(".")
    with pytest.raises(FedPeftError, match=r"mrpc/train class 0: need 1600 \(4 clients × 400\), have 1194"):
        partition_pools(["mrpc"] * 4, POOLS, train_samples=800, test_samples=10)
    with pytest.raises(FedPeftError, match=r"sst2/train: need 1300 \(2 clients × 650\), have 1200"):
        partition_pools(["sst2"] * 2, POOLS, train_samples=650, test_samples=10, partition="iid")


def test_infeasible_dirichlet_request_over_many_clients_stays_one_short_line():
    """A shortfall summed over many Dirichlet clients names the range of the shares, not every one of
    them (at 10,000 clients the sum was a line of 40,000 characters)."""
    small = {"sst2": (pool("sst2", "train", [300, 300]), pool("sst2", "val", [300, 300]))}
    with pytest.raises(FedPeftError) as info:
        partition_pools(["sst2"] * 40, small, train_samples=20, test_samples=2, label_split="dirichlet", alpha=0.5)
    message = str(info.value)
    assert "summed over 40 clients' label shares" in message and " + " not in message
    assert len(message) < 300 and "\n" not in message
    with pytest.raises(FedPeftError, match=r"summed over 4 clients: \d+ \+ \d+ \+ \d+ \+ \d+\)"):
        partition_pools(["sst2"] * 4, small, train_samples=200, test_samples=2, label_split="dirichlet", alpha=0.5)


def test_per_task_sample_counts():
    clients = partition_pools(
        ["sst2", "mrpc"], POOLS, train_samples={"sst2": 100, "mrpc": 50}, test_samples={"sst2": 20, "mrpc": 8}
    )
    assert [(len(c.train), len(c.test)) for c in clients] == [(100, 20), (50, 8)]
    with pytest.raises(FedPeftError, match="not given for task mrpc"):
        partition_pools(["sst2", "mrpc"], POOLS, train_samples={"sst2": 100}, test_samples=8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_samples=0), "train samples per client must be a whole number"),
        (dict(test_samples=-1), "test samples per client must be a whole number"),
        (dict(train_samples=2.5), "train samples"),
        (dict(alpha=0.0), "alpha must be a positive number"),
        (dict(alpha=float("nan")), "alpha must be a positive number"),
        (dict(partition="shards"), "Unknown partition 'shards'"),
        (dict(label_split="balanced"), "Unknown label split 'balanced'"),
        (dict(tasks=[]), "at least one task"),
        (dict(tasks=["sst2", "nope"]), "Unknown task 'nope'"),
    ],
)
def test_argument_errors(kwargs, match):
    args = dict(tasks=["sst2"], train_samples=10, test_samples=10)
    args.update(kwargs)
    tasks = args.pop("tasks")
    with pytest.raises(FedPeftError, match=match):
        build_federation(tasks, **args)


def test_regression_task_falls_back_to_uniform_sampling(caplog):
    scores = [Example(f"s{i}", f"t{i}", float(i % 6)) for i in range(300)]
    pools = {"stsb": (scores[:200], scores[200:])}
    with caplog.at_level(logging.WARNING, logger="fedpeft.data.partition"):
        clients = partition_pools(["stsb", "stsb"], pools, train_samples=50, test_samples=20)
    assert any("regression task" in r.getMessage() for r in caplog.records)
    assert [len(c.train) for c in clients] == [50, 50]
    assert set(clients[0].train_ids).isdisjoint(clients[1].train_ids)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedpeft.data.partition"):
        partition_pools(["stsb"], pools, train_samples=5, test_samples=5, label_split="natural")
    assert not caplog.records


def test_demo_federation_end_to_end():
    tasks = ["demo-sentiment", "demo-topic", "demo-question", "demo-paraphrase"] * 2
    clients = build_federation(tasks, train_samples=120, test_samples=40, seed=42)
    assert len(clients) == 8
    for c in clients:
        assert len(c.train) == 120 and len(c.test) == 40
    topic = clients[1]
    assert label_counts(topic.train, 4) == [30, 30, 30, 30]
    again = build_federation(tasks, train_samples=120, test_samples=40, seed=42)
    assert [c.train for c in again] == [c.train for c in clients]
    # clients of the same task share no text
    assert {e.text_a for e in clients[0].train}.isdisjoint(e.text_a for e in clients[4].train)


def test_carve_out_federation_is_disjoint(tmp_path):
    folder = tmp_path / "QNLI"
    folder.mkdir()
    rows = ["index\tquestion\tsentence\tlabel"] + [
        f"{i}\tQ{i}?\tS{i}.\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(200)
    ]
    (folder / "dev.tsv").write_text("\n".join(rows) + "\n")
    with pytest.raises(FedPeftError, match="--carve-out"):
        build_federation(["qnli"] * 2, train_samples=40, test_samples=10, data_dir=tmp_path)
    clients = build_federation(["qnli"] * 2, train_samples=40, test_samples=10, data_dir=tmp_path, carve_out=True)
    train = [e.text_a for c in clients for e in c.train]
    test = [e.text_a for c in clients for e in c.test]
    assert len(set(train)) == 80 and len(set(test)) == 20
    assert set(train).isdisjoint(test)


def test_validation_hold_out_is_disjoint_stratified_and_seeded():
    from fedpeft.data.partition.client import ClientData
    from fedpeft.data.partition.validation import hold_out_validation
    from fedpeft.data.tasks import Example

    train = [Example(f"t{i}", None, i % 2) for i in range(40)] + [Example(f"x{i}", None, 0) for i in range(10)]
    part = ClientData(3, "sst2", train, [Example("test", None, 1)])
    a = hold_out_validation(part, 0.2, seed=7, num_labels=2)
    b = hold_out_validation(part, 0.2, seed=7, num_labels=2)
    c = hold_out_validation(part, 0.2, seed=8, num_labels=2)
    assert a.test == b.test and a.test != c.test
    assert len(a.train) + len(a.test) == 50
    assert {e.text_a for e in a.train}.isdisjoint({e.text_a for e in a.test})
    assert "test" not in {e.text_a for e in a.test}  # the test split is never used
    # class 0 has 30 examples, class 1 has 20: 6 and 4 held out
    assert sorted(e.label for e in a.test) == [0] * 6 + [1] * 4


def test_validation_hold_out_needs_examples():
    from fedpeft.data.partition.client import ClientData
    from fedpeft.data.partition.validation import hold_out_validation
    from fedpeft.data.tasks import Example
    from fedpeft.errors import FedPeftError

    part = ClientData(0, "sst2", [Example("a", None, 0), Example("b", None, 1)], [])
    with pytest.raises(FedPeftError, match="too few training examples"):
        hold_out_validation(part, 0.2, seed=1, num_labels=2)


def test_run_with_validation_fraction_scores_on_held_out_training_data(tiny_backbone, tiny_cfg):
    from fedpeft.run import run

    res = run(tiny_cfg(validation_fraction=0.25, global_rounds=1), backbone=tiny_backbone)
    clients = res.history.meta["clients"]
    # 24 class-balanced examples: sentiment 12 + 12 → 3 + 3 held out; topic 6 × 4 → round(1.5) = 2 × 4
    assert [c["num_examples"] for c in clients] == [18, 18, 16, 16]
    last = [r for r in res.history.records if r["round"] == 1]
    assert all(r["accuracy"] is not None for r in last)
