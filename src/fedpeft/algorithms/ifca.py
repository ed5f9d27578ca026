"""IFCA (Ghosh et al., NeurIPS 2020) applied to LoRA: K cluster LoRAs, each client picks one per round.

Server state: K LoRAs, cluster k initialised from (seed, k) with A Kaiming-uniform and B ~ N(0, 1e-3²)
so that the clusters differ from round 1. Every round every client downloads all K, evaluates the mean
loss of each on its whole training set (eval mode, its own head), picks the argmin (ties → lower k),
trains that LoRA for E epochs and uploads it with the cluster index (`config["cluster"]`). The server
averages each cluster (A and B separately, n-weighted) over the clients that chose it; a cluster nobody
chose stays unchanged. Under `head_policy = shared` heads are averaged within the chosen cluster; a
client downloads the head of the cluster it chose last (the head init before its first reply).
"""

from __future__ import annotations

import logging
from typing import Any

from fedpeft.algorithms.base import Message
from fedpeft.algorithms.fedit import LORA_PREFIX, FedIT
from fedpeft.algorithms.local_training import fit_report
from fedpeft.algorithms.replies import accept, reject
from fedpeft.algorithms.tensors import mark_synced, prefixed, unprefixed, weighted_mean
from fedpeft.models.adapters import get_lora_state, init_lora_state, lora_parameters, set_lora_state
from fedpeft.seeding import torch_generator
from fedpeft.training import mean_loss

log = logging.getLogger("fedpeft")

IFCA_B_STD = 1e-3


def cluster_prefix(k: int) -> str:
    return f"cluster{k}.{LORA_PREFIX}"


class IFCA(FedIT):
    name = "ifca"

    @property
    def num_clusters(self) -> int:
        return int(self.cfg.ifca_clusters)

    # ------------------------------------------------------------ server
    def init(self) -> dict[str, Any]:
        sites = self.runtime.sites
        return {
            "clusters": [init_lora_state(sites, torch_generator(self.cfg.seed, "ifca-init", k),
                                         rank=self.lora_rank(), b_std=IFCA_B_STD)
                         for k in range(self.num_clusters)],
            "assign": {},  # client id → cluster chosen in its last reply
            "head_init": self.heads.inits(),
            "heads": {},
        }

    def configure(self, state, rnd, clients):
        out = {}
        for c in (self.federation[i] for i in clients):
            tensors = {}
            for k, lora in enumerate(state["clusters"]):
                tensors.update(prefixed(cluster_prefix(k), lora))
            group = state["assign"].get(c.client_id)
            tensors.update(self.heads.download(state, c, group=group))
            out[c.client_id] = Message(tensors, {"round": rnd})
        return out

    def aggregate(self, state, rnd, replies):
        expected = {LORA_PREFIX + k: v.shape for k, v in state["clusters"][0].items()}
        ok = {}
        for cid, reply in accept(self, rnd, replies, expected).items():
            k = reply.config.get("cluster")
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < self.num_clusters:
                reject(self, rnd, cid, f"cluster index {k!r}")
                continue
            ok[cid] = reply
        for k in range(self.num_clusters):
            members = [cid for cid, r in ok.items() if r.config["cluster"] == k]
            if members:  # a cluster nobody chose stays unchanged
                ups = [unprefixed(LORA_PREFIX, ok[c].tensors) for c in members]
                state["clusters"][k] = weighted_mean(ups, [ok[c].config["num_examples"] for c in members])
        if ok:
            group_of = {cid: r.config["cluster"] for cid, r in ok.items()}
            self.heads.aggregate(state, ok, group_of=group_of)
            state["assign"] = {**state["assign"], **group_of}
            mark_synced(state, ok)
            chosen = {k: [c for c in sorted(group_of) if group_of[c] == k] for k in range(self.num_clusters)}
            log.info("round %d: IFCA cluster choices %s", rnd,
                     "; ".join(f"{k}: {members}" for k, members in chosen.items() if members))
        state["choices"] = {"round": rnd, "clusters": {str(c): r.config["cluster"] for c, r in ok.items()}}
        return state

    exports_one_adapter = False

    def export(self, state, backbone, out, base_path, stores=None):
        """One PEFT folder per cluster LoRA (cluster_<k>/), with the clients that chose it last."""
        from fedpeft.algorithms.lora_runtime import export_lora

        adapters = {}
        for k, lora in enumerate(state["clusters"]):
            export_lora(backbone, self.cfg, lora, out / f"cluster_{k}", base_path)
            adapters[f"cluster_{k}"] = {"path": f"cluster_{k}",
                                        "clients": sorted(c for c, j in state["assign"].items() if j == k),
                                        "use": "alone, by the clients that chose this cluster last"}
        return adapters

    def round_info(self, state, rnd: int) -> dict:
        """The cluster each client chose this round, in training_history.json's round entry."""
        choices = state.get("choices", {})
        return {"ifca_choice": choices.get("clusters", {}) if choices.get("round") == rnd else {}}

    # ------------------------------------------------------------ client
    def cluster_losses(self, instruction: Message, client) -> list[float]:
        losses = []
        for k in range(self.num_clusters):
            set_lora_state(self.runtime.sites, unprefixed(cluster_prefix(k), instruction.tensors))
            losses.append(mean_loss(self.runtime.model, client.train, batch_size=self.cfg.eval_batch_size,
                                    precision=self.cfg.precision, regression=client.regression))
        return losses

    def select(self, instruction: Message, client) -> int:
        """Load the head, then the cluster LoRA with the lowest mean training loss (ties → lower k)."""
        self.heads.load(instruction, client)
        losses = self.cluster_losses(instruction, client)
        best = min(range(len(losses)), key=lambda k: (losses[k], k))
        set_lora_state(self.runtime.sites, unprefixed(cluster_prefix(best), instruction.tensors))
        client.store["cluster_losses"] = losses
        return best

    def load_for_eval(self, instruction, client):
        self.select(instruction, client)

    def fit(self, instruction, client):
        k = self.select(instruction, client)
        stats = self.train_client(client, lora_parameters(self.runtime.sites), tag="fit",
                                  rnd=instruction.config["round"])
        up = get_lora_state(self.runtime.sites)
        return Message({**prefixed(LORA_PREFIX, up), **self.heads.keep(client)},
                       {**fit_report(client, stats), "cluster": k})
