"""The Algorithm contract: what every federated method implements, whatever engine carries it.

Server side (pure, deterministic given the seed): `init`, `configure`, `aggregate`.
Client side (where the data is): `fit`, `evaluate`. Between them, `configure_evaluate` (server side)
says what each client scores.

`Message` (an Instruction down, a Reply up) is a dict of named tensors plus a dict of plain values:
exactly what a Flower ArrayRecord + ConfigRecord hold. Per-client state that persists across rounds
(a local head, a personal LoRA) lives in `Client.store`. Bytes are counted at this boundary.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from fedpeft.config import RunConfig
from fedpeft.data.batching import Encoded
from fedpeft.models.task_model import TaskModel, init_head_state
from fedpeft.seeding import torch_generator

log = logging.getLogger("fedpeft")

HEAD_PREFIX = "head."


@dataclass
class Message:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Payload bytes: numel × element size of every tensor (metadata excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows of a client."""

    client_id: int
    task: str
    num_labels: int
    num_examples: int


@dataclass
class Client:
    """A client as seen where its data lives."""

    info: ClientInfo
    train: Encoded
    test: Encoded
    regression: bool
    store: dict[str, Any] = field(default_factory=dict)

    @property
    def cid(self) -> int:
        return self.info.client_id

    @property
    def is_generation(self) -> bool:
        """A generation client (prompt → text, a causal LM) rather than a classification one."""
        from fedpeft.data.batching import EncodedLM

        return isinstance(self.train, EncodedLM)


@dataclass
class Runtime:
    """The one model in memory: backbone + adapters + heads, built once per process."""

    model: TaskModel  # or models.causal_model.CausalLM for a decoder backbone (no head)
    sites: list  # adapter sites, in a method-specific type
    extra: dict[str, Any] = field(default_factory=dict)


class Algorithm:
    """Base class: head policy, reply validation and weighted averaging shared by every method."""

    name = "base"
    history = None  # the run's RunHistory, where the server side may record events and files

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.runtime: Runtime | None = None
        self.federation: list[ClientInfo] = []

    # ------------------------------------------------------------ engine hooks
    def build_runtime(self, backbone) -> Runtime:
        raise NotImplementedError

    @staticmethod
    def wrap_model(peft_model, backbone):
        """The model the methods drive: an encoder + heads (`TaskModel`), or a decoder (`CausalLM`)."""
        if getattr(backbone, "kind", "encoder") == "causal":
            from fedpeft.models.causal_model import CausalLM

            return CausalLM(peft_model, backbone.tokenizer, backbone.hidden_size)
        return TaskModel(peft_model, backbone.hidden_size, backbone.pooling)

    @property
    def has_head(self) -> bool:
        """False for a causal LM: no classification head, so every head policy is a no-op."""
        return getattr(self.runtime.model, "has_head", True)

    def bind(self, runtime: Runtime, federation: list[ClientInfo]) -> None:
        self.runtime = runtime
        self.federation = federation

    def phase(self, rnd: int) -> str:
        return "train"

    def finish(self) -> None:
        """Called once after the last round, on the server side: method-specific outputs."""

    @property
    def num_rounds(self) -> int:
        return self.cfg.global_rounds

    # ------------------------------------------------------------ server side
    def init(self) -> dict[str, Any]:
        raise NotImplementedError

    def configure(self, state: dict[str, Any], rnd: int) -> dict[int, Message]:
        raise NotImplementedError

    def aggregate(self, state: dict[str, Any], rnd: int, replies: dict[int, Message]) -> dict[str, Any]:
        raise NotImplementedError

    def configure_evaluate(self, state: dict[str, Any], rnd: int,
                           broadcast: dict[int, Message]) -> dict[int, Message]:
        """The message each client scores after round `rnd`, made after aggregation. Default: the
        broadcast of round rnd + 1, so a client is scored with the state it trains with next (D16).
        A method that scores a model the broadcast does not carry (LEFF: the global Θ_g, spec L14)
        returns it here; `evaluate` must need nothing but this message and the client's store, so
        every engine (client and server in one process or not) gets the same numbers."""
        return broadcast

    # ------------------------------------------------------------ client side
    def fit(self, instruction: Message, client: Client) -> Message:
        raise NotImplementedError

    def evaluate(self, instruction: Message, client: Client) -> dict[str, float]:
        from fedpeft.metrics import compute_metrics
        from fedpeft.training import predict

        self.load_for_eval(instruction, client)
        if client.is_generation:
            return self.evaluate_generation(client)
        preds, loss = predict(self.runtime.model, client.test, batch_size=self.cfg.eval_batch_size,
                              precision=self.cfg.precision, regression=client.regression)
        metrics = compute_metrics(client.info.task, preds, client.test.labels)
        metrics["loss"] = loss
        return metrics

    def evaluate_generation(self, client: Client) -> dict[str, float]:
        """Generate for the client's test prompts and score against their references; plus the
        test loss on the target tokens. The model holds the client's state already."""
        from fedpeft.generation import GenerationSettings, generate, score_generation
        from fedpeft.training import lm_mean_loss

        model, precision = self.runtime.model, self.cfg.precision
        hyps = generate(model, client.test, GenerationSettings.from_config(self.cfg), precision)
        metrics = score_generation(client.info.task, hyps, client.test.references)
        metrics["loss"] = lm_mean_loss(model, client.test, batch_size=self.cfg.eval_batch_size, precision=precision)
        return metrics

    def load_for_eval(self, instruction: Message, client: Client) -> None:
        """Put exactly the state the client would train with next into the model."""
        raise NotImplementedError

    def train_client(self, client: Client, params: list[torch.nn.Parameter], *, tag: str, rnd: int, **kwargs):
        """One local run over `params` (and the head when the head policy trains it), with the run's
        optimiser settings and the seed of (tag, client, round). Grads are on for exactly these
        parameters during the run and off after it. `kwargs` go to `train_local`."""
        from fedpeft.seeding import derive_seed
        from fedpeft.training import train_local

        params = list(params)
        for p in params:
            p.requires_grad_(True)
        params += self.head_params()
        try:
            return train_local(
                self.runtime.model, client.train, params, epochs=self.cfg.local_epochs, lr=self.cfg.lr,
                batch_size=self.cfg.batch_size, seed=derive_seed(self.cfg.seed, tag, client.cid, rnd),
                weight_decay=self.cfg.weight_decay, max_grad_norm=self.cfg.max_grad_norm,
                precision=self.cfg.precision, regression=client.regression, **kwargs)
        finally:
            for p in params:
                p.requires_grad_(False)

    @staticmethod
    def fit_report(client: Client, stats) -> dict[str, Any]:
        """The plain values every fit reply carries: n_i and what the local run measured."""
        return {"num_examples": len(client.train), "train_loss": stats.loss, "train_seconds": stats.seconds,
                "compute_seconds": stats.compute_seconds, "real_tokens": stats.real_tokens,
                "padded_tokens": stats.padded_tokens}

    # ------------------------------------------------------------ heads (D9)
    def head_inits(self) -> dict[int, dict[str, torch.Tensor]]:
        """The common head initialisation of every head shape in the federation (D2); none for a decoder."""
        if not self.has_head:
            return {}
        hidden = self.runtime.model.hidden
        return {c: init_head_state(hidden, c, torch_generator(self.cfg.seed, "head-init", c))
                for c in sorted({ci.num_labels for ci in self.federation})}

    def head_download(self, state: dict[str, Any], info: ClientInfo, group: Any = "all") -> dict[str, torch.Tensor]:
        """Head tensors in an instruction: the group head under `shared`, else the init until it arrived."""
        if not self.has_head:
            return {}
        if self.cfg.head_policy == "shared":
            head = state["heads"].get((group, info.num_labels)) or state["head_init"][info.num_labels]
            return prefixed(HEAD_PREFIX, head)
        if not is_synced(state, info.client_id):
            return prefixed(HEAD_PREFIX, state["head_init"][info.num_labels])
        return {}

    def load_head(self, instruction: Message, client: Client) -> None:
        if not self.has_head:
            return
        head = unprefixed(HEAD_PREFIX, instruction.tensors)
        if head:
            client.store["head"] = head
        if "head" not in client.store:
            raise RuntimeError(f"client {client.cid} has no head: the first instruction must carry it")
        self.runtime.model.use_head(client.info.num_labels, client.store["head"],
                                    trainable=self.cfg.head_policy != "frozen")

    def head_params(self) -> list[torch.nn.Parameter]:
        return self.runtime.model.head_parameters() if self.cfg.head_policy != "frozen" else []

    def keep_head(self, client: Client) -> dict[str, torch.Tensor]:
        """After training: store the head; return it for upload under `shared`."""
        if not self.has_head:
            return {}
        client.store["head"] = self.runtime.model.head_state()
        return prefixed(HEAD_PREFIX, client.store["head"]) if self.cfg.head_policy == "shared" else {}

    def aggregate_heads(self, state: dict[str, Any], replies: Mapping[int, Message],
                        group_of: Mapping[int, Any] | None = None) -> None:
        """Under `shared`: n-weighted mean within each (group, head shape); other policies: no-op."""
        if self.cfg.head_policy != "shared" or not self.has_head:
            return
        buckets: dict[Any, list[int]] = {}
        for cid in replies:
            info = self.federation[cid]
            group = group_of[cid] if group_of is not None else "all"
            buckets.setdefault((group, info.num_labels), []).append(cid)
        for key, members in buckets.items():
            heads = [unprefixed(HEAD_PREFIX, replies[c].tensors) for c in members]
            state["heads"][key] = weighted_mean(heads, [replies[c].config["num_examples"] for c in members])

    # ------------------------------------------------------------ replies
    def accept(self, rnd: int, replies: Mapping[int, Message], expected: Mapping[str, torch.Size] | None = None,
               optional_prefix: str = HEAD_PREFIX) -> dict[int, Message]:
        """Drop (and log) replies with NaN/Inf, wrong shapes, or unexpected/missing keys."""
        ok = {}
        for cid, reply in sorted(replies.items()):
            reason = check_reply(reply, expected, optional_prefix)
            if reason:
                log.warning("round %d: rejected the reply of client %d: %s", rnd, cid, reason)
            else:
                ok[cid] = reply
        return ok

    def num_examples(self, cid: int) -> int:
        return self.federation[cid].num_examples


def is_synced(state: dict[str, Any], cid: int) -> bool:
    """Has this client replied at least once, so it holds the one-time initial tensors?"""
    return cid in state.get("synced", [])


def mark_synced(state: dict[str, Any], cids: Iterable[int]) -> None:
    state["synced"] = sorted(set(state.get("synced", [])) | set(cids))


def check_reply(reply: Message, expected: Mapping[str, torch.Size] | None, optional_prefix: str) -> str | None:
    n = reply.config.get("num_examples")
    if not isinstance(n, (int, float)) or not n > 0 or not math.isfinite(n):
        return f"num_examples is {n!r}"
    for key, tensor in reply.tensors.items():
        if not torch.isfinite(tensor).all():
            return f"tensor {key} has NaN or Inf values"
        if expected is not None and not key.startswith(optional_prefix):
            if key not in expected:
                return f"unexpected tensor {key}"
            if tuple(tensor.shape) != tuple(expected[key]):
                return f"tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key])}"
    if expected is not None:
        missing = [k for k in expected if k not in reply.tensors]
        if missing:
            return f"missing tensor {missing[0]}"
    return None


def weighted_mean(states: list[Mapping[str, torch.Tensor]], weights: Iterable[float]) -> dict[str, torch.Tensor]:
    """Σ w_i x_i / Σ w_i per key, accumulated in float64 and stored in the parameter dtype."""
    weights = [float(w) for w in weights]
    total = sum(weights)
    if not states or total <= 0:
        raise ValueError("weighted_mean needs at least one state with positive weight")
    out = {}
    for key in states[0]:
        acc = torch.zeros(states[0][key].shape, dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += s[key].to(torch.float64) * (w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out


def prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
