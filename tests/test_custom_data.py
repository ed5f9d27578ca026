"""Your own data (--dataset): a CSV, TSV, JSON/JSONL or Parquet file read by `datasets` becomes a task whose
kind and metrics follow its label column, with a test file or a fixed hold-out, and clients by a column."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fedpeft.config import RunConfig
from fedpeft.data import custom
from fedpeft.data.tasks import TASKS, get_task
from fedpeft.errors import FedPeftError


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """`datasets` converts each file into an Arrow file in its cache: keep the tests' in tmp_path."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    yield
    for name in [n for n in TASKS if get_task(n).source == "custom"]:  # no task leaks into other tests
        TASKS.pop(name)
        custom._DATASETS.pop(name, None)


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def reviews(path, n=120, users=4):
    """Sentiment rows: the label is in the text (a word list per class), a user id, a star rating, a score."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pos = bool(i % 2)
        word = ["awful", "dull", "poor"][i % 3] if not pos else ["great", "lovely", "fine"][i % 3]
        rows.append([f"it was {word} {i}", "positive" if pos else "negative", f"u{i % users}", int(rng.integers(1, 6)),
                     float(rng.random())])
    return write_csv(path, ["review", "sentiment", "user", "stars", "score"], rows)


def test_string_labels_make_a_classification_task_with_a_stratified_fixed_holdout(tmp_path):
    path = reviews(tmp_path / "reviews.csv")
    spec, n_clients = custom.resolve_dataset(str(path), text_columns=["review"], label_column="sentiment")
    assert (spec.name, spec.kind, spec.label_values, n_clients) == ("reviews", "classification",
                                                                     ("negative", "positive"), 0)
    task = get_task("reviews")
    assert task.metrics == ("accuracy", "f1", "matthews") and task.num_labels == 2 and not task.is_pair
    train, test = custom.load_pools(spec)
    assert len(train) == 96 and len(test) == 24  # 20 % of each class
    assert np.bincount(test.label_ids).tolist() == [12, 12]
    assert not set(train.rows) & set(test.rows) and len(set(train.rows) | set(test.rows)) == 120
    first = train[0]
    assert first.text_b is None and first.label == (1 if "great" in first.text_a or "lovely" in first.text_a
                                                    or "fine" in first.text_a else 0)
    # the hold-out is a fixed split: the same rows whatever happens around it
    custom._pools.cache_clear()
    assert custom.load_pools(spec)[1].rows.tolist() == test.rows.tolist()


def test_label_types_decide_the_kind_and_the_metrics(tmp_path):
    path = reviews(tmp_path / "reviews.csv")
    stars, _ = custom.resolve_dataset(str(path), name="stars", text_columns=["review"], label_column="stars")
    assert stars.kind == "classification" and stars.label_values == ("1", "2", "3", "4", "5")
    assert get_task("stars").metrics == ("accuracy", "f1_macro", "matthews")
    score, _ = custom.resolve_dataset(str(path), name="score", text_columns=["review"], label_column="score")
    assert score.kind == "regression" and get_task("score").metrics == ("pearson", "spearman")
    assert isinstance(custom.load_pools(score)[0][0].label, float)
    forced, _ = custom.resolve_dataset(str(path), name="stars-r", text_columns=["review"], label_column="stars",
                                       label_kind="regression")
    assert forced.kind == "regression" and get_task("stars-r").is_regression
    # whole numbers sort by value, not as text
    numbers = write_csv(tmp_path / "n.csv", ["text", "label"], [[f"t{i}", v] for i, v in enumerate([10, 2, 10, 2])])
    assert custom.resolve_dataset(str(numbers))[0].label_values == ("2", "10")


def test_label_names_fix_the_class_order(tmp_path):
    path = reviews(tmp_path / "reviews.csv")
    spec, _ = custom.resolve_dataset(str(path), text_columns=["review"], label_column="sentiment",
                                     label_names=["positive", "negative"])
    assert spec.label_values == ("positive", "negative")
    train, _ = custom.load_pools(spec)
    assert all((ex.label == 0) == ("great" in ex.text_a or "lovely" in ex.text_a or "fine" in ex.text_a)
               for ex in train[:20])
    with pytest.raises(FedPeftError, match="'positive', which --label-names"):
        custom.resolve_dataset(str(path), text_columns=["review"], label_column="sentiment", label_names=["negative"])


def test_formats_pairs_and_a_test_file(tmp_path):
    pytest.importorskip("pyarrow")
    rows = [{"q": f"question {i}", "a": f"answer {i}", "label": i % 3} for i in range(30)]
    with open(tmp_path / "train.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "test.json").write_text(json.dumps(rows[:9]))
    spec, _ = custom.resolve_dataset(str(tmp_path / "train.jsonl"), text_columns=["q", "a"],
                                     test_file=str(tmp_path / "test.json"))
    assert get_task(spec.name).is_pair and spec.label_values == ("0", "1", "2")
    train, test = custom.load_pools(spec)
    assert (len(train), len(test)) == (30, 9)  # a test file: no hold-out
    assert test[4].text_a == "question 4" and test[4].text_b == "answer 4" and test[4].label == 1
    write_csv(tmp_path / "t.tsv", ["text", "label"], [["a\tb", "x"], ["NA", "y"], ["c", "x"]], delimiter="\t")
    tsv, _ = custom.resolve_dataset(str(tmp_path / "t.tsv"), test_fraction=0.5)
    assert sorted(ex.text_a for ex in list(custom.load_pools(tsv)[0]) + list(custom.load_pools(tsv)[1])) == \
        ["NA", "a\tb", "c"]  # quoted tabs stay in their field; "NA" is text, not a missing value
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    pq, _ = custom.resolve_dataset(str(tmp_path / "train.parquet"), text_columns=["q"])
    assert len(custom.load_pools(pq)[0]) + len(custom.load_pools(pq)[1]) == 30


def test_prompt_and_target_make_a_generation_task(tmp_path):
    rows = [{"instruction": f"Add {i} and 1.", "answer": str(i + 1)} for i in range(20)]
    with open(tmp_path / "sums.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    spec, _ = custom.resolve_dataset(str(tmp_path / "sums.jsonl"), prompt_column="instruction", target_column="answer")
    task = get_task("sums")
    assert spec.kind == "generation" and task.is_generation and task.chat and task.primary_metric == "bleu"
    train, test = custom.load_pools(spec)
    assert (len(train), len(test)) == (16, 4)
    ex = train[0]
    assert ex.prompt.endswith(".\n") and ex.references == (ex.target,) and int(ex.target) >= 1
    with pytest.raises(FedPeftError, match="both --prompt-column and --target-column"):
        custom.resolve_dataset(str(tmp_path / "sums.jsonl"), prompt_column="instruction")


def test_clients_by_a_column(tmp_path):
    path = reviews(tmp_path / "reviews.csv", n=100, users=4)
    with open(path, "a", newline="") as fh:  # a user with one row has no test example: not a client
        csv.writer(fh).writerow(["it was great 999", "positive", "lonely", 3, 0.5])
    cfg = RunConfig(method="fedit", dataset=str(path), text_columns=["review"], label_column="sentiment",
                    client_column="user", train_samples=15, test_samples=100).with_dataset()
    assert cfg.tasks == ["reviews"] * 4 and cfg.label_kind == "classification"
    from fedpeft.run.federation import federation_parts

    parts = federation_parts(cfg)
    train, test = custom.load_pools(cfg.dataset_spec())
    assert train.client_values == ("u0", "u1", "u2", "u3")
    for k, part in enumerate(parts):
        assert len(part.train) == 15 and len(part.test) == 5  # at most 15 of its 20 rows; all 5 test rows
        assert all(train.client_ids[j] == k for j in part.train_ids)
        assert all(test.client_ids[j] == k for j in part.test_ids)
        assert all(int(ex.text_a.rsplit(" ", 1)[1]) % 4 == k for ex in part.train + part.test)
    with pytest.raises(FedPeftError, match="--partition dirichlet does not apply"):
        RunConfig(dataset=str(path), client_column="user", partition="dirichlet")
    with pytest.raises(FedPeftError, match="leave --tasks out"):
        RunConfig(method="fedit", dataset=str(path), text_columns=["review"], label_column="sentiment",
                  client_column="user", tasks=["reviews"] * 3).with_dataset()


def test_dirichlet_and_iid_partitions_of_a_dataset(tmp_path):
    from fedpeft.run.federation import federation_parts

    path = reviews(tmp_path / "reviews.csv", n=400)
    base = dict(method="fedit", dataset=str(path), text_columns=["review"], label_column="sentiment", num_clients=3,
                train_samples=40, test_samples=10)
    skewed = federation_parts(RunConfig(**base, partition="dirichlet", alpha=0.1).with_dataset())
    iid = federation_parts(RunConfig(**base, partition="iid").with_dataset())
    for parts in (skewed, iid):
        ids = [j for p in parts for j in p.train_ids]
        assert len(ids) == len(set(ids)) == 120
    from fedpeft.data.partition.client import label_skew

    assert label_skew(skewed) > 0.3 and label_skew(iid) < 0.1  # α = 0.1: clients far from the pool's label mix


def test_a_dataset_sits_beside_other_tasks_and_is_found_under_the_data_root(tmp_path, monkeypatch):
    from fedpeft.run.federation import federation_parts

    root = tmp_path / "root"
    root.mkdir()
    reviews(root / "reviews.csv", n=200)
    monkeypatch.chdir(tmp_path)  # "reviews.csv" is not in the working folder: the data root has it
    cfg = RunConfig(method="fedit", dataset="reviews.csv", data_dir=str(root), text_columns=["review"],
                    label_column="sentiment", tasks=["reviews", "reviews", "demo-topic", "demo-topic"],
                    train_samples=20, test_samples=8).with_dataset()
    assert cfg.dataset == "reviews.csv"  # relative to the data root: each Flower node looks in its own
    parts = federation_parts(cfg)
    assert [p.task for p in parts] == ["reviews", "reviews", "demo-topic", "demo-topic"]
    assert all(len(p.train) == 20 for p in parts) and parts[0].train[0].text_a.startswith("it was")
    with pytest.raises(FedPeftError, match="does not name the dataset's task 'reviews'"):
        RunConfig(method="fedit", dataset="reviews.csv", data_dir=str(root), text_columns=["review"],
                  label_column="sentiment", tasks=["demo-topic"]).with_dataset()


def test_the_task_is_rebuilt_from_config_json_alone_and_a_run_resumes(tmp_path, tiny_backbone):
    from fedpeft.run import run
    from fedpeft.run.federation import federation_parts

    path = reviews(tmp_path / "reviews.csv")
    cfg = RunConfig(method="fedit", dataset=str(path), text_columns=["review"], label_column="sentiment",
                    client_column="user", train_samples=16, test_samples=8, global_rounds=2, local_epochs=1,
                    batch_size=8, max_length=16, rank=2, quiet=True, output_dir=str(tmp_path / "run"))
    first = run(cfg, backbone=tiny_backbone, stop_after=1)
    ids = [p.train_ids for p in federation_parts(first.config)]
    TASKS.pop("reviews"), custom._DATASETS.pop("reviews")  # a fresh process knows no such task
    custom._pools.cache_clear()
    with pytest.raises(FedPeftError):
        get_task("reviews")
    saved = RunConfig.load(tmp_path / "run" / "config.json")  # what a Flower node or a resume reads
    assert get_task("reviews").metrics == ("accuracy", "f1", "matthews")
    assert [p.train_ids for p in federation_parts(saved)] == ids
    done = run(RunConfig(resume=str(tmp_path / "run"), quiet=True), backbone=tiny_backbone)
    assert done.headline["round"] == 2 and set(done.headline["per_task"]) == {"reviews"}


def test_mistakes_name_the_file_and_the_columns(tmp_path, capsys, monkeypatch):
    from fedpeft.cli import main

    path = reviews(tmp_path / "reviews.csv")
    with pytest.raises(FedPeftError) as info:
        custom.resolve_dataset(str(path), text_columns=["review"], label_column="stars_")
    assert str(path) in str(info.value) and "'stars_'" in str(info.value) and "review, sentiment, user" in str(info.value)
    with pytest.raises(FedPeftError, match="has no column 'text'.*--text-columns"):
        custom.resolve_dataset(str(path))
    holes = write_csv(tmp_path / "holes.csv", ["text", "label"], [["a", "x"], ["b", ""], ["c", "y"]])
    with pytest.raises(FedPeftError, match=r"holes.csv, row 2: the column 'label' is empty"):
        custom.resolve_dataset(str(holes))
    ok = write_csv(tmp_path / "ok.csv", ["text", "label"], [["a", "x"], ["b", "y"]])
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [["a", "x"], ["b", "z"]])
    with pytest.raises(FedPeftError, match=r"test.csv, row 2: the label 'z' is not one of the classes"):
        custom.resolve_dataset(str(ok), test_file=str(test))
    with pytest.raises(FedPeftError, match="missing.csv does not exist"):
        custom.resolve_dataset(str(tmp_path / "missing.csv"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(FedPeftError, match="cannot read .*bad.parquet as PARQUET"):
        custom.resolve_dataset(str(tmp_path / "bad.parquet"))
    with pytest.raises(FedPeftError, match="--client-column describes your own data"):
        RunConfig(client_column="user")
    # the CLI: one line, exit 2; a hub id offline says how to work offline
    monkeypatch.setattr(custom, "hub_reachable", lambda: False)
    argv = ["run", "--dataset", "someone/reviews", "--num-clients", "2", "--quiet", "--output-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedpeft: error: could not load the hub dataset 'someone/reviews'") and "offline" in err
    assert len(err.splitlines()) == 1
    assert main(["run", "--dataset", str(path), "--text-columns", "review", "--label-column", "sentiment",
                 "--quiet", "--output-dir", str(tmp_path / "r")]) == 2
    assert "--num-clients" in capsys.readouterr().err


def test_a_dataset_federation_runs_from_the_command_line(tmp_path, capsys):
    from fedpeft.cli import main

    path = reviews(tmp_path / "reviews.csv")
    argv = ["run", "--method", "fedit", "--dataset", str(path), "--text-columns", "review", "--label-column",
            "sentiment", "--client-column", "user", "--model-name", "tiny_models:tiny_bert", "--train-samples", "16",
            "--test-samples", "8", "--global-rounds", "1", "--local-epochs", "1", "--batch-size", "8",
            "--max-length", "16", "--rank", "2", "--quiet", "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["tasks"] == ["reviews"] * 4 and saved["label_names"] == ["negative", "positive"]
    assert "| reviews | 4 | matthews |" in capsys.readouterr().out


def test_the_server_reserve_of_the_leff_family_leaves_a_dataset_pool_lazy(tmp_path):
    from fedpeft.data.partition.federation import partition_pools

    path = reviews(tmp_path / "reviews.csv", n=200)
    spec, _ = custom.resolve_dataset(str(path), text_columns=["review"], label_column="sentiment")
    pools = {"reviews": custom.load_pools(spec)}
    parts = partition_pools(["reviews"] * 2, pools, train_samples=20, test_samples=5, reserve=16, seed=3)
    from fedpeft.data.partition.common import reserved_ids

    held = {ex.text_a for ex in pools["reviews"][0].take(reserved_ids("reviews", 160, 16, 3))}
    used = {ex.text_a for p in parts for ex in p.train}
    assert len(held) == 16 and len(used) == 40 and not held & used


def test_the_demo_tasks_are_read_by_the_general_reader():
    from fedpeft.data.sources import demo_dataset, load_examples

    spec = demo_dataset("demo-question")
    assert spec.text_columns == ("text_a", "text_b") and spec.label_names == ("not_answered", "answered")
    train = load_examples("demo-question", "train")
    assert len(train) == 640 and train[0].text_b and train[0].label in (0, 1)
    assert load_examples("demo-sentiment", "validation")[0].text_b is None


@pytest.mark.flower
def test_flower_sim_clients_rebuild_the_dataset_task_from_the_run_config(tmp_path):
    """Ray's client processes know no 'reviews' task: they register it from the settings they are sent
    and cut the same rows, so flower-sim gives the local engine's numbers."""
    pytest.importorskip("flwr")
    from fedpeft.run import run

    path = reviews(tmp_path / "reviews.csv")
    settings = dict(method="fedit", model_name="tiny_models:tiny_bert", dataset=str(path), text_columns=["review"],
                    label_column="sentiment", client_column="user", train_samples=16, test_samples=8,
                    global_rounds=1, local_epochs=1, batch_size=8, max_length=16, rank=2, threads=1, quiet=True)
    local = run(RunConfig(**settings, output_dir=str(tmp_path / "local")))
    sim = run(RunConfig(**settings, engine="flower-sim", output_dir=str(tmp_path / "sim")))
    want = {(r["round"], r["client"]): r.get("accuracy") for r in local.history.records}
    got = {(r["round"], r["client"]): r.get("accuracy") for r in sim.history.records}
    assert want.keys() == got.keys() and sum(v is not None for v in got.values()) == 4, (want, got)
    assert all(want[k] is None and got[k] is None or abs(want[k] - got[k]) < 1e-6 for k in want)


def test_settings_that_only_look_resolved_are_resolved_from_the_file(tmp_path):
    path = reviews(tmp_path / "reviews.csv")
    cfg = RunConfig(method="fedit", dataset=str(path), dataset_name="mine", label_kind="classification",
                    text_columns=["review"], label_column="sentiment", num_clients=2)
    assert not cfg.dataset_resolved  # no classes, no clients yet: the file decides them
    done = cfg.with_dataset()
    assert done.dataset_resolved and done.tasks == ["mine", "mine"] and done.label_names == ["negative", "positive"]
