"""The mixture-of-LoRA-experts of FedLEASE (docs/methods/fedlease.md#mixture-layer), by role:

- `layer.py`: the layer (`MoELoRALinear`, its fused expert evaluation) and the model-level helpers
  that inject, remove, switch and disable it;
- `state.py`: the structured state keys (`moe_key`, `parse_moe_key`) and the mixture state
  (`moe_state`, `load_moe_state`), loaded strictly (docs/methods/fedlease.md#structured-keys-and-strict-loading);
- `export.py`: an expert as a PEFT LoRA adapter folder, routers to and from safetensors files.
"""
