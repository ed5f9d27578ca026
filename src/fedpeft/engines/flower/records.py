"""Translation between fedpeft's `Message` and Flower's `RecordDict`, and the client store blob.

An Instruction or Reply becomes up to three records: `tensors` (an ArrayRecord holding ONE Array,
`packed`: every tensor's raw bytes one after the other, bit-exact, any torch dtype, bfloat16
included), `tensor_index` (a ConfigRecord whose `index` is the JSON list of [name, dtype, shape] in
that order) and `config` (a ConfigRecord). One Array per message instead of one per tensor: Flower
moves every Array as its own objects, one HTTP request each per hop, which cost seconds per message
for a LoRA of 50-100 tensors. Decoding checks the index against the bytes (`unpack_tensors`), so a
malformed message is a ValueError, never a wrong tensor. Scalars (bool, int, float, str) keep their Flower type;
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

TENSORS, INDEX, CONFIG, METRICS, CONTROL = "tensors", "tensor_index", "config", "metrics", "fedpeft"
PACKED = "packed"
# the dtypes a message may carry, by the name the index uses
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool}
MAX_DIMS = 8


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
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


def pack_tensors(tensors: dict[str, torch.Tensor]):
    """(the `packed` Array, the index JSON) of named tensors."""
    from flwr.app import Array

    index, parts = [], []
    for name, t in tensors.items():
        t = t.detach().to(WIRE_DEVICE).contiguous()
        if dtype_name(t.dtype) not in DTYPES:
            raise TypeError(f"tensor {name!r} of dtype {t.dtype} cannot cross the wire")
        index.append([name, dtype_name(t.dtype), list(t.shape)])
        parts.append(t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8))
    blob = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return Array(blob.numpy()), json.dumps(index)


def unpack_tensors(blob: bytes, index_json: str, *, dtypes=None, max_numel: int | None = None,
                   max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a packed message; ValueError (with the reason) for anything that is not exactly
    an index of unique names with known dtypes and shapes whose bytes add up to the blob. `dtypes`
    (names) and `max_numel` restrict what is accepted further."""
    if not isinstance(index_json, str):
        raise ValueError("the tensor index is not text")
    if max_bytes is not None and len(index_json) > max_bytes:
        raise ValueError(f"the tensor index holds {len(index_json)} bytes, over the bound of {max_bytes}")
    try:
        index = json.loads(index_json)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the tensor index is not valid JSON: {exc}") from None
    if not isinstance(index, list):
        raise ValueError("the tensor index is not a list")
    entries, offset = [], 0
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], str)
                and isinstance(entry[2], list)):
            raise ValueError(f"malformed tensor index entry {str(entry)[:80]}")
        name, dt, shape = entry
        if not 0 < len(name) <= 512:
            raise ValueError("a tensor name is empty or too long")
        if dt not in DTYPES or (dtypes is not None and dt not in dtypes):
            raise ValueError(f"tensor {name[:60]!r} has dtype {dt[:40]!r}"
                             + (f", expected {'/'.join(sorted(dtypes))}" if dtypes is not None else ""))
        if len(shape) > MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 40
                                            for d in shape):
            raise ValueError(f"tensor {name[:60]!r} has shape {str(shape)[:80]}")
        numel = 1
        for d in shape:
            numel *= d
        if max_numel is not None and numel > max_numel:
            raise ValueError(f"tensor {name[:60]!r} has {numel} elements, more than any tensor of the model ({max_numel})")
        size = numel * torch.empty(0, dtype=DTYPES[dt]).element_size()
        entries.append((name, DTYPES[dt], tuple(shape), offset, numel))
        offset += size
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("the tensor index names a tensor twice")
    if offset != len(blob):
        raise ValueError(f"the tensor index describes {offset} bytes, the packed array holds {len(blob)}")
    buf = bytearray(blob)
    out = {}
    for name, dt, shape, off, numel in entries:
        t = torch.frombuffer(buf, dtype=dt, count=numel, offset=off) if numel else torch.empty(0, dtype=dt)
        out[name] = t.reshape(shape).clone()
    return out


def packed_bytes(content) -> bytes:
    """The raw bytes of a message's `packed` Array (ValueError if it is not one 1-D uint8 array)."""
    from flwr.app import Array, ArrayRecord

    record = content[TENSORS]
    if not isinstance(record, ArrayRecord) or set(record.keys()) != {PACKED}:
        raise ValueError("the tensors record is not one packed array")
    arr = record[PACKED]
    if not isinstance(arr, Array) or arr.stype != "numpy.ndarray" or arr.dtype != "uint8" or len(arr.shape) != 1:
        raise ValueError("the packed array is not a 1-D uint8 numpy array")
    try:
        value = arr.numpy()
    except Exception as exc:  # noqa: BLE001 - np.load of another party's bytes
        raise ValueError(f"the packed array cannot be decoded: {type(exc).__name__}") from None
    if value.dtype != "uint8" or value.ndim != 1 or value.shape[0] != arr.shape[0]:
        raise ValueError("the packed array's bytes are not what its header says")
    return value.tobytes()


def to_records(message: Message, control: dict[str, Any] | None = None):
    """A fedpeft Message (plus engine control values) as a Flower RecordDict."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    records = {CONFIG: encode_config(message.config)}
    if message.tensors:
        packed, index = pack_tensors(message.tensors)
        records[TENSORS] = ArrayRecord({PACKED: packed})
        records[INDEX] = ConfigRecord({"index": index})
    if control is not None:
        records[CONTROL] = encode_config(control)
    return RecordDict(records)


def decode_tensors(content) -> dict[str, torch.Tensor]:
    """The tensors of a message (ValueError if malformed)."""
    if TENSORS not in content and INDEX not in content:
        return {}
    if TENSORS not in content or INDEX not in content:
        raise ValueError("a message has tensors without their index, or an index without tensors")
    return unpack_tensors(packed_bytes(content), content[INDEX].get("index"))


def from_records(content) -> Message:
    config = decode_config(content[CONFIG]) if CONFIG in content else {}
    return Message(decode_tensors(content), config)


def control_of(content) -> dict[str, Any]:
    return decode_config(content[CONTROL]) if CONTROL in content else {}


def wire_summary(content) -> dict[str, Any]:
    """What a Flower message carries, record by record: for the payload audit (`wire.jsonl`). The
    packed tensors are listed one by one (name, shape, dtype, bytes), as the index gives them."""
    out = {}
    for name, record in content.items():
        if name == INDEX:
            continue
        if name == TENSORS:
            try:
                index = json.loads(content[INDEX]["index"]) if INDEX in content else []
            except (ValueError, KeyError, TypeError):
                index = []
            out[name] = {k: {"shape": shape, "dtype": dt,
                             "nbytes": int(torch.Size(shape).numel()) * torch.empty(0, dtype=DTYPES[dt]).element_size()}
                         for k, dt, shape in index if dt in DTYPES}
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
