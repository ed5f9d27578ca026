"""Which linear modules get LoRA, per architecture (the `model_type` of a transformers config).

`attention`: the query and value projections, the FedLEASE paper's (and LoRA's) default.
`block_linears`: every linear map of every block, the LEFF paper's FedLoRA baseline. For Llama that
is all seven linears, not only q/k/v/o: it is what reproduces the LEFF paper's Table 5 count for
Llama-3.1-8B (32 × 655,360 = 20,971,520 parameters at r = 8; q/k/v/o alone would give 32 × 212,992).
Suffixes match the end of a module's path ("output.dense" also matches attention.output.dense).
"""

from __future__ import annotations

from fedpeft.errors import FedPeftError

ATTENTION = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

BLOCK_LINEARS = {
    "bert": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense"],
    "gpt2": ["c_attn", "attn.c_proj", "mlp.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

KINDS = {"attention": ATTENTION, "block_linears": BLOCK_LINEARS}


def lora_targets(model_type: str, kind: str = "attention") -> list[str]:
    """The target module names of `kind` for an architecture; a clear error when fedpeft has none."""
    table = KINDS[kind]
    if model_type not in table:
        what = "FedLoRA targets" if kind == "block_linears" else "default LoRA targets"
        raise FedPeftError(f"no {what} for model type {model_type!r}: pass --target-modules")
    return list(table[model_type])
