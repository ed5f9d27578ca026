"""FedProx (Li et al., MLSys 2020) on LoRA: FedIT plus a proximal term on the trained LoRA factors.

Every local step minimises task loss + (mu/2)·||θ − θ_global||², where θ are the LoRA parameters the
client trains and θ_global their values at the start of `fit` (the global LoRA just received). The
head is not in the proximal term. Upload, download and aggregation are FedIT's.
"""

from __future__ import annotations

import torch

from fedpeft.algorithms.fedit import FedIT


class FedProx(FedIT):
    name = "fedprox"

    def local_extra_loss(self, lora_params):
        mu = float(self.cfg.fedprox_mu)
        anchors = [p.detach().clone() for p in lora_params]

        def proximal() -> torch.Tensor:
            total = sum(((p - a) ** 2).sum() for p, a in zip(lora_params, anchors))
            return 0.5 * mu * total

        return proximal
