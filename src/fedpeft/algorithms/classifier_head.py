"""The head of the LEFF paper's PEFT baselines (FedLoRA, SLoRA, FedBitFit; shared/specs/leff.md §5).

DeBERTa's classifier is trained in full and averaged over all clients; its pooler is not trained
(FedBitFit) or only through LoRA (FedLoRA). On fedpeft's head (dense → tanh → out_proj) that is:
`out_proj` (the classifier) trained by every client and D_i-averaged over all of them, `dense`
(the pooler) frozen at the common initialisation and sent once. fedpeft does not put LoRA on the
head's dense: on DeBERTaV3-Base that is 12,288 of FedLoRA's 1,340,930 parameters.

A decoder (`CausalLM`, generation tasks) has no classifier: its LM head is part of the frozen
backbone, so every hook here is a no-op there and the methods train only their adapters or biases.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from fedpeft.algorithms.base import HEAD_PREFIX, ClientInfo, Message, is_synced, prefixed, unprefixed, weighted_mean

CLASSIFIER = ("out_proj.weight", "out_proj.bias")


class ClassifierHead:
    """Mixin over `Algorithm`'s head hooks: only the classifier is trained, sent and averaged."""

    def train_client(self, client, params, *, tag: str, rnd: int, **kwargs):
        kwargs.setdefault("constant_lr", self.cfg.constant_lr)  # the LEFF family's schedule switch (L9)
        return super().train_client(client, params, tag=tag, rnd=rnd, **kwargs)

    def trained_numel(self, rnd: int) -> int:
        """Parameters a client trains this round, besides the classifier."""
        raise NotImplementedError

    def round_info(self, rnd: int) -> dict[str, Any]:
        """Client memory, float32: every parameter held (the backbone's unused pooler aside) plus
        gradients and AdamW moments of the trained ones (3 × trained); activations not included."""
        model = self.runtime.model
        if not self.has_head:
            held = sum(p.numel() for p in model.parameters())
            return {"peak_client_memory_bytes": 4 * held + 4 * 3 * self.trained_numel(rnd)}
        head = model.head(self.federation[0].num_labels)
        held = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("heads.", "encoder.pooler.")))
        held += sum(p.numel() for p in head.parameters())
        trained = self.trained_numel(rnd) + head.out_proj.weight.numel() + head.out_proj.bias.numel()
        return {"peak_client_memory_bytes": 4 * held + 4 * 3 * trained}

    def global_head(self, state, num_labels: int) -> dict[str, torch.Tensor]:
        return {**state["head_init"][num_labels], **state["heads"].get(("all", num_labels), {})}

    def head_download(self, state: dict[str, Any], info: ClientInfo, group: Any = "all") -> dict[str, torch.Tensor]:
        if not self.has_head:
            return {}
        head = self.global_head(state, info.num_labels)
        keys = CLASSIFIER if is_synced(state, info.client_id) else tuple(head)
        return prefixed(HEAD_PREFIX, {k: head[k] for k in keys})

    def load_head(self, instruction: Message, client) -> None:
        if not self.has_head:
            return
        head = {**client.store.get("head", {}), **unprefixed(HEAD_PREFIX, instruction.tensors)}
        if set(head) != set(self.head_inits()[client.info.num_labels]):
            raise RuntimeError(f"client {client.cid} has no full head: the first instruction must carry it")
        client.store["head"] = head
        self.runtime.model.use_head(client.info.num_labels, head, trainable=False)

    def head_params(self) -> list[torch.nn.Parameter]:
        if not self.has_head:
            return []
        head = self.runtime.model.head(self.runtime.model.num_labels)
        params = [head.out_proj.weight, head.out_proj.bias]
        for p in params:
            p.requires_grad_(True)
        return params

    def keep_head(self, client) -> dict[str, torch.Tensor]:
        if not self.has_head:
            return {}
        client.store["head"] = self.runtime.model.head_state()
        return prefixed(HEAD_PREFIX, {k: client.store["head"][k] for k in CLASSIFIER})

    def aggregate_heads(self, state: dict[str, Any], replies: Mapping[int, Message], group_of=None) -> None:
        if not self.has_head:
            return
        buckets: dict[int, list[int]] = {}
        for cid in replies:
            buckets.setdefault(self.federation[cid].num_labels, []).append(cid)
        for n, members in buckets.items():
            heads = [unprefixed(HEAD_PREFIX, replies[c].tensors) for c in members]
            state["heads"][("all", n)] = weighted_mean(heads, [replies[c].config["num_examples"] for c in members])
