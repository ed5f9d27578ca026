"""Save the whole federation after every round; resume exactly.

Everything random is derived from (seed, client, round, phase), so the server state, the client
stores and the round number are all that a resumed run needs to reach the same numbers. They hold
tensors on the wire device (the CPU), and load there whatever device the run computes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedpeft.errors import FedPeftError
from fedpeft.hardware import WIRE_DEVICE
from fedpeft.records.atomic import atomic_write_with

NAME = "checkpoint.pt"


def save_checkpoint(run_dir: Path, rnd: int, server_state: dict[str, Any], stores: dict[int, dict[str, Any]]) -> None:
    # written atomically: a crash mid-save leaves the previous checkpoint intact
    atomic_write_with(run_dir / NAME, lambda fh: torch.save({"round": rnd, "server_state": server_state,
                                                             "client_stores": stores}, fh))


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    path = run_dir / NAME
    if not path.is_file():
        raise FedPeftError(f"cannot resume: {path} does not exist (was the run started with this --output_dir?)")
    try:
        return torch.load(path, map_location=WIRE_DEVICE, weights_only=True)
    except Exception as exc:
        raise FedPeftError(f"cannot resume: {path} is unreadable ({exc})") from None
