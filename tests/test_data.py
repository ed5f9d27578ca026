"""Task registry, TSV readers, data resolution (local / hub / demo) and the carve-out."""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import pytest

from fedpeft.data import sources
from fedpeft.data.pools import load_federation_pools
from fedpeft.data.root import ENV_DATA_DIR
from fedpeft.data.sources import load_examples, read_task_tsv
from fedpeft.data.tasks import DEMO_TASKS, GLUE_TASKS, TASKS, Example, get_task
from fedpeft.errors import FedPeftError

REPO = Path(__file__).resolve().parents[1]


def _one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith("."), message
    assert ". " not in message, message


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    """Tests choose their data root explicitly; a developer's FEDPEFT_DATA_DIR must not leak in."""
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)


def write_tsv(path: Path, rows: list[list[str]], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join("\t".join(row) + "\n" for row in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_glue_tasks_and_metrics():
    assert set(GLUE_TASKS) == {"sst2", "mrpc", "qnli", "qqp", "mnli", "rte", "cola", "stsb", "wnli"}
    assert get_task("sst2").glue_dir == "SST-2"
    assert get_task("mrpc").metrics == ("accuracy", "f1")
    assert get_task("qqp").metrics == ("accuracy", "f1")
    assert get_task("mrpc").primary_metric == "accuracy"
    cola = get_task("cola")
    assert cola.primary_metric == "matthews" and cola.metrics[0] == "matthews"
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1
    assert stsb.metrics == ("pearson", "spearman") and stsb.primary_metric == "pearson"
    assert get_task("mnli").num_labels == 3
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("qnli").label_names[0] == "entailment"
    assert get_task("rte").hf_name == ("glue", "rte")
    for spec in TASKS.values():
        assert spec.metrics[0] == spec.primary_metric
        assert "accuracy" in spec.metrics or spec.is_regression or spec.is_generation
        if not spec.is_regression and not spec.is_generation:
            assert len(spec.label_names) == spec.num_labels


def test_registry_demo_tasks():
    assert len(DEMO_TASKS) >= 3
    for name in DEMO_TASKS:
        spec = get_task(name)
        assert spec.source == "demo" and spec.metrics == ("accuracy",)
    # different label meanings
    assert len({get_task(n).label_names for n in DEMO_TASKS}) == len(DEMO_TASKS)


def test_unknown_task_lists_known_names():
    with pytest.raises(FedPeftError) as info:
        get_task("sst3")
    message = str(info.value)
    assert "'sst3'" in message and "sst2" in message and "demo-topic" in message
    _one_sentence(message)
    assert get_task("SST2") is get_task("sst2")


# ---------------------------------------------------------------------------------------------
# GLUE TSV layouts (fixture files)


@pytest.fixture
def glue_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    g = root / "glue"
    write_tsv(g / "SST-2" / "train.tsv", [["sentence", "label"], ["a fine film ", "1"], ["dull", "0"]])
    write_tsv(g / "SST-2" / "dev.tsv", [["sentence", "label"], ["\"quoted\" text", "1"]])
    write_tsv(
        g / "MRPC" / "train.tsv",
        [
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            ["1", "11", "12", "He said \"yes\".", "He agreed."],
            ["0", "13", "14", "It rained.", "It was sunny."],
        ],
        bom=True,
    )
    write_tsv(g / "CoLA" / "train.tsv", [["gj04", "1", "", "The cat sat."], ["gj04", "0", "*", "Cat the sat."]])
    write_tsv(
        g / "RTE" / "train.tsv",
        [["index", "sentence1", "sentence2", "label"], ["0", "A b.", "B.", "entailment"],
         ["1", "C d.", "E.", "not_entailment"]],
    )
    write_tsv(
        g / "STS-B" / "train.tsv",
        [["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
          "sentence2", "score"],
         ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A man.", "A guy.", "4.200"]],
    )
    write_tsv(
        g / "QQP" / "train.tsv",
        [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
         ["0", "1", "2", "How old?", "What age?", "1"]],
    )
    write_tsv(
        g / "MNLI" / "dev_matched.tsv",
        [["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label"],
         ["0", "1", "1e", "fiction", "P one.", "H one.", "neutral", "neutral"],
         ["1", "2", "2e", "fiction", "P two.", "H two.", "contradiction", "contradiction"]],
    )
    write_tsv(
        g / "QNLI" / "dev.tsv",
        [["index", "question", "sentence", "label"]]
        + [[str(i), f"Q{i}?", f"S{i}.", "entailment" if i % 3 else "not_entailment"] for i in range(60)],
    )
    return root


def test_sst2_and_quotes(glue_root):
    train = load_examples("sst2", "train", glue_root)
    assert train == [Example("a fine film ", None, 1), Example("dull", None, 0)]
    # QUOTE_NONE: quotes are text
    assert load_examples("sst2", "validation", glue_root)[0].text_a == "\"quoted\" text"


def test_mrpc_bom_header(glue_root):
    assert (glue_root / "glue/MRPC/train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality")
    rows = load_examples("mrpc", "train", glue_root)
    assert rows[0] == Example("He said \"yes\".", "He agreed.", 1)
    assert [r.label for r in rows] == [1, 0]


def test_headerless_cola_rte_strings_stsb_qqp_mnli(glue_root):
    assert load_examples("cola", "train", glue_root) == [
        Example("The cat sat.", None, 1),
        Example("Cat the sat.", None, 0),
    ]
    assert [e.label for e in load_examples("rte", "train", glue_root)] == [0, 1]
    stsb = load_examples("stsb", "train", glue_root)
    assert stsb == [Example("A man.", "A guy.", 4.2)] and isinstance(stsb[0].label, float)
    assert load_examples("qqp", "train", glue_root) == [Example("How old?", "What age?", 1)]
    mnli = load_examples("mnli", "validation", glue_root)  # dev_matched.tsv, columns by name
    assert mnli == [Example("P one.", "H one.", 1), Example("P two.", "H two.", 2)]


def test_plain_glue_folder_and_env_root(tmp_path, monkeypatch):
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["ok", "1"]])
    assert load_examples("sst2", "train", tmp_path) == [Example("ok", None, 1)]
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path))
    assert load_examples("sst2", "train", None) == [Example("ok", None, 1)]


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([["sentence", "label"], ["good", "1"], ["bad", "0", "extra"]], "line 3: expected 2 tab-separated columns but found 3"),
        ([["sentence", "label"], ["good", "1"], ["meh", "2"]], "line 3: label '2' is not one of 0, 1"),
    ],
)
def test_corrupt_row_names_file_and_line(tmp_path, rows, expected):
    path = write_tsv(tmp_path / "glue" / "SST-2" / "train.tsv", rows)
    with pytest.raises(FedPeftError) as info:
        load_examples("sst2", "train", tmp_path)
    message = str(info.value)
    assert str(path) in message and expected in message
    assert "\n" not in message and message.endswith("; fix or remove that row.")


def test_unparsable_score(tmp_path):
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    good = ["0", "g", "f", "y", "0", "n", "n", "A.", "B.", "1.0"]
    path = write_tsv(tmp_path / "STS-B" / "dev.tsv", [header, good, good[:-1] + ["high"]])
    with pytest.raises(FedPeftError, match=r"dev\.tsv, line 3: the score 'high' is not a finite number"):
        read_task_tsv("stsb", path)


def test_missing_header_column(tmp_path):
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["text", "label"], ["ok", "1"]])
    with pytest.raises(FedPeftError, match="has no 'sentence' column"):
        load_examples("sst2", "train", tmp_path)


def test_parsed_once_per_file_version(tmp_path):
    path = write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["one", "1"]])
    first = load_examples("sst2", "train", tmp_path)
    hits = sources._read_cached.cache_info().hits
    second = load_examples("sst2", "train", tmp_path)
    assert sources._read_cached.cache_info().hits == hits + 1
    assert second == first and second is not first and second[0] is first[0]
    write_tsv(path, [["sentence", "label"], ["two", "0"], ["three", "1"]])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert [e.text_a for e in load_examples("sst2", "train", tmp_path)] == ["two", "three"]


def test_missing_task_folder_names_paths(glue_root):
    with pytest.raises(FedPeftError) as info:
        load_examples("wnli", "train", glue_root)
    message = str(info.value)
    assert str(glue_root / "glue" / "WNLI") in message and str(glue_root / "WNLI") in message
    _one_sentence(message)


def test_missing_root(tmp_path):
    with pytest.raises(FedPeftError, match="does not exist"):
        load_examples("sst2", "train", tmp_path / "nowhere")


def test_unknown_split(glue_root):
    with pytest.raises(FedPeftError, match="'train' or 'validation'"):
        load_examples("sst2", "test", glue_root)


# ---------------------------------------------------------------------------------------------
# the hub (never contacted: datasets.load_dataset is replaced)


@pytest.fixture
def clear_hub_cache():
    sources._load_from_hub.cache_clear()
    yield
    sources._load_from_hub.cache_clear()


def test_hub_offline_says_how_to_work_offline(monkeypatch, clear_hub_cache):
    datasets = pytest.importorskip("datasets")
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(sources, "hub_reachable", lambda: True)  # the probe passes; the download fails
    with pytest.raises(FedPeftError) as info:
        load_examples("sst2", "train", None)
    message = str(info.value)
    assert calls == [(("glue", "sst2"), {"split": "train"})]
    assert "Hugging Face hub" in message and "ConnectionError" in message
    assert "--data-dir" in message and ENV_DATA_DIR in message and "demo-sentiment" in message
    assert isinstance(info.value.__cause__, ConnectionError)
    _one_sentence(message.replace("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)", "x"))


def test_unreachable_hub_fails_at_once_without_downloading(monkeypatch, clear_hub_cache):
    datasets = pytest.importorskip("datasets")
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(sources, "hub_reachable", lambda: False)
    with pytest.raises(FedPeftError, match="unreachable") as info:
        load_examples("sst2", "train", None)
    assert calls == [] and "--data-dir" in str(info.value)


def test_hub_rows_become_examples(monkeypatch, clear_hub_cache):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake(path, name, split):
        seen[name] = split
        if name == "mnli":
            return [{"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 0}]
        return [{"sentence1": "A.", "sentence2": "B.", "label": 3.5, "idx": 0}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(sources, "hub_reachable", lambda: True)
    assert load_examples("mnli", "validation", None) == [Example("P.", "H.", 2)]
    assert seen["mnli"] == "validation_matched"
    assert load_examples("stsb", "train", None) == [Example("A.", "B.", 3.5)]


# ---------------------------------------------------------------------------------------------
# train split missing, carve-out


def test_missing_train_split_mentions_carve_out(glue_root):
    with pytest.raises(FedPeftError) as info:
        load_examples("qnli", "train", glue_root)
    assert "--carve-out" in str(info.value) and "train" in str(info.value)
    with pytest.raises(FedPeftError, match="--carve-out"):
        load_federation_pools("qnli", glue_root, carve_out=False)


def test_carve_out_is_disjoint_stratified_and_fixed(glue_root, caplog):
    dev = load_examples("qnli", "validation", glue_root)  # 60 rows: 20 not_entailment, 40 entailment
    with caplog.at_level(logging.WARNING, logger="fedpeft.data.sources"):
        train, test = load_federation_pools("qnli", glue_root, carve_out=True)
    assert any("Carve-out in use for qnli" in r.getMessage() for r in caplog.records)
    assert len(train) + len(test) == len(dev)
    assert {id(e) for e in train}.isdisjoint({id(e) for e in test})
    assert {e.text_a for e in train}.isdisjoint({e.text_a for e in test})
    assert collections.Counter(e.label for e in test) == {0: 8, 1: 4}  # round(0.2 · 40), round(0.2 · 20)
    # file order kept, and the same split every time (it does not follow the run seed)
    assert [dev.index(e) for e in train] == sorted(dev.index(e) for e in train)
    again_train, again_test = load_federation_pools("qnli", glue_root, carve_out=True)
    assert again_test == test and again_train == train
    other_train, other_test = load_federation_pools("qnli", glue_root, carve_out=True, seed=1)
    assert other_test != test


def test_carve_out_ignored_when_train_exists(glue_root):
    train, test = load_federation_pools("sst2", glue_root, carve_out=True)
    assert len(train) == 2 and len(test) == 1


# ---------------------------------------------------------------------------------------------
# the bundled demo tasks


def test_demo_files_sizes_and_disjointness():
    for name in DEMO_TASKS:
        spec = get_task(name)
        train = load_examples(name, "train", None)
        validation = load_examples(name, "validation", None)
        assert len(train) >= 600 and len(validation) >= 200
        for split in (train, validation):
            assert set(e.label for e in split) == set(range(spec.num_labels))
            assert all((e.text_b is None) != spec.is_pair for e in split)
        pairs_train = {(e.text_a, e.text_b) for e in train}
        pairs_val = {(e.text_a, e.text_b) for e in validation}
        assert len(pairs_train) == len(train) and len(pairs_val) == len(validation)
        assert pairs_train.isdisjoint(pairs_val)
        assert len({e.text_a for e in train}) >= 300  # diverse text, not a handful of templates


def test_demo_files_are_what_make_demo_writes(tmp_path):
    import importlib.util

    demo_dir = Path(sources.DEMO_DIR)
    spec = importlib.util.spec_from_file_location("make_demo", demo_dir / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    written = sorted(p.name for p in tmp_path.glob("*.tsv"))
    assert written == sorted(p.name for p in demo_dir.glob("*.tsv"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (demo_dir / name).read_bytes(), name
    total = sum(p.stat().st_size for p in demo_dir.iterdir() if p.is_file())
    assert total < 320_000


# ---------------------------------------------------------------------------------------------
# the real GLUE data (optional)


def _shared_root() -> Path | None:
    candidates = [os.environ.get(ENV_DATA_DIR)]  # the data root; .ci/run sets it when the data is there
    for candidate in candidates:
        if candidate and (Path(candidate) / "glue" / "SST-2" / "dev.tsv").is_file():
            return Path(candidate)
    return None


SHARED = _shared_root()
needs_shared = pytest.mark.skipif(
    SHARED is None,
    reason=f"real GLUE data not found (set {ENV_DATA_DIR} to a data root laid out as glue/SST-2/{{train,dev}}.tsv)",
)


@needs_shared
def test_real_glue_counts():
    def counts(task, split):
        rows = load_examples(task, split, SHARED)
        return len(rows), collections.Counter(e.label for e in rows)

    assert counts("sst2", "validation") == (872, {1: 444, 0: 428})
    assert counts("mrpc", "train") == (3668, {1: 2474, 0: 1194})
    assert counts("mrpc", "validation") == (408, {1: 279, 0: 129})
    assert counts("cola", "validation") == (1043, {1: 721, 0: 322})
    assert counts("rte", "validation") == (277, {0: 146, 1: 131})
    assert counts("wnli", "validation") == (71, {0: 40, 1: 31})
    assert counts("qnli", "validation") == (5463, {0: 2702, 1: 2761})
    stsb = load_examples("stsb", "validation", SHARED)
    assert len(stsb) == 1500 and all(0.0 <= e.label <= 5.0 for e in stsb)


@needs_shared
def test_real_qnli_needs_carve_out():
    with pytest.raises(FedPeftError, match="--carve-out"):
        load_examples("qnli", "train", SHARED)
    train, test = load_federation_pools("qnli", SHARED, carve_out=True)
    assert collections.Counter(e.label for e in test) == {0: 540, 1: 552}
    assert collections.Counter(e.label for e in train) == {0: 2162, 1: 2209}
    assert {id(e) for e in train}.isdisjoint({id(e) for e in test})
