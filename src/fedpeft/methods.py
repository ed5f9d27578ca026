"""The catalogue of federated methods: the one place that lists them.

Each entry names the method, its family, the class that implements it (as "module:Class", imported
only when a run needs it, so `import fedpeft` and `fedpeft --help` stay fast) and a line of help.
`RunConfig` validates `--method` against this list; `algorithms.registry` builds the class. Adding a
method is one entry here plus its file under `algorithms/` implementing the contract
(docs/architecture.md#the-algorithm-contract).

Families:
- `lora`: the FedLEASE paper's setting (LoRA on the attention projections, the run's head policy);
- `leff`: the LEFF paper's setting (one task per run; the server holds a labelled importance batch
  out of every client's pool; constant learning rate available; client memory reported).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str  # "lora" or "leff"
    target: str  # "module:Class" under fedpeft.algorithms
    summary: str
    has_warmup: bool = False  # rounds before the main phase (FedLEASE; not its single-expert ablation)
    head: str = "policy"  # "policy": the run's --head-policy; "classifier": only the classifier trains (LEFF
    #                       paper's PEFT baselines); "head_set": LEFF's trainable set decides (--train-head-set)
    lora_targets: str = "attention"  # default LoRA targets: "attention" (per-architecture q/v), "block_linears"
    #                                  (every block linear), "" (the method puts no LoRA)
    dp: bool = False  # `--dp central|local` applies: a FedAvg-family method whose every upload is a clipped,
    #                   noised update (algorithms/privacy.py, docs/privacy.md)


CATALOGUE: tuple[MethodSpec, ...] = (
    MethodSpec("fedlease", "lora", "fedlease.algorithm:FedLEASE",
               "LoRA experts allocated by clustering warmup B matrices, adaptive top-M routers", has_warmup=True,
               dp=True),
    MethodSpec("fedit", "lora", "fedit:FedIT", "FedAvg over one shared LoRA (A and B averaged separately)", dp=True),
    MethodSpec("ffa-lora", "lora", "ffa_lora:FFALoRA", "A frozen at the common init, only B trained and averaged", dp=True),
    MethodSpec("fedsa-lora", "lora", "fedsa_lora:FedSALoRA", "A averaged, B kept local", dp=True),
    MethodSpec("feddpa", "lora", "feddpa:FedDPA", "a global and a personal LoRA, mixed at inference"),
    MethodSpec("ifca", "lora", "ifca:IFCA", "K cluster LoRAs, each client picks the lowest-loss one"),
    MethodSpec("fedprox", "lora", "fedprox:FedProx", "FedIT plus a proximal term on the trained LoRA", dp=True),
    MethodSpec("leff", "leff", "leff.algorithm:LEFF",
               "importance-sampled blocks trained in full, the rest distilled into students", head="head_set",
               lora_targets=""),
    MethodSpec("fedavg-full", "leff", "leff.fedavg_full:FedAvgFull", "FedAvg over every block", head="head_set",
               lora_targets=""),
    MethodSpec("fedlora", "leff", "fedlora:FedLoRA", "LoRA on every block linear, FedAvg",
               head="classifier", lora_targets="block_linears"),
    MethodSpec("slora", "leff", "slora:SLoRA", "a sparse stage, then LoRA from its SVD",
               head="classifier", lora_targets="block_linears"),
    MethodSpec("fedbitfit", "leff", "fedbitfit:FedBitFit", "biases and the classifier, FedAvg", head="classifier",
               lora_targets=""),
)

METHODS: dict[str, MethodSpec] = {m.name: m for m in CATALOGUE}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def dp_methods() -> tuple[str, ...]:
    """The methods `--dp` applies to (the FedAvg family)."""
    return tuple(m.name for m in CATALOGUE if m.dp)


def leff_family() -> tuple[str, ...]:
    return tuple(m.name for m in CATALOGUE if m.family == "leff")
