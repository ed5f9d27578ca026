"""Checking replies before they are used: a reply with NaN/Inf, a wrong or missing tensor, or a bad
`num_examples` is left out of the aggregation, logged, and recorded as a `rejected_reply` event."""

from __future__ import annotations

import logging
import math
from typing import Mapping

import torch

from fedpeft.algorithms.base import Algorithm, Message
from fedpeft.algorithms.heads import HEAD_PREFIX

log = logging.getLogger("fedpeft")


def check_reply(reply: Message, expected: Mapping[str, torch.Size] | None, optional_prefix: str = HEAD_PREFIX) -> str | None:
    """Why `reply` cannot be used, or None. `expected` maps tensor names to shapes (None: any);
    tensors under `optional_prefix` (the head, whose presence depends on the head policy) may be absent."""
    n = reply.config.get("num_examples")
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or not n > 0:
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


def accept(alg: Algorithm, rnd: int, replies: Mapping[int, Message], expected: Mapping[str, torch.Size] | None = None,
           optional_prefix: str = HEAD_PREFIX) -> dict[int, Message]:
    """The replies that pass `check_reply`; the others are logged and recorded as events of `alg`."""
    ok = {}
    for cid, reply in sorted(replies.items()):
        reason = check_reply(reply, expected, optional_prefix)
        if reason:
            reject(alg, rnd, cid, reason)
        else:
            ok[cid] = reply
    return ok


def reject(alg: Algorithm, rnd: int, cid: int, reason: str) -> None:
    log.warning("round %d: rejected the reply of client %d: %s", rnd, cid, reason)
    alg.record_event("rejected_reply", round=rnd, client=cid, reason=reason)
