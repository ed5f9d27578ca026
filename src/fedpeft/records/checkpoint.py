"""Save the whole federation after every round; resume exactly.

Everything random is derived from (seed, client, round, phase), so the server state, the client
stores and the round number are all that a resumed run needs to reach the same numbers. The
checkpoint also carries the fingerprint of the settings that shape the run
(`RunConfig.shaping_settings`), so that a resume with other settings, or with an edited
config.json, refuses before any work instead of mixing two runs. It holds tensors on the wire
device (the CPU), and loads there whatever device the run computes on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from fedpeft.atomic import atomic_write_with
from fedpeft.errors import FedPeftError
from fedpeft.hardware import WIRE_DEVICE

NAME = "checkpoint.pt"


def fingerprint(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape a run, and their digest (what a checkpoint carries)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return {"settings": json.loads(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def save_checkpoint(run_dir: Path, rnd: int, server_state: dict[str, Any], stores: dict[int, dict[str, Any]],
                    settings: dict[str, Any] | None = None) -> None:
    # written atomically: a crash mid-save leaves the previous checkpoint intact
    payload = {"round": rnd, "server_state": server_state, "client_stores": stores}
    if settings is not None:
        payload["fingerprint"] = fingerprint(settings)
    atomic_write_with(run_dir / NAME, lambda fh: torch.save(payload, fh))


def load_checkpoint(run_dir: Path, *, mmap: bool = False) -> dict[str, Any]:
    path = Path(run_dir) / NAME
    if not path.is_file():
        raise FedPeftError(f"cannot resume: {path} does not exist (was the run started with this --output_dir?)")
    try:
        ckpt = torch.load(path, map_location=WIRE_DEVICE, weights_only=True, mmap=mmap)
    except Exception as exc:
        raise FedPeftError(f"cannot resume: {path} is unreadable ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("round"), int):
        raise FedPeftError(f"cannot resume: {path} is not a fedpeft checkpoint")
    return ckpt


def checkpoint_round(run_dir: Path) -> tuple[int, dict[str, Any] | None] | None:
    """(round, fingerprint or None for an older checkpoint) of the run folder's checkpoint, read
    without loading its tensors into memory; None when there is no checkpoint yet."""
    if not (Path(run_dir) / NAME).exists():
        return None
    ckpt = load_checkpoint(run_dir, mmap=True)
    return ckpt["round"], ckpt.get("fingerprint")
