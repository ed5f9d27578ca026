"""Is the Hugging Face hub reachable? Asked before any hub download, so an offline user gets the
"how to work offline" message at once instead of half a minute of client retries."""

from __future__ import annotations

import os
import socket

HUB_HOST = "huggingface.co"


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """False when offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or the host does not answer."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "0").lower() in ("1", "true", "yes"):
            return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
