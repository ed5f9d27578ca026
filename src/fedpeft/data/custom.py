"""Your own data as a task: a CSV, TSV, JSON/JSONL or Parquet file, or a hub dataset, read with `datasets`.

A dataset becomes one task, named after it (the file's stem, or `--dataset-name`). What the task is
follows from its columns, resolved once when a run starts (`resolve_dataset`) and saved in the run's
config.json field by field, so that every process reading those settings (a Flower client, a resumed
run, `fedpeft export`) registers the same task (`register_dataset`) without looking at the file:

- `--label-column` of whole numbers, booleans or strings: classification, classes in sorted order
  (numbers by value) unless `--label-names` gives the order; accuracy, F1 (of class 1 when there are
  two classes, macro-averaged otherwise) and Matthews correlation;
- a label column of floats: regression; Pearson and Spearman;
- `--prompt-column` and `--target-column`: generation (prompt → text, on a decoder); the E2E set of
  text metrics. The prompt is used as it is, with a newline appended when it does not end in
  whitespace; on a chat model it is the user's turn of the chat template (`data/chat.py`).

Test examples come from `--test-file` (for a hub dataset: the name of one of its splits), or else from
a hold-out of `--test-fraction` of the rows, stratified by class (by client with `--client-column`),
drawn from a fixed seed: it does not change with the run seed. With `--client-column` every distinct
value of that column is one client (in sorted order), holding that value's rows.

Reading. `datasets.load_dataset` converts the file once, in chunks, into an Arrow file in its cache
(`HF_DATASETS_CACHE`) and memory-maps it; later runs reuse that file. Only the label and client
columns are read whole (as arrays of ids); an example becomes a Python object when a client is given
it (`ArrowPool`). So a file of millions of rows is never held in memory as rows, let alone twice
(docs/data.md#your-own-data gives the peak memory for a 1 GB file).

Errors name the file, the column that is missing and the columns that exist, or the row (counted from
1 after any header) that cannot be used.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft.data.root import resolve_data_root
from fedpeft.data.tasks import (BUILTIN_TASKS, TEXT_METRICS, Example, GenExample, TaskSpec, get_task,
                                register_task)
from fedpeft.errors import FedPeftError
from fedpeft.hub import hub_reachable

logger = logging.getLogger(__name__)

KINDS = ("classification", "regression", "generation")
FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
           ".jsonl": ("json", {}), ".ndjson": ("json", {}), ".parquet": ("parquet", {}), ".pq": ("parquet", {})}
# CSV/TSV: only an empty field is missing; "NA", "null" or "None" are text like any other.
_CSV_OPTIONS = {"keep_default_na": False, "na_values": [""]}
HOLDOUT_SEED = 0
"""The hold-out is a fixed data split: it does not change with the run seed."""
DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that makes a dataset a task: where it is, which columns mean what, its classes."""

    name: str
    source: str
    """A file path, or a hub id (`owner/name`, `owner/name:config`)."""
    kind: str
    """"classification", "regression" or "generation"."""
    text_columns: tuple[str, ...] = ()
    label_column: str | None = None
    prompt_column: str | None = None
    target_column: str | None = None
    client_column: str | None = None
    test_file: str | None = None
    """A second file of the same columns, or a split of a hub dataset; None: a hold-out."""
    test_fraction: float = DEFAULT_TEST_FRACTION
    label_values: tuple[str, ...] = ()
    """The label column's values (as text) in class-id order."""
    label_names: tuple[str, ...] = ()
    """What each class is called (default: its value)."""
    builtin: bool = False
    """A bundled task described through this reader (the demo tasks): registered already."""

    @property
    def is_hub(self) -> bool:
        return _is_hub_id(self.source)

    def task_spec(self) -> TaskSpec:
        if self.kind == "generation":
            return TaskSpec(name=self.name, glue_dir="", num_labels=0, label_names=(), metrics=TEXT_METRICS,
                            primary_metric=TEXT_METRICS[0], is_regression=False, hf_name=("", ""),
                            source="custom", kind="generation", chat=True)
        if self.kind == "regression":
            metrics = ("pearson", "spearman")
            return TaskSpec(name=self.name, glue_dir="", num_labels=1, label_names=("score",), metrics=metrics,
                            primary_metric=metrics[0], is_regression=True, hf_name=("", ""), source="custom",
                            pair=len(self.text_columns) == 2)
        names = self.label_names or self.label_values
        metrics = ("accuracy", "f1" if len(names) == 2 else "f1_macro", "matthews")
        return TaskSpec(name=self.name, glue_dir="", num_labels=len(names), label_names=tuple(names),
                        metrics=metrics, primary_metric="accuracy", is_regression=False, hf_name=("", ""),
                        source="custom", pair=len(self.text_columns) == 2)


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> None:
    """Make `spec` a task of this process (replacing an earlier dataset of the same name)."""
    if not spec.builtin:
        register_task(spec.task_spec())
    _DATASETS[spec.name] = spec


def dataset_of(task: str) -> DatasetSpec | None:
    """The dataset behind `task`, or None for a task with its own reader (GLUE, E2E, WebNLG)."""
    return _DATASETS.get(get_task(task).name)


# ----------------------------------------------------------------------------------------------
# Files and the hub


def _is_hub_id(source: str) -> bool:
    """A hub id has no file suffix we read and is not a path that exists."""
    if Path(source).suffix.lower() in FORMATS or os.path.exists(source) or source.startswith((".", "/", "~")):
        return False
    name = source.split(":", 1)[0]
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name))


def default_name(source: str) -> str:
    """The task name of a dataset: the file's stem or the hub id's last part, lower case, [a-z0-9_-]."""
    base = source.split(":", 1)[0].rstrip("/").split("/")[-1] if _is_hub_id(source) else Path(source).stem
    return re.sub(r"[^a-z0-9_-]+", "-", base.lower()).strip("-") or "dataset"


def find_file(path: str, data_dir: str | os.PathLike | None, what: str = "--dataset") -> Path:
    """The file `path` names: as given (a relative path from the working folder), else under the data
    root (a relative path, or an absolute one's file name: a Flower node keeps the file there)."""
    p = Path(path).expanduser()
    tried = [p]
    if not p.is_file():
        root = resolve_data_root(data_dir)
        if root is not None:
            tried.append(root / (p.name if p.is_absolute() else p))
    for candidate in tried:
        if candidate.is_file():
            return candidate
    if p.suffix.lower() not in FORMATS:
        raise FedPeftError(f"{what} {path}: no such file, and not a hub dataset id; give a .csv, .tsv, .json, "
                           ".jsonl or .parquet file")
    raise FedPeftError(f"{what} {path} does not exist (tried {', '.join(str(t) for t in tried)}); "
                       "check the path")


def absolute_if_here(path: str) -> str:
    """`path` made absolute when it names a file from the working folder; as given otherwise (a hub id,
    a file under the data root)."""
    p = Path(path).expanduser()
    return str(p.resolve()) if not _is_hub_id(path) and not p.is_absolute() and p.is_file() else path


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _cache_dir() -> str | None:
    return os.environ.get("HF_DATASETS_CACHE") or None


def _first_line(exc: BaseException) -> str:
    """The parser's own complaint: `datasets` wraps it in a DatasetGenerationError."""
    while type(exc).__name__ == "DatasetGenerationError" and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@functools.lru_cache(maxsize=8)
def _read_file(path: str, mtime_ns: int, size: int):
    builder, options = FORMATS[Path(path).suffix.lower()]
    if builder == "csv":
        options = {**options, **_CSV_OPTIONS}
    datasets = _datasets()
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=_cache_dir(), **options)
    except Exception as exc:  # a parser's error, whatever the format: say which file
        raise FedPeftError(f"cannot read {path} as {Path(path).suffix.lstrip('.').upper()} ({_first_line(exc)}); "
                           "fix the file or give it the suffix of its format") from None


def read_file(path: Path):
    """The file as a memory-mapped `datasets.Dataset`, converted once per file version."""
    stat = path.stat()
    return _read_file(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def read_hub(source: str, split: str | None):
    """Split `split` of a hub dataset (`id` or `id:config`); None: its train split (or its only one)."""
    name, _, config = source.partition(":")
    try:
        if not hub_reachable():
            raise ConnectionError("the hub is unreachable or offline mode is set")
        datasets = _datasets()
        splits = datasets.load_dataset(name, config or None, cache_dir=_cache_dir())
    except Exception as exc:
        raise FedPeftError(f"could not load the hub dataset {source!r} ({_first_line(exc)}); to work offline, "
                           "give --dataset a local .csv, .tsv, .json, .jsonl or .parquet file") from None
    if split is None:
        split = "train" if "train" in splits else (next(iter(splits)) if len(splits) == 1 else None)
        if split is None:
            raise FedPeftError(f"the hub dataset {source!r} has no train split (it has {', '.join(splits)}); "
                               "it cannot be used as training data")
    if split not in splits:
        raise FedPeftError(f"the hub dataset {source!r} has no split {split!r} (it has {', '.join(splits)}); "
                           "give --test-file one of them")
    return splits[split]


def _tables(spec: DatasetSpec, data_dir) -> tuple[object, str, object | None, str | None]:
    """(train dataset, its name for messages, test dataset or None, its name)."""
    if spec.is_hub:
        train = read_hub(spec.source, None)
        test = read_hub(spec.source, spec.test_file) if spec.test_file else None
        return train, f"the hub dataset {spec.source}", test, f"split {spec.test_file} of {spec.source}"
    path = find_file(spec.source, data_dir)
    train = read_file(path)
    if spec.test_file is None:
        return train, str(path), None, None
    test_path = find_file(spec.test_file, data_dir, "--test-file")
    return train, str(path), read_file(test_path), str(test_path)


# ----------------------------------------------------------------------------------------------
# Columns


def _need_columns(ds, where: str, columns: Sequence[str | None], flags: Sequence[str]) -> None:
    have = list(ds.column_names)
    for col, flag in zip(columns, flags):
        if col is not None and col not in have:
            raise FedPeftError(f"{where} has no column {col!r} (its columns: {', '.join(have)}); "
                               f"give {flag} one of them")


def _column(ds, name: str):
    return ds.data.column(name)


def _first_null(column) -> int | None:
    if column.null_count == 0:
        return None
    import pyarrow.compute as pc

    return int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])


def _check_no_nulls(ds, where: str, columns: Sequence[str]) -> None:
    for col in columns:
        row = _first_null(_column(ds, col))
        if row is not None:
            raise FedPeftError(f"{where}, row {row + 1}: the column {col!r} is empty; fill or remove that row "
                               "(rows are counted from 1 after the header)")


def _as_text(column):
    """A column as strings, the form label and client values are compared in."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)
    return column if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) else pc.cast(column, pa.string())


def _sorted_values(column) -> list[str]:
    """Distinct values in sorted order (numbers by value), as text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = sorted(v for v in pc.unique(column).to_pylist() if v is not None)
    return _as_text(pa.chunked_array([pa.array(values)])).to_pylist() if values else []


def _ids_of(column, values: Sequence[str]) -> np.ndarray:
    """The position of every row's value in `values` (-1 where it is not there)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pc.index_in(_as_text(column), value_set=pa.array(list(values), type=pa.string()))
    return pc.fill_null(ids, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _class_label(ds, column: str):
    """The `datasets.ClassLabel` feature of `column`, or None."""
    feature = ds.features.get(column)
    return feature if type(feature).__name__ == "ClassLabel" else None


def _label_kind(ds, column: str, where: str) -> str:
    import pyarrow as pa

    if _class_label(ds, column) is not None:
        return "classification"
    typ = _column(ds, column).type
    if pa.types.is_floating(typ):
        return "regression"
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "classification"
    raise FedPeftError(f"{where}: the label column {column!r} holds {typ}, neither classes (whole numbers, "
                       "booleans, strings) nor scores (floats); give --label-column another column")


# ----------------------------------------------------------------------------------------------
# Resolution: the settings of a run → a DatasetSpec and its number of clients


def resolve_dataset(source: str, *, name: str | None = None, text_columns: Sequence[str] = (),
                    label_column: str | None = None, prompt_column: str | None = None,
                    target_column: str | None = None, client_column: str | None = None,
                    test_file: str | None = None, test_fraction: float = DEFAULT_TEST_FRACTION,
                    label_kind: str = "auto", label_names: Sequence[str] = (),
                    data_dir: str | os.PathLike | None = None) -> tuple[DatasetSpec, int]:
    """Read the dataset's columns and decide what task it is: (its spec, its number of clients by
    `client_column`, 0 without one). Registers the task."""
    name = name or default_name(source)
    if name in BUILTIN_TASKS:
        raise FedPeftError(f"the dataset's task name {name!r} is a built-in task: give it another name with "
                           "--dataset-name")
    probe = DatasetSpec(name=name, source=source, kind="classification", test_file=test_file)
    train, where, _, _ = _tables(probe, data_dir)  # the test file is checked with the pools, below
    columns = list(train.column_names)
    if prompt_column or target_column:
        if not (prompt_column and target_column):
            raise FedPeftError("a generation dataset needs both --prompt-column and --target-column")
        if text_columns or label_column:
            raise FedPeftError("--prompt-column/--target-column (generation) and --text-columns/--label-column "
                               "(classification, regression) do not go together: give one pair")
        kind = "generation"
        text_columns = ()
        _need_columns(train, where, (prompt_column, target_column), ("--prompt-column", "--target-column"))
    else:
        if not text_columns:
            text_columns = next((c for c in (("text",), ("sentence",), ("sentence1", "sentence2"))
                                 if all(x in columns for x in c)), None)
            if text_columns is None:
                raise FedPeftError(f"{where} has no column 'text' (its columns: {', '.join(columns)}); give "
                                   "--text-columns one or two of them (or --prompt-column and --target-column "
                                   "for generation)")
        if len(text_columns) > 2:
            raise FedPeftError(f"--text-columns takes one or two columns, got {len(text_columns)}")
        if label_column is None:
            if "label" not in columns:
                raise FedPeftError(f"{where} has no column 'label' (its columns: {', '.join(columns)}); give "
                                   "--label-column one of them")
            label_column = "label"
        _need_columns(train, where, (*text_columns, label_column), ("--text-columns",) * len(text_columns) +
                      ("--label-column",))
        found = _label_kind(train, label_column, where)
        kind = found if label_kind == "auto" else label_kind
        if kind == "generation":
            raise FedPeftError("--label-kind generation needs --prompt-column and --target-column")
    _need_columns(train, where, (client_column,), ("--client-column",))
    values: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    if kind == "classification":
        feature = _class_label(train, label_column)
        if feature is not None:
            values = tuple(str(i) for i in range(feature.num_classes))
            names = tuple(feature.names)
        else:
            _check_no_nulls(train, where, [label_column])
            values = tuple(_sorted_values(_column(train, label_column)))
        if label_names:
            label_names = tuple(str(v) for v in label_names)
            if feature is not None:
                raise FedPeftError(f"{where}: the column {label_column!r} names its classes already "
                                   f"({', '.join(names)}); leave out --label-names")
            missing = [v for v in values if v not in label_names]
            if missing:
                raise FedPeftError(f"{where}: the column {label_column!r} has the value {missing[0]!r}, which "
                                   f"--label-names ({', '.join(label_names)}) does not list; list every value")
            values = label_names
        if len(values) < 2:
            raise FedPeftError(f"{where}: the label column {label_column!r} has {len(values)} distinct value(s); "
                               "classification needs two or more")
        if len(values) > 100:
            logger.warning("%s: the label column %r has %d distinct values, each a class; if it is a score, "
                           "give --label-kind regression", where, label_column, len(values))
    elif label_names:
        raise FedPeftError(f"--label-names applies to classification; this dataset is {kind}")
    spec = DatasetSpec(name=name, source=source, kind=kind, text_columns=tuple(text_columns),
                       label_column=label_column if kind != "generation" else None,
                       prompt_column=prompt_column, target_column=target_column, client_column=client_column,
                       test_file=test_file, test_fraction=test_fraction, label_values=values,
                       label_names=names)
    register_dataset(spec)
    train_pool, _ = load_pools(spec, data_dir)
    n_clients = train_pool.num_clients if client_column else 0
    logger.info("dataset %s: %s task %r%s", where, kind, name,
                f" with classes {', '.join(spec.task_spec().label_names)}" if kind == "classification" else "")
    return spec, n_clients


# ----------------------------------------------------------------------------------------------
# Pools


class ArrowPool(Sequence):
    """Some rows of a memory-mapped dataset as a sequence of `Example`s (or `GenExample`s), made when
    they are asked for. `label_ids` (classification) and `client_ids` are arrays over the pool, so a
    partition needs no example to group the rows."""

    def __init__(self, spec: DatasetSpec, dataset, rows: np.ndarray, labels: np.ndarray | None,
                 client_ids: np.ndarray | None, client_values: tuple[str, ...] = ()):
        self.spec = spec
        self.dataset = dataset
        self.rows = rows
        self.labels = labels
        self.client_ids = client_ids
        self.client_values = client_values

    @property
    def label_ids(self) -> np.ndarray | None:
        return self.labels if self.spec.kind == "classification" else None

    @property
    def num_clients(self) -> int:
        return len(self.client_values)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.take(range(*j.indices(len(self))))
        n = len(self)
        if not -n <= j < n:
            raise IndexError(j)
        return self.take([j])[0]

    def __iter__(self):
        for start in range(0, len(self), 4096):
            yield from self.take(range(start, min(start + 4096, len(self))))

    def subset(self, positions) -> "ArrowPool":
        """The pool's examples at `positions`, as a pool."""
        p = np.asarray(positions, dtype=np.int64)
        return ArrowPool(self.spec, self.dataset, self.rows[p], None if self.labels is None else self.labels[p],
                         None if self.client_ids is None else self.client_ids[p], self.client_values)

    def take(self, positions) -> list:
        """The examples at `positions`, in that order (one gather from the Arrow file)."""
        p = np.asarray(list(positions) if not isinstance(positions, np.ndarray) else positions, dtype=np.int64)
        if len(p) == 0:
            return []
        spec = self.spec
        batch = self.dataset[self.rows[p].tolist()]  # datasets gathers the rows from the Arrow file
        if spec.kind == "generation":
            prompts, targets = batch[spec.prompt_column], batch[spec.target_column]
            return [GenExample(format_prompt(str(pr)), str(tg), (str(tg),)) for pr, tg in zip(prompts, targets)]
        text_a = batch[spec.text_columns[0]]
        text_b = batch[spec.text_columns[1]] if len(spec.text_columns) == 2 else [None] * len(p)
        labels = self.labels[p]
        cast = float if spec.kind == "regression" else int
        return [Example(str(a), None if b is None else str(b), cast(y)) for a, b, y in zip(text_a, text_b, labels)]


def format_prompt(prompt: str) -> str:
    """A dataset's prompt as a plain LM continues it: ended by a newline unless it ends in whitespace."""
    return prompt if not prompt or prompt[-1].isspace() else prompt + "\n"


def _labels(spec: DatasetSpec, ds, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels of the usable rows, those rows): class ids or scores. Hub rows labelled -1 (unlabelled)
    are left out; any other row without a usable label is an error naming it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = ds.num_rows
    if spec.kind == "generation":
        _check_no_nulls(ds, where, [spec.prompt_column, spec.target_column])
        return np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    _check_no_nulls(ds, where, [*spec.text_columns, spec.label_column])
    column = _column(ds, spec.label_column)
    if spec.kind == "regression":
        try:
            scores = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            texts = _as_text(column).to_pylist()
            bad = next(i for i, v in enumerate(texts) if not _is_number(v))
            raise FedPeftError(f"{where}, row {bad + 1}: the score {texts[bad]!r} in column {spec.label_column!r} "
                               "is not a number; fix or remove that row") from None
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            raise FedPeftError(f"{where}, row {bad[0] + 1}: the score in column {spec.label_column!r} is not a "
                               "finite number; fix or remove that row")
        return scores.astype(np.float32), np.arange(n, dtype=np.int64)
    if _class_label(ds, spec.label_column) is not None:
        ids = pc.fill_null(column, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        keep = np.flatnonzero(ids >= 0)  # the hub's unlabelled rows (-1) carry nothing to train or score on
        return ids[keep], keep
    ids = _ids_of(column, spec.label_values)
    bad = np.flatnonzero(ids < 0)
    if len(bad):
        value = _as_text(column)[int(bad[0])].as_py()
        raise FedPeftError(f"{where}, row {bad[0] + 1}: the label {value!r} is not one of the classes "
                           f"({', '.join(spec.label_values)}) of the training data; fix or remove that row")
    return ids, np.arange(n, dtype=np.int64)


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def holdout_mask(groups: np.ndarray, fraction: float, seed_words: Sequence[int]) -> np.ndarray:
    """True for the rows held out as test data: within every group of n rows, round(fraction · n) of
    them (at least 1 and at most n − 1 when n ≥ 2; none from a group of one row), drawn in a random
    order from `numpy.random.default_rng(seed_words)`."""
    n = len(groups)
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    rng = np.random.default_rng(list(seed_words))
    order = rng.permutation(n)
    by_group = order[np.argsort(groups[order], kind="stable")]
    g = groups[by_group]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    counts = np.diff(np.r_[starts, n])
    k = np.floor(fraction * counts + 0.5).astype(np.int64)
    k = np.where(counts >= 2, np.clip(k, 1, counts - 1), 0)
    rank = np.arange(n) - np.repeat(starts, counts)
    mask[by_group[rank < np.repeat(k, counts)]] = True
    return mask


def load_pools(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> tuple[ArrowPool, ArrowPool]:
    """(train pool, test pool) of a dataset, as the module docstring says (cached per file version)."""
    if spec.is_hub:
        return _pools(spec, None, None)
    path = find_file(spec.source, data_dir)
    stamp = [str(path), path.stat().st_mtime_ns]
    if spec.test_file:
        test_path = find_file(spec.test_file, data_dir, "--test-file")
        stamp += [str(test_path), test_path.stat().st_mtime_ns]
    return _pools(spec, str(data_dir) if data_dir else None, tuple(stamp))


@functools.lru_cache(maxsize=4)
def _pools(spec: DatasetSpec, data_dir: str | None, stamp) -> tuple[ArrowPool, ArrowPool]:
    train, where, test, test_where = _tables(spec, data_dir)
    flags = {**{c: "--text-columns" for c in spec.text_columns}, spec.label_column: "--label-column",
             spec.prompt_column: "--prompt-column", spec.target_column: "--target-column"}
    keep_columns = [c for c in flags if c is not None]
    train_labels, train_rows = _labels(spec, train, where)
    if test is not None:
        _need_columns(test, test_where, keep_columns, [flags[c] for c in keep_columns])
        if spec.client_column and spec.client_column not in test.column_names:
            raise FedPeftError(f"{test_where} has no column {spec.client_column!r} (its columns: "
                               f"{', '.join(test.column_names)}); with --client-column every test row must "
                               "say which client it belongs to")
        test_labels, test_rows = _labels(spec, test, test_where)
    client_values: tuple[str, ...] = ()
    train_clients = test_clients = None
    if spec.client_column:
        _check_no_nulls(train, where, [spec.client_column])
        column = _column(train, spec.client_column)
        client_values = tuple(_sorted_values(column))
        train_clients = _ids_of(column, client_values)[train_rows]
        if test is not None:
            _check_no_nulls(test, test_where, [spec.client_column])
            test_clients = _ids_of(_column(test, spec.client_column), client_values)[test_rows]
    if test is None:
        if spec.client_column:
            groups = train_clients
        elif spec.kind == "classification":
            groups = train_labels
        else:
            groups = np.zeros(len(train_rows), dtype=np.int64)
        held = holdout_mask(groups, spec.test_fraction, (HOLDOUT_SEED, zlib.crc32(spec.name.encode())))
        test, test_rows, test_labels = train, train_rows[held], train_labels[held]
        test_clients = None if train_clients is None else train_clients[held]
        train_rows, train_labels = train_rows[~held], train_labels[~held]
        train_clients = None if train_clients is None else train_clients[~held]
    if spec.client_column:  # a client needs a training and a test example; others are left out
        n_train = np.bincount(train_clients[train_clients >= 0], minlength=len(client_values))
        n_test = np.bincount(test_clients[test_clients >= 0], minlength=len(client_values))
        usable = np.flatnonzero((n_train > 0) & (n_test > 0))
        if len(usable) < len(client_values):
            dropped = [client_values[i] for i in np.flatnonzero((n_train == 0) | (n_test == 0))]
            logger.warning("%s: %d value(s) of %r have no training or no test row and are not clients: %s",
                           where, len(dropped), spec.client_column, ", ".join(dropped[:10]) +
                           (", …" if len(dropped) > 10 else ""))
        if len(usable) == 0:
            raise FedPeftError(f"{where}: no value of the column {spec.client_column!r} has both a training and "
                               "a test row, so there is no client; check --client-column and --test-file")
        remap = np.full(len(client_values), -1, dtype=np.int64)
        remap[usable] = np.arange(len(usable))
        client_values = tuple(client_values[i] for i in usable)
        train_clients = np.where(train_clients >= 0, remap[np.maximum(train_clients, 0)], -1)
        test_clients = np.where(test_clients >= 0, remap[np.maximum(test_clients, 0)], -1)
        tr, te = train_clients >= 0, test_clients >= 0
        train_rows, train_labels, train_clients = train_rows[tr], train_labels[tr], train_clients[tr]
        test_rows, test_labels, test_clients = test_rows[te], test_labels[te], test_clients[te]
    train_ds = train.select_columns(keep_columns)
    test_ds = train_ds if test is train else test.select_columns(keep_columns)
    return (ArrowPool(spec, train_ds, train_rows, train_labels, train_clients, client_values),
            ArrowPool(spec, test_ds, test_rows, test_labels, test_clients, client_values))


def describe(spec: DatasetSpec, data_dir=None) -> str:
    """One line for the run's log: the task, its classes, its rows and its clients."""
    train, test = load_pools(spec, data_dir)
    what = spec.kind
    if spec.kind == "classification":
        what += " (" + ", ".join(spec.task_spec().label_names) + ")"
    line = (f"dataset {spec.source} is the {what} task {spec.name}: {len(train)} training and {len(test)} test "
            f"rows ({'from ' + spec.test_file if spec.test_file else f'a {spec.test_fraction:.0%} hold-out'})")
    if spec.client_column:
        shown = ", ".join(f"{k} ← {v}" for k, v in enumerate(train.client_values[:8]))
        line += f"; clients by {spec.client_column!r}: {shown}{', …' if train.num_clients > 8 else ''}"
    return line


def load_split(spec: DatasetSpec, split: str, data_dir=None) -> list:
    """Every example of the train pool (`split="train"`) or the test pool (`"validation"`), as a list."""
    train, test = load_pools(spec, data_dir)
    return list(train if split == "train" else test)
