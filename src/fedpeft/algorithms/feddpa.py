"""FedDPA (Yang et al., NeurIPS 2024), iterative variant: a global and a local LoRA on the same modules.

Both are PEFT adapters of rank r on every target module: `default` is the global LoRA, `local` the
client's own. Each round the client
  1. loads the aggregated global LoRA and trains it alone (forward y = W0x + s·B_gA_g x) for E epochs;
  2. trains the local LoRA for E epochs with the global frozen, under the mixture
     y = W0x + λ·s·B_gA_g x + (1−λ)·s·B_lA_l x   (λ = `feddpa_lambda`).
PEFT 0.21 sums the outputs of all active adapters, each times its own `scaling[adapter]`, so the
mixture is both adapters active with scalings λ·s and (1−λ)·s.
Only the global LoRA is uploaded and downloaded (FedIT's n-weighted mean of A and of B); the local
LoRA lives in the client's store and never leaves it. Evaluation uses the mixture.
The local LoRA starts from a common initialisation drawn from the run seed (A Kaiming-uniform, B = 0),
generated on each client: it is never transmitted.

`--feddpa-weighting instance` is the paper's instance-wise dynamic weighting at inference (as in the
official code's `get_weight`): for a test instance x, K = `feddpa_instances` random local training
instances x_j are drawn; with the local LoRA alone active, e(·) is the pooled last hidden state, and
the local weight is w_x = `feddpa_max_weight` · mean_j cos(e(x), e(x_j)), clipped to [0, 1]; the
global LoRA gets 1 − w_x. Per-instance weights enter PEFT's LoRA layers as (batch, 1, 1) scalings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedpeft.algorithms.base import Message, Runtime
from fedpeft.algorithms.fedit import LORA_PREFIX, FedIT
from fedpeft.algorithms.lora_runtime import build_lora_runtime
from fedpeft.algorithms.tensors import prefixed, unprefixed
from fedpeft.hardware import WIRE_DEVICE
from fedpeft.models.adapters import get_lora_state, init_lora_state, lora_parameters, set_lora_state
from fedpeft.seeding import derive_seed, torch_generator

GLOBAL, LOCAL = "default", "local"


class FedDPA(FedIT):
    name = "feddpa"

    # ------------------------------------------------------------ model
    def build_runtime(self, backbone) -> Runtime:
        rt = build_lora_runtime(self.cfg, backbone, rank=self.lora_rank(), adapter_names=(GLOBAL, LOCAL))
        rt.extra["scale"] = {id(s.lora): s.lora.scaling[GLOBAL] for s in rt.sites}  # s = alpha / r
        return rt

    def use(self, mode: str) -> None:
        """`global`: the global LoRA alone at scale s; `mixture`: λ·s global + (1−λ)·s local."""
        lam = float(self.cfg.feddpa_lambda)
        for site in self.runtime.sites:
            s = self.runtime.extra["scale"][id(site.lora)]
            if mode == "global":
                site.lora.set_adapter([GLOBAL])
                site.lora.scaling[GLOBAL] = s
            else:
                site.lora.set_adapter([GLOBAL, LOCAL])
                site.lora.scaling[GLOBAL] = lam * s
                site.lora.scaling[LOCAL] = (1.0 - lam) * s
        for p in lora_parameters(self.runtime.sites, adapter=GLOBAL) + lora_parameters(self.runtime.sites, adapter=LOCAL):
            p.requires_grad_(False)  # set_adapter switches grads on; the caller decides what trains

    # ------------------------------------------------------------ export
    exports_one_adapter = False

    def export(self, state, backbone, out, base_path, stores=None):
        """The global LoRA (global_lora/) and every client's local LoRA (client_<i>_local/), from the
        clients' stores when the run folder holds them: a client is scored with the two mixed."""
        from fedpeft.algorithms.lora_runtime import export_lora

        lam = float(self.cfg.feddpa_lambda)
        mix = (f"{lam:g} × global + {1 - lam:g} × the client's local LoRA (the adapter outputs summed)"
               if self.cfg.feddpa_weighting == "fixed" else
               "1 − w × global + w × the client's local LoRA, w chosen per test instance (--feddpa-weighting instance)")
        export_lora(backbone, self.cfg, state["lora"], out / "global_lora", base_path)
        adapters = {"global_lora": {"path": "global_lora", "clients": "all", "use": f"in each client's mixture: {mix}"}}
        for cid, store in sorted((stores or {}).items()):
            if "local_lora" in store:
                name = f"client_{cid}_local"
                export_lora(backbone, self.cfg, store["local_lora"], out / name, base_path)
                adapters[name] = {"path": name, "clients": [cid], "use": f"in client {cid}'s mixture: {mix}"}
        if len(adapters) == 1:
            adapters["global_lora"]["note"] = ("the clients' local LoRAs are not in this run folder (a deployed "
                                               "Flower run keeps them on its nodes): only the global LoRA is exported")
        return adapters

    # ------------------------------------------------------------ client
    def local_init(self) -> dict:
        return init_lora_state(self.runtime.sites, torch_generator(self.cfg.seed, "feddpa-local-init"),
                               rank=self.lora_rank())

    def load_lora(self, instruction: Message, client) -> None:
        set_lora_state(self.runtime.sites, unprefixed(LORA_PREFIX, instruction.tensors), adapter=GLOBAL)
        if "local_lora" not in client.store:
            client.store["local_lora"] = self.local_init()
        set_lora_state(self.runtime.sites, client.store["local_lora"], adapter=LOCAL)

    def load_for_eval(self, instruction, client):
        self.load_lora(instruction, client)
        self.heads.load(instruction, client)
        self.use("mixture")

    def fit(self, instruction, client):
        rnd = instruction.config["round"]
        self.load_lora(instruction, client)
        self.heads.load(instruction, client)
        sites = self.runtime.sites
        self.use("global")
        g = self.train_client(client, lora_parameters(sites, adapter=GLOBAL), tag="fit", rnd=rnd)
        self.use("mixture")
        loc = self.train_client(client, lora_parameters(sites, adapter=LOCAL), tag="fit-local", rnd=rnd)
        client.store["local_lora"] = get_lora_state(sites, adapter=LOCAL)
        up = get_lora_state(sites, adapter=GLOBAL)
        return Message({**prefixed(LORA_PREFIX, up), **self.heads.keep(client)},
                       {"num_examples": len(client.train), "train_loss": loc.loss, "global_train_loss": g.loss,
                        "train_seconds": g.seconds + loc.seconds,
                        "compute_seconds": g.compute_seconds + loc.compute_seconds,
                        "real_tokens": g.real_tokens + loc.real_tokens,
                        "padded_tokens": g.padded_tokens + loc.padded_tokens})

    # ------------------------------------------------------ instance-wise weighting (FedDPA paper, §4.3)
    def evaluate(self, instruction, client):
        if self.cfg.feddpa_weighting != "instance":
            return super().evaluate(instruction, client)
        from fedpeft.metrics import EXAMPLES, compute_metrics, example_outcome

        self.load_for_eval(instruction, client)
        weights = self.instance_weights(client, instruction.config["round"])
        preds, loss = self._predict_weighted(client, weights)
        metrics = compute_metrics(client.info.task, preds, client.test.labels)
        metrics["loss"] = loss
        metrics[EXAMPLES] = example_outcome(client.info.task, preds, client.test.labels)
        metrics["feddpa_local_weight"] = float(weights.mean())
        return metrics

    def _embed(self, data, idx: np.ndarray) -> torch.Tensor:
        """Pooled last hidden states of data[idx] with the local LoRA alone (official code: adapter 'local')."""
        from fedpeft.data.batching import collate
        from fedpeft.training import autocast, to_device

        model, out, device = self.runtime.model, [], self.device
        for start in range(0, len(idx), self.cfg.eval_batch_size):
            batch = collate(data, idx[start:start + self.cfg.eval_batch_size])
            batch.pop("labels")
            with autocast(self.cfg.precision, device):
                out.append(model.pooled(**to_device(batch, device)).float())
        return torch.cat(out) if out else torch.zeros(0, model.hidden, device=device)

    @torch.inference_mode()
    def instance_weights(self, client, rnd: int) -> np.ndarray:
        """w_x for every test instance of the client, in test order."""
        model, sites = self.runtime.model, self.runtime.sites
        model.eval()
        for site in sites:
            site.lora.set_adapter([LOCAL])
            site.lora.scaling[LOCAL] = self.runtime.extra["scale"][id(site.lora)]
        for p in lora_parameters(sites, adapter=LOCAL):
            p.requires_grad_(False)
        rng = np.random.default_rng(derive_seed(self.cfg.seed, "feddpa-instances", client.cid, rnd))
        n_train, n_test, k = len(client.train), len(client.test), min(self.cfg.feddpa_instances, len(client.train))
        refs = np.stack([rng.choice(n_train, size=k, replace=False) for _ in range(n_test)]) if n_test else np.zeros((0, k), int)
        used = np.unique(refs)
        train_emb = self._embed(client.train, used)
        test_emb = self._embed(client.test, np.arange(n_test))
        pos = {int(j): i for i, j in enumerate(used)}
        rows = torch.as_tensor([[pos[int(j)] for j in row] for row in refs], dtype=torch.long, device=train_emb.device)
        ref_emb = train_emb[rows]
        sims = F.cosine_similarity(test_emb.unsqueeze(1), ref_emb, dim=-1).mean(1)
        self.use("mixture")
        return (self.cfg.feddpa_max_weight * sims).clamp(0.0, 1.0).to(WIRE_DEVICE).numpy()

    @torch.inference_mode()
    def _predict_weighted(self, client, weights: np.ndarray):
        from fedpeft.data.batching import eval_batches
        from fedpeft.training import autocast, task_loss, to_device

        model, sites, device = self.runtime.model, self.runtime.sites, self.device
        model.eval()
        preds = np.zeros(len(client.test), dtype=np.float32 if client.regression else np.int64)
        total = 0.0
        try:
            for idx, batch in eval_batches(client.test, self.cfg.eval_batch_size):
                labels = batch.pop("labels").to(device)
                w = torch.as_tensor(weights[idx], dtype=torch.float32, device=device).view(-1, 1, 1)
                for site in sites:
                    s = self.runtime.extra["scale"][id(site.lora)]
                    site.lora.scaling[GLOBAL] = (1.0 - w) * s
                    site.lora.scaling[LOCAL] = w * s
                # The per-instance scalings are [B, 1, 1]: they need the padded [B, S, H] activations.
                with autocast(self.cfg.precision, device), model.padded():
                    logits = model(**to_device(batch, device)).float()
                total += task_loss(logits, labels, client.regression).item() * len(idx)
                preds[idx] = (logits.squeeze(-1) if client.regression else logits.argmax(-1)).to(WIRE_DEVICE).numpy()
        finally:
            self.use("mixture")  # scalars again: the tensors above are for this batch only
        return preds, total / max(1, len(client.test))
