"""Head policies: what happens to a client's classification head (`--head-policy`, resolved per method).

- `local`: trained with the adapters, kept by the client (in its store), never sent after the first
  instruction (which carries the common initialisation of its shape).
- `frozen`: never trained: every client keeps the common initialisation (the official FedLEASE code).
- `shared`: trained, uploaded, and averaged (data-size weights) within an aggregation group (the
  whole federation, a FedLEASE cluster, an IFCA cluster) among heads of the same shape.
- `classifier`: the LEFF paper's PEFT baselines (FedLoRA, SLoRA, FedBitFit): only the classifier
  (`out_proj`) is trained and averaged over all clients; the pooler (`dense`) stays at the common
  initialisation, sent once (docs/methods/baselines.md#classifier-of-the-leff-baselines).
- `none`: a decoder (generation tasks) has no classification head; every hook is a no-op.

Heads of different shapes (tasks with different label counts) never mix. The common initialisation
of each shape is drawn from (run seed, "head-init", number of labels), identical on every client
(docs/methods/fedlease.md#common-initialisation).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from fedpeft.algorithms.messages import ClientInfo, Message
from fedpeft.algorithms.tensors import is_synced, prefixed, unprefixed, weighted_mean
from fedpeft.errors import FedPeftError
from fedpeft.models.task_model import init_head_state
from fedpeft.seeding import torch_generator

HEAD_PREFIX = "head."
CLASSIFIER = ("out_proj.weight", "out_proj.bias")


class HeadPolicy:
    """`local`, `frozen` and `shared` (the FedLEASE paper's policies) on a model with a head."""

    def __init__(self, policy: str, model, federation: list[ClientInfo], seed: int):
        self.policy, self.model, self.federation, self.seed = policy, model, federation, seed

    @property
    def trains(self) -> bool:
        return self.policy != "frozen"

    @property
    def shared(self) -> bool:
        return self.policy == "shared"

    def inits(self) -> dict[int, dict[str, torch.Tensor]]:
        """The common initialisation of every head shape in the federation."""
        return {c: init_head_state(self.model.hidden, c, torch_generator(self.seed, "head-init", c))
                for c in sorted({ci.num_labels for ci in self.federation})}

    def download(self, state: dict[str, Any], info: ClientInfo, group: Any = "all") -> dict[str, torch.Tensor]:
        """Head tensors in an instruction: the group head under `shared`, else the init until the
        client has replied once."""
        if self.shared:
            head = state["heads"].get((group, info.num_labels)) or state["head_init"][info.num_labels]
            return prefixed(HEAD_PREFIX, head)
        if not is_synced(state, info.client_id):
            return prefixed(HEAD_PREFIX, state["head_init"][info.num_labels])
        return {}

    def load(self, instruction: Message, client) -> None:
        """Put the client's head (sent now, or kept in its store) into the model."""
        head = unprefixed(HEAD_PREFIX, instruction.tensors)
        if head:
            client.store["head"] = head
        if "head" not in client.store:
            raise RuntimeError(f"client {client.cid} has no head: the first instruction must carry it")
        self.model.use_head(client.info.num_labels, client.store["head"], trainable=self.trains)

    def params(self) -> list[torch.nn.Parameter]:
        """The head parameters a local run trains."""
        return self.model.head_parameters() if self.trains else []

    def keep(self, client) -> dict[str, torch.Tensor]:
        """After training: store the head (a frozen one is unchanged: the store keeps the shared init,
        no per-client copy); return what the reply uploads (only under `shared`)."""
        if self.trains:
            client.store["head"] = self.model.head_state()
        return prefixed(HEAD_PREFIX, client.store["head"]) if self.shared else {}

    def aggregate(self, state: dict[str, Any], replies: Mapping[int, Message],
                  group_of: Mapping[int, Any] | None = None, mean: Callable | None = None) -> None:
        """Under `shared`: the data-size-weighted mean within each (group, head shape). `mean(heads,
        weights, key)` replaces `weighted_mean` (--dp central: the noisy mean of the group `key`)."""
        if not self.shared:
            return
        buckets: dict[Any, list[int]] = {}
        for cid in replies:
            group = group_of[cid] if group_of is not None else "all"
            buckets.setdefault((group, self.federation[cid].num_labels), []).append(cid)
        for key, members in buckets.items():
            heads = [unprefixed(HEAD_PREFIX, replies[c].tensors) for c in members]
            weights = [replies[c].config["num_examples"] for c in members]
            state["heads"][key] = mean(heads, weights, key) if mean else weighted_mean(heads, weights)

    def global_head(self, state: dict[str, Any], num_labels: int) -> dict[str, torch.Tensor]:
        """The federation-wide head of a shape (LEFF scores the global model with it)."""
        return state["heads"].get(("all", num_labels)) or state["head_init"][num_labels]


class ClassifierOnly(HeadPolicy):
    """`classifier`: only out_proj is trained, sent and averaged over all clients; dense stays at the
    common init, which a client receives with its first instruction and keeps."""

    trains = True
    shared = True

    def global_head(self, state, num_labels):
        return {**state["head_init"][num_labels], **state["heads"].get(("all", num_labels), {})}

    def download(self, state, info, group="all"):
        head = self.global_head(state, info.num_labels)
        keys = CLASSIFIER if is_synced(state, info.client_id) else tuple(head)
        return prefixed(HEAD_PREFIX, {k: head[k] for k in keys})

    def load(self, instruction, client):
        head = {**client.store.get("head", {}), **unprefixed(HEAD_PREFIX, instruction.tensors)}
        if set(head) != set(self.inits()[client.info.num_labels]):
            raise RuntimeError(f"client {client.cid} has no full head: the first instruction must carry it")
        client.store["head"] = head
        self.model.use_head(client.info.num_labels, head, trainable=False)

    def params(self):
        head = self.model.head(self.model.num_labels)
        params = [head.out_proj.weight, head.out_proj.bias]
        for p in params:
            p.requires_grad_(True)
        return params

    def keep(self, client):
        client.store["head"] = self.model.head_state()
        return prefixed(HEAD_PREFIX, {k: client.store["head"][k] for k in CLASSIFIER})

    def aggregate(self, state, replies, group_of=None, mean=None):
        buckets: dict[int, list[int]] = {}
        for cid in replies:
            buckets.setdefault(self.federation[cid].num_labels, []).append(cid)
        for n, members in buckets.items():
            heads = [unprefixed(HEAD_PREFIX, replies[c].tensors) for c in members]
            weights = [replies[c].config["num_examples"] for c in members]
            key = ("all", n)
            state["heads"][key] = mean(heads, weights, key) if mean else weighted_mean(heads, weights)


class NoHead(HeadPolicy):
    """A causal LM (generation tasks): no classification head, nothing to do."""

    trains = False
    shared = False

    def inits(self):
        return {}

    def download(self, state, info, group="all"):
        return {}

    def load(self, instruction, client):
        pass

    def params(self):
        return []

    def keep(self, client):
        return {}

    def aggregate(self, state, replies, group_of=None, mean=None):
        pass


def make_heads(cfg, model, federation: list[ClientInfo]) -> HeadPolicy:
    """The head policy of a run (cfg.head_policy is resolved: RunConfig.resolved())."""
    if not getattr(model, "has_head", True):
        return NoHead("none", model, federation, cfg.seed)
    if cfg.head_policy == "none":
        raise FedPeftError("--head-policy none is for decoders (generation tasks); this model has a classification "
                           "head: use local, frozen or shared")
    if cfg.head_policy == "classifier":
        return ClassifierOnly("classifier", model, federation, cfg.seed)
    return HeadPolicy(cfg.head_policy, model, federation, cfg.seed)
