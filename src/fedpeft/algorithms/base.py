"""The Algorithm contract: what every federated method implements, whatever engine carries it.

An algorithm is plain Python over tensors. Engines only move its messages: the in-process engine
calls the hooks directly, Flower sends them across processes or machines, and a test proves both
give the same numbers. The hooks, in the order an engine calls them:

    build_runtime(backbone) → bind(runtime, federation) → init() → state
    every round r:   configure(state, r, clients)  server: what each client sampled for round r is sent
                     fit(instruction, client)      client: local training → reply
                     aggregate(state, r, replies)  server: new state (missing/rejected clients tolerated)
                     configure(state, r + 1, ...)  server: the next broadcast, to round r + 1's sample
                     configure_evaluate(...)       server: what each scored client gets (default: its
                                                   instruction for round r + 1, sampled or not)
                     evaluate(instruction, client) client: metrics
                     round_info(state, r), take_events(), artifacts(state, r, records)  → the run's records

Server-side hooks are deterministic given the run seed, and everything the server needs between
rounds lives in `state` (a dict of tensors and plain values that the checkpoint saves), never in
attributes: a resumed run rebuilds the algorithm, loads `state` and reaches the same numbers.
Attributes hold only caches that can be rebuilt (a distilled student, an encoded proxy set).

`Message` (an Instruction down, a Reply up) is a dict of named tensors plus a dict of plain values:
exactly what a Flower ArrayRecord + ConfigRecord hold. Per-client state that persists across rounds
(a local head, a personal LoRA, a router) lives in `Client.store`. Bytes are counted at this
boundary. Algorithms never write files: they hand events and artifacts to the run layer.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar

from fedpeft.algorithms.heads import make_heads
from fedpeft.algorithms.local_training import score, train
from fedpeft.algorithms.messages import Artifact, Client, ClientInfo, Message, Runtime
from fedpeft.algorithms.privacy import Privacy
from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError
from fedpeft.hardware import resolve_precision

__all__ = ["Algorithm", "Artifact", "Client", "ClientInfo", "Message", "Runtime"]

log = logging.getLogger("fedpeft")


class Algorithm(abc.ABC):
    """Base class of every method. Subclasses implement the abstract hooks; the others have defaults."""

    name: ClassVar[str] = "base"

    def __init__(self, cfg: RunConfig):
        if cfg.device == "auto" or cfg.precision == "auto":
            # Settings built by hand (tests, benchmark scripts) that never went through resolved():
            # an algorithm computes, so its device and precision are made concrete here, by the same rule.
            device = cfg.resolved_device()
            cfg = dataclasses.replace(cfg, device=device, precision=resolve_precision(cfg.precision, device))
        self.cfg = cfg  # resolved settings (RunConfig.resolved()): nothing here guesses a default again
        self.runtime: Runtime | None = None
        self.federation: list[ClientInfo] = []
        self.heads = None  # the head policy (algorithms/heads.py), made in bind()
        self.privacy = Privacy(cfg)  # --dp: clipping, noise, the accountant (algorithms/privacy.py)
        self._events: list[dict[str, Any]] = []

    @classmethod
    def create(cls, cfg: RunConfig) -> "Algorithm":
        """The instance for `cfg`. A method whose ablations are other classes picks one here."""
        return cls(cfg)

    # ------------------------------------------------------------ assembly
    @abc.abstractmethod
    def build_runtime(self, backbone) -> Runtime:
        """The model this process trains and scores with: a copy of the backbone with the method's
        adapters. Called once per process (server and every client process)."""

    def bind(self, runtime: Runtime, federation: list[ClientInfo]) -> None:
        """Attach the runtime and the federation (what the server knows of every client). A method
        that cannot run on this federation raises FedPeftError here, before round 1."""
        self.runtime = runtime
        self.federation = federation
        self.heads = make_heads(self.cfg, runtime.model, federation)
        self.privacy.bind(len(federation))

    def place_runtime(self, runtime: Runtime) -> Runtime:
        """Put the runtime model on the run's device (`--device`, resolved) and switch gradient
        checkpointing on when asked. The run assembly calls it once, right after `build_runtime`.

        Everything the model computes runs there (its adapters, heads, batches, generation, LEFF's
        distillation); what leaves it (messages, the server state, client stores) is copied to
        `hardware.WIRE_DEVICE`, so aggregation runs on the CPU whatever device the clients use."""
        from fedpeft.models.placement import enable_gradient_checkpointing, place

        place(runtime.model, self.cfg.device)
        if self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(runtime.model)
        return runtime

    @property
    def device(self):
        """Where this process's runtime model computes (its parameters' device)."""
        return next(self.runtime.model.parameters()).device

    # ------------------------------------------------------------ schedule
    @property
    def num_rounds(self) -> int:
        return self.cfg.global_rounds

    def phase(self, rnd: int) -> str:
        """The name of round `rnd`'s phase, recorded with every record ("train", "warmup", ...)."""
        return "train"

    # ------------------------------------------------------------ server side
    @abc.abstractmethod
    def init(self) -> dict[str, Any]:
        """The server state before round 1 (common initialisations drawn from the run seed)."""

    @abc.abstractmethod
    def configure(self, state: dict[str, Any], rnd: int, clients: list[int]) -> dict[int, Message]:
        """The instruction for round `rnd` of each client in `clients` (the round's sample, drawn by
        the engine from the run seed: every client under full participation). A client may be
        sampled for the first time in any round: until it has replied once its instruction carries
        the common initialisation. `configure` may record in `state` what `aggregate` must know
        about these instructions (LEFF: each client's block); it is deterministic, so a resumed run
        makes the same instructions again. The engine also asks for round num_rounds + 1 (every
        client): the state each client would train with next, which is what it is scored with."""

    @abc.abstractmethod
    def aggregate(self, state: dict[str, Any], rnd: int, replies: dict[int, Message]) -> dict[str, Any]:
        """The new state from the replies that arrived. Clients may be missing (failed, late); every
        reply is checked (`algorithms/replies.py`) and a bad one is left out, never averaged."""

    def configure_evaluate(self, state: dict[str, Any], rnd: int, clients: list[int],
                           broadcast: dict[int, Message]) -> dict[int, Message]:
        """The message each client in `clients` scores after round `rnd`, made after aggregation.
        Default: its instruction for round rnd + 1 (the `broadcast` when it is sampled for that
        round, else made here), so a client is scored with the state it trains with next
        (docs/methods/fedlease.md#evaluation-timing). A method that scores a model the broadcast does not
        carry (LEFF scores the global model) returns it here; `evaluate` must need nothing but this
        message and the client's store, so every engine gets the same numbers."""
        missing = [c for c in clients if c not in broadcast]
        extra = self.configure(state, rnd + 1, missing) if missing else {}
        return {c: broadcast[c] if c in broadcast else extra[c] for c in clients}

    def round_info(self, state: dict[str, Any], rnd: int) -> dict[str, Any]:
        """Plain values recorded in round `rnd`'s entry of training_history.json (e.g. IFCA's
        cluster choices, LEFF's blocks and client memory). Default: under --dp, the privacy spent."""
        return self.privacy.report(state, rnd)

    def artifacts(self, state: dict[str, Any], rnd: int, records: list[dict[str, Any]]) -> list[Artifact]:
        """Files and figures for the run folder after round `rnd` (`records`: that round's client
        records). The run layer writes them; a method returns the ones that changed this round."""
        return []

    exports_one_adapter: ClassVar[bool] = False
    """Every client uses one exported adapter alone, so `fedpeft export --merge` can fold it into the
    base weights (FedIT and the methods built on it; not FedSA-LoRA, FedDPA, IFCA or FedLEASE)."""

    def export(self, state: dict[str, Any], backbone, out: Path, base_path: str,
               stores: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write the trained adapters under `out` as standard PEFT folders for the base model at
        `base_path`; return the manifest's adapter entries ({name: {"path", "clients", "use", ...}}):
        the adapters the clients actually use, per client where that is what they use. `stores` are the
        clients' stores when the run folder holds them (the local engine's checkpoint, flower-sim's
        client_state/), else None. Methods without a PEFT adapter say so."""
        raise FedPeftError(f"`fedpeft export` writes PEFT LoRA adapters; {self.name} has none to export")

    # ------------------------------------------------------------ events
    def record_event(self, kind: str, **fields: Any) -> None:
        """An event for training_history.json (clustering, a late join, a rejected reply, ...)."""
        self._events.append({"kind": kind, **fields})

    def take_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------ client side
    @abc.abstractmethod
    def fit(self, instruction: Message, client: Client) -> Message:
        """Local training on the client's data; the reply carries only what the method uploads, and
        `num_examples`. Client state that persists goes to `client.store`."""

    @abc.abstractmethod
    def load_for_eval(self, instruction: Message, client: Client) -> None:
        """Put into the runtime model exactly the state this client is scored with."""

    def evaluate(self, instruction: Message, client: Client) -> dict[str, float]:
        """Metrics of the client's test data under `instruction` (configure_evaluate's message)."""
        self.load_for_eval(instruction, client)
        return score(self.cfg, self.runtime.model, client)

    # ------------------------------------------------------------ helpers for subclasses
    def train_client(self, client: Client, params, *, tag: str, rnd: int, **kwargs):
        """One local run over `params` plus whatever the head policy trains (local_training.train)."""
        return train(self.cfg, self.runtime.model, client, list(params) + self.heads.params(),
                     tag=tag, rnd=rnd, **kwargs)

    def num_examples(self, cid: int) -> int:
        return self.federation[cid].num_examples

    @property
    def has_head(self) -> bool:
        """False for a causal LM: no classification head, so every head policy is a no-op."""
        return getattr(self.runtime.model, "has_head", True)
