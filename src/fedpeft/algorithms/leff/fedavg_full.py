"""FedAvg-full (McMahan et al. 2017) as the LEFF paper runs it: every block and 𝒜 trained and averaged,
embeddings frozen. It is LEFF with L_i = L for every client: one block, no student, nothing
sampled (docs/methods/leff.md#reduction-to-fedavg-full)."""

from __future__ import annotations

from fedpeft.algorithms.leff.algorithm import LEFF


class FedAvgFull(LEFF):
    """FedAvg over every block and 𝒜, embeddings frozen (McMahan et al. 2017): LEFF with L_i = L."""

    name = "fedavg-full"

    def client_budgets(self) -> list[int]:
        return [self.num_layers] * len(self.federation)
