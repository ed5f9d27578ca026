"""FedLEASE (Wang et al., NeurIPS 2025): LoRA experts allocated by clustering, selected by an
adaptive top-M router, as docs/methods/fedlease.md states it (each rule with its reason).

Rounds 1..W (warmup): every client trains one LoRA from the server's common initialisation, as one
AdamW run spanning all warmup rounds; nothing is aggregated; each client uploads its LoRA once, at
the end of round W. The server then clusters the clients by Eq. 2 on their B matrices (average
linkage, M by silhouette), initialises expert j as the n-weighted mean of cluster j's LoRAs (Eq. 3)
and one router per cluster, and broadcasts all experts (the transition broadcast).

Rounds W+1..W+T: client i of cluster j trains only expert j and its router (and its head if the head
policy trains it) inside the adaptive top-M mixture; uploads expert j (+ router, + head if shared).
The server averages expert j and router j, n_i-weighted, over cluster j's replies only; a cluster
with no reply keeps both (docs/methods/fedlease.md#aggregation-within-the-cluster).

A client that misses the warmup upload joins late (docs/methods/fedlease.md#late-join): it is asked for
its warmup LoRA each round and, once it arrives, assigned to the cluster at the smallest mean Eq. 2
distance; M does not change, since the clustering runs only once.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import numpy as np
import torch

from fedpeft.algorithms.base import Algorithm, Artifact, Client, Message, Runtime
from fedpeft.algorithms.fedit import LORA_PREFIX
from fedpeft.algorithms.heads import HEAD_PREFIX
from fedpeft.algorithms.local_training import fit_report
from fedpeft.algorithms.lora_runtime import build_lora_runtime
from fedpeft.algorithms.replies import accept
from fedpeft.algorithms.tensors import is_synced, mark_synced, prefixed, unprefixed, weighted_mean
from fedpeft.data.batching import num_batches
from fedpeft.errors import RunFailed
from fedpeft.models.adapters import (get_lora_state, init_lora_state, lora_key, lora_parameters, parse_lora_key,
                                     set_lora_state)
from fedpeft.models.moe.layer import (ROUTER_STATS, inject_moe_lora, moe_layers, set_own_expert, set_record_usage,
                                     solo_expert)
from fedpeft.models.moe.state import load_moe_state, moe_key, moe_state, parse_moe_key
from fedpeft.models.varlen import use_fast_dropout
from fedpeft.seeding import torch_generator

log = logging.getLogger("fedpeft")

MOE_PREFIX = "moe."
# Above this many clustered clients, clustering.json names clustering_distance.npy instead of listing
# the matrix, and the per-client figures (dendrogram, MDS, heat-map) are not drawn.
MAX_LISTED_CLIENTS = 200


class FedLEASE(Algorithm):
    name = "fedlease"

    @classmethod
    def create(cls, cfg):
        """The ablation `--experts single_shared` is FedIT at rank r × multiplier (single_expert.py)."""
        if cfg.experts == "single_shared":
            from fedpeft.algorithms.fedlease.single_expert import SingleSharedExpert

            return SingleSharedExpert(cfg)
        return cls(cfg)

    # ------------------------------------------------------------ phases
    @property
    def warmup_rounds(self) -> int:
        return self.cfg.warmup_rounds if self.cfg.has_warmup else 0

    def phase(self, rnd: int) -> str:
        return "warmup" if rnd <= self.warmup_rounds else "train"

    # ------------------------------------------------------------ server
    def init(self) -> dict[str, Any]:
        # the common LoRA and head initialisations (docs/methods/fedlease.md#common-initialisation)
        state = {"lora": init_lora_state(self.runtime.sites, torch_generator(self.cfg.seed, "lora-init"),
                                         rank=self.cfg.rank),
                 "head_init": self.heads.inits(), "heads": {}, "cluster_of": {}}
        if self.cfg.experts == "per_client":  # M = N, C_j = {j}: no warmup, experts start at the common init
            n = len(self.federation)
            self._start_phase2(state, {c.client_id: c.client_id for c in self.federation},
                               {c.client_id: state["lora"] for c in self.federation}, n)
        return state

    def configure(self, state, rnd, clients):
        out = {}
        for c in (self.federation[i] for i in clients):
            cid = c.client_id
            cfg = {"round": rnd, "phase": self.phase(rnd)}
            warm = rnd <= self.warmup_rounds
            late = not warm and cid not in state["cluster_of"]
            tensors: dict[str, torch.Tensor] = {}
            if not is_synced(state, cid):  # the common initialisation, until the client first replies
                if warm or late:
                    tensors.update(prefixed(LORA_PREFIX, state["lora"]))
                if (warm or late or not self.heads.shared) and self.has_head:
                    tensors.update(prefixed(HEAD_PREFIX, state["head_init"][c.num_labels]))
            if warm:
                cfg["upload"] = rnd == self.warmup_rounds
            elif late:
                cfg.update(phase="late_upload", upload=True)  # late join: send your warmup LoRA, train nothing
            else:
                j = state["cluster_of"][cid]
                cfg.update(num_experts=state["num_experts"], own_expert=j)
                tensors.update(prefixed(MOE_PREFIX, state["experts"]))
                if self.cfg.router_aggregation == "cluster":
                    tensors.update(prefixed(MOE_PREFIX, state["routers"][j]))
                if self.heads.shared:
                    tensors.update(self.heads.download(state, c, group=j))
            out[cid] = Message(tensors, cfg)
        return out

    def aggregate(self, state, rnd, replies):
        if rnd < self.warmup_rounds:
            mark_synced(state, replies)  # they hold the common initialisation now
            return state  # warmup: nothing aggregated or sent until the one upload at the end of round W
        rejected: set[int] = set()
        uploads = {cid: r for cid, r in replies.items() if r.config.get("uploaded_warmup")}
        if uploads:
            expected = {LORA_PREFIX + k: v.shape for k, v in state["lora"].items()}
            ok = accept(self, rnd, uploads, expected)
            rejected |= set(uploads) - set(ok)
            # --dp central: each warmup LoRA clipped against the common initialisation it started from
            uploads = self.privacy.receive(state, rnd, ok, lambda cid: self._warmup_sent(state, cid))
        if rnd == self.warmup_rounds:
            if not uploads:
                why = "every upload was rejected" if rejected else "no client uploaded one"
                raise RunFailed(f"round {rnd}: no warmup LoRA to cluster ({why}; see the log); the run stopped with "
                                f"the checkpoint of round {rnd - 1}")
            self._cluster(state, rnd, uploads)
        elif uploads:
            self._late_join(state, rnd, uploads)
        trained = {cid: r for cid, r in replies.items() if "own_expert" in r.config}
        if trained:
            rejected |= self._aggregate_experts(state, rnd, trained)
        # They hold the common initialisation now; a rejected client is rolled back to before this
        # round (engines/local.py), so it is sent the initialisation again if this was its first reply.
        mark_synced(state, set(replies) - rejected)
        return state

    def _cluster(self, state, rnd, uploads: dict[int, Message]) -> None:
        from fedpeft.algorithms.fedlease.clustering import (b_distance_matrix, cluster_clients, delta_w_distance_matrix,
                                                            task_clusters)

        t0 = time.perf_counter()
        cids = sorted(uploads)
        loras = {cid: unprefixed(LORA_PREFIX, uploads[cid].tensors) for cid in cids}
        compared = [self._compared(loras[cid]) for cid in cids]
        distance = (delta_w_distance_matrix(compared) if self.cfg.clustering_matrices == "delta_w"
                    else b_distance_matrix(compared))
        if self.cfg.clustering == "task":
            result = task_clusters([self.federation[c].task for c in cids], distance)
        else:
            with warnings.catch_warnings():  # its warnings come back in result.warnings and are logged below
                warnings.simplefilter("ignore")
                result = cluster_clients(distance, max_clusters=self.cfg.max_clusters, method=self.cfg.clustering,
                                         pair_split_threshold=self.cfg.pair_split_threshold, seed=self.cfg.seed)
        for w in result.warnings:
            log.warning("clustering: %s", w)
        cluster_of = {cid: int(label) for cid, label in zip(cids, result.labels)}
        scores = ", ".join(f"k={k}: {s:.3f}" for k, s in sorted(result.silhouette.items()))
        log.info("clustering %d clients by their %s (Eq. 2): silhouette %s → M = %d", len(cids),
                 "updates ΔW = B·A" if self.cfg.clustering_matrices == "delta_w" else "B matrices",
                 scores or "(not needed)", result.num_clusters)
        for j, members in enumerate(result.clusters()):
            tasks = [self.federation[cids[m]].task for m in members]
            log.info("  expert %d ← clients %s (%s)", j, [cids[m] for m in members],
                     ", ".join(f"{t} × {tasks.count(t)}" for t in dict.fromkeys(tasks)))
        state["warmup_b"] = {cid: m for cid, m in zip(cids, compared)}  # what Eq. 2 compared: B, or A and B
        info = result.to_json()
        # the N×N distances as one tensor (a JSON list of 10^6 floats at N = 1,000 is not state)
        state["clustering_distance"] = torch.from_numpy(np.asarray(info.pop("distance"), dtype=np.float64))
        state["clustering"] = {"clients": cids, **info}  # no wall time in the state: a resumed run's must be equal
        seconds = time.perf_counter() - t0
        self._start_phase2(state, cluster_of, loras, result.num_clusters,
                           heads={cid: unprefixed(HEAD_PREFIX, uploads[cid].tensors) for cid in cids},
                           sizes={cid: uploads[cid].config["num_examples"] for cid in cids},
                           mean=lambda s, w, group: self.privacy.mean(state, rnd, s, w, group))
        self.record_event("clustering", round=rnd, num_experts=state["num_experts"], seconds=seconds,
                          silhouette=state["clustering"].get("silhouette"),
                          client_to_expert={str(c): j for c, j in sorted(state["cluster_of"].items())})

    def _start_phase2(self, state, cluster_of: dict[int, int], loras: dict[int, dict], m: int,
                      heads: dict[int, dict] | None = None, sizes: dict[int, int] | None = None,
                      mean=None) -> None:
        """Eq. 3 experts (n-weighted means of the members' warmup LoRAs), one router per cluster from
        (seed, j), so all members of a cluster start identical.

        `sizes`: the n_i uploaded with the warmup LoRAs; the federation's sizes by default. `mean(states,
        weights, group)`: the mean of one cluster's uploads (--dp central: with its noise)."""
        n = sizes or {cid: self.num_examples(cid) for cid in cluster_of}
        mean = mean or (lambda states, weights, group: weighted_mean(states, weights))
        state["num_experts"] = m
        state["cluster_of"] = dict(cluster_of)
        experts = {}
        for j in range(m):
            members = [cid for cid, c in cluster_of.items() if c == j]
            expert = mean([loras[cid] for cid in members], [n[cid] for cid in members], ("expert", j))
            for key, tensor in expert.items():
                layer, module, factor = parse_lora_key(key)
                experts[moe_key(layer, module, j, factor)] = tensor
        state["experts"] = experts
        dims = {(layer, module): a.shape[1] for key, a in state["lora"].items()
                for layer, module, factor in [parse_lora_key(key)] if factor == "A"}
        state["routers"] = {j: self._router_init(dims, j, m) for j in range(m)}
        if self.heads.shared and heads:
            for j in range(m):
                for labels in {self.federation[c].num_labels for c, cj in cluster_of.items() if cj == j}:
                    members = [c for c, cj in cluster_of.items() if cj == j and self.federation[c].num_labels == labels
                               and heads.get(c)]
                    if members:
                        state["heads"][(j, labels)] = mean([heads[c] for c in members], [n[c] for c in members],
                                                           (j, labels))

    def _router_init(self, dims: dict[tuple[int, str], int], j: int, m: int) -> dict[str, torch.Tensor]:
        """Cluster j's initial routers (Kaiming-uniform) from (seed, j); `dims` maps (layer, module) to its d_in.

        The server (cluster routers) and a client (local routers) call it with the same dims and
        get the same tensors."""
        width = 2 * m - 1 if self.cfg.routing == "adaptive_topM" else m
        gen = torch_generator(self.cfg.seed, "router-init", j)
        out = {}
        for (layer, module), d_in in sorted(dims.items()):
            bound = 1.0 / d_in ** 0.5  # kaiming_uniform_(a=√5) on (width, d_in)
            out[moe_key(layer, module, None, "router")] = (torch.rand(width, d_in, generator=gen) * 2 - 1) * bound
        return out

    def _compared(self, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The factors of one warmup LoRA that Eq. 2 compares (--clustering-matrices): B, or A and B."""
        ends = (".A", ".B") if self.cfg.clustering_matrices == "delta_w" else (".B",)
        return {k: v for k, v in lora.items() if k.endswith(ends)}

    def _late_join(self, state, rnd, uploads) -> None:
        from fedpeft.algorithms.fedlease.clustering import DeltaWRows, UnitRows, assign_late_client

        # Every clustered client, joiners of this round included as they join (in the order they join):
        # their unit B rows (or ΔW factors) stacked once and all joiners' Eq. 2 rows from one product.
        members = sorted(state["cluster_of"])
        held = DeltaWRows if self.cfg.clustering_matrices == "delta_w" else UnitRows
        rows = held([state["warmup_b"][c] for c in members])
        joiners = sorted(uploads)
        b_of = {cid: self._compared(unprefixed(LORA_PREFIX, uploads[cid].tensors)) for cid in joiners}
        distances = rows.late_rows([b_of[cid] for cid in joiners])  # joiner t against members + joiners < t
        for cid, dist in zip(joiners, distances):
            b_new = b_of[cid]
            j = assign_late_client(dist, [state["cluster_of"][c] for c in members])
            if self.cfg.clustering == "task":  # the oracle: the expert of a client with the same task, if any
                task = self.federation[cid].task
                j = next((state["cluster_of"][c] for c in members if self.federation[c].task == task), j)
            state["cluster_of"][cid] = j
            state["warmup_b"][cid] = b_new
            members.append(cid)
            log.info("round %d: late client %d (missed the warmup upload) joins expert %d", rnd, cid, j)
            self.record_event("late_join", round=rnd, client=cid, expert=j)

    def _aggregate_experts(self, state, rnd, replies) -> set[int]:
        """Expert j and router j from cluster j's replies only; an empty cluster keeps its values.
        Returns the clients whose replies were rejected."""
        rejected = set()
        for j in range(state["num_experts"]):
            members = {cid: r for cid, r in replies.items() if state["cluster_of"].get(cid) == j}
            if not members:
                continue
            ok = accept(self, rnd, members, self._upload_shapes(state, j))
            rejected |= set(members) - set(ok)
            if not ok:
                continue
            ok = self.privacy.receive(state, rnd, ok, lambda cid: self._phase2_sent(state, cid, j))  # --dp central
            weights = [r.config["num_examples"] for r in ok.values()]
            ups = [unprefixed(MOE_PREFIX, r.tensors) for r in ok.values()]
            mean = self.privacy.mean(state, rnd, ups, weights, ("expert", j))
            for key, tensor in mean.items():
                if key.endswith(".router"):
                    state["routers"][j][key] = tensor
                else:
                    state["experts"][key] = tensor
            self.heads.aggregate(state, ok, group_of={cid: j for cid in ok},
                                 mean=lambda s, w, key: self.privacy.mean(state, rnd, s, w, key))
        return rejected

    def _warmup_sent(self, state, cid: int) -> dict[str, torch.Tensor]:
        """What a warmup upload started from: the common LoRA and head initialisations (--dp's reference)."""
        labels = self.federation[cid].num_labels
        return {**prefixed(LORA_PREFIX, state["lora"]), **prefixed(HEAD_PREFIX, state["head_init"].get(labels, {}))}

    def _phase2_sent(self, state, cid: int, j: int) -> dict[str, torch.Tensor]:
        """What a client of cluster j was sent this round: the experts, router j, its group's head."""
        return {**prefixed(MOE_PREFIX, state["experts"]), **prefixed(MOE_PREFIX, state["routers"][j]),
                **self.heads.download(state, self.federation[cid], group=j)}

    def _upload_shapes(self, state, j: int) -> dict[str, torch.Size]:
        shapes = {MOE_PREFIX + k: t.shape for k, t in state["experts"].items() if parse_moe_key(k)[2] == j}
        if self.cfg.router_aggregation == "cluster":
            shapes.update({MOE_PREFIX + k: t.shape for k, t in state["routers"][j].items()})
        return shapes

    # ------------------------------------------------------------ outputs
    def artifacts(self, state, rnd, records):
        """After the clustering round: the client map, clustering.json and the clustering figures;
        after the last round: expert_usage.png (mean distinct experts per token, the paper's Fig. 6)."""
        from fedpeft.algorithms.fedlease import plots

        out = []
        if rnd == self.warmup_rounds and "clustering" in state:
            info = state["clustering"]
            client_map = {
                "round": rnd, "num_experts": state["num_experts"],
                "client_to_expert": {str(c): j for c, j in sorted(state["cluster_of"].items())},
                "experts": {str(j): [c for c, cj in sorted(state["cluster_of"].items()) if cj == j]
                            for j in range(state["num_experts"])},
                "tasks": {str(c.client_id): c.task for c in self.federation},
            }
            d = state["clustering_distance"].numpy()
            names = [f"{c} ({self.federation[c].task})" for c in info["clients"]]
            labels = [state["cluster_of"][c] for c in info["clients"]]
            out += [Artifact(f"lora_client_map_round_{rnd}.json", data=client_map),
                    Artifact("clustering_distance.npy", draw=lambda p: np.save(open(p, "wb"), d))]
            if len(names) <= MAX_LISTED_CLIENTS:  # the matrix in the JSON and per-client figures stay readable
                out += [Artifact("clustering.json", data={**info, "distance": d.tolist()}),
                        Artifact("dendrogram.png", draw=lambda p: plots.plot_dendrogram(d, names, p)),
                        Artifact("mds.png", draw=lambda p: plots.plot_mds(d, labels, names, p, seed=self.cfg.seed)),
                        Artifact("distance_heatmap.png", draw=lambda p: plots.plot_distance_heatmap(d, names, p))]
            else:
                out.append(Artifact("clustering.json", data={**info, "distance": "clustering_distance.npy"}))
            if info.get("silhouette"):
                scores = {int(k): v for k, v in info["silhouette"].items()}
                out.append(Artifact("silhouette.png",
                                    draw=lambda p: plots.plot_silhouette(scores, state["num_experts"], p)))
        if rnd == self.num_rounds:
            usage = {}
            for r in sorted(records, key=lambda r: r["client"]):
                layers = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("experts_per_token/")}
                if layers:
                    usage[f"client {r['client']} ({r['task']})"] = layers
            if usage:
                out.append(Artifact("expert_usage.png", draw=lambda p: plots.plot_expert_usage(usage, p)))
        return out

    def export(self, state, backbone, out, base_path, stores=None):
        """One PEFT folder per expert (expert_<j>/) and, with cluster routers, routers_cluster_<j>.safetensors."""
        import copy

        from fedpeft.models.moe.export import export_expert_as_peft, save_routers

        if "experts" not in state:
            from fedpeft.errors import FedPeftError

            raise FedPeftError("this FedLEASE run stopped before its experts existed (during the warmup): nothing to export")
        cfg, m = self.cfg, state["num_experts"]
        encoder = copy.deepcopy(backbone.model)
        inject_moe_lora(encoder, cfg.target_modules, num_experts=m, own_expert=0, rank=cfg.rank,
                        lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, routing=cfg.routing,
                        top_k=cfg.top_k, renormalize=cfg.renormalize)
        load_moe_state(encoder, state["experts"], strict=True, include_router=False)
        adapters = {}
        for j in range(m):
            folder = export_expert_as_peft(encoder, j, out / f"expert_{j}", base_path, cfg.target_modules)
            adapters[f"expert_{j}"] = {"path": folder.name,
                                       "clients": sorted(c for c, cj in state["cluster_of"].items() if cj == j),
                                       "use": "in a mixture of experts: every client routes each token over all "
                                              "experts with its cluster's routers"}
            if cfg.router_aggregation == "cluster":
                load_moe_state(encoder, state["routers"][j], strict=True, experts=[], include_router=True)
                save_routers(encoder, out / f"routers_cluster_{j}.safetensors")
                adapters[f"expert_{j}"]["routers"] = f"routers_cluster_{j}.safetensors"
        return adapters

    # ------------------------------------------------------------ client
    def _ensure_moe(self, m: int, own: int) -> None:
        """Switch the shared model from plain LoRA (warmup) to the M-expert mixture, once per process."""
        rt = self.runtime
        if rt.extra.get("num_experts") != m:
            encoder = rt.model.encoder
            if rt.extra.get("num_experts") is None:
                encoder = encoder.unload()  # drop the PEFT LoRA layers; the backbone is untouched
            else:
                raise RuntimeError("the number of experts changed within a run")
            inject_moe_lora(encoder, self.cfg.target_modules, num_experts=m, own_expert=own, rank=self.cfg.rank,
                            lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                            routing=self.cfg.routing, top_k=self.cfg.top_k, renormalize=self.cfg.renormalize)
            if getattr(rt.model, "fast", False):  # --encoder-path varlen: its dropout for the mixture's new modules too
                use_fast_dropout(encoder)
            rt.model.encoder = encoder
            rt.extra["num_experts"] = m
        set_own_expert(rt.model.encoder, own)

    def build_runtime(self, backbone) -> Runtime:
        """Plain LoRA for the warmup; the mixture replaces it when the experts exist (_ensure_moe)."""
        return build_lora_runtime(self.cfg, backbone, rank=self.cfg.rank)

    def _load_phase2(self, instruction: Message, client: Client) -> int:
        m, j = instruction.config["num_experts"], instruction.config["own_expert"]
        self._ensure_moe(m, j)
        sent = unprefixed(MOE_PREFIX, instruction.tensors)
        model = self.runtime.model.encoder
        if self.cfg.router_aggregation == "local":
            if "router" not in client.store:  # the cluster's initial router from (seed, j), made here, never sent
                dims = {(mod.layer_index, mod.module_name): mod.in_features for _, mod in moe_layers(model)}
                client.store["router"] = self._router_init(dims, j, m)
            sent.update(client.store["router"])
        load_moe_state(model, sent, strict=True)
        self.heads.load(instruction, client)
        return j

    def load_for_eval(self, instruction, client):
        if instruction.config["phase"] == "train":
            self._load_phase2(instruction, client)
            set_record_usage(self.runtime.model.encoder, True, reset=True)  # Fig. 6: experts per token
        else:
            self._load_warmup(instruction, client)

    def evaluate(self, instruction, client):
        if instruction.config["phase"] == "late_upload":
            return {}  # not yet assigned to an expert: nothing to score with
        metrics = super().evaluate(instruction, client)
        if instruction.config["phase"] == "train":
            layers = moe_layers(self.runtime.model.encoder)
            per_layer = {f"{m.layer_index}.{m.module_name}": m.mean_distinct_experts for _, m in layers}
            routers = {f"{m.layer_index}.{m.module_name}": m.router_stats() for _, m in layers}
            set_record_usage(self.runtime.model.encoder, False)
            metrics["experts_per_token"] = sum(per_layer.values()) / len(per_layer)
            metrics.update({f"experts_per_token/{k}": v for k, v in per_layer.items()})
            # router logs: γ_own, the share of tokens routed to the own expert alone (and to any one
            # expert alone: no router gradient there), the router's entropy; mean over modules, and per module
            for name in ROUTER_STATS:
                values = {k: v[name] for k, v in routers.items() if v is not None}
                if values:
                    metrics[name] = sum(values.values()) / len(values)
                    metrics.update({f"{name}/{k}": v for k, v in values.items()})
        return metrics

    def _load_warmup(self, instruction, client) -> None:
        if self.runtime.extra.get("num_experts") is not None:
            raise RuntimeError("warmup after the mixture was built")
        state = client.store.get("lora") or unprefixed(LORA_PREFIX, instruction.tensors)
        if self.privacy.local and "dp_sent" not in client.store and any(k.startswith(LORA_PREFIX) for k in instruction.tensors):
            client.store["dp_sent"] = dict(instruction.tensors)  # the common init: its warmup upload's reference
        set_lora_state(self.runtime.sites, state)
        self.heads.load(instruction, client)

    def fit(self, instruction, client):
        phase = instruction.config["phase"]
        if phase == "late_upload":
            if "lora" not in client.store:  # never sampled during the warmup: the whole warmup runs now
                return self._fit_warmup(instruction, client, whole=True)
            client.store.pop("warmup_optimizer", None)  # its warmup is over too: free the optimiser state
            return self._warmup_reply(client, uploaded=True, stats=None, rnd=instruction.config["round"])
        if phase == "warmup":
            return self._fit_warmup(instruction, client)
        return self._fit_phase2(instruction, client)

    def _fit_warmup(self, instruction, client, *, whole: bool = False):
        """The warmup's W·E epochs as ONE AdamW run (state and LR schedule carried across the warmup
        rounds the client is sampled in). `whole`: a client first sampled after the warmup runs all
        W·E epochs at once and uploads (docs/methods/fedlease.md#late-join)."""
        if self.runtime.extra.get("num_experts") is not None:
            return self._late_warmup_on_mixture(instruction, client)
        self._load_warmup(instruction, client)
        rt = self.runtime
        params = lora_parameters(rt.sites)
        steps = self.warmup_rounds * self.cfg.local_epochs * num_batches(len(client.train), self.cfg.batch_size)
        stats = self.train_client(
            client, params, tag="warmup", rnd=instruction.config["round"],
            optimizer_state=client.store.get("warmup_optimizer"), start_step=client.store.get("warmup_step", 0),
            schedule_steps=steps, epochs=self.warmup_rounds * self.cfg.local_epochs if whole else None)
        client.store["warmup_optimizer"] = stats.optimizer_state
        client.store["warmup_step"] = stats.end_step
        client.store["lora"] = get_lora_state(rt.sites)
        head = self.heads.keep(client)
        if whole or instruction.config.get("upload"):
            client.store.pop("warmup_optimizer", None)  # warmup is over: free the optimiser state
            return self._warmup_reply(client, uploaded=True, stats=stats, head=head, rnd=instruction.config["round"])
        return self._warmup_reply(client, uploaded=False, stats=stats)

    def _late_warmup_on_mixture(self, instruction, client) -> Message:
        """The whole warmup of a client first sampled after the clustering, in a process whose model
        already holds the mixture: expert slot 0 alone is plain LoRA (`solo_expert`), loaded with the
        common initialisation, trained for W·E epochs and read out as the client's warmup LoRA. The
        slot is overwritten by the next instruction that loads the experts."""
        model = self.runtime.model.encoder
        init = unprefixed(LORA_PREFIX, instruction.tensors)
        slot = {moe_key(layer, module, 0, factor): t for key, t in init.items()
                for layer, module, factor in [parse_lora_key(key)]}
        load_moe_state(model, slot, strict=True, experts=[0], include_router=False)
        self.heads.load(instruction, client)
        epochs = self.warmup_rounds * self.cfg.local_epochs
        with solo_expert(model, 0) as params:
            stats = self.train_client(client, params, tag="warmup", rnd=instruction.config["round"], epochs=epochs,
                                      schedule_steps=epochs * num_batches(len(client.train), self.cfg.batch_size))
        client.store["lora"] = {lora_key(layer, module, factor): t
                                for key, t in moe_state(model, experts=[0], include_router=False).items()
                                for layer, module, _, factor in [parse_moe_key(key)]}
        return self._warmup_reply(client, uploaded=True, stats=stats, head=self.heads.keep(client),
                                  rnd=instruction.config["round"])

    def _warmup_reply(self, client, *, uploaded: bool, stats, head=None, rnd: int = 0) -> Message:
        tensors = {}
        if uploaded:
            tensors = {**prefixed(LORA_PREFIX, client.store["lora"]), **(head or {})}
            tensors = self.privacy.upload(tensors, client.store.get("dp_sent", {}), cid=client.cid, rnd=rnd)
        cfg = {"num_examples": len(client.train), "uploaded_warmup": uploaded}
        if stats is not None:
            cfg.update(fit_report(client, stats))
        return Message(tensors, cfg)

    def _fit_phase2(self, instruction, client):
        j = self._load_phase2(instruction, client)
        rt = self.runtime
        model = rt.model.encoder
        layers = moe_layers(model)
        params = [layer.lora_A[j] for _, layer in layers] + [layer.lora_B[j] for _, layer in layers]
        params += [layer.router.weight for _, layer in layers]
        stats = self.train_client(client, params, tag="fit", rnd=instruction.config["round"])
        set_own_expert(model, j)  # the layer keeps its own expert trainable between rounds
        share_router = self.cfg.router_aggregation == "cluster"
        up = moe_state(model, experts=[j], include_router=share_router)
        if not share_router:
            client.store["router"] = {k: v for k, v in moe_state(model, experts=[], include_router=True).items()}
        up = {**prefixed(MOE_PREFIX, up), **self.heads.keep(client)}
        up = self.privacy.upload(up, instruction.tensors, cid=client.cid, rnd=instruction.config["round"])  # --dp local
        return Message(up, {**fit_report(client, stats), "own_expert": j})
