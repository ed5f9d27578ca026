"""FedSA-LoRA (Guo et al., ICLR 2025): A and B trained locally, only A uploaded and averaged.

B stays on its client (kept in the client's store) and never leaves it; client i's model uses
s·B_i·Ā. The first instruction carries the whole common initialisation (A and B = 0), so every client
starts from the same tensors (docs/methods/fedlease.md#common-initialisation).
"""

from __future__ import annotations

from fedpeft.algorithms.fedit import FedIT


class FedSALoRA(FedIT):
    name = "fedsa-lora"
    trained_factors = ("A", "B")
    sent_factors = ("A",)
