"""The server's check of every SuperNode reply, before anything in it is used.

A SuperNode is another party: its reply may be malformed by a bug or crafted by an attacker. Every
reply (query, fit, evaluate) is checked here against what the server itself expects, and turned into
plain Python values only after it passed. A reply that fails raises `Rejected` with the reason; the
engine logs it, records a `rejected_reply` event and treats the client as missing for that step.
Nothing here trusts a value the client chose: a client's task and label count come from the
server's own federation definition (the run's `tasks`), its declared size is bounded by the sizes
the run's settings give, and the tensors' dtypes, head names and head shapes come from the server's
model and head policy.

What a fit reply may hold:
- records `config` (a ConfigRecord) and, with tensors, `tensors` + `tensor_index` (records.py's
  packed format), nothing else;
- config: only the keys of `FIT_VALUES`, each of its type (finite numbers), `num_examples` an
  integer in [1, the client's declared size];
- tensors: an index of unique names of at most 512 characters whose dtypes are the server model's
  floating dtypes and whose shapes add up to exactly the packed bytes, no tensor with more elements
  than the server model's largest, finite values; head tensors (`head.*`) exactly the names, shapes and dtypes of the
  server's head for the client's label count (a subset under the `classifier` policy);
- at most `max_reply_bytes` in all.
The tensor names and shapes a method expects in a given round (which LoRA factors, which expert,
which LEFF block) are then checked by the method itself (`algorithms/replies.py`, `accept`), which
rejects the reply the same way.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from fedpeft.algorithms.base import ClientInfo, Message
from fedpeft.engines.flower.records import (
    CONFIG, CONTROL, INDEX, JSON_PREFIX, METRICS, TENSORS, dtype_name, packed_bytes, unpack_tensors)

HEAD_PREFIX = "head."
MAX_NAME = 512
MAX_INT = 2 ** 53  # larger integers do not survive a float64 round trip: no honest count is that big

# The plain values a fit reply may carry, by kind: "count" (integer >= 1), "int" (integer >= 0),
# "float" (finite), "float?" (finite or None: a local run with no batch has no loss), "bool".
FIT_VALUES: dict[str, str] = {
    "num_examples": "count", "train_loss": "float?", "global_train_loss": "float?", "train_seconds": "float",
    "compute_seconds": "float", "real_tokens": "int", "padded_tokens": "int", "uploaded_warmup": "bool",
    "own_expert": "int", "cluster": "int", "block_start": "int", "budget": "int", "participated": "bool",
}
QUERY_KEYS = ("client_id", "task", "num_labels", "num_examples")
_METRIC = re.compile(r"(accuracy|f1|matthews|pearson|spearman|loss|bleu|nist|meteor|rouge_l|rouge1|cider|token_f1|"
                     r"exact_match|(experts_per_token|gamma_own|own_only_share|single_expert_share|router_entropy)"
                     r"(/[A-Za-z0-9_.]{1,64})?)")
MAX_METRICS = 512  # FedLEASE on RoBERTa-large: 5 usage and router logs x 48 modules, plus the task's metrics


class Rejected(Exception):
    """A reply that the server does not use; the message is the reason, for the log and the history."""


@dataclass
class ReplySchema:
    """What the server accepts from one client in one round (server-side values only)."""

    client: ClientInfo  # from the server's federation definition and the checked query reply
    dtypes: frozenset[str]  # the server model's floating dtypes by name, e.g. {"float32"}
    heads: Mapping[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # head.* name → (shape, dtype)
    max_numel: int = 0  # elements of the server model's largest tensor
    max_reply_bytes: int = 0


def _scalar_kind_ok(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind in ("count", "int"):
        return isinstance(value, int) and (1 if kind == "count" else 0) <= value <= MAX_INT
    if kind == "float?" and value is None:
        return True
    return isinstance(value, (int, float)) and math.isfinite(value)


def record_bytes(content) -> int:
    """What a reply costs in memory before it is decoded: array payloads plus config/metric values."""
    total = 0
    for name, record in content.items():
        total += len(str(name))
        for key, value in record.items():
            total += len(str(key))
            data = getattr(value, "data", None)
            if isinstance(data, (bytes, bytearray, memoryview)):
                total += len(data)
            elif isinstance(value, (str, bytes)):
                total += len(value)
            elif isinstance(value, list):
                total += 8 * len(value) + sum(len(v) for v in value if isinstance(v, (str, bytes)))
            else:
                total += 8
    return total


def _records_of(content, allowed: set[str], required: set[str]) -> None:
    from flwr.app import RecordDict

    if not isinstance(content, RecordDict):
        raise Rejected(f"the reply is a {type(content).__name__}, not a RecordDict")
    names = set(content.keys())
    if names - allowed:
        raise Rejected(f"unexpected record {sorted(names - allowed)[0]!r}")
    if required - names:
        raise Rejected(f"missing record {sorted(required - names)[0]!r}")


def _config_values(record, where: str) -> dict[str, Any]:
    """A ConfigRecord's values, `json:` keys decoded; anything malformed is a Rejected."""
    from flwr.app import ConfigRecord

    if not isinstance(record, ConfigRecord):
        raise Rejected(f"record {where!r} is a {type(record).__name__}, not a ConfigRecord")
    out = {}
    for key, value in record.items():
        if not isinstance(key, str):
            raise Rejected(f"{where} has a non-string key")
        if key.startswith(JSON_PREFIX):
            if not isinstance(value, str):
                raise Rejected(f"{where} value {key[:60]!r} is not JSON text")
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as exc:
                raise Rejected(f"{where} value {key[:60]!r} is not valid JSON: {exc}") from None
            key = key[len(JSON_PREFIX):]
        out[key] = value
    return out


# ------------------------------------------------------------ query
def check_query(content, node_id: int, num_clients: int, expected_info) -> ClientInfo:
    """A node's answer to "who are you": ClientInfo whose task and label count are the server's own
    (`expected_info(cid)` → (task, num_labels, max_examples)), and whose size is in [1, max_examples]."""
    _records_of(content, {CONTROL}, {CONTROL})
    values = _config_values(content[CONTROL], "query reply")
    if set(values) != set(QUERY_KEYS):
        extra, missing = set(values) - set(QUERY_KEYS), set(QUERY_KEYS) - set(values)
        raise Rejected(f"query reply has unexpected key {sorted(extra)[0][:60]!r}" if extra
                       else f"query reply lacks {sorted(missing)[0]!r}")
    cid, n = values["client_id"], values["num_examples"]
    if not _scalar_kind_ok("int", cid) or not cid < num_clients:
        raise Rejected(f"node {node_id} claims partition-id {cid!r}; the run has clients 0..{num_clients - 1}")
    task, num_labels, max_examples = expected_info(cid)
    if values["task"] != task or values["num_labels"] != num_labels:
        raise Rejected(f"node {node_id} (partition-id {cid}) says it holds {values['task']!r} with "
                       f"{values['num_labels']!r} labels; the run gives client {cid} {task!r} with {num_labels}")
    if not _scalar_kind_ok("count", n) or n > max_examples:
        raise Rejected(f"node {node_id} (partition-id {cid}) declares {n!r} training examples; the run's settings "
                       f"give it between 1 and {max_examples}")
    return ClientInfo(cid, task, num_labels, n)


# ------------------------------------------------------------ fit
def check_fit(content, schema: ReplySchema) -> Message:
    """A fit reply as a fedpeft Message, or Rejected."""
    from flwr.app import ConfigRecord

    _records_of(content, {TENSORS, INDEX, CONFIG}, {CONFIG})
    size = record_bytes(content)
    if size > schema.max_reply_bytes:
        raise Rejected(f"the reply holds {size} bytes, over the bound of {schema.max_reply_bytes} per reply")
    values = _config_values(content[CONFIG], "fit reply")
    for key, value in values.items():
        kind = FIT_VALUES.get(key)
        if kind is None:
            raise Rejected(f"fit reply has unexpected value {key[:60]!r}")
        if not _scalar_kind_ok(kind, value):
            raise Rejected(f"fit reply value {key!r} is {str(value)[:60]!r}, not a valid {kind}")
    n = values.get("num_examples")
    if n is None:
        raise Rejected("fit reply lacks num_examples")
    if n > schema.client.num_examples:
        raise Rejected(f"num_examples is {n}, more than the {schema.client.num_examples} the client declared")
    tensors: dict[str, torch.Tensor] = {}
    if TENSORS in content or INDEX in content:
        if TENSORS not in content or INDEX not in content:
            raise Rejected("the reply has tensors without their index, or an index without tensors")
        index = content[INDEX]
        if not isinstance(index, ConfigRecord) or set(index.keys()) != {"index"}:
            raise Rejected("record 'tensor_index' is not a ConfigRecord holding only 'index'")
        try:
            tensors = unpack_tensors(packed_bytes(content), index["index"], dtypes=schema.dtypes,
                                     max_numel=schema.max_numel, max_bytes=schema.max_reply_bytes)
        except ValueError as exc:
            raise Rejected(str(exc)) from None
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise Rejected(f"tensor {name[:60]!r} has NaN or Inf values")
            if name.startswith(HEAD_PREFIX):
                want = schema.heads.get(name)
                if want is None:
                    raise Rejected(f"unexpected head tensor {name[:60]!r} for a client with "
                                   f"{schema.client.num_labels} labels")
                if (tuple(t.shape), dtype_name(t.dtype)) != (tuple(want[0]), want[1]):
                    raise Rejected(f"head tensor {name!r} is {dtype_name(t.dtype)} {tuple(t.shape)}, "
                                   f"expected {want[1]} {tuple(want[0])}")
    return Message(tensors, values)


# ------------------------------------------------------------ evaluate
RESERVED_RECORD_KEYS = frozenset({"round", "phase", "client", "task", "bytes_up", "bytes_down", "bytes_eval_down",
                                  "participated", "train_loss", "fit_seconds", "compute_seconds", "real_tokens",
                                  "padded_tokens"})


def check_metrics(content) -> dict[str, float]:
    """An evaluate reply's metrics: known metric names only (never a field of the client's record such
    as `client` or `round`), finite numbers."""
    from flwr.app import MetricRecord

    _records_of(content, {METRICS}, {METRICS})
    record = content[METRICS]
    if not isinstance(record, MetricRecord):
        raise Rejected(f"record 'metrics' is a {type(record).__name__}, not a MetricRecord")
    if len(record) > MAX_METRICS:
        raise Rejected(f"evaluate reply has {len(record)} metrics, more than {MAX_METRICS}")
    out = {}
    for key, value in record.items():
        if not isinstance(key, str) or key in RESERVED_RECORD_KEYS or not _METRIC.fullmatch(key):
            raise Rejected(f"evaluate reply has unknown metric {str(key)[:60]!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Rejected(f"metric {key!r} is {str(value)[:60]!r}, not a finite number")
        out[key] = float(value)
    return out


# ------------------------------------------------------------ bounds derived from the server's model
def model_dtypes_and_numel(model) -> tuple[frozenset[str], int]:
    """The names of the model's floating dtypes (e.g. {"float32"}) and its largest tensor's element count."""
    dtypes, numel = set(), 1
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            dtypes.add(dtype_name(t.dtype))
        numel = max(numel, t.numel())
    return frozenset(dtypes or {"float32"}), numel


def head_schema(init: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {HEAD_PREFIX + k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in init.items()}
