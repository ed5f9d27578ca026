"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at the common initialisation, only B trained and averaged.

The first instruction carries the whole common LoRA initialisation (A and B), so every client starts
from the same tensors; afterwards only B travels. A never changes, so the server's n-weighted mean of
B gives s·B̄A = the n-weighted mean of the clients' updates exactly. The client keeps its (unchanged)
A in its store.
"""

from __future__ import annotations

from fedpeft.algorithms.fedit import FedIT


class FFALoRA(FedIT):
    name = "ffa-lora"
    trained_factors = ("B",)
    sent_factors = ("B",)
