"""FedLEASE's ablation `--experts single_shared`: M = 1 expert shared by all, no warmup or clustering.

With one expert the router has nothing to choose, so the mixture is one LoRA: FedIT at rank
r × `--single-rank-multiplier` (the paper's "single expert r" and "single expert 4r" rows). With
multiplier 1 it equals FedIT exactly, which a test checks.
"""

from __future__ import annotations

from fedpeft.algorithms.fedit import FedIT


class SingleSharedExpert(FedIT):
    name = "fedlease"

    def lora_rank(self) -> int:
        return self.cfg.rank * self.cfg.single_rank_multiplier
