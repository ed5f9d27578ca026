"""RunConfig: every knob of a run, typed, documented and validated in one place.

The CLI flags and a TOML file both map onto these fields; each field's metadata carries its help
text and any alias (the official FedLEASE code's underscore names are accepted as they are).

Each field also says what `--resume` may do with it (metadata `resume`):
- `same` (the default): the setting shapes the run (method, tasks, model, rank, seed, partition,
  sizes, learning rate, ...). It is part of the fingerprint the checkpoint carries, and a resume
  that asks for another value refuses and names it, before any work.
- `free`: where and how fast the run executes, never what it computes (`quiet`, `threads`,
  `data_dir`, `round_timeout`, `client_cpus`, `client_gpus`): a resume applies a new value and says so.
- `grow`: `global_rounds` may be raised on resume (train a finished run further), never lowered;
  the rounds already run are those of a longer run, since no method but SLoRA (whose sparse stage
  is a fraction of all rounds) schedules by the total.
- `folder`: not a setting of the run but of this command (`output_dir`, `resume`, `overwrite`).

Values are type-checked whatever their source (flags, TOML, JSON, Python): a whole number where an
int is due, a finite number where a float is, a list of strings where a list is, so that a wrong
config file is one clear error instead of a traceback deep inside a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft import hardware
from fedpeft.errors import FedPeftError
from fedpeft.methods import METHODS as _CATALOGUE, dp_methods, leff_family

METHODS = tuple(_CATALOGUE)
# LEFF and the baselines of the LEFF paper: one task per run, a server importance batch held out of
# every client's pool (docs/methods/leff.md#server-importance-batch), so all five see the same client data.
LEFF_FAMILY = leff_family()
PARTITIONS = ("task", "dirichlet", "iid", "dirichlet_cut")
LABEL_SPLITS = ("class_balanced", "natural")
# `classifier` and `none` are what RunConfig.resolved() gives the LEFF paper's PEFT baselines and
# decoders; a user may ask for `classifier` (only out_proj trained and averaged) with any method.
HEAD_POLICIES = ("local", "frozen", "shared", "classifier", "none")
PRECISIONS = hardware.PRECISIONS
ENGINES = ("local", "flower-sim", "flower")
AGGREGATIONS = ("mean", "trimmed-mean", "median")
ROUTINGS = ("adaptive_topM", "fixed_topk")
EXPERT_MODES = ("clustered", "single_shared", "per_client")
CLUSTERINGS = ("hierarchical", "spectral", "task")
CLUSTERING_MATRICES = ("b", "delta_w")
LEFF_SAMPLINGS = ("importance", "round_robin", "random")
LEFF_BLOCKS = ("sliding", "disjoint")
LEFF_NORMALISE = ("max", "none")
LEFF_IMPORTANCE_SOURCES = ("server_batch", "last_update")
ROUTER_AGGREGATIONS = ("cluster", "local")
FEDDPA_WEIGHTINGS = ("fixed", "instance")
QUANTIZATIONS = ("none", "8bit", "4bit")
LABEL_KINDS = ("auto", "classification", "regression", "generation")
CHAT_TEMPLATES = ("auto", "none")
ENCODER_PATHS = ("padded", "varlen")
# A run saved before --encoder-path existed ran the padded forward: its config.json says nothing of it.
ENCODER_PATH_BEFORE_THE_SETTING = "padded"
DECODER_PATHS = ("padded", "varlen")
# Likewise --decoder-path: a decoder run saved before it ran the padded forward.
DECODER_PATH_BEFORE_THE_SETTING = "padded"
DISTILL_REUSE = ("off", "unchanged")
DISTILL_TEACHERS = ("per-step", "cached")
DISTILL_PRECISIONS = ("fp32", "run")
# The settings of --dataset: without it each of them is a mistake (RunConfig.validate says which).
_DATASET_FIELDS = ("dataset_name", "text_columns", "label_column", "label_names", "prompt_column", "target_column",
                   "client_column", "test_file")
DP_MODES = ("off", "central", "local")
DP_METHODS = dp_methods()
TRACKERS = ("none", "tensorboard", "mlflow")


RESUME_KINDS = ("same", "free", "grow", "folder")


def _f(default: Any, help: str, *, choices: tuple | None = None, group: str = "run", resume: str = "same",
       infinite: bool = False) -> Any:
    """A setting: its help, choices, --help group, what --resume may do with it, and (floats)
    whether +inf is a value it takes (NaN never is)."""
    assert resume in RESUME_KINDS, resume
    meta = {"help": help, "choices": choices, "group": group, "resume": resume, "infinite": infinite}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    # What to run
    method: str = _f("fedlease", "federated method", choices=METHODS)
    tasks: list[str] = _f([], "one task per client, e.g. --tasks sst2 sst2 mrpc mrpc", group="data")
    model_name: str = _f("minilm", "backbone: 'minilm' (packaged, offline), a hub id, a local path, or a model factory 'module:function' (a function, called with no arguments, of a module importable in every process that loads the model, Flower clients included, that returns a fedpeft.models.backbone.Backbone)", group="model")
    engine: str = _f("local", "execution engine: local (in-process), flower-sim (Flower's Simulation Engine); 'flower' marks runs of the deployed ServerApp (started with flwr run, see docs/flower.md)", choices=ENGINES)
    # Data
    data_dir: str | None = _f(None, "data root with GLUE task folders (glue/SST-2/{train,dev}.tsv, ...) and e2e/, webnlg/ for generation tasks (default: $FEDPEFT_DATA_DIR)", group="data", resume="free")
    partition: str = _f("task", "how clients get their data", choices=PARTITIONS, group="data")
    label_split: str = _f("class_balanced", "label proportions under --partition task", choices=LABEL_SPLITS, group="data")
    alpha: float = _f(0.5, "Dirichlet concentration for --partition dirichlet", group="data")
    e2e_partition_key: str = _f("food", "E2E: the MR attribute a label-skew partition keys on (an MR without it is the category 'missing')", group="data")
    train_samples: int = _f(1000, "training examples per client", group="data")
    test_samples: int = _f(200, "test examples per client (from the task's validation split)", group="data")
    task_samples: list[str] = _f([], "per-task sizes TASK=TRAIN:TEST overriding the two above, e.g. mrpc=500:64 (the FedLEASE preset's MRPC sizes: MRPC's class pools are too small for 4 disjoint class-balanced clients at 1000:200)", group="data")
    carve_out: bool = _f(False, "for tasks with no local train split, carve train and test pools out of the validation split", group="data")
    max_length: int = _f(128, "maximum tokens per example", group="data")
    validation_fraction: float = _f(0.0, "hold out this share of every client's training examples (stratified) and score on it instead of the test split: for choosing hyperparameters without looking at test data", group="data")
    # Who takes part, and when clients are scored
    num_clients: int | None = _f(None, "make N clients of the one task in --tasks (e.g. --tasks sst2 --num-clients 1000 --partition dirichlet)", group="federation")
    participation: float = _f(1.0, "fraction f of the clients that train each round: ceil(f*N), drawn uniformly from the run seed per round", group="federation")
    clients_per_round: int | None = _f(None, "train exactly K clients each round (instead of --participation)", group="federation")
    eval_every: int = _f(1, "score every N rounds (the last round is always scored)", group="federation")
    eval_clients: str = _f("all", "who is scored in a scored round: all clients, or the round's sampled ones (the last round always scores all)", choices=("all", "sampled"), group="federation")
    test_source: str = _f("validation", "where test examples come from: the task's validation split, or carved out of its train split (disjoint from every client's training examples) when many clients need more test data than the validation split holds", choices=("validation", "train"), group="federation")
    client_store: str = _f("memory", "where clients keep what persists between rounds (local heads and LoRAs, optimiser state): in memory, or on disk in the run folder, loaded when the client is sampled", choices=("memory", "disk"), group="federation")
    # Your own data (data/custom.py, docs/data.md#your-own-data)
    dataset: str | None = _f(None, "your own data: a .csv, .tsv, .json, .jsonl or .parquet file, or a Hugging Face hub dataset id (ID or ID:CONFIG, online); it becomes one task, named after it", group="dataset")
    dataset_name: str | None = _f(None, "the task name of --dataset (default: the file's stem, or the hub id's last part)", group="dataset")
    text_columns: list[str] = _f([], "the one or two text columns of --dataset (default: text)", group="dataset")
    label_column: str | None = _f(None, "the label column of --dataset (default: label): whole numbers, booleans or strings are classes (accuracy, F1, MCC), floats are scores (Pearson, Spearman)", group="dataset")
    label_kind: str = _f("auto", "what the label column is: auto (from its type), classification or regression; the resolved settings say generation for a prompt/target dataset", choices=LABEL_KINDS, group="dataset")
    label_names: list[str] = _f([], "the label column's values in class order (default: sorted, numbers by value); with two classes, F1 is that of the second", group="dataset")
    prompt_column: str | None = _f(None, "generation: the prompt column of --dataset (with --target-column; on a decoder)", group="dataset")
    target_column: str | None = _f(None, "generation: the column of the text to generate", group="dataset")
    client_column: str | None = _f(None, "one client per distinct value of this column (e.g. a user or hospital id), holding its rows; --tasks is then not needed", group="dataset")
    test_file: str | None = _f(None, "test examples from this file of the same columns (for a hub dataset: the name of a split) instead of a hold-out", group="dataset")
    test_fraction: float = _f(0.2, "share of the rows held out as test examples when there is no --test-file (stratified by class, or by client with --client-column; a fixed split, whatever the --seed)", group="dataset")
    # Rounds and local training
    global_rounds: int = _f(25, "total rounds (warmup included, as in the official FedLEASE code); with --resume, a higher value trains the run further", group="training", resume="grow")
    warmup_rounds: int = _f(5, "warmup rounds (methods with a warmup phase only)", group="training")
    local_epochs: int = _f(2, "local epochs per round", group="training")
    lr: float = _f(1e-3, "learning rate", group="training")
    batch_size: int = _f(32, "training batch size", group="training")
    eval_batch_size: int = _f(32, "evaluation batch size (examples are sorted by length, so small batches pad little)", group="training")
    weight_decay: float = _f(0.05, "AdamW weight decay", group="training")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)", group="training")
    device: str = _f("auto", "where the model, its adapters, heads and batches compute: auto (CUDA when a GPU is visible, else the CPU), cpu, cuda, cuda:N or mps; aggregation and the server state stay on the CPU. Resolved once and saved in config.json", group="training")
    precision: str = _f("auto", "auto (bf16 where the device runs it natively: a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX; float32 elsewhere), fp32, bf16 (autocast) or fp16 (autocast with a gradient scaler, CUDA only); routers, softmax and losses stay float32. Resolved once and saved in config.json", choices=PRECISIONS, group="training")
    encoder_path: str = _f("varlen", "how a BERT/RoBERTa encoder runs a batch: varlen (padding-free: the projections, LoRA and feed-forward run on the real tokens only, with a 3x cheaper dropout of the same probability) or padded (the model's own forward over the padded [batch, length] tensor with torch's dropout, as runs made before this setting did). The two give the same outputs in evaluation and different dropout draws in training, so a seed's numbers differ; a 3-seed comparison found the difference inside the seed noise (docs/benchmarks.md). Decoders (--decoder-path), DeBERTa and FedDPA's instance weighting always run padded", choices=ENCODER_PATHS, group="training")
    decoder_path: str = _f("varlen", "how a Llama-family decoder (SmolLM2, Llama, Mistral, Qwen2) runs a training or loss batch: varlen (padding-free: every layer but attention on the real tokens only, causal attention with the fused kernel and no mask, LoRA dropout 3x cheaper with the same probability) or padded (the model's own forward on the padded batch with torch's dropout, as runs made before this setting did). Same outputs without dropout, other dropout draws in training; 1.04x (fp32) / 1.05x (bf16) faster on real E2E batches (benchmarks/README.md#decoder_throughputpy). GPT-2, LEFF and generation always run padded", choices=DECODER_PATHS, group="training")
    gradient_checkpointing: bool = _f(False, "recompute each transformer block's activations in the backward pass instead of keeping them (Hugging Face gradient checkpointing, non-reentrant): less memory for long sequences and large decoders, about a third more compute, the same loss and gradients", group="training")
    seed: int = _f(42, "run seed; every client/round/phase seed derives from it", group="training")
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice)", group="training", resume="free")
    # LoRA and head
    rank: int = _f(4, "LoRA rank r", group="model")
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r)", group="model")
    lora_dropout: float = _f(0.05, "LoRA dropout", group="model")
    target_modules: list[str] = _f([], "LoRA target modules (default per architecture: query/value, q_proj/v_proj)", group="model")
    head_policy: str = _f("frozen", "classification head: frozen (never trained: the FedLEASE paper and its official code), local (trained, kept), shared (trained and averaged in the group), classifier (only out_proj trained and averaged over all); the LEFF family and decoders set their own", choices=HEAD_POLICIES, group="model")
    # Decoders and generation (generation tasks)
    quantization: str = _f("none", "load the decoder in 8 or 4 bits through bitsandbytes (needs a CUDA GPU)", choices=QUANTIZATIONS, group="generation")
    num_beams: int = _f(1, "beams for generation (1 = greedy)", group="generation")
    max_new_tokens: int = _f(64, "most tokens generated per prompt", group="generation")
    length_penalty: float = _f(1.0, "beam search: exponent of the length normalisation of beam scores", group="generation")
    no_repeat_ngram_size: int = _f(0, "never generate an n-gram twice, for this n (0 = off)", group="generation")
    gen_batch_size: int = _f(16, "prompts generated together (left-padded, KV cache)", group="generation")
    # Chat models and instruction data (data/chat.py)
    chat_template: str = _f("auto", "instruction tasks (inst-*, a prompt/target --dataset) on a chat model: auto puts the prompt in a user turn of the tokenizer's chat template when it has one (loss on the assistant's tokens only); none uses the plain prompt", choices=CHAT_TEMPLATES, group="chat")
    # FedLEASE
    max_clusters: int = _f(8, "FedLEASE: M_max, the upper bound on the number of experts", group="fedlease")
    routing: str = _f("adaptive_topM", "FedLEASE routing", choices=ROUTINGS, group="fedlease")
    top_k: int = _f(2, "FedLEASE: k for --routing fixed_topk", group="fedlease")
    renormalize: bool = _f(True, "FedLEASE: renormalise the selected router weights", group="fedlease")
    router_aggregation: str = _f("cluster", "FedLEASE: routers averaged in the cluster or kept local", choices=ROUTER_AGGREGATIONS, group="fedlease")
    experts: str = _f("clustered", "FedLEASE ablation: expert allocation", choices=EXPERT_MODES, group="fedlease")
    single_rank_multiplier: int = _f(1, "FedLEASE ablation: rank multiplier for --experts single_shared", group="fedlease")
    clustering: str = _f("hierarchical", "FedLEASE: clustering algorithm; 'task' is an oracle diagnostic (one expert per task, clients grouped by their task), not the paper's method", choices=CLUSTERINGS, group="fedlease")
    pair_split_threshold: float = _f(0.5, "FedLEASE: with 2 clients, split them when their distance exceeds this", group="fedlease")
    clustering_matrices: str = _f("b", "FedLEASE: the matrices Eq. 2 compares: b (the paper's, the warmup B matrices) or delta_w (each module's update ΔW = B·A, from the factors); see docs/methods/fedlease.md#client-distance for when delta_w recovered the tasks and b did not", choices=CLUSTERING_MATRICES, group="fedlease")
    # Baselines
    ifca_clusters: int = _f(4, "IFCA: number of cluster LoRAs K", group="baselines")
    fedprox_mu: float = _f(0.01, "FedProx: proximal coefficient mu", group="baselines")
    feddpa_lambda: float = _f(0.5, "FedDPA: weight of the global LoRA in the mixture", group="baselines")
    feddpa_weighting: str = _f("fixed", "FedDPA inference: fixed (the --feddpa-lambda mixture) or instance (the paper's instance-wise dynamic weighting)", choices=FEDDPA_WEIGHTINGS, group="baselines")
    feddpa_instances: int = _f(5, "FedDPA instance weighting: local training instances compared with each test instance", group="baselines")
    feddpa_max_weight: float = _f(0.5, "FedDPA instance weighting: local weight = this × mean cosine similarity (the official code's default 0.5)", group="baselines")
    # LEFF (docs/methods/leff.md)
    layer_budgets: list[str] = _f(["1"], "LEFF: layers each client can train (L_i), cycled over the clients, e.g. --layer-budgets 1 2 4; or 'uniform:a-b' drawn once per client from the seed", group="leff")
    compression_rate: float = _f(0.5, "LEFF: r_c in (0, 1]; a segment of n unselected layers becomes a student of ceil(n*r_c) layers", group="leff")
    distill_alpha: float = _f(0.5, "LEFF: weight of the attention KL in the distillation loss (1-a)*MSE + a*KL", group="leff")
    distill_steps: int = _f(200, "LEFF: distillation steps per student per round (0: students stay at their evenly spaced init)", group="leff")
    distill_lr: float = _f(1e-4, "LEFF: distillation AdamW learning rate", group="leff")
    distill_batch_size: int = _f(16, "LEFF: distillation batch size", group="leff")
    distill_reuse: str = _f("off", "LEFF: off (the paper: every round distils every segment a client needs) or unchanged (a segment whose teacher blocks, and every block before it, are the very tensors they were when its student was distilled in an earlier round reuses that student instead of distilling again: the teacher and its inputs are the same function, but the student keeps that round's batch draws, so numbers differ from off; a resumed run distils afresh in its first round)", choices=DISTILL_REUSE, group="leff")
    distill_teacher: str = _f("per-step", "LEFF: per-step (the paper's loop: every distillation step runs the global blocks before the segment and the segment itself on its batch) or cached (the global model runs over the distillation texts once per round and every step reads its batch's hidden states and attention from that: the same batches and targets up to float rounding, the teacher's cost paid once instead of once per step; DeBERTa keeps per-step)", choices=DISTILL_TEACHERS, group="leff")
    distill_precision: str = _f("fp32", "LEFF: fp32 (the server distils in float32 whatever --precision says) or run (the distillation runs under the run's --precision autocast, bf16 where the hardware has it: the students' matmuls in bf16, so the students differ from fp32's by bf16 rounding)", choices=DISTILL_PRECISIONS, group="leff")
    distill_examples: int = _f(512, "LEFF: proxy texts used for distillation", group="leff")
    proxy_dataset: str = _f("auto", "LEFF: public proxy texts for distillation (and, on a decoder, the importance batch): 'auto' (the paper's pairing: webnlg for generation tasks, wnli otherwise), a GLUE task folder (wnli), 'webnlg' (WebNLG train references, for E2E on a decoder) or 'demo' (the bundled synthetic texts)", group="leff")
    importance_examples: int = _f(64, "LEFF family: labelled server examples held out of every client's pool, for the importance pass", group="leff")
    sampling: str = _f("importance", "LEFF: block selection per round", choices=LEFF_SAMPLINGS, group="leff")
    blocks: str = _f("sliding", "LEFF: candidate blocks: every start (sliding) or non-overlapping starts (disjoint)", choices=LEFF_BLOCKS, group="leff")
    importance_source: str = _f("server_batch", "LEFF: gradients for the importance from one pass over the server batch, or data-free from the last aggregation, g = -dTheta/lr (uniform in round 1)", choices=LEFF_IMPORTANCE_SOURCES, group="leff")
    importance_normalise: str = _f("max", "LEFF: block scores divided by their max before the softmax (max) or the literal Eq. 6 (none)", choices=LEFF_NORMALISE, group="leff")
    importance_temperature: float = _f(1.0, "LEFF: softmax temperature tau", group="leff")
    train_head_set: bool = _f(True, "LEFF / FedAvg-full: train and average the always-trainable set (the classification head)", group="leff")
    constant_lr: bool = _f(False, "LEFF family: constant learning rate in each local run (the LEFF paper states one learning rate and no schedule) instead of linear decay", group="leff")
    slora_stage1_fraction: float = _f(0.25, "SLoRA: fraction of rounds in the sparse stage 1", group="leff")
    slora_density: float = _f(0.01, "SLoRA: density of the stage-1 sparse mask", group="leff")
    # Flower engine
    client_cpus: float = _f(1.0, "flower-sim: CPUs reserved per simulated client (Ray resources)", group="flower", resume="free")
    client_gpus: float = _f(0.0, "flower-sim: GPUs (fractions allowed) reserved per simulated client", group="flower", resume="free")
    round_timeout: float = _f(3600.0, "Flower: seconds to wait for the replies of a round before aggregating those that arrived", group="flower", resume="free")
    max_reply_bytes: int = _f(0, "Flower: most bytes one client reply may hold; larger replies are rejected (0: twice the largest message the server sent in the run, plus 1 MiB)", group="flower", resume="free")
    max_round_bytes: int = _f(0, "Flower: most bytes all replies of one round may hold, smallest replies counted first (0: clients x (largest message sent + 1 MiB) + one reply bound)", group="flower", resume="free")
    aggregation: str = _f("mean", "FedAvg-type aggregation (FedIT, FFA-LoRA, FedSA-LoRA, FedProx): data-size-weighted mean, or the coordinate-wise trimmed-mean / median of Yin et al. 2018, robust to a few clients sending arbitrary updates", choices=AGGREGATIONS, group="training")
    trim_fraction: float = _f(0.1, "--aggregation trimmed-mean: the share of clients cut at each end, per coordinate, in [0, 0.5)", group="training")
    # Differential privacy (algorithms/privacy.py, docs/privacy.md)
    dp: str = _f("off", "user-level differential privacy for " + ", ".join(DP_METHODS) + ": each client's update (what it uploads minus what it was sent) is clipped to --dp-clip, and Gaussian noise of std --dp-noise x --dp-clip is added to each aggregation group's sum at the server (central) or to the update by the client before upload (local)", choices=DP_MODES, group="privacy")
    dp_clip: float = _f(1.0, "C: the L2 norm each client's update is clipped to, over all it uploads ('inf': no clipping, only with --dp-noise 0)", group="privacy", infinite=True)
    dp_noise: float | None = _f(None, "sigma: the noise std in units of C (give this or --dp-epsilon)", group="privacy")
    dp_epsilon: float | None = _f(None, "target epsilon: sigma is computed for the run's rounds and sampling rate (give this or --dp-noise)", group="privacy")
    dp_delta: float = _f(1e-5, "delta of the (epsilon, delta) guarantee reported each round", group="privacy")
    dp_seed: int | None = _f(None, "seed the DP noise to reproduce an experiment; by default it comes from the OS's randomness, as the guarantee needs noise nobody can regenerate (a seed saved in config.json can be)", group="privacy")
    # Experiment tracking (records/tracking.py)
    tracking: str = _f("none", "log the run to a tracker: tensorboard (events in RUN_DIR/tensorboard) or mlflow (a local store, RUN_DIR/mlflow.db, unless --tracking-uri); needs pip install 'fedpeft[tracking]'", choices=TRACKERS, group="tracking", resume="free")
    tracking_uri: str | None = _f(None, "mlflow: the tracking URI (a server, or sqlite:///FILE) instead of the run folder's store; tensorboard: the folder the run's event folder goes under", group="tracking", resume="free")
    tracking_experiment: str = _f("fedpeft", "the experiment the run is logged under (fedpeft bench uses the suite's name)", group="tracking", resume="free")
    # Output
    output_dir: str | None = _f(None, "run folder (default: runs/<method>-<time>, made unique); it must not hold another run", group="output", resume="folder")
    resume: str | None = _f(None, "continue the stopped run in this folder; flags may change only --global-rounds (upwards), --threads, --quiet, --data-dir and the Flower timeouts/resources", group="output", resume="folder")
    overwrite: bool = _f(False, "replace the run that --output_dir holds: the folder is emptied first", group="output", resume="folder")
    quiet: bool = _f(False, "no progress bar; warnings and the final summary only", group="output", resume="free")

    # ---------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        self.validate()
        if self.dataset_resolved:  # config.json alone makes the dataset's task known to this process
            from fedpeft.data.custom import register_dataset

            register_dataset(self.dataset_spec())

    def validate(self) -> "RunConfig":
        """Check every field once, early; raise FedPeftError with what to change."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _typed(f, getattr(self, f.name)))
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise FedPeftError(
                    f"unknown {_flag(f.name)} {value!r}: choose one of {', '.join(choices)}"
                )
        if self.rank <= 0:
            raise FedPeftError(f"--rank must be a positive integer, got {self.rank}")
        positive = ("train_samples", "test_samples", "global_rounds", "local_epochs", "batch_size",
                    "eval_batch_size", "max_length", "max_clusters", "top_k", "ifca_clusters",
                    "single_rank_multiplier", "feddpa_instances", "num_beams", "max_new_tokens", "gen_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise FedPeftError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.warmup_rounds < 0:
            raise FedPeftError(f"--warmup-rounds must be 0 or more, got {self.warmup_rounds}")
        for name in ("lr", "alpha", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise FedPeftError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise FedPeftError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.fedprox_mu < 0:
            raise FedPeftError("--weight-decay, --max-grad-norm and --fedprox-mu must not be negative")
        if not 0.0 <= self.feddpa_max_weight <= 1.0:
            raise FedPeftError(f"--feddpa-max-weight must be in [0, 1], got {self.feddpa_max_weight}")
        if self.no_repeat_ngram_size < 0:
            raise FedPeftError(f"--no-repeat-ngram-size must be 0 (off) or more, got {self.no_repeat_ngram_size}")
        if not 0.0 <= self.feddpa_lambda <= 1.0:
            raise FedPeftError(f"--feddpa-lambda must be in [0, 1], got {self.feddpa_lambda}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise FedPeftError(f"--validation-fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0.0 < self.participation <= 1.0:
            raise FedPeftError(f"--participation must be in (0, 1], got {self.participation}")
        for name in ("num_clients", "clients_per_round"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise FedPeftError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.eval_every < 1:
            raise FedPeftError(f"--eval-every must be at least 1, got {self.eval_every}")
        self.samples_for_tasks()  # checks the TASK=TRAIN:TEST syntax
        self._validate_dataset()
        self._validate_leff()
        if self.client_cpus <= 0 or self.client_gpus < 0 or self.round_timeout <= 0:
            raise FedPeftError("--client-cpus and --round-timeout must be positive and --client-gpus not negative")
        if self.max_reply_bytes < 0 or self.max_round_bytes < 0:
            raise FedPeftError("--max-reply-bytes and --max-round-bytes must be 0 (derived) or positive")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise FedPeftError(f"--trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.threads is not None and self.threads < 1:
            raise FedPeftError(f"--threads must be at least 1, got {self.threads}")
        hardware.check_device(self.device)
        self._validate_dp()
        return self

    def _validate_dataset(self) -> None:
        E = FedPeftError
        if not self.dataset:
            given = [f for f in _DATASET_FIELDS if getattr(self, f)] + (["label_kind"] if self.label_kind != "auto" else [])
            if given:
                raise E(f"{_flag(given[0])} describes your own data: give the file with --dataset too")
            return
        if len(self.text_columns) > 2:
            raise E(f"--text-columns takes one or two columns, got {len(self.text_columns)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise E(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.client_column:
            if self.partition != "task":
                raise E(f"--client-column gives each client the rows of one value: --partition {self.partition} "
                        "does not apply; leave --partition at task")
            if self.num_clients:
                raise E("--client-column makes one client per value: leave out --num-clients")

    @property
    def dataset_resolved(self) -> bool:
        """True once --dataset's columns have been read (RunConfig.with_dataset): its task is fully
        described by these settings (name, kind, columns, classes) and its clients are in `tasks`."""
        if not (self.dataset and self.dataset_name and self.tasks and self.label_kind != "auto"):
            return False
        if self.label_kind == "generation":
            return bool(self.prompt_column and self.target_column)
        return bool(self.text_columns and self.label_column and (self.label_kind == "regression" or self.label_names))

    def dataset_spec(self):
        """The task description of a resolved --dataset (data/custom.py), from these settings alone."""
        from fedpeft.data.custom import DatasetSpec

        return DatasetSpec(name=self.dataset_name, source=self.dataset, kind=self.label_kind,
                           text_columns=tuple(self.text_columns), label_column=self.label_column,
                           prompt_column=self.prompt_column, target_column=self.target_column,
                           client_column=self.client_column, test_file=self.test_file,
                           test_fraction=self.test_fraction, label_values=tuple(self.label_names))

    def with_dataset(self) -> "RunConfig":
        """These settings with --dataset resolved: its columns read, its task kind and classes decided,
        its task registered, and `tasks` filled (one per value of --client-column, or --num-clients
        times); itself when there is no dataset or it is resolved already."""
        if not self.dataset or self.dataset_resolved:
            return self
        from fedpeft.data.custom import absolute_if_here, resolve_dataset

        # a file found from the working folder is saved with its absolute path (Ray workers, a resume from
        # elsewhere); one under the data root stays relative to it (each Flower node has its own root)
        source, test_file = absolute_if_here(self.dataset), self.test_file and absolute_if_here(self.test_file)
        spec, n_values = resolve_dataset(
            source, name=self.dataset_name or None, text_columns=self.text_columns, label_column=self.label_column,
            prompt_column=self.prompt_column, target_column=self.target_column, client_column=self.client_column,
            test_file=test_file, test_fraction=self.test_fraction, label_kind=self.label_kind,
            label_names=self.label_names, data_dir=self.resolved_data_dir())
        values = self.to_dict()
        values.update(dataset=source, test_file=test_file, dataset_name=spec.name, text_columns=list(spec.text_columns), label_column=spec.label_column,
                      label_kind=spec.kind, label_names=list(spec.label_names or spec.label_values))
        name, tasks = spec.name, list(self.tasks)
        if self.client_column:
            expected = [name] * n_values
            if tasks and tasks != expected:
                raise FedPeftError(f"--client-column {self.client_column} makes {n_values} clients of {name}: leave "
                                   "--tasks out (one client per value)")
            values["tasks"] = expected
        elif not tasks:
            if not self.num_clients:
                raise FedPeftError(f"how many clients share {name}? give --num-clients N, --tasks {name} {name} …, "
                                   "or --client-column COLUMN")
            values["tasks"] = [name] * self.num_clients
        elif name not in tasks:
            raise FedPeftError(f"--tasks does not name the dataset's task {name!r}: list it once per client "
                               f"(e.g. --tasks {name} {name}) or give --tasks {name} --num-clients N")
        return RunConfig(**values)

    def _validate_dp(self) -> None:
        E = FedPeftError
        if not self.dp_clip > 0:
            raise E(f"--dp-clip must be positive (or inf), got {self.dp_clip}")
        if self.dp_noise is not None and not self.dp_noise >= 0:
            raise E(f"--dp-noise must be 0 or more, got {self.dp_noise}")
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            raise E(f"--dp-epsilon must be positive, got {self.dp_epsilon}")
        if not 0.0 < self.dp_delta < 1.0:
            raise E(f"--dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.dp == "off":
            given = [_flag(n) for n in ("dp_noise", "dp_epsilon", "dp_seed") if getattr(self, n) is not None]
            if given:
                raise E(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without --dp central or --dp local")
            return
        if self.method not in DP_METHODS:
            raise E(f"--dp {self.dp}: {self.method} is not in the FedAvg family differential privacy covers "
                    f"({', '.join(DP_METHODS)}): its uploads are not all clipped, noised updates (docs/privacy.md)")
        if (self.dp_noise is None) == (self.dp_epsilon is None):
            raise E(f"--dp {self.dp} needs exactly one of --dp-noise (sigma) or --dp-epsilon (a target from which "
                    "sigma is computed)")
        if self.dp_clip == float("inf") and self.dp_noise != 0:
            raise E("--dp-clip inf bounds nothing, so no noise makes it private: use it only with --dp-noise 0")
        if self.aggregation != "mean":
            raise E(f"--dp {self.dp} accounts for the weighted mean of clipped updates: --aggregation "
                    f"{self.aggregation} has another sensitivity; use --aggregation mean")

    def _validate_leff(self) -> None:
        E = FedPeftError
        self.parse_layer_budgets()
        if not 0.0 < self.compression_rate <= 1.0:
            raise E(f"--compression-rate must be in (0, 1], got {self.compression_rate}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise E(f"--distill-alpha must be in [0, 1], got {self.distill_alpha}")
        if self.distill_steps < 0 or self.distill_batch_size < 1 or self.distill_examples < 1 or not self.distill_lr > 0:
            raise E("--distill-steps must be >= 0, --distill-batch-size and --distill-examples >= 1, --distill-lr > 0")
        if self.importance_examples < 1:
            raise E(f"--importance-examples must be at least 1, got {self.importance_examples}")
        if not self.importance_temperature > 0:
            raise E(f"--importance-temperature must be positive, got {self.importance_temperature}")
        if not 0.0 <= self.slora_stage1_fraction < 1.0 or not 0.0 < self.slora_density <= 1.0:
            raise E("--slora-stage1-fraction must be in [0, 1) and --slora-density in (0, 1]")

    def parse_layer_budgets(self) -> list[int] | tuple[int, int]:
        """--layer-budgets as a list of ints (cycled over the clients) or (a, b) for 'uniform:a-b'."""
        E = FedPeftError
        items = [str(x) for x in self.layer_budgets]
        if len(items) == 1 and items[0].startswith("uniform:"):
            lo, _, hi = items[0][len("uniform:"):].partition("-")
            if not (_COUNT.fullmatch(lo) and _COUNT.fullmatch(hi) and 1 <= int(lo) <= int(hi)):
                raise E(f"--layer-budgets {items[0]!r} is not uniform:a-b with 1 <= a <= b, e.g. uniform:1-4")
            return int(lo), int(hi)
        if not items or not all(_COUNT.fullmatch(x) and int(x) >= 1 for x in items):
            raise E(f"--layer-budgets takes whole numbers >= 1 (e.g. --layer-budgets 1 2 4), got {' '.join(items)}")
        return [int(x) for x in items]

    @property
    def reserved_train_examples(self) -> int:
        """Train examples per task held out of every client's pool for the server (LEFF family)."""
        return self.importance_examples if self.method in LEFF_FAMILY else 0

    def check_runnable(self) -> None:
        """Checks that only matter when a run starts (a config file may be partial before that)."""
        if not self.tasks:
            raise FedPeftError("no clients: give one task per client, e.g. --tasks sst2 sst2 mrpc mrpc")
        if self.clients_per_round is not None and self.clients_per_round > len(self.tasks):
            raise FedPeftError(f"--clients-per-round {self.clients_per_round} exceeds the {len(self.tasks)} clients")
        if self.method == "fedlease" and self.experts == "clustered" and self.phase2_rounds < 1:
            raise FedPeftError(
                f"--global-rounds ({self.global_rounds}) must exceed --warmup-rounds "
                f"({self.warmup_rounds}): FedLEASE needs at least one round after warmup"
            )

    # ---------------------------------------------------------------- derived values
    @property
    def has_warmup(self) -> bool:
        """Rounds 1..warmup_rounds are a warmup (FedLEASE with clustered experts only)."""
        return _CATALOGUE[self.method].has_warmup and self.experts == "clustered"

    @property
    def phase2_rounds(self) -> int:
        """Rounds after warmup: T = global_rounds − warmup_rounds for methods with a warmup."""
        return self.global_rounds - self.warmup_rounds if self.has_warmup else self.global_rounds

    def samples_for_tasks(self) -> tuple[dict[str, int], dict[str, int]]:
        """(train, test) examples per client for every task of the run, --task-samples applied."""
        train = {t: self.train_samples for t in self.tasks}
        test = {t: self.test_samples for t in self.tasks}
        for item in self.task_samples:
            task, _, sizes = item.partition("=")
            tr, _, te = sizes.partition(":")
            if not (task and _COUNT.fullmatch(tr) and _COUNT.fullmatch(te) and int(tr) > 0 and int(te) > 0):
                raise FedPeftError(f"--task-samples {item!r} is not TASK=TRAIN:TEST with positive numbers, e.g. mrpc=500:64")
            train[task], test[task] = int(tr), int(te)
        return train, test

    def resolved_data_dir(self) -> str | None:
        return self.data_dir or os.environ.get("FEDPEFT_DATA_DIR") or None

    def resolved_device(self) -> str:
        """The device this run computes on (see `resolved`). On flower-sim a client computes where its
        Ray resources put it: on its GPU share when --client-gpus > 0, on the CPU otherwise."""
        if self.engine != "flower-sim":
            return hardware.resolve_device(self.device)
        kind = hardware.device_type(self.device)
        if self.client_gpus > 0:
            if kind not in ("auto", "cuda"):
                raise FedPeftError(f"--client-gpus {self.client_gpus:g} reserves a GPU share for every simulated "
                                   f"client, but --device {self.device} keeps them off the GPU: use --device auto "
                                   f"(or cuda), or --client-gpus 0")
            if not hardware.cuda_available():
                raise FedPeftError(f"--client-gpus {self.client_gpus:g} needs a CUDA GPU and none is visible here: "
                                   f"use --client-gpus 0 (the clients train on the CPU)")
            return hardware.resolve_device("cuda" if kind == "auto" else self.device)
        if kind == "cuda":
            raise FedPeftError(f"--engine flower-sim --device {self.device}: a simulated client sees a GPU only "
                               f"through its Ray GPU share: give --client-gpus (e.g. 0.25: four clients share "
                               f"one GPU), or use --device auto or cpu")
        return hardware.resolve_device(hardware.CPU if kind == "auto" else self.device)

    def resolved(self, *, model_type: str | None = None) -> "RunConfig":
        """Every setting that has an automatic value, resolved once: the run folder's config.json
        holds the result, and resume and export read it back from there (resolving again changes
        nothing). `model_type` (the backbone's) decides the default LoRA targets; without it the
        backbone is loaded to find it.

        - `target_modules`: the architecture's attention projections, or every block linear for
          FedLoRA and SLoRA (models/targets.py);
        - `head_policy`: the LEFF family's trainable set decides it (`shared`, or `frozen` with
          --no-train-head-set), the LEFF paper's PEFT baselines train only the classifier
          (`classifier`), and a decoder has no head (`none`);
        - `proxy_dataset`: `auto` is the LEFF paper's pairing, WebNLG for generation tasks, WNLI
          otherwise (docs/methods/leff.md#proxy-dataset);
        - `data_dir`: the flag, else $FEDPEFT_DATA_DIR;
        - `device`: `auto` is CUDA when a GPU is visible, else the CPU (on flower-sim: CUDA exactly
          when the clients have a GPU share, --client-gpus); an explicit device must exist here;
        - `precision`: `auto` is bf16 where that device runs it natively, else fp32 (hardware.py).
        """
        from fedpeft.data.tasks import backbone_kind, get_task

        if self.dataset and not self.dataset_resolved:
            return self.with_dataset().resolved(model_type=model_type)
        spec = _CATALOGUE[self.method]
        values = self.to_dict()
        for t in dict.fromkeys(self.tasks):
            get_task(t)  # an unknown task: one clear error before anything loads
        if self.num_clients is not None and len(self.tasks) != self.num_clients:
            if len(self.tasks) != 1:
                raise FedPeftError(f"--num-clients {self.num_clients} makes clients of ONE task; --tasks lists "
                                   f"{len(self.tasks)}: give one task, or one task per client without --num-clients")
            values["tasks"] = self.tasks * self.num_clients
        causal = bool(self.tasks) and backbone_kind(self.tasks) == "causal"
        if spec.head == "head_set":
            values["head_policy"] = "shared" if self.train_head_set else "frozen"
        elif causal:
            values["head_policy"] = "none"
        elif spec.head == "classifier":
            values["head_policy"] = "classifier"
        if self.proxy_dataset == "auto":
            values["proxy_dataset"] = "webnlg" if any(get_task(t).is_generation for t in self.tasks) else "wnli"
        values["data_dir"] = self.resolved_data_dir()
        values["device"] = self.resolved_device()
        values["precision"] = hardware.resolve_precision(self.precision, values["device"])
        if spec.lora_targets and not self.target_modules:
            from fedpeft.models.targets import lora_targets

            if model_type is None:
                from fedpeft.models.backbone import load_backbone

                model_type = load_backbone(self.model_name, kind="causal" if causal else "encoder",
                                           quantization=self.quantization, device=values["device"]).model_type
            values["target_modules"] = lora_targets(model_type, spec.lora_targets)
        return RunConfig(**values)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from fedpeft.atomic import atomic_write

        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "settings") -> "RunConfig":
        """The settings `values` names; the result remembers which ones were given (`_given`), so
        that `--resume` knows what the command asks to change."""
        if not isinstance(values, dict):
            raise FedPeftError(f"{source} must hold a table of settings (name = value), not a {_kind(values)}")
        known = {f.name for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in values.items():
            name = key.replace("-", "_") if isinstance(key, str) else key
            if name not in known:
                raise FedPeftError(f"unknown setting {key!r} in {source}: see `fedpeft run --help` for the names")
            clean[name] = value
        try:
            cfg = cls(**clean)
        except FedPeftError as exc:
            if source in ("settings", "the command line"):
                raise
            raise FedPeftError(f"{source}: {exc}") from None
        cfg._given = frozenset(clean)
        return cfg

    # ---------------------------------------------------------------- resume
    def resume_kind(self, name: str) -> str:
        """What `--resume` may do with setting `name` (the module docstring lists the kinds)."""
        if name == "global_rounds" and self.method == "slora":
            return "same"  # SLoRA's sparse stage is a fraction of all rounds: the total shapes the run
        return _FIELDS[name].metadata["resume"]

    def sample_size(self, n: int) -> int:
        """Clients drawn per round out of n: K = --clients-per-round, else ceil(f·N) for
        --participation f (engines/participation.py draws them; the DP accountant counts them)."""
        if self.clients_per_round is not None:
            return min(n, int(self.clients_per_round))
        return min(n, max(1, math.ceil(self.participation * n - 1e-9)))

    def shaping_settings(self) -> dict[str, Any]:
        """The settings that shape the run (resume kind `same`): the fingerprint a checkpoint carries."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if self.resume_kind(f.name) == "same"}

    def requested(self) -> dict[str, Any]:
        """The settings this config asks for explicitly: the names given to `from_dict` (the CLI,
        a TOML file), or, for a RunConfig made in Python, the fields that differ from their default."""
        names = getattr(self, "_given", None)
        if names is None:
            names = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != _default(f)}
        return {n: getattr(self, n) for n in sorted(names)}

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """A saved config.json of a run, or a TOML file of settings."""
        return cls.from_dict(read_settings(path), source=str(path))


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML or JSON file, as a plain dict (not yet validated)."""
    p = Path(path)
    if p.is_dir():
        raise FedPeftError(f"config file {p} is a folder, not a file of settings")
    if not p.is_file():
        raise FedPeftError(f"config file {p} does not exist")
    try:
        raw = p.read_bytes()
        text = raw.decode("utf-8")
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            data = toml_module().loads(text)
    except UnicodeDecodeError as exc:
        raise FedPeftError(f"cannot read config file {p}: byte {exc.object[exc.start]:#04x} at offset {exc.start} "
                           "is not UTF-8; save the file as UTF-8") from None
    except (ValueError, OSError, RecursionError) as exc:
        raise FedPeftError(f"cannot read config file {p}: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise FedPeftError(f"config file {p} must hold a table of settings (name = value), not a {_kind(data)}")
    # Allow a [run] table or top-level keys.
    return data.get("run", data) if isinstance(data.get("run"), dict) else data


def toml_module():
    """tomllib (Python 3.11+), or the tomli package it came from on Python 3.10."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


_COUNT = re.compile(r"[0-9]+")
_FIELDS: dict[str, dataclasses.Field] = {}


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _kind(value: Any) -> str:
    return {list: "list", dict: "table", str: "string", bool: "boolean", int: "whole number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _typed(f: dataclasses.Field, value: Any) -> Any:
    """`value` checked against field `f`'s annotation (ints may stand for floats, and numbers for the
    strings of a list such as --layer-budgets); a wrong type is a FedPeftError naming the setting."""
    ann = str(f.type).replace(" ", "")
    optional = ann.endswith("|None")
    base = ann[: -len("|None")] if optional else ann
    if value is None and optional:
        return None
    flag = _flag(f.name)

    def wrong(what: str) -> FedPeftError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return FedPeftError(f"{flag} must be {what}, got {shown} (a {_kind(value)})")

    if base == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("a whole number")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        try:
            number = float(value)
        except OverflowError:
            raise wrong("a finite number") from None
        if math.isnan(number) or (math.isinf(number) and not (f.metadata.get("infinite") and number > 0)):
            raise wrong("a finite number" + (" or inf" if f.metadata.get("infinite") else ""))
        return number
    if base == "str":
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if base == "list[str]":
        if not isinstance(value, (list, tuple)):
            example = f', e.g. {f.name} = ["sst2", "sst2"]' if f.name == "tasks" else ""
            raise wrong(f"a list of strings{example}")
        out = []
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool):
                item = str(item)
            if not isinstance(item, str):
                raise wrong("a list of strings")
            out.append(item)
        return out
    raise AssertionError(f"RunConfig.{f.name}: no type check for {f.type}")  # a new annotation: add it above


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_FIELDS.update({f.name: f for f in dataclasses.fields(RunConfig)})


def field_help() -> list[tuple[dataclasses.Field, str]]:
    """(field, group) pairs in declaration order, for the CLI."""
    return [(f, f.metadata.get("group", "run")) for f in dataclasses.fields(RunConfig)]
