"""Client memory as the LEFF paper reports it, for its PEFT baselines (FedLoRA, SLoRA, FedBitFit).

Float32 bytes of every parameter the client holds (the backbone's unused pooler aside; the client's
head) plus gradients and AdamW moments of the parameters it trains (3 × trained); activations are
not included (docs/methods/leff.md#client-memory). LEFF computes its own from the blocks it sends.
"""

from __future__ import annotations

from typing import Any


def peak_client_memory(alg, trained_numel: int) -> dict[str, Any]:
    """`trained_numel`: what a client trains this round besides the classifier."""
    model = alg.runtime.model
    if not alg.has_head:
        held = sum(p.numel() for p in model.parameters())
        return {"peak_client_memory_bytes": 4 * held + 4 * 3 * trained_numel}
    head = model.head(alg.federation[0].num_labels)
    held = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("heads.", "encoder.pooler.")))
    held += sum(p.numel() for p in head.parameters())
    trained = trained_numel + head.out_proj.weight.numel() + head.out_proj.bias.numel()
    return {"peak_client_memory_bytes": 4 * held + 4 * 3 * trained}
