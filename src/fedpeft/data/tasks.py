"""The task registry: what each task is, how it is labelled and how it is scored.

A `TaskSpec` is plain data. Readers (`sources.py`) turn a task's files into `Example`s, the
partitioner (`partition/`) hands them to clients, and `metrics.py` scores predictions with the
metrics listed here. Label ids follow GLUE and the Hugging Face `glue` dataset, so a model trained
on local TSV files and one trained on the hub data agree on what label 0 means.

GLUE tasks: sst2, mrpc, qnli, qqp, mnli, rte, cola, stsb, wnli. The bundled demo tasks
(`demo-sentiment`, `demo-topic`, `demo-question`, `demo-paraphrase`) are synthetic text written for
fedpeft (see `fedpeft/data/demo/README.md`); they are not a benchmark.

Generation tasks (`kind="generation"`, examples are `GenExample`s, readers in `nlg_sources.py`,
prompts in `prompts.py`, metrics in `nlg_metrics.py`):

- `e2e`: E2E NLG, cleaned release (MR → restaurant description); `webnlg`: WebNLG 2017 (DBpedia
  triples → text). Both report BLEU, NIST, METEOR, ROUGE-L and CIDEr as the E2E challenge does.
- An instruction-task federation built from the local data (one task per client group):
  `inst-e2e` (MR → text), `inst-webnlg` (triples → text), `inst-sst2` (sentiment, answer
  "positive"/"negative") and `inst-cola` (acceptability, answer "acceptable"/"unacceptable").
  They report ROUGE-1 (as FedLEASE/FedDPA do for instruction tasks), plus BLEU for the two text
  tasks and accuracy (normalised exact match) for the label-word tasks. `inst-mrpc` (paraphrase,
  answer "yes"/"no") is a fifth to swap in.

A dataset of the user's (`--dataset`, `data/custom.py`) becomes a task at run time: its spec is made
from the run's resolved settings and added with `register_task`, so every process that reads those
settings knows it by name. Instruction tasks (`chat=True`: the `inst-*` tasks and a prompt/target
dataset) put their prompt in a user turn of the tokenizer's chat template on a chat model
(`data/chat.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.errors import FedPeftError


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its data lives, its labels and the metrics it is reported with."""

    name: str
    """Registry name, e.g. "sst2" or "demo-topic"."""
    glue_dir: str
    """Folder name in a GLUE-format distribution, e.g. "SST-2" (empty for demo tasks)."""
    num_labels: int
    """Number of classes; 1 for a regression task (stsb)."""
    label_names: tuple[str, ...]
    """Name of each label id, in id order (for stsb: the single output, "score")."""
    metrics: tuple[str, ...]
    """Every metric reported for the task, primary first."""
    primary_metric: str
    """The metric that stands for the task in averages."""
    is_regression: bool
    """True when labels are floats (stsb)."""
    hf_name: tuple[str, str]
    """`datasets.load_dataset(*hf_name)` arguments; ("", "") for demo tasks."""
    source: str = "glue"
    """"glue" or "demo" (generation tasks name their own source, e.g. "e2e")."""
    kind: str = "classification"
    """"classification" (labels, a head) or "generation" (prompt → text, a causal LM, `GenExample`s)."""
    pair: bool = False
    """Examples are sentence pairs (a dataset of the user's with two text columns; GLUE pairs are listed below)."""
    chat: bool = False
    """An instruction task: on a chat model the prompt is a user turn of the tokenizer's chat template."""

    @property
    def is_generation(self) -> bool:
        return self.kind == "generation"

    @property
    def is_pair(self) -> bool:
        """True when examples are sentence pairs (text_b is set)."""
        return self.pair or self.name in _PAIR_TASKS


@dataclass(frozen=True)
class Example:
    """One labelled example. `text_b` is None for single-sentence tasks.

    Frozen: loaded examples are cached and shared between callers, so they must not be mutated.
    """

    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class GenExample:
    """One generation example: the prompt (already formatted by the task's template), the training
    target (without EOS; the tokenizer side appends it), and every reference the metrics compare a
    hypothesis with (E2E and WebNLG have several per input; `target` is one of them).
    `group` is what a partition may key on (E2E: the MR's `food` value; WebNLG: the category) and
    what a report may split on (WebNLG seen/unseen)."""

    prompt: str
    target: str
    references: tuple[str, ...]
    group: str | None = None


def _glue(name, glue_dir, label_names, metrics, hf_config=None, regression=False) -> TaskSpec:
    return TaskSpec(
        name=name,
        glue_dir=glue_dir,
        num_labels=1 if regression else len(label_names),
        label_names=tuple(label_names),
        metrics=tuple(metrics),
        primary_metric=metrics[0],
        is_regression=regression,
        hf_name=("glue", hf_config or name),
        source="glue",
    )


def _demo(name, label_names) -> TaskSpec:
    return TaskSpec(
        name=name,
        glue_dir="",
        num_labels=len(label_names),
        label_names=tuple(label_names),
        metrics=("accuracy",),
        primary_metric="accuracy",
        is_regression=False,
        hf_name=("", ""),
        source="demo",
    )


_SPECS = [
    _glue("sst2", "SST-2", ("negative", "positive"), ("accuracy",)),
    # FedLEASE reports accuracy for MRPC and QQP; F1 of the positive class is reported as well.
    _glue("mrpc", "MRPC", ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    _glue("qnli", "QNLI", ("entailment", "not_entailment"), ("accuracy",)),
    _glue("qqp", "QQP", ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    # MNLI is scored on its matched validation split.
    _glue("mnli", "MNLI", ("entailment", "neutral", "contradiction"), ("accuracy",)),
    _glue("rte", "RTE", ("entailment", "not_entailment"), ("accuracy",)),
    _glue("cola", "CoLA", ("unacceptable", "acceptable"), ("matthews", "accuracy")),
    # Accuracy is undefined for a regression task, so STS-B reports correlations only.
    _glue("stsb", "STS-B", ("score",), ("pearson", "spearman"), regression=True),
    _glue("wnli", "WNLI", ("not_entailment", "entailment"), ("accuracy",)),
    _demo("demo-sentiment", ("negative", "positive")),
    _demo("demo-topic", ("sport", "science", "cooking", "travel")),
    _demo("demo-question", ("not_answered", "answered")),
    _demo("demo-paraphrase", ("different", "paraphrase")),
]

_TEXT_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")  # the E2E challenge's five


def _gen(name, metrics, source, hf_name=("", "")) -> TaskSpec:
    return TaskSpec(
        chat=name.startswith("inst-"),
        name=name,
        glue_dir="",
        num_labels=0,
        label_names=(),
        metrics=tuple(metrics),
        primary_metric=metrics[0],
        is_regression=False,
        hf_name=hf_name,
        source=source,
        kind="generation",
    )


_SPECS += [
    # Hub ids are used only when no local data root is given (see nlg_sources.py).
    _gen("e2e", _TEXT_METRICS, "e2e", ("tuetschek/e2e_nlg_cleaned", "")),
    _gen("webnlg", _TEXT_METRICS, "webnlg", ("webnlg-challenge/web_nlg", "webnlg_challenge_2017")),
    _gen("inst-e2e", ("rouge1", "bleu"), "e2e", ("tuetschek/e2e_nlg_cleaned", "")),
    _gen("inst-webnlg", ("rouge1", "bleu"), "webnlg", ("webnlg-challenge/web_nlg", "webnlg_challenge_2017")),
    _gen("inst-sst2", ("rouge1", "accuracy"), "glue", ("glue", "sst2")),
    _gen("inst-cola", ("rouge1", "accuracy"), "glue", ("glue", "cola")),
    _gen("inst-mrpc", ("rouge1", "accuracy"), "glue", ("glue", "mrpc")),
]

_PAIR_TASKS = frozenset(
    {"mrpc", "qnli", "qqp", "mnli", "rte", "stsb", "wnli", "demo-question", "demo-paraphrase"}
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
BUILTIN_TASKS: frozenset[str] = frozenset(TASKS)
TEXT_METRICS = _TEXT_METRICS
GLUE_TASKS: tuple[str, ...] = tuple(s.name for s in _SPECS if s.source == "glue" and not s.is_generation)
DEMO_TASKS: tuple[str, ...] = tuple(s.name for s in _SPECS if s.source == "demo")
GENERATION_TASKS: tuple[str, ...] = tuple(s.name for s in _SPECS if s.is_generation)


def is_generation_run(settings: dict) -> bool:
    """Do a run's saved settings (config.json) describe generation tasks, i.e. a causal LM's run?"""
    return bool(settings.get("prompt_column")) or any(t in GENERATION_TASKS for t in settings.get("tasks") or [])


def get_task(name: str) -> TaskSpec:
    """Return the registered task `name`; an unknown name raises `FedPeftError` listing the known ones."""
    try:
        return TASKS[name] if name in TASKS else TASKS[name.strip().lower()]
    except (KeyError, TypeError, AttributeError):
        known = ", ".join(TASKS)
        raise FedPeftError(f"Unknown task {name!r}; choose one of: {known}.") from None


def register_task(spec: TaskSpec) -> None:
    """Add a task made at run time (a dataset of the user's, `data/custom.py`). A task registered
    before under the same name is replaced; a built-in task never is."""
    if spec.name in BUILTIN_TASKS:
        raise FedPeftError(f"the task name {spec.name!r} is a built-in task: give your dataset another name "
                           "with --dataset-name")
    TASKS[spec.name] = spec


def backbone_kind(tasks: list[str]) -> str:
    """"causal" when every task is a generation task, "encoder" when none is; a mix is an error."""
    names = list(dict.fromkeys(tasks))
    gen = [t for t in names if get_task(t).is_generation]
    if gen and len(gen) < len(names):
        cls = [t for t in names if not get_task(t).is_generation]
        raise FedPeftError(f"the run mixes generation tasks ({', '.join(gen)}) with classification tasks "
                           f"({', '.join(cls)}): one run uses one backbone, so give tasks of one kind")
    return "causal" if gen else "encoder"
