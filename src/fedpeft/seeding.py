"""One run seed; every other seed derives from it.

`derive_seed(seed, "fit", client, round)` is stable across processes and machines (it does not
use Python's salted `hash`), so the in-process and Flower engines draw the same numbers.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    text = "/".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def torch_generator(seed: int, *parts: object):
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, *parts))
