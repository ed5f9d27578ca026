"""Benchmark suites as data: a base RunConfig dict plus a list of (label, overrides, seeds policy).

Seeds policy: "all" runs every seed given with --seeds; "first" runs only the first one (the
ablations run on one seed only).

No hyperparameter here was tuned on a test split: every method shares the base settings (the
learning rate and frozen head of the packaged demo and of the official FedLEASE code, lr 3e-3);
a per-method change, if one is ever needed, goes into that entry's overrides with a comment saying
where it was chosen (a validation carve-out of the training data, never the test clients).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError

SEED_POLICIES = ("all", "first")
GLUE4 = ("sst2", "qnli", "mrpc", "cola")


@dataclass(frozen=True)
class Entry:
    label: str
    overrides: dict[str, Any]
    seeds: str = "all"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    base: dict[str, Any]
    entries: tuple[Entry, ...]
    # Something a user must know before the suite runs (printed once at the start), e.g. its cost.
    note: str | None = None
    requires_gpu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # (task, preferred): the suite runs `preferred` instead of `task` where its data can be had
    # (glue4: QQP, the paper's fourth task, instead of CoLA when the hub or a local QQP is there).
    swap: tuple[str, str] | None = None

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.entries]

    def plan(self, seeds: list[int], labels: list[str] | None = None) -> list[tuple[Entry, int]]:
        """Every (entry, seed) pair to run, in suite order; `labels` restricts the entries."""
        if not seeds:
            raise FedPeftError("--seeds needs at least one seed")
        entries = list(self.entries)
        if labels:
            unknown = [lbl for lbl in labels if lbl not in self.labels]
            if unknown:
                raise FedPeftError(f"suite {self.name!r} has no method label {unknown[0]!r}: "
                                   f"choose from {', '.join(self.labels)}")
            entries = [e for e in entries if e.label in labels]
        return [(e, s) for e in entries for s in (seeds if e.seeds == "all" else seeds[:1])]

    def config(self, entry: Entry, seed: int, *, output_dir: str | None = None,
               data_dir: str | None = None) -> RunConfig:
        values = {**self.base, **entry.overrides, "seed": seed, "output_dir": output_dir}
        if data_dir is not None:
            values["data_dir"] = data_dir
        return RunConfig.from_dict(values, source=f"suite {self.name!r}, entry {entry.label!r}")


def shrunk(suite: Suite, **overrides: Any) -> Suite:
    """The same suite (entries, seeds policy, every base setting not overridden) with some base settings
    replaced and no GPU requirement: how a test runs the paper suite's plumbing on a tiny model and a
    few examples on the CPU (tests/test_paper_suite.py). Named `<suite>-shrunk`, so its runs never mix
    with the real suite's."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise FedPeftError(f"shrunk({suite.name!r}): unknown setting {unknown[0]!r}")
    return dataclasses.replace(suite, name=f"{suite.name}-shrunk", base={**suite.base, **overrides},
                               requires_gpu=False, note=None)


def _clients(tasks: tuple[str, ...], per_task: int) -> list[str]:
    return [t for t in tasks for _ in range(per_task)]


def _matrix(ablations: bool = True) -> tuple[Entry, ...]:
    """The FedLEASE comparison: main methods on every seed, FedLEASE ablations on the first seed."""
    main = (
        Entry("fedit", {"method": "fedit"}),
        Entry("ffa-lora", {"method": "ffa-lora"}),
        Entry("fedsa-lora", {"method": "fedsa-lora"}),
        # FedDPA combines its global and local LoRA per instance, as the paper does.
        Entry("feddpa", {"method": "feddpa", "feddpa_weighting": "instance"}),
        # K = 4 cluster LoRAs: as many as the tasks (the paper's IFCA+LoRA setting).
        Entry("ifca", {"method": "ifca", "ifca_clusters": 4}),
        Entry("fedlease", {"method": "fedlease"}),
    )
    if not ablations:
        return main
    return main + (
        Entry("fedlease-single-r", {"method": "fedlease", "experts": "single_shared", "single_rank_multiplier": 1}, "first"),
        Entry("fedlease-single-4r", {"method": "fedlease", "experts": "single_shared", "single_rank_multiplier": 4}, "first"),
        Entry("fedlease-per-client", {"method": "fedlease", "experts": "per_client"}, "first"),
        Entry("fedlease-top1", {"method": "fedlease", "routing": "fixed_topk", "top_k": 1}, "first"),
        Entry("fedlease-top2", {"method": "fedlease", "routing": "fixed_topk", "top_k": 2}, "first"),
    )


# Shared by every GLUE suite: MiniLM, r = 4, frozen head (the official FedLEASE code), lr 3e-3
# (the packaged demo's and the integration tests'), QNLI carved out of its validation split
# offline (the offline GLUE data has no QNLI train split), class-balanced test sets. MRPC's dev split
# has only 129 negatives and CoLA's 322 ungrammatical sentences, so with 4 clients each their test
# sets are kept at <= 64 per client (4 x 32 per class fits MRPC's 129).
_GLUE_BASE: dict[str, Any] = dict(
    tasks=_clients(GLUE4, 4), model_name="minilm", carve_out=True, rank=4, lora_alpha=16.0,
    head_policy="frozen", lr=3e-3, batch_size=16, eval_batch_size=64, max_clusters=8, quiet=True,
    threads=None, precision="auto",  # bf16 where the hardware runs it natively, fp32 elsewhere
)

# Generation: 8 clients (E2E, WebNLG and two instruction tasks x 2) on the packaged SmolLM2, FedIT vs
# FedDPA vs FedLEASE (the FedLEASE paper's decoder comparison, at CPU size). Task ids are those of
# the NLG data readers. Precision auto: bf16 where the CPU has native bf16 matmuls (SmolLM2 LoRA steps
# are ~2.5x faster than fp32 there, benchmarks/decoder_throughput.py), fp32 elsewhere (an AVX2 CPU runs
# bf16 matmuls far slower than fp32); each run's config.json and results.csv say which it used. lr 5e-4 is a common LoRA rate for small decoders, not
# tuned here. Cost, ESTIMATED (the suite has not run yet: its tasks land with the NLG readers) from
# benchmarks/decoder_throughput.py and a 4-client SmolLM2 smoke run at one thread: per client-round
# ~7 s for 4 bf16 steps of 8 x ~100 tokens + ~10 s to generate 16 x <= 48 tokens, so ~11 minutes per
# method, FedDPA (two local runs) ~16: about 40 minutes for the three.
NLG4 = ("e2e", "webnlg", "inst-sst2", "inst-cola")
_NLG_BASE: dict[str, Any] = dict(
    tasks=_clients(NLG4, 2), model_name="smollm2", train_samples=32, test_samples=16, max_length=128,
    global_rounds=5, warmup_rounds=2, local_epochs=1, batch_size=8, eval_batch_size=16, rank=8,
    lora_alpha=16.0, lr=5e-4, precision="auto", num_beams=1, max_new_tokens=48, gen_batch_size=16,
    max_clusters=4, quiet=True, threads=None,
    # Plain prompts for inst-sst2 / inst-cola, as the recorded results (benchmarks/results/nlg-cpu.md) were
    # made: SmolLM2's chat template adds a ~25-token system prompt that --max-length 128 would have to fit.
    chat_template="none",
)

SUITES: dict[str, Suite] = {
    "nlg-cpu": Suite(
        name="nlg-cpu",
        description="8 clients (E2E, WebNLG, inst-sst2, inst-cola x 2), SmolLM2-135M, r = 8 on q/v, 32 train / "
                    "16 test per client, 5 rounds (FedLEASE: 2 warmup + 3), greedy decoding, precision auto; "
                    "FedIT, FedDPA, FedLEASE in under an hour on 2 cores",
        base=_NLG_BASE,
        entries=(Entry("fedit", {"method": "fedit"}), Entry("feddpa", {"method": "feddpa"}),
                 Entry("fedlease", {"method": "fedlease"})),
    ),
    "glue4-cpu": Suite(
        name="glue4-cpu",
        swap=("cola", "qqp"),
        description="16 clients (SST-2, QNLI, MRPC, CoLA x 4), MiniLM, 128 train / 64 test per client, 64 tokens, "
                    "precision auto, 8 rounds (FedLEASE: 3 warmup + 5), 1 local epoch; one method in about 5 minutes "
                    "on 2 cores with native bf16",
        # Sizes: the largest that keeps one method near 5 minutes on 2 idle cores. Checked on a
        # validation hold-out (--validation-fraction 0.2), never on the test clients: at this size
        # MiniLM learns SST-2 well, QNLI and MRPC barely (a single client with 512 examples reaches
        # 0.57-0.61 validation accuracy after 4 epochs), CoLA not at all. The frozen head was kept
        # (the official code's choice): with it the warmup B matrices separated into 3 clusters on
        # the validation run against 2 with a trained local head.
        base={**_GLUE_BASE, "train_samples": 128, "test_samples": 64,
              "task_samples": ["mrpc=128:64", "cola=128:64"], "max_length": 64,
              "global_rounds": 8, "warmup_rounds": 3, "local_epochs": 1},
        entries=_matrix(),
    ),
    "glue4-mini": Suite(
        name="glue4-mini",
        swap=("cola", "qqp"),
        description="glue4-cpu's shape at quick-check size: 32 train / 32 test per client, max 48 tokens, "
                    "3 rounds (FedLEASE: 2 warmup + 1), 1 local epoch; the whole matrix in under 10 minutes",
        base={**_GLUE_BASE, "train_samples": 32, "test_samples": 32,
              "task_samples": ["mrpc=32:32", "cola=32:32"], "max_length": 48,
              "global_rounds": 3, "warmup_rounds": 2, "local_epochs": 1},
        entries=_matrix(),
    ),
    "paper": Suite(
        name="paper",
        description="the paper's setting: RoBERTa-large, 16 clients (SST-2, QNLI, MRPC, QQP x 4), "
                    "1000 train / 200 test (MRPC 500/64: its class pools are too small for 1000/200), "
                    "25 rounds (5 warmup), 2 local epochs, batch 128, r = 4, M_max = 8",
        base=dict(tasks=_clients(("sst2", "qnli", "mrpc", "qqp"), 4), model_name="roberta-large",
                  train_samples=1000, test_samples=200, task_samples=["mrpc=500:64"], max_length=128,
                  global_rounds=25, warmup_rounds=5, local_epochs=2, batch_size=128, rank=4,
                  max_clusters=8, head_policy="frozen", lr=1e-3, quiet=True),
        entries=_matrix(),
        requires_gpu=True,
        note="the paper suite trains RoBERTa-large (355 M parameters) on 16 x 1000 examples x 2 epochs x "
             "25 rounds = 800,000 example passes per method; on a GPU (--device auto finds it) that is "
             "hours, on a CPU roughly 2-3 days per method on 2 cores (about 0.25 s per 128-token example forward + "
             "backward); it needs the hub model 'roberta-large' (or a local copy via --model_name) "
             "and QQP, which the offline GLUE data does not have (a local glue/QQP folder or the hub)",
    ),
}


# LEFF (docs/methods/leff.md): one GLUE task, Dirichlet label skew alpha = 0.05 (Table 1) cut over 4
# clients (at N = 8 and 2 classes a cut where every client gets a batch is too rare: 0.05 % of draws),
# MiniLM (6 blocks), L_i = 1 (Table 5's setting), r_c = 0.5, WNLI sentences as the proxy, the LEFF local
# optimiser: AdamW with a constant lr (the paper states one lr and no schedule), weight decay 0.01 and no
# clipping where the paper is silent (docs/methods/leff.md#local-training). lr: one value for every
# method, as in the paper, but 1e-4 instead of its 1e-5: the paper runs 20 rounds over full GLUE splits,
# this suite 6 rounds of 8 steps; fixed before any run, never looked up on the validation clients.
# Distillation: 20 steps per student instead of 200 (CPU budget).
_LEFF_BASE: dict[str, Any] = dict(
    tasks=["sst2"] * 4, model_name="minilm", partition="dirichlet_cut", alpha=0.05, train_samples=128,
    test_samples=128, max_length=64, global_rounds=6, local_epochs=1, batch_size=16, eval_batch_size=64,
    lr=1e-4, weight_decay=0.01, max_grad_norm=0.0, constant_lr=True, rank=8, lora_alpha=16.0,
    lora_dropout=0.05, layer_budgets=["1"], compression_rate=0.5, distill_steps=20, distill_examples=512,
    importance_examples=64, proxy_dataset="wnli", quiet=True, threads=1,
)

# glue4-cpu with each method at the learning rate it picked on validation, never on test:
# `fedpeft tune --suite glue4-cpu --param lr --values 1e-3 3e-3 1e-2 --methods fedit fedlease` (seed 1, a
# stratified 0.2 hold-out of every client's training data; the table is benchmarks/results/glue4-cpu-tune.md).
# Only the methods whose grid has run are here; glue4-cpu keeps every method at the common lr 3e-3.
_TUNED_LR = {
    "fedit": 1e-2,  # validation overall 34.75 / 35.85 / 41.33 at 1e-3 / 3e-3 / 1e-2
    "fedlease": 1e-2,  # validation overall 38.06 / 38.02 / 46.45
    "fedsa-lora": 3e-3,  # validation overall 38.98 / 45.10 / 41.74: the common lr, so glue4-cpu's runs are these
    "ifca": 3e-3,  # validation overall — / 52.92 / 46.00 (1e-3 not run: the lowest for every method above)
}
# FedLEASE at its picked lr over the oracle partition (one expert per task): a diagnostic, see below
_ORACLE = {"method": "fedlease", "lr": _TUNED_LR["fedlease"], "clustering": "task"}
SUITES["glue4-cpu-tuned"] = dataclasses.replace(
    SUITES["glue4-cpu"], name="glue4-cpu-tuned",
    description=SUITES["glue4-cpu"].description + "; each method at its learning rate picked on validation",
    entries=tuple(Entry(e.label, {**e.overrides, "lr": _TUNED_LR[e.label]}) for e in _matrix(ablations=False)
                  if e.label in _TUNED_LR) + (
        # A diagnostic, not a method of the paper: FedLEASE with the oracle partition (one expert per
        # task). Against `fedlease` it measures what the B-matrix clustering costs at this scale.
        Entry("fedlease-oracle", _ORACLE),
    ) + tuple(
        # The ablations at FedLEASE's picked lr, on the first seed (single expert r is FedIT at that lr,
        # exactly, round by round, as a test checks, so it is not run twice) ...
        Entry(e.label, {**e.overrides, "lr": _TUNED_LR["fedlease"]}, "first") for e in _matrix()
        if e.seeds == "first" and e.label != "fedlease-single-r"
    ) + (
        # ... and fixed top-k over the oracle clusters: "clustered experts without adaptive top-M" with
        # clusters that are right, so the routing step is measured apart from the clustering's failures.
        Entry("fedlease-oracle-top1", {**_ORACLE, "routing": "fixed_topk", "top_k": 1}, "first"),
        Entry("fedlease-oracle-top2", {**_ORACLE, "routing": "fixed_topk", "top_k": 2}, "first"),
    ))

# paper-cpu: the FedLEASE paper's protocol (docs/methods/fedlease.md#paper-setting) as close as the offline
# GLUE data and an 8-hour budget for the 3-seed matrix of the six main methods (FedIT, FedSA-LoRA, FedDPA,
# IFCA, FedLEASE, FedLEASE with oracle clusters) allow on 2 CPU cores, 1 thread per run, two runs at a time.
# What it keeps from the paper: 16 clients, 4 tasks x 4, 200 test examples per client, class-balanced
# clients, LoRA r = 4 (alpha 16, dropout 0.05) on query/value, the frozen head, AdamW with weight decay
# 0.05 and linear decay in each local run, M_max = 8, the last round as the headline.
# Deviations, each with its reason:
# - model: MiniLM-L6 (22 M parameters, packaged, offline) for RoBERTa-large (355 M): about 16x the cost
#   per token would leave 1-2 rounds in the budget;
# - fourth task: CoLA for QQP, which the offline data lacks (QQP runs instead, as paper-cpu-qqp, where its
#   data can be had; the glue4 suites' swap);
# - QNLI: train and test pools carved out of its validation split (the offline copy has no train split);
# - test examples: carved out of each task's train split, disjoint from every client's training examples
#   (--test-source train), because MRPC's validation split has 129 negatives and CoLA's 322 ungrammatical
#   sentences, fewer than 4 clients x 100 per class; the paper draws them from validation;
# - training examples: 400 per client (paper 1,000), MRPC 380 (what its 1,194 negatives supply beside
#   4 x 100 test negatives); this and the rounds below are what the budget allows;
# - 64 tokens (paper 128), batch 16 (paper 128: with 400 examples a batch of 128 is 3 steps an epoch);
# - rounds: 12 = 3 warmup + 9 (paper 25 = 5 + 20), 1 local epoch (paper 2);
# - learning rate: 3e-3 for every method, the GLUE suites' common value (the paper does not state its
#   own); to be replaced per method by `fedpeft tune --suite paper-cpu --param lr --values 1e-3 3e-3 1e-2`
#   on validation, which has not run yet;
# - precision: bf16 where the CPU runs it natively (fp32 elsewhere).
# Cost, estimated from the warmup checks below on this 2-core AMD EPYC under a load of about 5: about 9 s per
# client-round at 1 thread (400 training examples, 200 test), so a FedIT run is 16 x 12 x 9 s = 29 min;
# FedSA-LoRA the same, FedLEASE and its oracle about 10 % more, FedDPA and IFCA about 2.3x (two local runs;
# K = 4 loss passes over the training set): about 4.2 h of one thread per seed, 6.3 h for 3 seeds on two
# threads, and the fixed top-2 router (the router study) about 35 min of one thread more per seed.
# Checked on validation (--validation-fraction 0.2 of 500, i.e. these 400 training examples; the
# table is benchmarks/results/paper-cpu-warmup-check.md): the warmup learns SST-2 well, QNLI and MRPC a
# little and CoLA not at all, and its clustering still groups the SST-2, QNLI and MRPC pairs.
_PAPER_CPU_BASE: dict[str, Any] = {
    **_GLUE_BASE, "train_samples": 400, "test_samples": 200, "task_samples": ["mrpc=380:200"],
    "test_source": "train", "max_length": 64, "global_rounds": 12, "warmup_rounds": 3, "local_epochs": 1,
}
SUITES["paper-cpu"] = Suite(
    name="paper-cpu",
    swap=("cola", "qqp"),
    description="the FedLEASE paper's protocol at CPU size: 16 clients (SST-2, QNLI, MRPC, CoLA x 4), MiniLM, "
                "400 train (MRPC 380) / 200 test per client, test examples carved out of each task's train split, "
                "64 tokens, batch 16, 12 rounds (FedLEASE: 3 warmup + 9), 1 local epoch, lr 3e-3 for every method, "
                "precision auto. Deviations from the paper (RoBERTa-large, QQP, 1000 / 200 from validation, "
                "128 tokens, batch 128, 25 rounds = 5 + 20, 2 epochs, lr per method): model, fourth task, sizes, "
                "rounds, epochs, batch, length and the untuned lr, for offline data and an 8-hour 3-seed budget "
                "on 2 cores (src/fedpeft/bench/suites.py says why for each)",
    base=_PAPER_CPU_BASE,
    entries=tuple(e for e in _matrix(ablations=False) if e.label != "ffa-lora") + (
        # A diagnostic: FedLEASE with the oracle partition (one expert per task), what the clustering costs.
        Entry("fedlease-oracle", {"method": "fedlease", "clustering": "task"}),
        # An option, on the first seed (the 8-hour budget is the main methods'): Eq. 2 on ΔW = B·A, which
        # recovered the tasks better than B from this federation's warmup uploads
        # (benchmarks/results/clustering-signal-2026-12-07-seeds43-44.md).
        Entry("fedlease-delta-w", {"method": "fedlease", "clustering_matrices": "delta_w"}, seeds="first"),
        # The router study (issue §4): fixed top-2 against FedLEASE's adaptive top-M on every seed, so the
        # bench's paired comparison against `fedlease` has pairs. Same seed, same warmup and clusters: only
        # the routing differs.
        Entry("fedlease-top2", {"method": "fedlease", "routing": "fixed_topk", "top_k": 2}),
    ),
)

# The LEFF suites' shared entries: LEFF against FedAvg-full and FedLoRA on every seed, and LEFF at
# r_c = 1 on the first: no compression (the students are the global layers, the Fig. 5 end of the
# sweep), which separates the cost of compression from that of training one block.
_LEFF_MAIN = (Entry("leff", {"method": "leff"}), Entry("fedavg-full", {"method": "fedavg-full"}),
              Entry("fedlora", {"method": "fedlora"}))
_LEFF_R1 = Entry("leff-r1.0", {"method": "leff", "compression_rate": 1.0}, "first")

SUITES["leff-cpu"] = Suite(
    name="leff-cpu",
    description="LEFF vs FedAvg-full, FedLoRA (r = 8), FedBitFit, LEFF with uniform block sampling and LEFF with "
                "the literal Eq. 6 (and SLoRA, LEFF with budgets 1 2 4, LEFF with r_c = 1 on the first seed): "
                "SST-2, 4 clients, Dirichlet alpha = 0.05 over 4 x 128 train examples, 128 "
                "validation examples per client, MiniLM, 64 tokens, 6 rounds, 1 local epoch, lr 1e-4; "
                "about 30 minutes on 1 thread of a busy 2-core machine (2-6 min per run, LEFF's "
                "distillation the largest part)",
    base=_LEFF_BASE,
    entries=_LEFF_MAIN + (
        Entry("fedbitfit", {"method": "fedbitfit"}),
        Entry("slora", {"method": "slora"}, "first"),
        Entry("leff-budgets-1-2-4", {"method": "leff", "layer_budgets": ["1", "2", "4"]}, "first"),
        _LEFF_R1,
        # The paper's sampling ablation (Figs. 6-7), on every seed so the report pairs it with `leff`:
        # uniform block draws, and importance through the literal Eq. 6 (softmax of the raw scores) instead
        # of the spec's max-normalised one, which keeps p_max / p_min <= e over MiniLM's 6 blocks.
        Entry("leff-uniform", {"method": "leff", "sampling": "random"}),
        Entry("leff-eq6-raw", {"method": "leff", "importance_normalise": "none"}),
    ),
    extra={"report": "leff"},
)

# leff-cpu with the paper's 200 distillation steps per student (issue 17 §5): at leff-cpu's 20 steps the
# students, not the sampling, limited LEFF (benchmarks/results/leff-cpu-sampling-2026-12-07.md: two seeds of
# three at chance). Only what the sampling ablation needs, on every seed: LEFF with importance sampling and
# with uniform block draws, and FedAvg-full, the reference every LEFF row is paired with. The teacher runs
# once over the distillation texts (`cached`: the same batches and targets up to float rounding, 0.66x the
# time per step); about 30 minutes per LEFF run on one idle thread, 3-3.5 hours for the whole 3-seed matrix.
SUITES["leff-cpu-200"] = Suite(
    name="leff-cpu-200",
    description="leff-cpu with the paper's 200 distillation steps per student (teacher cached): LEFF with "
                "importance and with uniform block sampling, and FedAvg-full, on every seed; SST-2, 4 clients, "
                "Dirichlet alpha = 0.05, MiniLM, 6 rounds; about 30 minutes per LEFF run on one idle thread",
    base={**_LEFF_BASE, "distill_steps": 200, "distill_teacher": "cached"},
    entries=(Entry("leff", {"method": "leff"}), Entry("fedavg-full", {"method": "fedavg-full"}),
             Entry("leff-uniform", {"method": "leff", "sampling": "random"})),
    extra={"report": "leff"},
)

# LEFF on a decoder (docs/methods/leff.md#decoders): E2E with the Dirichlet cut on the MR's
# `food` (α = 0.05, Table 1) over 4 clients, WebNLG references as the proxy (distillation and the
# importance batch), the global model scored after every round by greedy generation with the E2E
# metrics. SmolLM2-135M (30 Llama blocks, tied embeddings) stands in for GPT-2 Medium, whose weights
# are not available offline; FedBitFit does not apply (Llama has no biases) and FedLoRA puts r = 8 on
# all seven Llama linears (the set that reproduces Table 5's Llama count). CPU-sized: 16 train
# examples per client, 8 test MRs per client (32 in all), 96 tokens, 2 rounds, batch 4, 5 distillation
# steps on 64 proxy texts, 16 importance texts. The optimiser is leff-cpu's (lr 1e-4 for every method,
# constant, weight decay 0.01, no clipping), fixed before any run.
_LEFF_NLG_BASE: dict[str, Any] = dict(
    tasks=["e2e"] * 4, model_name="smollm2", partition="dirichlet_cut", alpha=0.05, e2e_partition_key="food",
    train_samples=16, test_samples=8, max_length=96, global_rounds=2, local_epochs=1, batch_size=4,
    eval_batch_size=16, lr=1e-4, weight_decay=0.01, max_grad_norm=0.0, constant_lr=True, rank=8,
    lora_alpha=16.0, lora_dropout=0.05, layer_budgets=["1"], compression_rate=0.5, distill_steps=5,
    distill_examples=64, distill_batch_size=8, importance_examples=16, proxy_dataset="webnlg", num_beams=1,
    max_new_tokens=48, gen_batch_size=16, quiet=True, threads=1,
)

SUITES["leff-nlg"] = Suite(
    name="leff-nlg",
    description="LEFF vs FedAvg-full and FedLoRA (r = 8) (and LEFF with r_c = 1 on the first seed) on a decoder: E2E, 4 clients, Dirichlet alpha = 0.05 on "
                "the MR's food over 4 x 16 train examples, 8 test MRs per client, SmolLM2-135M (30 blocks), "
                "96 tokens, 2 rounds, greedy decoding, WebNLG proxy; BLEU, NIST, METEOR, ROUGE-L, CIDEr of the "
                "global model after the last round",
    base=_LEFF_NLG_BASE,
    entries=_LEFF_MAIN + (_LEFF_R1,),
    extra={"report": "leff"},
)


_SHOWN = {"cola": "CoLA", "qqp": "QQP"}


def task_available(task: str, data_dir: str | None = None) -> bool:
    """Whether `task`'s examples can be loaded here: from the local data root when one applies (its
    validation split suffices, the GLUE suites carve out), otherwise from a reachable hub."""
    from fedpeft.data.sources import has_local_split
    from fedpeft.hub import hub_reachable

    try:
        local = has_local_split(task, "validation", data_dir)
    except FedPeftError:  # a local root without the task's folder
        return False
    return bool(local) if local is not None else hub_reachable()


def with_swap(suite: Suite, choice: str = "auto", data_dir: str | None = None) -> tuple[Suite, str | None]:
    """The suite to run and a sentence saying which task it uses and why (None when it has no swap).

    choice: "auto" (the preferred task when available), or a task name to force either side. The
    swapped suite is named `<suite>-<task>`, so its runs never mix with the other federation's."""
    if suite.swap is None:
        if choice != "auto":
            raise FedPeftError(f"suite {suite.name!r} has no task swap: drop --fourth-task")
        return suite, None
    old, new = suite.swap
    if choice not in ("auto", old, new):
        raise FedPeftError(f"--fourth-task must be auto, {old} or {new} for suite {suite.name!r}")
    if choice == old or (choice == "auto" and not task_available(new, data_dir)):
        why = "as asked" if choice == old else f"{new} cannot be loaded here: not in the local data root, or no root and no reachable hub"
        return suite, f"bench {suite.name}: runs {old} ({why}); {new} runs as suite {suite.name}-{new}"
    tasks = [new if t == old else t for t in suite.base["tasks"]]
    sizes = [x for x in suite.base.get("task_samples", []) if not x.startswith(f"{old}=")]
    swapped = dataclasses.replace(
        suite, name=f"{suite.name}-{new}", description=suite.description.replace(_SHOWN.get(old, old), _SHOWN.get(new, new)),
        base={**suite.base, "tasks": tasks, "task_samples": sizes}, swap=None)
    why = "as asked" if choice == new else f"{new} data is available"
    return swapped, f"bench {suite.name}: runs {new} instead of {old} ({why}), as suite {swapped.name}"


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise FedPeftError(f"unknown suite {name!r}: choose one of {', '.join(SUITES)}")
    return SUITES[name]
