"""Readers: a task's train or validation split as a list of `Example`s.

Where the data comes from, in order:

1. a demo task (`demo-*`): the TSV files bundled in `fedpeft/data/demo/`, read by the general reader of
   a dataset (`custom.py`) from a small description (`demo_dataset`): its two files, its text and label
   columns, its label names;
2. a local data root, given as `data_dir` or else by the environment variable `FEDPEFT_DATA_DIR`:
   the task folder is `ROOT/glue/<DIR>/` or, for a plain GLUE distribution, `ROOT/<DIR>/`
   (`<DIR>` is the GLUE folder name, e.g. `SST-2`); the train split is `train.tsv`, the
   validation split `dev.tsv` (`dev_matched.tsv` for MNLI);
3. otherwise the Hugging Face hub, through `datasets.load_dataset(*spec.hf_name, split=...)`
   (imported only then). When the hub cannot be reached, a `FedPeftError` says how to work offline.

A local root never falls back to the hub: a task folder missing under it is an error that names
the paths tried. GLUE TSV files are read with `csv.reader(delimiter="\\t", quoting=QUOTE_NONE)`,
columns are found by header name (CoLA has no header and is read by position), and every row is
checked: a row with the wrong number of columns, a label outside the task's label set or an
unparsable score raises a `FedPeftError` naming the file and line. Each file is parsed once per
process (cached on path, modification time and size); the returned `Example`s are shared and
frozen.

`load_classification_pools` returns the (train pool, test pool) pair a federation draws from
(`pools.load_federation_pools` dispatches to it); when a local folder has no train split (e.g. an
offline GLUE copy with only QNLI's dev.tsv) it can carve both pools out of the validation split (see its
docstring for the exact rule). The local root itself is resolved in `root.py`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft.data import custom
from fedpeft.data.root import ENV_DATA_DIR, resolve_data_root
from fedpeft.data.tasks import DEMO_TASKS, Example, TaskSpec, get_task
from fedpeft.errors import FedPeftError
from fedpeft.hub import hub_reachable

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
DEMO_DIR = Path(__file__).resolve().parent / "demo"

CARVE_OUT_TEST_FRACTION = 0.2
"""Share of each class of the validation split that goes to the test pool under `--carve-out`."""
CARVE_OUT_SEED = 0
"""The carve-out is a fixed data split: it does not change with the run seed."""


# ----------------------------------------------------------------------------------------------
# GLUE TSV layouts


@dataclass(frozen=True)
class _Layout:
    """How one task's TSV file is laid out: header names (or column positions when headerless)."""

    text_a: str | int
    text_b: str | int | None
    label: str | int
    label_map: dict[str, int] | None  # None: the label is a float score (regression)
    header: bool = True
    num_columns: int | None = None  # only for headerless files


_BINARY = {"0": 0, "1": 1}
_ENTAILMENT = {"entailment": 0, "not_entailment": 1}

_LAYOUTS: dict[str, _Layout] = {
    "sst2": _Layout("sentence", None, "label", _BINARY),
    "mrpc": _Layout("#1 String", "#2 String", "Quality", _BINARY),
    "cola": _Layout(3, None, 1, _BINARY, header=False, num_columns=4),
    "qnli": _Layout("question", "sentence", "label", _ENTAILMENT),
    "rte": _Layout("sentence1", "sentence2", "label", _ENTAILMENT),
    "wnli": _Layout("sentence1", "sentence2", "label", _BINARY),
    "stsb": _Layout("sentence1", "sentence2", "score", None),
    "qqp": _Layout("question1", "question2", "is_duplicate", _BINARY),
    "mnli": _Layout(
        "sentence1", "sentence2", "gold_label", {"entailment": 0, "neutral": 1, "contradiction": 2}
    ),
}

_GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv"}
_GLUE_FILES_MNLI = {"train": "train.tsv", "validation": "dev_matched.tsv"}

# Hugging Face `glue` dataset: text columns and split names.
_HF_TEXT_FIELDS: dict[str, tuple[str, str | None]] = {
    "sst2": ("sentence", None),
    "cola": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "rte": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
_HF_SPLITS = {"train": "train", "validation": "validation"}
_HF_SPLITS_MNLI = {"train": "train", "validation": "validation_matched"}


def demo_dataset(task: str) -> custom.DatasetSpec:
    """A bundled demo task as a dataset of the general reader: `<task>.train.tsv` and, as its test
    file, `<task>.validation.tsv` (columns text_a, text_b for pairs, and label, the class id)."""
    spec = get_task(task)
    return custom.DatasetSpec(
        name=spec.name, source=str(DEMO_DIR / f"{spec.name}.train.tsv"), kind="classification",
        text_columns=("text_a", "text_b") if spec.is_pair else ("text_a",), label_column="label",
        test_file=str(DEMO_DIR / f"{spec.name}.validation.tsv"),
        label_values=tuple(str(i) for i in range(spec.num_labels)), label_names=spec.label_names, builtin=True)


# ----------------------------------------------------------------------------------------------
# Parsing


def read_task_tsv(task: str, path: str | os.PathLike) -> list[Example]:
    """Parse one TSV file in `task`'s GLUE layout.

    Cached per process on (task, path, modification time, size); a fresh list is returned each
    call, holding shared frozen `Example`s.
    """
    spec = get_task(task)
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise FedPeftError(f"Data file {path} does not exist; check --data-dir.") from None
    return list(_read_cached(spec.name, str(path), stat.st_mtime_ns, stat.st_size))


class _Where:
    reader = None


@contextlib.contextmanager
def text_file_errors(path: str | os.PathLike):
    """Turn what a damaged text data file raises while it is read into one FedPeftError naming the
    file and line: a byte that is not UTF-8 (the line found by rereading the file as bytes), or a
    field longer than Python's csv limit. Set `.reader` on the yielded object to the csv reader."""
    where = _Where()
    try:
        yield where
    except UnicodeDecodeError:
        line, column, byte = first_non_utf8(path)
        raise FedPeftError(f"{path}, line {line}: byte {byte:#04x} (column {column}) is not UTF-8; save the file "
                           "as UTF-8 or fix that line.") from None
    except csv.Error as exc:
        line = where.reader.line_num if where.reader is not None else "?"
        if "field larger than field limit" in str(exc):
            raise FedPeftError(f"{path}, line {line}: a field is longer than {csv.field_size_limit()} characters "
                               "(Python's csv limit); is this the right file? Fix or remove that row.") from None
        raise FedPeftError(f"{path}, line {line}: {exc}; fix or remove that row.") from None


def first_non_utf8(path: str | os.PathLike) -> tuple[int, int, int]:
    """(line, column, byte) of the first byte of `path` that is not UTF-8 (columns count bytes from 1)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                return number, exc.start + 1, raw[exc.start]
    return 0, 0, 0  # pragma: no cover - only called after a decode error


@functools.lru_cache(maxsize=64)
def _read_cached(task: str, path: str, mtime_ns: int, size: int) -> tuple[Example, ...]:
    spec = get_task(task)
    layout = _LAYOUTS[spec.name]
    label_map = layout.label_map
    # utf-8-sig drops the byte-order mark that starts the GLUE MRPC header.
    with open(path, encoding="utf-8-sig", newline="") as f, text_file_errors(path) as where:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        where.reader = reader
        if layout.header:
            header = next(reader, None)
            if header is None:
                raise FedPeftError(f"{path} is empty; it should start with a header row.")
            width = len(header)
            index = {name.strip(): i for i, name in enumerate(header)}

            def col(key: str | int | None) -> int | None:
                if key is None or isinstance(key, int):
                    return key
                if key not in index:
                    raise FedPeftError(
                        f"{path} has no {key!r} column in its header (found {', '.join(header)}); "
                        f"use the original GLUE {spec.glue_dir or spec.name} file layout."
                    )
                return index[key]

            ia, ib, il = col(layout.text_a), col(layout.text_b), col(layout.label)
        else:
            width = layout.num_columns
            ia, ib, il = layout.text_a, layout.text_b, layout.label

        examples = []
        for row in reader:
            if not row:  # a blank line
                continue
            line = reader.line_num
            if len(row) != width:
                raise FedPeftError(
                    f"{path}, line {line}: expected {width} tab-separated columns but found "
                    f"{len(row)}; fix or remove that row."
                )
            raw = row[il].strip()
            if label_map is None:
                try:
                    label: int | float = float(raw)
                except ValueError:
                    label = math.nan
                if not math.isfinite(label):
                    raise FedPeftError(
                        f"{path}, line {line}: the score {raw!r} is not a finite number; "
                        "fix or remove that row."
                    )
            else:
                if raw not in label_map:
                    raise FedPeftError(
                        f"{path}, line {line}: label {raw!r} is not one of "
                        f"{', '.join(label_map)}; fix or remove that row."
                    )
                label = label_map[raw]
            text_b = row[ib] if ib is not None else None
            examples.append(Example(text_a=row[ia], text_b=text_b, label=label))
    return tuple(examples)


# ----------------------------------------------------------------------------------------------
# Resolution


def _task_dir(spec: TaskSpec, root: Path) -> Path:
    tried = [root / "glue" / spec.glue_dir, root / spec.glue_dir]
    for candidate in tried:
        if candidate.is_dir():
            return candidate
    raise FedPeftError(
        f"No {spec.glue_dir} folder for task {spec.name} under {root} "
        f"(tried {tried[0]} and {tried[1]}); add the GLUE {spec.glue_dir} files there "
        f"or point --data-dir / {ENV_DATA_DIR} at a folder that has them."
    )


def _split_file(spec: TaskSpec, split: str, root: Path) -> Path:
    names = _GLUE_FILES_MNLI if spec.name == "mnli" else _GLUE_FILES
    return _task_dir(spec, root) / names[split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FedPeftError(f"Unknown split {split!r}; use 'train' or 'validation'.")


def has_local_split(task: str, split: str, data_dir: str | os.PathLike | None = None) -> bool | None:
    """Whether the local data root has `task`'s `split` file; None when no local root applies."""
    spec = get_task(task)
    _check_split(split)
    if spec.source == "demo":
        return True
    root = resolve_data_root(data_dir)
    if root is None:
        return None
    return _split_file(spec, split, root).is_file()


def load_examples(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Return `task`'s `split` ("train" or "validation") as a list of frozen `Example`s.

    Resolution: a demo task reads its bundled files; otherwise a local root (`data_dir`, else
    `$FEDPEFT_DATA_DIR`) is read in GLUE format; otherwise the Hugging Face hub is asked.
    """
    spec = get_task(task)
    _check_split(split)
    if spec.is_generation:
        raise FedPeftError(
            f"Task {spec.name} is a generation task; its examples come from "
            "fedpeft.data.nlg_sources.load_gen_examples, not load_examples."
        )
    if spec.source == "demo":
        return custom.load_split(demo_dataset(spec.name), split)
    root = resolve_data_root(data_dir)
    if root is None:
        return list(_load_from_hub(spec.name, split))
    path = _split_file(spec, split, root)
    if not path.is_file():
        if split == "train":
            raise FedPeftError(
                f"Task {spec.name} has no train split under {root} ({path} is missing); "
                f"pass --carve-out to split its validation split into disjoint train and test "
                f"pools, or add {path.name} there."
            )
        raise FedPeftError(
            f"Task {spec.name} has no validation split under {root} ({path} is missing); "
            f"add {path.name} there."
        )
    return read_task_tsv(spec.name, path)


@functools.lru_cache(maxsize=32)
def _load_from_hub(task: str, split: str) -> tuple[Example, ...]:
    spec = get_task(task)
    hf_split = (_HF_SPLITS_MNLI if task == "mnli" else _HF_SPLITS)[split]
    try:
        if not hub_reachable():
            raise ConnectionError("the hub is unreachable or offline mode is set")
        import datasets  # heavy: imported only when the hub is actually used

        dataset = datasets.load_dataset(*spec.hf_name, split=hf_split)
    except Exception as exc:  # offline, missing package, unknown config: all mean the same to a user
        detail = str(exc).strip().splitlines()[0][:160].rstrip(".") if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise FedPeftError(
            f"Could not load {task} from the Hugging Face hub ({detail}); to work offline, pass "
            f"--data-dir DIR or set {ENV_DATA_DIR}=DIR with DIR holding GLUE-format task folders "
            f"(DIR/glue/{spec.glue_dir}/train.tsv or DIR/{spec.glue_dir}/train.tsv), or use a "
            f"bundled demo task ({', '.join(DEMO_TASKS)})."
        ) from exc
    field_a, field_b = _HF_TEXT_FIELDS[task]
    examples = []
    for row in dataset:
        label = float(row["label"]) if spec.is_regression else int(row["label"])
        if not spec.is_regression and not 0 <= label < spec.num_labels:
            continue  # unlabelled rows (label -1) carry nothing to train or score on
        text_b = row[field_b] if field_b is not None else None
        examples.append(Example(text_a=row[field_a], text_b=text_b, label=label))
    return tuple(examples)


# ----------------------------------------------------------------------------------------------
# Federation pools and the carve-out


def load_classification_pools(
    task: str,
    data_dir: str | os.PathLike | None = None,
    *,
    carve_out: bool = False,
    seed: int = CARVE_OUT_SEED,
) -> tuple[list[Example], list[Example]]:
    """(train_pool, test_pool) of a classification task (`pools.load_federation_pools` for one).

    Normally the train pool is the train split and the test pool the validation split.

    Carve-out (only when the local folder has no train split and `carve_out` is True): the
    validation split is divided per class. Within each class c with n_c examples, the examples
    are put in a random order drawn from `numpy.random.default_rng([seed, crc32(task)])` (classes
    taken in label order), the first round(0.2 · n_c) (halves rounded up) go to the test pool and
    the rest to the train pool. Both pools keep file order; they are disjoint and together are
    exactly the validation split. A regression task is split the same way without classes. The
    seed defaults to the fixed `CARVE_OUT_SEED`, so the carve-out behaves like a fixed data split
    that does not change with the run seed. A warning is logged whenever the carve-out is used.
    For QNLI dev (2,702 / 2,761) this gives a test pool of 540 / 552 and a train pool of
    2,162 / 2,209 examples.
    """
    spec = get_task(task)
    local_train = has_local_split(spec.name, "train", data_dir)
    if local_train is False and carve_out:
        validation = load_examples(spec.name, "validation", data_dir)
        train_pool, test_pool = carve_out_split(spec, validation, seed=seed)
        logger.warning(
            "Carve-out in use for %s: it has no train split, so its validation split (%d examples) "
            "was split into a train pool of %d and a disjoint test pool of %d; scores are not "
            "comparable with results on the official validation split.",
            spec.name,
            len(validation),
            len(train_pool),
            len(test_pool),
        )
        return train_pool, test_pool
    if carve_out and local_train:
        logger.info("Carve-out not needed for %s: it has a train split.", spec.name)
    return load_examples(spec.name, "train", data_dir), load_examples(spec.name, "validation", data_dir)


def carve_out_split(
    spec: TaskSpec, examples: list[Example], *, seed: int = CARVE_OUT_SEED
) -> tuple[list[Example], list[Example]]:
    """Split `examples` into (train_pool, test_pool) by the carve-out rule of `load_classification_pools`."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    if spec.is_regression:
        groups = [list(range(len(examples)))]
    else:
        groups = [[i for i, ex in enumerate(examples) if ex.label == c] for c in range(spec.num_labels)]
    test_ids: set[int] = set()
    for members in groups:
        n_test = math.floor(CARVE_OUT_TEST_FRACTION * len(members) + 0.5)
        order = rng.permutation(len(members))
        test_ids.update(members[j] for j in order[:n_test])
    train_pool = [ex for i, ex in enumerate(examples) if i not in test_ids]
    test_pool = [ex for i, ex in enumerate(examples) if i in test_ids]
    return train_pool, test_pool
