"""Translation between fedpeft's `Message` and Flower's `RecordDict`, and the client store blob.

An Instruction or Reply becomes two records: `tensors` (an ArrayRecord, one Array per named tensor,
bit-exact) and `config` (a ConfigRecord). Scalars (bool, int, float, str) keep their Flower type;
anything else (lists, nested dicts) is JSON under the key with a `json:` prefix, so Flower never
sees a value type it cannot carry. JSON cannot keep non-string dict keys, so those raise instead of
silently turning into strings.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from fedpeft.algorithms.base import Message
from fedpeft.hardware import WIRE_DEVICE

TENSORS, CONFIG, METRICS, CONTROL = "tensors", "config", "metrics", "fedpeft"
JSON_PREFIX = "json:"
_SCALARS = (bool, int, float, str)


def encode_config(values: dict[str, Any]):
    from flwr.app import ConfigRecord

    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, _SCALARS):
            out[key] = value
        else:
            out[JSON_PREFIX + key] = json.dumps(_check_json(value, key))
    return ConfigRecord(out)


def decode_config(record) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if key.startswith(JSON_PREFIX):
            out[key[len(JSON_PREFIX):]] = json.loads(value)
        else:
            out[key] = value
    return out


def _check_json(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"config value {where!r} has a non-string key {k!r}: it cannot cross the wire as JSON")
            _check_json(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
    elif value is not None and not isinstance(value, _SCALARS):
        raise TypeError(f"config value {where!r} of type {type(value).__name__} cannot cross the wire")
    return value


def encode_tensors(tensors: dict[str, torch.Tensor]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v.detach().to(WIRE_DEVICE).contiguous()) for k, v in tensors.items()})


def decode_tensors(record) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(arr.numpy().copy()) for k, arr in record.items()}


def to_records(message: Message, control: dict[str, Any] | None = None):
    """A fedpeft Message (plus engine control values) as a Flower RecordDict."""
    from flwr.app import RecordDict

    records = {TENSORS: encode_tensors(message.tensors), CONFIG: encode_config(message.config)}
    if control is not None:
        records[CONTROL] = encode_config(control)
    return RecordDict(records)


def from_records(content) -> Message:
    tensors = decode_tensors(content[TENSORS]) if TENSORS in content else {}
    config = decode_config(content[CONFIG]) if CONFIG in content else {}
    return Message(tensors, config)


def control_of(content) -> dict[str, Any]:
    return decode_config(content[CONTROL]) if CONTROL in content else {}


def wire_summary(content) -> dict[str, Any]:
    """What a Flower message carries, record by record: for the payload audit (`wire.jsonl`)."""
    out = {}
    for name, record in content.items():
        if hasattr(record, "to_torch_state_dict") or name == TENSORS:
            out[name] = {k: {"shape": list(a.shape), "dtype": a.dtype, "nbytes": len(a.data)}
                         for k, a in record.items()}
        else:
            out[name] = {k: (v if isinstance(v, (bool, int, float)) else f"<{type(v).__name__} {len(v)}>")
                         for k, v in record.items()}
    return out


# ------------------------------------------------------------ client store
def store_to_bytes(store: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(store, buf)
    return buf.getvalue()


def store_from_bytes(blob: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(blob), map_location=WIRE_DEVICE, weights_only=True)
