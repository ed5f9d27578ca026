"""FedBitFit (BitFit, Zaken et al. 2022, run with FedAvg), a LEFF-paper baseline
(docs/methods/baselines.md#fedbitfit).

Every bias inside the blocks (query, key, value, attention output, intermediate, output and both
LayerNorm biases) plus the classifier is trained, sent both ways and D_i-averaged; the pooler is not
trained (head policy `classifier`, algorithms/heads.py). On GPT-2: the biases of c_attn, attn.c_proj,
c_fc, mlp.c_proj, ln_1 and ln_2 in every block, plus ln_f's bias (the LM head is tied and frozen).
These sets reproduce the paper's Table 5 counts. Llama-style decoders have no bias parameters
(Table 5: "no biases"), so FedBitFit refuses them.
"""

from __future__ import annotations

import copy
from typing import Any

from fedpeft.algorithms.base import Algorithm, Message, Runtime
from fedpeft.algorithms.client_memory import peak_client_memory
from fedpeft.algorithms.leff.structure import parameter_role
from fedpeft.algorithms.local_training import fit_report
from fedpeft.algorithms.lora_runtime import wrap_model
from fedpeft.algorithms.replies import accept
from fedpeft.algorithms.tensors import mark_synced, on_wire, prefixed, unprefixed, weighted_mean
from fedpeft.errors import FedPeftError

BIAS_PREFIX = "bias."


class FedBitFit(Algorithm):
    name = "fedbitfit"

    def build_runtime(self, backbone) -> Runtime:
        encoder = copy.deepcopy(backbone.model)
        for p in encoder.parameters():
            p.requires_grad_(False)
        causal = getattr(backbone, "kind", "encoder") == "causal"
        model = wrap_model(encoder, backbone, self.cfg.encoder_path)
        biases = {n: p for n, p in encoder.named_parameters()
                  if n.endswith(".bias") and (parameter_role(n)[0] == "block"
                                              or (causal and parameter_role(n)[0] == "head_set"))}
        if not biases:
            raise FedPeftError(f"{self.name} trains bias parameters and {backbone.model_type} model "
                               f"{backbone.name!r} has none (Llama-style models have no biases): use another method")
        return Runtime(model, [], {"biases": biases})

    def biases(self) -> dict[str, Any]:
        return self.runtime.extra["biases"]

    def trained_numel(self, rnd: int) -> int:
        return sum(p.numel() for p in self.biases().values())

    def round_info(self, state, rnd):
        return peak_client_memory(self, self.trained_numel(rnd))

    def init(self):
        return {"bias": on_wire(self.biases()),
                "head_init": self.heads.inits(), "heads": {}}

    def configure(self, state, rnd, clients):
        return {c.client_id: Message({**prefixed(BIAS_PREFIX, state["bias"]), **self.heads.download(state, c)},
                                     {"round": rnd}) for c in (self.federation[i] for i in clients)}

    def aggregate(self, state, rnd, replies):
        ok = accept(self, rnd, replies, {BIAS_PREFIX + n: t.shape for n, t in state["bias"].items()})
        if ok:
            state["bias"] = weighted_mean([unprefixed(BIAS_PREFIX, r.tensors) for r in ok.values()],
                                          [r.config["num_examples"] for r in ok.values()])
            self.heads.aggregate(state, ok)
            mark_synced(state, ok)
        return state

    def load_for_eval(self, instruction, client):
        import torch

        bias = unprefixed(BIAS_PREFIX, instruction.tensors)
        with torch.no_grad():
            for n, p in self.biases().items():
                p.copy_(bias[n])
        self.heads.load(instruction, client)

    def fit(self, instruction, client):
        self.load_for_eval(instruction, client)
        stats = self.train_client(client, list(self.biases().values()), tag="fit", rnd=instruction.config["round"])
        up = on_wire(self.biases())
        return Message({**prefixed(BIAS_PREFIX, up), **self.heads.keep(client)}, fit_report(client, stats))
