"""The values that cross the Algorithm contract (base.py): messages, what the server knows of a
client, a client where its data lives, the runtime model, and a method's artifacts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fedpeft.data.batching import Encoded
from fedpeft.hardware import WIRE_DEVICE


@dataclass
class Message:
    """Named tensors and plain values. Its tensors are on `hardware.WIRE_DEVICE` (the CPU): a tensor
    given on another device (a GPU-trained parameter) is copied there, so the server and the wire
    never see device memory."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        wire = torch.device(WIRE_DEVICE)
        if any(t.device != wire for t in self.tensors.values()):
            self.tensors = {k: t.detach().to(WIRE_DEVICE) for k, t in self.tensors.items()}

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

    model: Any  # models.task_model.TaskModel, or models.causal_model.CausalLM for a decoder (no head)
    sites: list  # adapter sites, in a method-specific type
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Artifact:
    """A method output the run layer writes into the run folder: JSON `data`, or a figure that
    `draw(path)` renders. A figure that fails to draw is a warning, never a lost run."""

    name: str  # file name inside the run folder, e.g. "clustering.json" or "dendrogram.png"
    data: Any = None
    draw: Callable[[Path], Any] | None = None
