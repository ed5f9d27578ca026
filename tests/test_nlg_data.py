"""Generation tasks: registry, prompt templates, E2E/WebNLG readers, pools and partitions."""

from __future__ import annotations

import collections
import logging

import pytest

from fedpeft.data import nlg_sources, prompts
from fedpeft.data.nlg_sources import (
    WEBNLG_UNSEEN_CATEGORIES,
    load_gen_examples,
    parse_mr,
    read_e2e_csv,
    read_webnlg_split,
    webnlg_split_of,
)
from fedpeft.data.partition.federation import build_federation, partition_pools
from fedpeft.data.pools import load_federation_pools
from fedpeft.data.tasks import GENERATION_TASKS, GenExample, get_task
from fedpeft.errors import FedPeftError

from conftest import data_dir_or_skip

E2E_HEADER = "mr,ref,fixed,orig_mr\n"


def write_e2e(root, dev_rows, test_rows):
    folder = root / "e2e"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("devel-fixed.no-ol.csv", dev_rows), ("test-fixed.csv", test_rows)):
        body = "".join(f'"{mr}","{ref}",0,"{mr}"\n' for mr, ref in rows)
        (folder / name).write_text(E2E_HEADER + body, encoding="utf-8")
    return root


MR_A = "name[Alimentum], area[city centre], familyFriendly[no]"
MR_B = "name[Aromi], eatType[coffee shop], food[Chinese]"
MR_C = "name[Bibimbap House], food[English], priceRange[moderate]"


@pytest.fixture
def e2e_root(tmp_path):
    dev = [(MR_A, "Alimentum is in the centre."), (MR_B, "Aromi is a Chinese coffee shop."),
           (MR_A, "Alimentum is not for families."), (MR_C, "Bibimbap House serves English food.")]
    test = [(MR_B, "Aromi serves Chinese food."), (MR_C, "Bibimbap House is moderately priced."),
            (MR_B, "Try the Chinese coffee shop Aromi.")]
    return write_e2e(tmp_path, dev, test)


def entry(category, eid, triples, texts):
    t = "".join(f"<otriple>{x}</otriple>" for x in triples)
    lex = "".join(f'<lex comment="good" lid="Id{i}"><text>{x}</text></lex>' for i, x in enumerate(texts, 1))
    return (f'<entry category="{category}" eid="{eid}" size="{len(triples)}">'
            f"<originaltripleset>{t}</originaltripleset><modifiedtripleset>{t}</modifiedtripleset>{lex}</entry>")


def write_webnlg(root, split, category, entries, size=1):
    folder = root / "webnlg" / "v2.0" / "en" / split / f"{size}triples"
    folder.mkdir(parents=True, exist_ok=True)
    xml = '<?xml version="1.0" ?>\n<benchmark><entries>' + "".join(entries) + "</entries></benchmark>\n"
    (folder / f"{category}.xml").write_text(xml, encoding="utf-8")
    return root


@pytest.fixture
def webnlg_root(tmp_path):
    write_webnlg(tmp_path, "train", "Airport", [
        entry("Airport", "Id1", ["Aarhus_Airport | cityServed | Aarhus"], ["Aarhus Airport serves Aarhus.", "It serves Aarhus."]),
        entry("Airport", "Id2", ["Abilene | country | United_States"], ["Abilene is in the US."]),
    ])
    write_webnlg(tmp_path, "train", "Food", [
        entry("Food", "Id3", ["Bacon | course | Main", "Bacon | country | UK"], ["Bacon is a main course from the UK."]),
    ], size=2)
    write_webnlg(tmp_path, "test", "Artist", [
        entry("Artist", "Id4", ["Aaron_Deer | genre | Psychedelia"], ["Aaron Deer plays psychedelia.", "A psychedelic artist."]),
    ])
    write_webnlg(tmp_path, "test", "Airport", [
        entry("Airport", "Id5", ["Aarhus_Airport | runwayLength | 2776.0"], ["The runway is 2776 m long."]),
    ])
    return tmp_path


# ---------------------------------------------------------------------------------------------
# registry and prompts


def test_generation_tasks_are_registered_with_their_metrics():
    assert set(GENERATION_TASKS) >= {"e2e", "webnlg", "inst-e2e", "inst-webnlg", "inst-sst2", "inst-cola"}
    for name in ("e2e", "webnlg"):
        spec = get_task(name)
        assert spec.is_generation and spec.metrics == ("bleu", "nist", "meteor", "rouge_l", "cider")
        assert spec.primary_metric == "bleu"
    for name in ("inst-e2e", "inst-webnlg", "inst-sst2", "inst-cola"):
        assert get_task(name).primary_metric == "rouge1"
    assert "accuracy" in get_task("inst-sst2").metrics and not get_task("sst2").is_generation
    for name in GENERATION_TASKS:
        assert name in prompts.TEMPLATES


def test_prompts_follow_the_templates():
    assert prompts.render("e2e", mr=MR_A) == MR_A + "\n"
    triples = [("Aaron_Deer", "genre", "Psychedelia"), ("Aaron_Deer", "instrument", "Guitar")]
    assert prompts.linearize_triples(triples) == "Aaron Deer | genre | Psychedelia ; Aaron Deer | instrument | Guitar"
    text = prompts.render("inst-sst2", sentence="a fine film")
    assert "Review: a fine film\n" in text and text.endswith("Answer: ")
    with pytest.raises(FedPeftError, match="no prompt template"):
        prompts.render("sst2", sentence="x")
    with pytest.raises(FedPeftError, match="needs the field 'mr'"):
        prompts.render("e2e", sentence="x")


def test_parse_mr():
    assert parse_mr("name[The Eagle], customer rating[5 out of 5], priceRange[£20-25]") == {
        "name": "The Eagle", "customer rating": "5 out of 5", "priceRange": "£20-25"}
    for bad in ("", "name[Aromi", "name[Aromi] food[Chinese]"):
        with pytest.raises(ValueError):
            parse_mr(bad)


# ---------------------------------------------------------------------------------------------
# E2E


def test_e2e_train_pool_has_one_example_per_reference_and_eval_pool_one_per_mr(e2e_root):
    train, test = load_federation_pools("e2e", e2e_root)
    assert [ex.target for ex in train] == ["Alimentum is in the centre.", "Aromi is a Chinese coffee shop.",
                                           "Alimentum is not for families.", "Bibimbap House serves English food."]
    assert train[0].prompt == MR_A + "\n"
    # references are grouped by MR over the whole file, not just consecutive rows
    assert train[2].references == ("Alimentum is in the centre.", "Alimentum is not for families.")
    assert [ex.group for ex in train] == ["missing", "Chinese", "missing", "English"]
    assert len(test) == 2
    assert test[0] == GenExample(MR_B + "\n", "Aromi serves Chinese food.",
                                 ("Aromi serves Chinese food.", "Try the Chinese coffee shop Aromi."), "Chinese")
    inst = load_gen_examples("inst-e2e", "validation", e2e_root)
    assert inst[0].prompt.endswith(f"Attributes: {MR_B}\nAnswer: ") and inst[0].references == test[0].references


def test_e2e_official_train_file_is_used_when_present(e2e_root):
    (e2e_root / "e2e" / "train-fixed.no-ol.csv").write_text(E2E_HEADER + f'"{MR_C}","Only row.",0,"{MR_C}"\n')
    assert [ex.target for ex in load_gen_examples("e2e", "train", e2e_root)] == ["Only row."]


@pytest.mark.parametrize(
    "body, match",
    [
        ('"name[A]","ok",0\n', r"line 2: expected 4 comma-separated columns but found 3"),
        ('"name[A]","ok",0,"name[A]"\n"name[B","x",0,"name[B]"\n', r"line 3: the MR 'name\[B' is malformed"),
        ('"name[A]","  ",0,"name[A]"\n', r"line 2: the reference text is empty"),
    ],
)
def test_e2e_bad_rows_name_file_and_line(tmp_path, body, match):
    path = tmp_path / "bad.csv"
    path.write_text(E2E_HEADER + body)
    with pytest.raises(FedPeftError, match=match) as info:
        read_e2e_csv(path)
    assert str(path) in str(info.value)


def test_e2e_missing_columns_or_files(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("meaning,text\na,b\n")
    with pytest.raises(FedPeftError, match="no 'mr' and 'ref' columns"):
        read_e2e_csv(path)
    with pytest.raises(FedPeftError, match="does not exist"):
        read_e2e_csv(tmp_path / "nope.csv")
    (tmp_path / "e2e").mkdir()
    with pytest.raises(FedPeftError, match="devel-fixed.no-ol.csv, which is missing"):
        load_gen_examples("e2e", "train", tmp_path)


# ---------------------------------------------------------------------------------------------
# WebNLG


def test_webnlg_pools_categories_and_seen_unseen(webnlg_root):
    train, test = load_federation_pools("webnlg", webnlg_root)
    assert len(train) == 4  # one per (entry, text)
    assert train[0].prompt == "Aarhus Airport | cityServed | Aarhus\n"
    assert train[1].references == ("Aarhus Airport serves Aarhus.", "It serves Aarhus.")
    assert train[3].prompt == "Bacon | course | Main ; Bacon | country | UK\n"  # 2triples after 1triples
    assert [ex.group for ex in test] == ["Airport", "Artist"]  # category files in name order
    assert [webnlg_split_of(ex.group) for ex in test] == ["seen", "unseen"]
    assert test[1].references == ("Aaron Deer plays psychedelia.", "A psychedelic artist.")
    assert load_gen_examples("inst-webnlg", "train", webnlg_root)[0].prompt.startswith("Write a short text")


def test_webnlg_falls_back_to_dev_when_test_is_absent(webnlg_root, caplog):
    import shutil

    shutil.move(webnlg_root / "webnlg/v2.0/en/test", webnlg_root / "webnlg/v2.0/en/dev")
    with caplog.at_level(logging.WARNING, logger="fedpeft.data.nlg_sources"):
        records = read_webnlg_split(webnlg_root, "validation")
    assert len(records) == 2 and "dev set is the evaluation pool" in caplog.text


def test_webnlg_errors_name_file_and_entry(tmp_path):
    write_webnlg(tmp_path, "train", "Food", [entry("Food", "Id9", ["Bacon | course"], ["x"])])
    with pytest.raises(FedPeftError, match=r"Food.xml, entry Id9: the triple 'Bacon \| course'"):
        load_gen_examples("webnlg", "train", tmp_path)
    path = tmp_path / "webnlg/v2.0/en/train/1triples/Food.xml"
    path.write_text('<?xml version="1.0" ?>\n<benchmark><entries>\n<entry>\n</benchmark>\n')
    with pytest.raises(FedPeftError, match=r"Food.xml, line 4, column \d+: not well-formed XML"):
        load_gen_examples("webnlg", "train", tmp_path)
    with pytest.raises(FedPeftError, match="No WebNLG data under"):
        load_gen_examples("webnlg", "train", tmp_path / "webnlg" / "v2.0")


# ---------------------------------------------------------------------------------------------
# hub


def test_hub_rows_convert_to_records():
    pairs, records = nlg_sources.e2e_records_from_hub([
        {"meaning_representation": MR_B, "human_reference": "r1"},
        {"meaning_representation": MR_B, "human_reference": "r2"},
    ])
    assert pairs == [(MR_B, "r1"), (MR_B, "r2")] and records[0].references == ("r1", "r2")
    assert records[0].group == "Chinese"
    def row(triple, texts):
        return {"category": "Artist", "modified_triple_sets": {"mtriple_set": [[triple]]}, "lex": {"text": texts}}

    rows = [row("Aaron_Deer | genre | Psychedelia", ["Aaron Deer plays psychedelia.", ""]),
            row("Aaron_Deer | origin | Indiana", ["From Indiana."]),
            row("Aaron_Deer | genre | Psychedelia", ["A psychedelic artist.", "Aaron Deer plays psychedelia."]),
            row("Aaron_Deer | genre", ["broken triple"])]
    first, second = nlg_sources.webnlg_records_from_hub(rows)
    assert first.source == "Aaron Deer | genre | Psychedelia"
    assert first.references == ("Aaron Deer plays psychedelia.", "A psychedelic artist.")  # rows merged
    assert second.references == ("From Indiana.",)


def test_offline_without_data_dir_says_how_to_work_offline(monkeypatch):
    monkeypatch.delenv("FEDPEFT_DATA_DIR", raising=False)
    monkeypatch.setattr(nlg_sources, "hub_reachable", lambda: False)
    with pytest.raises(FedPeftError, match="Could not load e2e from the Hugging Face hub.*--data-dir"):
        load_gen_examples("e2e", "train")


def test_readers_refuse_the_other_kind_of_task():
    from fedpeft.data.sources import load_examples

    with pytest.raises(FedPeftError, match="not a generation task"):
        load_gen_examples("sst2", "train")
    with pytest.raises(FedPeftError, match="generation task; its examples come from"):
        load_examples("e2e", "train")


# ---------------------------------------------------------------------------------------------
# partitions


def synthetic_pools(n_train=120, n_test=40, groups=("Chinese", "English", "French")):
    def pool(n, tag):
        return [GenExample(f"{tag}{i}\n", f"t{i}", (f"t{i}",), groups[i % len(groups)]) for i in range(n)]

    return {"e2e": (pool(n_train, "tr"), pool(n_test, "te"))}


@pytest.mark.parametrize("partition", ["task", "iid", "dirichlet"])
def test_generation_partitions_are_disjoint_sized_and_seeded(partition):
    pools = synthetic_pools()
    kwargs = dict(train_samples=20, test_samples=6, partition=partition, alpha=5.0)
    fed = partition_pools(["e2e"] * 4, pools, seed=3, **kwargs)
    for split, size in (("train_ids", 20), ("test_ids", 6)):
        ids = [j for c in fed for j in getattr(c, split)]
        assert len(ids) == len(set(ids)) == 4 * size
    assert all(c.train[k] is pools["e2e"][0][j] for c in fed for k, j in enumerate(c.train_ids))
    assert all(c.pool_proportions == () for c in fed)
    again = partition_pools(["e2e"] * 4, pools, seed=3, **kwargs)
    other = partition_pools(["e2e"] * 4, pools, seed=4, **kwargs)
    assert [c.train_ids for c in again] == [c.train_ids for c in fed]
    assert [c.train_ids for c in other] != [c.train_ids for c in fed]


def test_dirichlet_keys_on_group_and_small_alpha_skews_clients():
    pools = synthetic_pools(n_train=600, n_test=60)
    fed = partition_pools(["e2e"] * 3, pools, train_samples=60, test_samples=6, partition="dirichlet", alpha=0.05, seed=0)
    for c in fed:
        top = collections.Counter(ex.group for ex in c.train).most_common(1)[0][1]
        assert top >= 45  # α = 0.05: nearly one group per client
    uniform = partition_pools(["e2e"] * 3, pools, train_samples=60, test_samples=6, partition="task", seed=0)
    assert max(collections.Counter(ex.group for ex in uniform[0].train).values()) < 45


def test_dirichlet_group_shortage_names_the_group():
    pools = synthetic_pools(n_train=30, n_test=30)
    with pytest.raises(FedPeftError, match=r"e2e/train group '\w+': need \d+ .* have 10"):
        partition_pools(["e2e"] * 4, pools, train_samples=10, test_samples=2, partition="dirichlet", alpha=0.01, seed=0)


def test_iid_shortage_is_a_clear_error():
    with pytest.raises(FedPeftError, match=r"e2e/validation: need 60 \(3 clients × 20\), have 40"):
        partition_pools(["e2e"] * 3, synthetic_pools(), train_samples=5, test_samples=20)


def test_mixed_federation_keeps_classification_clients(e2e_root):
    from fedpeft.data.tasks import Example

    pools = {"e2e": load_federation_pools("e2e", e2e_root),
             "demo-sentiment": ([Example(f"s{i}", None, i % 2) for i in range(20)], [Example(f"t{i}", None, i % 2) for i in range(10)])}
    fed = partition_pools(["demo-sentiment", "e2e", "demo-sentiment"], pools, train_samples=2, test_samples=1)
    assert [c.task for c in fed] == ["demo-sentiment", "e2e", "demo-sentiment"]
    assert isinstance(fed[1].train[0], GenExample) and fed[0].pool_proportions == (0.5, 0.5)


# ---------------------------------------------------------------------------------------------
# the real files


def test_real_e2e_and_webnlg_files():
    root = data_dir_or_skip()
    e2e_train, e2e_test = load_federation_pools("e2e", root)
    assert (len(e2e_train), len(e2e_test)) == (4299, 1847)  # dev rows; distinct test MRs
    assert sum(len(ex.references) for ex in e2e_test) == 4693
    assert collections.Counter(ex.group for ex in e2e_test)["Italian"] == 196
    train_records = read_webnlg_split(__import__("pathlib").Path(root), "train")
    test = load_gen_examples("webnlg", "validation", root)
    assert (len(train_records), len(test)) == (6940, 1862)  # the WebNLG 2017 challenge's sizes
    assert {r.group for r in train_records}.isdisjoint(WEBNLG_UNSEEN_CATEGORIES)
    assert {ex.group for ex in test} - {r.group for r in train_records} == WEBNLG_UNSEEN_CATEGORIES
    assert collections.Counter(webnlg_split_of(ex.group) for ex in test) == {"seen": 971, "unseen": 891}
    sst2_train, sst2_test = load_federation_pools("inst-sst2", root)
    assert (len(sst2_train), len(sst2_test)) == (67349, 872)
    assert collections.Counter(ex.target for ex in sst2_test) == {"positive": 444, "negative": 428}
    cola_test = load_gen_examples("inst-cola", "validation", root)
    assert collections.Counter(ex.target for ex in cola_test) == {"acceptable": 721, "unacceptable": 322}
    mrpc_test = load_gen_examples("inst-mrpc", "validation", root)
    assert collections.Counter(ex.target for ex in mrpc_test) == {"yes": 279, "no": 129}
    assert "\nSentence 2: " in mrpc_test[0].prompt and mrpc_test[0].prompt.endswith("\nAnswer: ")
    assert all(" \n" not in ex.prompt for ex in sst2_test)  # sentences are stripped


def test_real_instruction_federation_builds():
    root = data_dir_or_skip()
    tasks = [t for t in ("inst-e2e", "inst-webnlg", "inst-sst2", "inst-cola") for _ in range(2)]
    fed = build_federation(tasks, train_samples=100, test_samples=20, data_dir=root, seed=42)
    assert [len(c.train) for c in fed] == [100] * 8 and [len(c.test) for c in fed] == [20] * 8
    for a, b in zip(fed[::2], fed[1::2]):
        assert not set(a.train_ids) & set(b.train_ids) and not set(a.test_ids) & set(b.test_ids)
    webnlg = build_federation(["webnlg"] * 2, train_samples=200, test_samples=20, data_dir=root,
                              partition="dirichlet", alpha=0.5, seed=1)
    assert all(len(c.train) == 200 for c in webnlg)
