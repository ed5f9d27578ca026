"""FedIT (Zhang et al., ICASSP 2024): one shared LoRA, FedAvg of A and B separately.

Every client trains A and B of every target module from the global LoRA, uploads both, and the
server takes their data-size-weighted means. The head follows the run's head policy.
Subclasses change only which factors are trained and which are sent (FFA-LoRA, FedSA-LoRA, ...).
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.algorithms.base import Algorithm, Client, Message, Runtime
from fedpeft.algorithms.local_training import fit_report
from fedpeft.algorithms.lora_runtime import build_lora_runtime, export_lora
from fedpeft.algorithms.replies import accept
from fedpeft.algorithms.tensors import aggregate_states, is_synced, mark_synced, prefixed, unprefixed
from fedpeft.models.adapters import get_lora_state, init_lora_state, lora_parameters, select_factors, set_lora_state
from fedpeft.seeding import torch_generator

LORA_PREFIX = "lora."


class FedIT(Algorithm):
    name = "fedit"
    trained_factors: tuple[str, ...] = ("A", "B")
    sent_factors: tuple[str, ...] = ("A", "B")

    # ------------------------------------------------------------ model
    def lora_rank(self) -> int:
        return self.cfg.rank

    def build_runtime(self, backbone) -> Runtime:
        return build_lora_runtime(self.cfg, backbone, rank=self.lora_rank())

    # ------------------------------------------------------------ server
    def init(self) -> dict[str, Any]:
        return {
            "lora": init_lora_state(self.runtime.sites, torch_generator(self.cfg.seed, "lora-init"), rank=self.lora_rank()),
            "head_init": self.heads.inits(),
            "heads": {},
        }

    def configure(self, state, rnd, clients):
        out = {}
        for c in (self.federation[i] for i in clients):
            # Until a client has replied once it gets the whole common initialisation
            # (docs/methods/fedlease.md#common-initialisation); afterwards only the factors the method sends.
            factors = self.sent_factors if is_synced(state, c.client_id) else ("A", "B")
            lora = select_factors(state["lora"], factors)
            out[c.client_id] = Message({**prefixed(LORA_PREFIX, lora), **self.heads.download(state, c)},
                                       {"round": rnd})
        return out

    def aggregate(self, state, rnd, replies):
        expected = {LORA_PREFIX + k: v.shape for k, v in select_factors(state["lora"], self.sent_factors).items()}
        ok = accept(self, rnd, replies, expected)
        if ok:
            ok = self.privacy.receive(state, rnd, ok, lambda cid: self.sent_to(state, cid))  # --dp central: clipped
            ups = [unprefixed(LORA_PREFIX, r.tensors) for r in ok.values()]
            weights = [r.config["num_examples"] for r in ok.values()]
            state["lora"].update(self.privacy.mean(state, rnd, ups, weights, "lora", average=self.average))
            self.heads.aggregate(state, ok, mean=lambda s, w, key: self.privacy.mean(state, rnd, s, w, key))
            mark_synced(state, ok)
        return state

    def average(self, ups, weights):
        """FedAvg (`--aggregation mean`) or a coordinate-wise robust aggregate (trimmed-mean, median)."""
        return aggregate_states(ups, weights, self.cfg.aggregation, self.cfg.trim_fraction)

    def sent_to(self, state, cid: int) -> dict[str, torch.Tensor]:
        """What client `cid` was sent this round, by message name (the reference of its update under --dp)."""
        return {**prefixed(LORA_PREFIX, state["lora"]), **self.heads.download(state, self.federation[cid])}

    exports_one_adapter = True

    def export(self, state, backbone, out, base_path, stores=None):
        export_lora(backbone, self.cfg, state["lora"], out / "global_lora", base_path)
        return {"global_lora": {"path": "global_lora", "clients": "all", "use": "alone, by every client"}}

    # ------------------------------------------------------------ client
    def local_extra_loss(self, lora_params: list[torch.nn.Parameter]):
        """A term added to every local step's loss (FedProx), built before training; None: none."""
        return None

    def load_lora(self, instruction: Message, client: Client) -> None:
        """Global factors from the instruction; factors kept locally come from the store."""
        state = {**client.store.get("lora", {}), **unprefixed(LORA_PREFIX, instruction.tensors)}
        set_lora_state(self.runtime.sites, state)

    def load_for_eval(self, instruction, client):
        self.load_lora(instruction, client)
        self.heads.load(instruction, client)

    def fit(self, instruction, client):
        self.load_for_eval(instruction, client)
        rt = self.runtime
        for p in lora_parameters(rt.sites):
            p.requires_grad_(False)
        params = lora_parameters(rt.sites, factors=self.trained_factors)
        stats = self.train_client(client, params, tag="fit", rnd=instruction.config["round"],
                                  extra_loss=self.local_extra_loss(list(params)))
        lora = get_lora_state(rt.sites)
        kept = [f for f in ("A", "B") if f not in self.sent_factors]
        if kept:
            client.store["lora"] = select_factors(lora, kept)
        up = {**prefixed(LORA_PREFIX, select_factors(lora, self.sent_factors)), **self.heads.keep(client)}
        up = self.privacy.upload(up, instruction.tensors, cid=client.cid, rnd=instruction.config["round"])  # --dp local
        return Message(up, fit_report(client, stats))
