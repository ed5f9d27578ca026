"""FedLoRA (LoRA, Hu et al. 2022, run with FedAvg), the LEFF paper's LoRA baseline (spec §5).

LoRA on every linear map of every block (DeBERTa: query/key/value, attention output, intermediate,
output; GPT-2: c_attn, attn.c_proj, mlp.c_proj), A and B averaged separately with D_i weights, and
the classifier trained and averaged (classifier_head.py). The paper's rank is 8: pass --rank 8
(the leff-cpu suite does).
"""

from __future__ import annotations

import dataclasses

from fedpeft.algorithms.classifier_head import ClassifierHead
from fedpeft.algorithms.fedit import FedIT
from fedpeft.errors import FedPeftError

# Suffixes of the block linears per architecture ("output.dense" also matches attention.output.dense).
BLOCK_LINEARS = {
    "bert": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense"],
    "gpt2": ["c_attn", "attn.c_proj", "mlp.c_proj"],
    # Llama (SmolLM2): all seven linears, not only q/k/v/o: the spec's §5 says so and it is what
    # reproduces Table 5's FedLoRA count for Llama-3.1-8B (32 × 655,360 = 20,971,520 at r = 8;
    # q/k/v/o alone would give 32 × 212,992).
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def block_linears(model_type: str) -> list[str]:
    if model_type not in BLOCK_LINEARS:
        raise FedPeftError(f"no FedLoRA targets for model type {model_type!r}: pass --target-modules")
    return list(BLOCK_LINEARS[model_type])


class FedLoRA(ClassifierHead, FedIT):
    name = "fedlora"

    def build_runtime(self, backbone):
        if not self.cfg.target_modules:
            self.cfg = dataclasses.replace(self.cfg, target_modules=block_linears(backbone.model_type))
        return super().build_runtime(backbone)

    def trained_numel(self, rnd: int) -> int:
        from fedpeft.models.adapters import lora_parameters

        return sum(p.numel() for p in lora_parameters(self.runtime.sites, factors=self.trained_factors))
