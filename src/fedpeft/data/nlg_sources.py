"""Readers of the generation tasks: E2E NLG (cleaned), WebNLG 2017 and the instruction tasks.

Local layout under a data root (`--data-dir` / `$FEDPEFT_DATA_DIR`, as for GLUE):

- E2E: `ROOT/e2e/devel-fixed.no-ol.csv` and `ROOT/e2e/test-fixed.csv` (tuetschek/e2e-cleaning,
  columns `mr, ref, fixed, orig_mr`). The official cleaned train file is not in the offline data,
  so the **dev set is the train pool** and the test set the evaluation pool; when
  `ROOT/e2e/train-fixed.no-ol.csv` is present it is the train pool instead.
- WebNLG: `ROOT/webnlg/v2.0/en/{train,dev,test}/<N>triples/<Category>.xml` (or the same tree
  directly under `ROOT/webnlg/`); train is the train pool, test (dev when test is absent) the
  evaluation pool. The input is the `modifiedtripleset`; every `lex` text is a reference (empty
  ones are skipped); texts are kept verbatim (the enriched v2.0 release has a few " @ " marks).
- `inst-sst2`, `inst-cola`, `inst-mrpc`: the GLUE files through `sources.load_examples` (train / dev).

Examples (`GenExample`):

- train pool: one example per (input, reference) pair, `target` that reference;
- evaluation pool: one example per distinct input, `target` its first reference, `references` all
  of them. E2E references are grouped by identical MR over the whole file (the cleaned files do
  not keep an MR's rows together; the challenge script groups consecutive rows only).
- `group`: E2E the MR's `food` value ("missing" when the MR has none), WebNLG the category,
  label-word tasks the label word. `webnlg_split_of(category)` says "seen" or "unseen": the
  WebNLG 2017 test set adds 5 categories that train and dev lack (`WEBNLG_UNSEEN_CATEGORIES`).

Without a local root the Hugging Face hub is asked (`TaskSpec.hf_name`): the cleaned E2E release
there has its real train split, which then is the train pool. Files are parsed once per process
(cached on path, modification time and size); a bad file raises `FedPeftError` naming the file and
line or entry.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fedpeft.data import prompts
from fedpeft.data.root import ENV_DATA_DIR, resolve_data_root
from fedpeft.data.sources import load_examples, text_file_errors
from fedpeft.data.tasks import GenExample, TaskSpec, get_task
from fedpeft.errors import FedPeftError
from fedpeft.hub import hub_reachable

logger = logging.getLogger(__name__)

E2E_FILES = {"train": "devel-fixed.no-ol.csv", "validation": "test-fixed.csv"}
E2E_OFFICIAL_TRAIN = "train-fixed.no-ol.csv"
WEBNLG_SPLIT_DIRS = {"train": ("train",), "validation": ("test", "dev")}
WEBNLG_UNSEEN_CATEGORIES = frozenset({"Artist", "Athlete", "CelestialBody", "MeanOfTransportation", "Politician"})
"""Categories of the WebNLG 2017 test set that train and dev do not have (the challenge's "unseen")."""
_GLUE_BASE = {"inst-sst2": "sst2", "inst-cola": "cola", "inst-mrpc": "mrpc"}


@dataclass(frozen=True)
class Record:
    """One input with all its references: an E2E MR or a WebNLG triple set."""

    source: str  # the MR string, or the linearised triples
    references: tuple[str, ...]
    group: str
    triples: tuple[tuple[str, str, str], ...] = ()


def webnlg_split_of(category: str) -> str:
    """"unseen" for the 5 categories only the WebNLG 2017 test set has, else "seen"."""
    return "unseen" if category in WEBNLG_UNSEEN_CATEGORIES else "seen"


# ----------------------------------------------------------------------------------------------
# E2E

_MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


def parse_mr(mr: str) -> dict[str, str]:
    """"name[Alimentum], area[city centre]" → {"name": "Alimentum", "area": "city centre"}.

    Raises ValueError when the string is not a comma-separated list of slot[value] pairs."""
    slots, pos = {}, 0
    while pos < len(mr):
        m = _MR_SLOT.match(mr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"not a slot[value] list at character {pos}: {mr[pos:pos + 30]!r}")
        slots[m.group(1)] = m.group(2).strip()
        pos = m.end()
    if not slots:
        raise ValueError("no slot[value] pair")
    return slots


def _cache_key(path: str | os.PathLike, what: str) -> tuple[str, int, int]:
    """(path, mtime, size): the cached readers re-read a file only when it changed."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise FedPeftError(f"{what} file {path} does not exist; check --data-dir.") from None
    return str(path), stat.st_mtime_ns, stat.st_size


def read_e2e_csv(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """(mr, ref, line) rows of an E2E CSV file with `mr` and `ref` columns, checked."""
    return list(_read_e2e_cached(*_cache_key(path, "E2E")))


@functools.lru_cache(maxsize=8)
def _read_e2e_cached(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str, int], ...]:
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f, text_file_errors(path) as where:
        reader = csv.reader(f)
        where.reader = reader
        header = next(reader, None)
        if header is None:
            raise FedPeftError(f"{path} is empty; it should start with the header mr,ref.")
        index = {name.strip(): i for i, name in enumerate(header)}
        if "mr" not in index or "ref" not in index:
            raise FedPeftError(
                f"{path} has no 'mr' and 'ref' columns in its header (found {', '.join(header)}); "
                "use the E2E CSV layout."
            )
        width = len(header)
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != width:
                raise FedPeftError(
                    f"{path}, line {line}: expected {width} comma-separated columns but found {len(row)}; "
                    "fix or remove that row."
                )
            mr, ref = row[index["mr"]].strip(), row[index["ref"]].strip()
            try:
                parse_mr(mr)
            except ValueError as exc:
                raise FedPeftError(f"{path}, line {line}: the MR {mr[:60]!r} is malformed ({exc}); fix or remove that row.") from None
            if not ref:
                raise FedPeftError(f"{path}, line {line}: the reference text is empty; fix or remove that row.")
            rows.append((mr, ref, line))
    if not rows:
        raise FedPeftError(f"{path} has a header but no rows.")
    return tuple(rows)


def group_e2e(rows) -> list[Record]:
    """One `Record` per distinct MR (first-appearance order) with all its references."""
    refs: dict[str, list[str]] = {}
    for mr, ref, *_ in rows:
        refs.setdefault(mr, []).append(ref)
    return [Record(mr, tuple(r), parse_mr(mr).get("food", "missing")) for mr, r in refs.items()]


# ----------------------------------------------------------------------------------------------
# WebNLG


def read_webnlg_file(path: str | os.PathLike) -> list[Record]:
    """The entries of one WebNLG XML file, one `Record` per entry (group = category)."""
    return list(_read_webnlg_cached(*_cache_key(path, "WebNLG")))


@functools.lru_cache(maxsize=512)
def _read_webnlg_cached(path: str, mtime_ns: int, size: int) -> tuple[Record, ...]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, col = exc.position
        raise FedPeftError(f"{path}, line {line}, column {col}: not well-formed XML; replace the file.") from None
    records = []
    for entry in root.iter("entry"):
        eid = entry.get("eid", "?")
        category = entry.get("category")
        if not category:
            raise FedPeftError(f"{path}, entry {eid}: the entry has no category attribute; fix the entry.")
        triples = []
        for node in entry.findall("modifiedtripleset/mtriple") + entry.findall("modifiedtripleset/otriple"):
            parts = [p.strip() for p in (node.text or "").split("|")]
            if len(parts) != 3 or not all(parts):
                raise FedPeftError(
                    f"{path}, entry {eid}: the triple {node.text!r} is not 'subject | predicate | object'; "
                    "fix the entry."
                )
            triples.append(tuple(parts))
        if not triples:
            raise FedPeftError(f"{path}, entry {eid}: the entry has no modifiedtripleset triples; fix the entry.")
        texts = tuple(t.text.strip() for t in entry.findall("lex/text") if t.text and t.text.strip())
        if not texts:
            logger.debug("%s, entry %s: no reference text; skipped", path, eid)
            continue
        triples = tuple(triples)
        records.append(Record(prompts.linearize_triples(triples), texts, category, triples))
    return tuple(records)


def _webnlg_dir(root: Path) -> Path:
    for candidate in (root / "webnlg" / "v2.0" / "en", root / "webnlg"):
        if (candidate / "train").is_dir():
            return candidate
    raise FedPeftError(
        f"No WebNLG data under {root} (tried {root / 'webnlg/v2.0/en/train'} and {root / 'webnlg/train'}); "
        "add the WebNLG 2017 XML tree there or point --data-dir at a folder that has it."
    )


def read_webnlg_split(root: Path, split: str) -> list[Record]:
    base = _webnlg_dir(root)
    for name in WEBNLG_SPLIT_DIRS[split]:
        folder = base / name
        if folder.is_dir():
            break
    else:
        raise FedPeftError(f"No WebNLG {' or '.join(WEBNLG_SPLIT_DIRS[split])} folder under {base}; add it.")

    def order(p: Path):  # 1triples … 7triples, then category file name
        digits = re.match(r"\d+", p.parent.name)
        return (int(digits.group()) if digits else 0, p.parent.name, p.name)

    files = sorted(folder.glob("*/*.xml"), key=order) + sorted(folder.glob("*.xml"))
    if not files:
        raise FedPeftError(f"The WebNLG folder {folder} holds no XML files; add them.")
    records = [r for f in files for r in read_webnlg_file(f)]
    if split == "validation" and folder.name == "dev":
        logger.warning("WebNLG has no test folder under %s; its dev set is the evaluation pool.", base)
    return records


# ----------------------------------------------------------------------------------------------
# Hub


def _from_hub(spec: TaskSpec, split: str):
    hf_split = {"train": "train", "validation": "test"}[split]
    try:
        if not hub_reachable():
            raise ConnectionError("the hub is unreachable or offline mode is set")
        import datasets  # heavy: imported only when the hub is actually used

        name, config = spec.hf_name
        return datasets.load_dataset(name, config or None, split=hf_split)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:160].rstrip(".") if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise FedPeftError(
            f"Could not load {spec.name} from the Hugging Face hub ({detail}); to work offline, pass "
            f"--data-dir DIR or set {ENV_DATA_DIR}=DIR with DIR holding e2e/ and webnlg/ as described "
            "in the README."
        ) from exc


def e2e_records_from_hub(rows) -> tuple[list[tuple[str, str]], list[Record]]:
    """Hub rows (`meaning_representation`, `human_reference`) → ((mr, ref) pairs, grouped records)."""
    pairs = [(r["meaning_representation"].strip(), r["human_reference"].strip()) for r in rows]
    pairs = [(mr, ref) for mr, ref in pairs if mr and ref]
    return pairs, group_e2e(pairs)


def webnlg_records_from_hub(rows) -> list[Record]:
    """Hub rows of `web_nlg` (`category`, `modified_triple_sets.mtriple_set`, `lex.text`) → records.

    Rows with the same triple set are merged into one record with all their texts: the hub's
    test split does not have one row per entry (4,615 rows for the 1,862 test entries)."""
    merged: dict[str, Record] = {}
    for r in rows:
        triples = tuple(tuple(p.strip() for p in t.split("|")) for t in r["modified_triple_sets"]["mtriple_set"][0])
        texts = tuple(t.strip() for t in r["lex"]["text"] if t and t.strip())
        if not (texts and triples and all(len(t) == 3 and all(t) for t in triples)):
            continue
        source = prompts.linearize_triples(triples)
        if source in merged:
            old = merged[source]
            texts = old.references + tuple(t for t in texts if t not in old.references)
        merged[source] = Record(source, tuple(dict.fromkeys(texts)), r["category"], triples)
    return list(merged.values())


# ----------------------------------------------------------------------------------------------
# Examples and pools


def _records(spec: TaskSpec, split: str, root: Path | None) -> tuple[list[Record], list[tuple[str, str]] | None]:
    """(records, (input, reference) pairs or None when they follow from the records)."""
    if spec.source == "e2e":
        if root is None:
            pairs, records = e2e_records_from_hub(_from_hub(spec, split))
            return records, pairs
        folder = root / "e2e"
        path = folder / E2E_FILES[split]
        if split == "train" and (folder / E2E_OFFICIAL_TRAIN).is_file():
            path = folder / E2E_OFFICIAL_TRAIN
        if not path.is_file():
            raise FedPeftError(
                f"Task {spec.name} needs {path}, which is missing; add the cleaned E2E CSV files "
                f"({', '.join(E2E_FILES.values())}) under {folder}."
            )
        rows = read_e2e_csv(path)
        return group_e2e(rows), [(mr, ref) for mr, ref, _ in rows]
    if spec.source == "webnlg":
        if root is None:
            return webnlg_records_from_hub(_from_hub(spec, split)), None
        return read_webnlg_split(root, split), None
    raise ValueError(f"{spec.name}: no record reader for source {spec.source!r}")


def _prompt(spec: TaskSpec, record: Record) -> str:
    field = "mr" if spec.source == "e2e" else "triples"
    return prompts.render(spec.name, **{field: record.source})


def load_gen_examples(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[GenExample]:
    """`task`'s train pool (`split="train"`) or evaluation pool (`"validation"`) as `GenExample`s."""
    spec = get_task(task)
    if not spec.is_generation:
        raise FedPeftError(f"Task {spec.name} is not a generation task; it has no prompts or references.")
    if split not in ("train", "validation"):
        raise FedPeftError(f"Unknown split {split!r}; use 'train' or 'validation'.")
    if spec.name in _GLUE_BASE:
        words = prompts.LABEL_WORDS[spec.name]
        out = []
        for ex in load_examples(_GLUE_BASE[spec.name], split, data_dir):
            word = words[int(ex.label)]
            fields = {"sentence": ex.text_a.strip()}
            if ex.text_b is not None:
                fields["sentence2"] = ex.text_b.strip()
            out.append(GenExample(prompts.render(spec.name, **fields), word, (word,), word))
        return out
    root = resolve_data_root(data_dir)
    records, pairs = _records(spec, split, root)
    if split == "validation":
        return [GenExample(_prompt(spec, r), r.references[0], r.references, r.group) for r in records]
    by_source = {r.source: r for r in records}
    if pairs is None:
        pairs = [(r.source, ref) for r in records for ref in r.references]
    return [
        GenExample(_prompt(spec, by_source[src]), ref, by_source[src].references, by_source[src].group)
        for src, ref in pairs
    ]


def load_generation_pools(task: str, data_dir: str | os.PathLike | None = None) -> tuple[list[GenExample], list[GenExample]]:
    """(train pool, evaluation pool) of a generation task; see the module docstring."""
    return load_gen_examples(task, "train", data_dir), load_gen_examples(task, "validation", data_dir)
