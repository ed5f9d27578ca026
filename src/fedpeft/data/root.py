"""The local data root every reader resolves first: `data_dir`, else `$FEDPEFT_DATA_DIR`, else none
(then the readers ask the Hugging Face hub). GLUE (`sources.py`) and the generation tasks
(`nlg_sources.py`) look for their folders under it."""

from __future__ import annotations

import os
from pathlib import Path

from fedpeft.errors import FedPeftError

ENV_DATA_DIR = "FEDPEFT_DATA_DIR"


def resolve_data_root(data_dir: str | os.PathLike | None) -> Path | None:
    """The local data root: `data_dir`, else `$FEDPEFT_DATA_DIR`, else None (use the hub)."""
    root = data_dir if data_dir not in (None, "") else os.environ.get(ENV_DATA_DIR) or None
    if root is None:
        return None
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FedPeftError(
            f"The data directory {root} does not exist; pass --data-dir (or set {ENV_DATA_DIR}) "
            "to a folder holding GLUE-format task folders."
        )
    return root
