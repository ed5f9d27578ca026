"""FedLoRA (LoRA, Hu et al. 2022, run with FedAvg), the LEFF paper's LoRA baseline
(docs/methods/baselines.md#fedlora, #fedlora-targets).

LoRA on every linear map of every block (DeBERTa: query/key/value, attention output, intermediate,
output; GPT-2: c_attn, attn.c_proj, mlp.c_proj; Llama: all seven linears: the sets whose LoRA sizes
reproduce the paper's Table 5), A and B averaged separately with D_i weights, and the classifier
trained and averaged (head policy `classifier`, algorithms/heads.py). The paper's rank is 8: pass
--rank 8 (the leff-cpu suite does).
"""

from __future__ import annotations

from fedpeft.algorithms.client_memory import peak_client_memory
from fedpeft.algorithms.fedit import FedIT

class FedLoRA(FedIT):
    """FedIT on every block linear (the targets RunConfig.resolved() gives this method) with the
    classifier-only head; it reports the client memory the LEFF paper compares."""

    name = "fedlora"

    def round_info(self, state, rnd):
        return peak_client_memory(self, self.trained_numel(rnd))

    def trained_numel(self, rnd: int) -> int:
        from fedpeft.models.adapters import lora_parameters

        return sum(p.numel() for p in lora_parameters(self.runtime.sites, factors=self.trained_factors))
