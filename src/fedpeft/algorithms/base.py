"""The Algorithm contract: what every federated method implements, whatever engine carries it.

An algorithm is plain Python over tensors. Engines only move its messages: the in-process engine
calls the hooks directly, Flower sends them across processes or machines, and a test proves both
give the same numbers. The hooks, in the order an engine calls them:

    build_runtime(backbone) → bind(runtime, federation) → init() → state
    every round r:   configure(state, r)           server: what each client is sent
                     fit(instruction, client)      client: local training → reply
                     aggregate(state, r, replies)  server: new state (missing/rejected clients tolerated)
                     configure(state, r + 1)       server: the next broadcast
                     configure_evaluate(...)       server: what each client scores (default: that broadcast)
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
import logging
from pathlib import Path
from typing import Any, ClassVar

from fedpeft.algorithms.heads import make_heads
from fedpeft.algorithms.local_training import score, train
from fedpeft.algorithms.messages import Artifact, Client, ClientInfo, Message, Runtime
from fedpeft.algorithms.privacy import Privacy
from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError

__all__ = ["Algorithm", "Artifact", "Client", "ClientInfo", "Message", "Runtime"]

log = logging.getLogger("fedpeft")


class Algorithm(abc.ABC):
    """Base class of every method. Subclasses implement the abstract hooks; the others have defaults."""

    name: ClassVar[str] = "base"

    def __init__(self, cfg: RunConfig):
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
    def configure(self, state: dict[str, Any], rnd: int) -> dict[int, Message]:
        """The instruction of every client for round `rnd`. It may record in `state` what
        `aggregate` must know about these instructions (LEFF: each client's block); it is
        deterministic, so a resumed run makes the same instructions again. The engine also asks
        for round num_rounds + 1, the broadcast after the last round (what clients are scored with)."""

    @abc.abstractmethod
    def aggregate(self, state: dict[str, Any], rnd: int, replies: dict[int, Message]) -> dict[str, Any]:
        """The new state from the replies that arrived. Clients may be missing (failed, late); every
        reply is checked (`algorithms/replies.py`) and a bad one is left out, never averaged."""

    def configure_evaluate(self, state: dict[str, Any], rnd: int,
                           broadcast: dict[int, Message]) -> dict[int, Message]:
        """The message each client scores after round `rnd`, made after aggregation. Default: the
        broadcast of round rnd + 1, so a client is scored with the state it trains with next
        (docs/methods/fedlease.md#evaluation-timing). A method that scores a model the broadcast does not
        carry (LEFF scores the global model) returns it here; `evaluate` must need nothing but this
        message and the client's store, so every engine gets the same numbers."""
        return broadcast

    def round_info(self, state: dict[str, Any], rnd: int) -> dict[str, Any]:
        """Plain values recorded in round `rnd`'s entry of training_history.json (e.g. IFCA's
        cluster choices, LEFF's blocks and client memory). Default: under --dp, the privacy spent."""
        return self.privacy.report(state, rnd)

    def artifacts(self, state: dict[str, Any], rnd: int, records: list[dict[str, Any]]) -> list[Artifact]:
        """Files and figures for the run folder after round `rnd` (`records`: that round's client
        records). The run layer writes them; a method returns the ones that changed this round."""
        return []

    def export(self, state: dict[str, Any], backbone, out: Path, base_path: str) -> dict[str, Any]:
        """Write the trained adapters under `out` as standard PEFT folders for the base model at
        `base_path`; return the manifest's adapter entries. Methods without a PEFT adapter say so."""
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
