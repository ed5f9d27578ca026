"""SLoRA (Babakniya et al. 2023), a LEFF-paper baseline in two stages
(docs/methods/baselines.md#slora).

Stage 1 (the first `slora_stage1_fraction` of rounds): a fixed random mask of density
`slora_density` over the entries of every FedLoRA target matrix, shared by seed and never sent;
clients train only the masked entries (W = W_0 + scatter(δ)) and the classifier, and upload δ.
Transition: for each target, ΔW = scatter(δ̄) is truncated to rank r by SVD, U_r Σ_r V_rᵀ, and the
LoRA factors start at B = U_r Σ_r^½ / √s, A = Σ_r^½ V_rᵀ / √s with s = α/r, so s·BA is the
truncation; W is reset to W_0 (δ = 0). Stage 2 is FedLoRA from there.

An nn.Linear stores W as d_out × d_in; GPT-2's Conv1D stores its transpose (d_in × d_out), so the
mask and δ live on the stored layout and ΔW is transposed to d_out × d_in before the SVD, the layout
of PEFT's factors (A: r × d_in, B: d_out × r) for both kinds of module.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from fedpeft.algorithms.base import Message
from fedpeft.algorithms.fedlora import FedLoRA
from fedpeft.algorithms.local_training import fit_report
from fedpeft.algorithms.replies import accept
from fedpeft.hardware import WIRE_DEVICE
from fedpeft.algorithms.tensors import mark_synced, on_wire, prefixed, unprefixed, weighted_mean
from fedpeft.models.adapters import lora_key
from fedpeft.seeding import derive_seed

SPARSE_PREFIX = "sparse."


class SparseDelta(nn.Module):
    """Parametrisation W ↦ W + scatter(δ) at fixed flat positions `index`."""

    def __init__(self, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.delta = nn.Parameter(torch.zeros(len(index)), requires_grad=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(-1).index_add(0, self.index, self.delta.to(weight.dtype)).view_as(weight)


def sparse_mask(numel: int, density: float, seed: int, layer: int, module: str) -> torch.Tensor:
    """Sorted flat positions of the stage-1 mask of one matrix, from (seed, layer, module)."""
    nnz = max(1, round(density * numel))
    rng = np.random.default_rng(derive_seed(seed, "slora-mask", layer, module))
    return torch.from_numpy(np.sort(rng.choice(numel, size=nnz, replace=False))).long()


def svd_lora_init(delta_w: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with scaling·B·A equal to the rank-`rank` truncated SVD of ΔW (d_out × d_in)."""
    u, s, vh = torch.linalg.svd(delta_w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root / math.sqrt(scaling)
    a = root[:, None] * vh[:rank] / math.sqrt(scaling)
    return a.to(delta_w.dtype), b.to(delta_w.dtype)


def stores_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D keeps its weight as (d_in, d_out), the transpose of nn.Linear's (a
    parametrized module is an instance of a subclass, `ParametrizedConv1D`)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


class SLoRA(FedLoRA):
    name = "slora"

    @property
    def stage1_rounds(self) -> int:
        return int(self.cfg.slora_stage1_fraction * self.num_rounds)

    def phase(self, rnd: int) -> str:
        return "sparse" if rnd <= self.stage1_rounds else "train"

    def build_runtime(self, backbone):
        rt = super().build_runtime(backbone)
        deltas = {}
        for site in rt.sites:
            base = site.lora.base_layer
            index = sparse_mask(base.weight.numel(), self.cfg.slora_density, self.cfg.seed, site.layer, site.module)
            parametrize.register_parametrization(base, "weight", SparseDelta(index))
            deltas[lora_key(site.layer, site.module, "delta")] = base.parametrizations.weight[0]
        rt.extra["sparse"] = deltas
        return rt

    def trained_numel(self, rnd: int) -> int:
        if rnd <= self.stage1_rounds:
            return sum(m.delta.numel() for m in self.sparse().values())
        return super().trained_numel(rnd)

    def sparse(self) -> dict[str, SparseDelta]:
        return self.runtime.extra["sparse"]

    def init(self):
        state = super().init()
        state["sparse"] = {k: torch.zeros(m.delta.shape, dtype=m.delta.dtype) for k, m in self.sparse().items()}
        return state

    def set_sparse(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, m in self.sparse().items():
                m.delta.copy_(values[k] if values else torch.zeros_like(m.delta))

    def configure(self, state, rnd, clients):
        if rnd > self.stage1_rounds:
            return super().configure(state, rnd, clients)
        return {c.client_id: Message({**prefixed(SPARSE_PREFIX, state["sparse"]), **self.heads.download(state, c)},
                                     {"round": rnd, "stage": 1}) for c in (self.federation[i] for i in clients)}

    def aggregate(self, state, rnd, replies):
        if rnd > self.stage1_rounds:
            return super().aggregate(state, rnd, replies)
        ok = accept(self, rnd, replies, {SPARSE_PREFIX + k: v.shape for k, v in state["sparse"].items()})
        if ok:
            state["sparse"] = weighted_mean([unprefixed(SPARSE_PREFIX, r.tensors) for r in ok.values()],
                                            [r.config["num_examples"] for r in ok.values()])
            self.heads.aggregate(state, ok)
            mark_synced(state, ok)
        if rnd == self.stage1_rounds:
            self.transition(state)
        return state

    def transition(self, state) -> None:
        """Stage 1 → 2: LoRA factors from the rank-r SVD of each ΔW; W back to W_0 (δ = 0)."""
        scaling = self.cfg.lora_alpha / self.lora_rank()
        for site in self.runtime.sites:
            key = lora_key(site.layer, site.module, "delta")
            mod = self.sparse()[key]
            base = site.lora.base_layer
            shape = base.parametrizations.weight.original.shape
            index = mod.index.to(WIRE_DEVICE)  # the server state is on the wire device, the mask on the model's
            delta_w = torch.zeros(shape).reshape(-1).index_add(0, index, state["sparse"][key]).view(shape)
            if stores_transposed(base):
                delta_w = delta_w.T
            a, b = svd_lora_init(delta_w, self.lora_rank(), scaling)
            state["lora"][lora_key(site.layer, site.module, "A")] = a
            state["lora"][lora_key(site.layer, site.module, "B")] = b
            state["sparse"][key] = torch.zeros_like(state["sparse"][key])

    def load_for_eval(self, instruction, client):
        if instruction.config.get("stage") == 1:
            self.set_sparse(unprefixed(SPARSE_PREFIX, instruction.tensors))
            self.set_zero_lora()
            self.heads.load(instruction, client)
        else:
            self.set_sparse({})
            super().load_for_eval(instruction, client)

    def set_zero_lora(self) -> None:
        """In stage 1 the LoRA branch is off: B = 0 (local, nothing is sent)."""
        with torch.no_grad():
            for site in self.runtime.sites:
                for b in site.lora.lora_B.values():
                    b.weight.zero_()

    def fit(self, instruction, client):
        if instruction.config.get("stage") != 1:
            self.set_sparse({})
            return super().fit(instruction, client)
        self.load_for_eval(instruction, client)
        params = [m.delta for m in self.sparse().values()]
        stats = self.train_client(client, params, tag="fit", rnd=instruction.config["round"])
        up = on_wire({k: m.delta for k, m in self.sparse().items()})
        return Message({**prefixed(SPARSE_PREFIX, up), **self.heads.keep(client)}, fit_report(client, stats))
