"""Hostile SuperNodes, for the tests (test_flower.py) and benchmarks/faults.py, which import it from this
folder (test scaffolding, not part of the fedpeft package): a Flower Grid that runs the real fedpeft
ClientApp handler in this process, with one client whose reply is tampered with after the honest
computation, through the real record conversion (Flower Messages and records, not fedpeft Messages).

`CASES` names each attack; `campaign(settings, out)` runs a reference run (the hostile client's fit
fails in round 1: it is simply missing) and one run per case, and counts the cases that survived
(the run completed, the reply was rejected and recorded, and every record equals the reference run's)
and the records lost (missing or different from the reference). Nothing here is used by a real run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

HOSTILE_NODE, HOSTILE_CLIENT, HOSTILE_ROUND = 1003, 3, 1
METRIC_KEYS = ("accuracy", "f1", "matthews", "loss", "train_loss", "bytes_up", "bytes_down", "participated")


class InProcessGrid:
    """A Flower Grid whose nodes run the fedpeft ClientApp handler in this process; nodes can go
    down (no reply, as a killed SuperNode), come back under a new node id (a restarted SuperNode),
    fail (`fail_at`: (stage, round, node) → exception, an error reply) or lie (`tamper`:
    (stage, round, node) → function of the honest Flower reply returning the reply sent)."""

    def __init__(self, n: int, node_config: dict[str, Any] | None = None):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # what a ServerApp process has
        self.node_config = dict(node_config or {})
        self.nodes: dict[int, Any] = {}  # node id → Context
        for pid in range(n):
            self.add(1000 + pid, pid)
        self.down: set[int] = set()
        self.fail_at: dict[tuple, Exception] = {}
        self.tamper: dict[tuple, Callable] = {}

    def add(self, node: int, pid: int) -> None:
        from flwr.app import Context, RecordDict

        self.nodes[node] = Context(run_id=1, node_id=node, node_config={"partition-id": pid, **self.node_config},
                                   state=RecordDict(), run_config={})

    def get_node_ids(self) -> list[int]:
        return [n for n in self.nodes if n not in self.down]

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message as FlowerMessage

        from fedpeft.engines.flower.client import handle
        from fedpeft.engines.flower.records import control_of
        from fedpeft.run.flower import node_setup

        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.down:
                continue
            ctl = control_of(msg.content)
            key = (ctl["stage"], ctl.get("round", 0), node)
            try:
                if key in self.fail_at:
                    raise self.fail_at[key]
                reply = handle(msg, self.nodes[node], node_setup)
            except Exception as exc:
                out.append(FlowerMessage(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
                continue
            if key in self.tamper:
                reply = self.tamper[key](reply, msg)
            out.append(reply)
        return out


# ------------------------------------------------------------ the attacks
def _rebuild(reply, msg, records: dict[str, Any]):
    """A reply to `msg` with these records, as the node would send it."""
    from flwr.app import Message as FlowerMessage, RecordDict

    return FlowerMessage(RecordDict(records), reply_to=msg)


def _config(reply) -> dict[str, Any]:
    return dict(reply.content["config"].items())


def _tensors(reply) -> dict[str, Any]:
    from fedpeft.engines.flower.records import decode_tensors

    return decode_tensors(reply.content)


def _with(reply, msg, *, config=None, tensors=None, extra=None, drop=()):
    """The reply with its config and/or tensors replaced (tensors packed as fedpeft packs them)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fedpeft.engines.flower.records import INDEX, PACKED, TENSORS, pack_tensors

    records = {k: v for k, v in reply.content.items() if k not in drop}
    if config is not None:
        records["config"] = ConfigRecord(config)
    if tensors is not None:
        packed, index = pack_tensors(tensors)
        records[TENSORS], records[INDEX] = ArrayRecord({PACKED: packed}), ConfigRecord({"index": index})
    records.update(extra or {})
    return _rebuild(reply, msg, records)


def _first_lora(tensors) -> str:
    return next(k for k in tensors if not k.startswith("head."))


def bad_json(reply, msg):
    return _with(reply, msg, config={**_config(reply), "json:train_loss": "{not json"})


def missing_records(reply, msg):
    return _rebuild(reply, msg, {})


def missing_config(reply, msg):
    return _with(reply, msg, drop=("config",))


def missing_index(reply, msg):
    return _with(reply, msg, drop=("tensor_index",))


def extra_config_key(reply, msg):
    return _with(reply, msg, config={**_config(reply), "steer_server": 1})


def extra_record(reply, msg):
    from flwr.app import ConfigRecord

    return _with(reply, msg, extra={"fedpeft": ConfigRecord({"stage": "query", "client_id": 0})})


def extra_tensor(reply, msg):
    import torch

    return _with(reply, msg, tensors={**_tensors(reply), "lora.evil.A": torch.zeros(2, 2)})


def wrong_dtype(reply, msg):
    t = _tensors(reply)
    name = _first_lora(t)
    return _with(reply, msg, tensors={**t, name: t[name].double()})


def wrong_shape(reply, msg):
    t = _tensors(reply)
    name = _first_lora(t)
    return _with(reply, msg, tensors={**t, name: t[name][:1].clone()})


def lying_index(reply, msg):
    """The index declares a first tensor 4x larger than the bytes it packs."""
    from flwr.app import ConfigRecord

    index = json.loads(reply.content["tensor_index"]["index"])
    index[0][2] = [d * 4 for d in index[0][2]]
    return _with(reply, msg, extra={"tensor_index": ConfigRecord({"index": json.dumps(index)})})


def oversize_tensor(reply, msg):
    """A tensor far larger than anything the server sent (64 MiB of zeros)."""
    import torch

    t = _tensors(reply)
    return _with(reply, msg, tensors={**t, _first_lora(t): torch.zeros(4096, 4096)})


def huge_num_examples(reply, msg):
    return _with(reply, msg, config={**_config(reply), "num_examples": 10 ** 15})


def float_num_examples(reply, msg):
    return _with(reply, msg, config={**_config(reply), "num_examples": 1e15})


def nan_head(reply, msg):
    t = _tensors(reply)
    name = next(k for k in t if k.startswith("head."))
    bad = t[name].clone()
    bad.view(-1)[0] = math.nan
    return _with(reply, msg, tensors={**t, name: bad})


def wrong_head_shape(reply, msg):
    import torch

    t = _tensors(reply)
    name = next(k for k in t if k.startswith("head.out_proj"))
    return _with(reply, msg, tensors={**t, name: torch.zeros((7,) + tuple(t[name].shape[1:]))})


def string_loss(reply, msg):
    return _with(reply, msg, config={**_config(reply), "train_loss": "<script>"})


def scaled_update(reply, msg):
    """A well-formed reply whose LoRA is scaled 1000×: schema-valid, only robust aggregation resists it."""
    return _with(reply, msg, tensors={k: (v * 1000.0 if not k.startswith("head.") else v)
                                      for k, v in _tensors(reply).items()})


def metrics_overwrite_record(reply, msg):
    from flwr.app import MetricRecord

    return _rebuild(reply, msg, {"metrics": MetricRecord({**dict(reply.content["metrics"].items()), "client": 0.0})})


def metrics_nan(reply, msg):
    from flwr.app import MetricRecord

    return _rebuild(reply, msg, {"metrics": MetricRecord({**dict(reply.content["metrics"].items()),
                                                           "accuracy": math.nan})})


def query_other_partition(reply, msg):
    """An extra node claims the partition of client 2, same task as its own (a stranger without
    SuperNode authentication): the node already holding it keeps it."""
    from flwr.app import ConfigRecord

    return _rebuild(reply, msg, {"fedpeft": ConfigRecord({**dict(reply.content["fedpeft"].items()), "client_id": 2})})


def query_out_of_range(reply, msg):
    from flwr.app import ConfigRecord

    return _rebuild(reply, msg, {"fedpeft": ConfigRecord({**dict(reply.content["fedpeft"].items()), "client_id": 99})})


def query_wrong_task(reply, msg):
    """The stranger (partition 3, a demo-topic client) says it holds the 2-label sentiment task."""
    from flwr.app import ConfigRecord

    return _rebuild(reply, msg, {"fedpeft": ConfigRecord({**dict(reply.content["fedpeft"].items()),
                                                           "task": "demo-sentiment", "num_labels": 2})})


# name → (stage, tamper function, the method settings it needs)
CASES: dict[str, tuple[str, Callable, dict[str, Any]]] = {
    "bad JSON": ("fit", bad_json, {}),
    "missing records": ("fit", missing_records, {}),
    "missing config record": ("fit", missing_config, {}),
    "extra config key": ("fit", extra_config_key, {}),
    "extra record": ("fit", extra_record, {}),
    "extra tensor": ("fit", extra_tensor, {}),
    "wrong dtype": ("fit", wrong_dtype, {}),
    "wrong shape": ("fit", wrong_shape, {}),
    "tensor index lies about a shape": ("fit", lying_index, {}),
    "tensors without their index": ("fit", missing_index, {}),
    "oversize tensor": ("fit", oversize_tensor, {}),
    "num_examples = 10**15": ("fit", huge_num_examples, {}),
    "num_examples = 1e15 (float)": ("fit", float_num_examples, {}),
    "NaN head": ("fit", nan_head, {"head_policy": "shared"}),
    "wrong head shape": ("fit", wrong_head_shape, {"head_policy": "shared"}),
    "string train_loss": ("fit", string_loss, {}),
    "metric named 'client'": ("evaluate", metrics_overwrite_record, {}),
    "NaN metric": ("evaluate", metrics_nan, {}),
    "wrong partition id (another client's)": ("query", query_other_partition, {}),
    "wrong partition id (out of range)": ("query", query_out_of_range, {}),
    "wrong task and label count": ("query", query_wrong_task, {}),
}
STRANGER = 2000  # the extra node of the query cases


def hostile_grid(case: str, n: int, node_config: dict[str, Any]) -> InProcessGrid:
    """The grid of one case: node 1003 (client 3) tampers with its round-1 reply; a query case adds a
    stranger node that lies about who it is."""
    stage, fn, _ = CASES[case]
    grid = InProcessGrid(n, node_config)
    if stage == "query":
        grid.add(STRANGER, HOSTILE_CLIENT)
        grid.tamper[("query", 0, STRANGER)] = fn
    else:
        grid.tamper[(stage, HOSTILE_ROUND, HOSTILE_NODE)] = fn
    return grid


def reference_grid(case: str, n: int, node_config: dict[str, Any]) -> InProcessGrid:
    """What the run must equal: the hostile client simply missing from that step (its fit fails; its
    evaluation gives no metrics), and no stranger at all for a query case."""
    stage = CASES[case][0]
    grid = InProcessGrid(n, node_config)
    if stage == "fit":
        grid.fail_at[("fit", HOSTILE_ROUND, HOSTILE_NODE)] = RuntimeError("missing")
    elif stage == "evaluate":  # it scored (its store moved on) but its reply was lost on the way
        grid.tamper[("evaluate", HOSTILE_ROUND, HOSTILE_NODE)] = _lost_reply
    return grid


def _lost_reply(reply, msg):
    from flwr.app import Error, Message as FlowerMessage

    return FlowerMessage(Error(code=0, reason="reply lost"), reply_to=msg)


def serve_on(grid, settings: dict[str, Any], out: Path, backbone=None) -> Path:
    """The whole Flower server side (run/flower.py `serve`) on `grid`; the run folder."""
    from fedpeft.config import RunConfig
    from fedpeft.run.assemble import open_run_dir, settle
    from fedpeft.run.flower import serve

    cfg, backbone = settle(RunConfig(**settings, engine="flower-sim", output_dir=str(out)), backbone)
    run_dir, resume = open_run_dir(cfg)
    serve(grid, cfg, run_dir, resume=resume, backbone=backbone)
    return run_dir


def records_of(run_dir: Path) -> tuple[dict[tuple[int, int], dict], dict]:
    data = json.loads((Path(run_dir) / "training_history.json").read_text())
    return {(r["round"], r["client"]): r for r in data["records"]}, data


def lost_records(run_dir: Path, reference: Path, tol: float = 1e-6) -> list[tuple[int, int]]:
    """(round, client) records of the reference run that are missing or different in `run_dir`."""
    got, _ = records_of(run_dir)
    want, _ = records_of(reference)
    lost = []
    for key, rec in want.items():
        other = got.get(key)
        if other is None or any((m in rec) != (m in other) or (
                m in rec and rec[m] is not None and (other[m] is None or abs(float(rec[m]) - float(other[m])) > tol))
                for m in METRIC_KEYS):
            lost.append(key)
    return lost


def run_case(case: str, settings: dict[str, Any], out: Path, node_config: dict[str, Any], backbone=None,
             reference: Path | None = None) -> dict[str, Any]:
    """One hostile run against its reference: {survived, rejected (the events), lost, error}."""
    n = len(settings["tasks"])
    case_settings = {**settings, **CASES[case][2]}
    if reference is None:
        reference = serve_on(reference_grid(case, n, node_config), case_settings, out / "reference", backbone)
    try:
        run_dir = serve_on(hostile_grid(case, n, node_config), case_settings, out / "hostile", backbone)
    except Exception as exc:  # noqa: BLE001 - the campaign counts a run that stopped as lost
        return {"case": case, "survived": False, "error": f"{type(exc).__name__}: {exc}", "lost": None, "rejected": []}
    _, data = records_of(run_dir)
    rejected = [e for e in data["events"] if e["kind"] in ("rejected_reply", "rejected_node")]
    lost = lost_records(run_dir, reference)
    return {"case": case, "survived": bool(rejected) and not lost, "rejected": rejected, "lost": len(lost),
            "error": None}


def campaign(settings: dict[str, Any], out: str | Path, *, node_config: dict[str, Any] | None = None,
             backbone=None, cases: list[str] | None = None) -> tuple[int, int, int]:
    """Run every case (or `cases`): (cases tried, survived, records lost). `settings`: RunConfig fields
    of a small run with 4 clients (tasks, model_name, sizes, rounds ≥ 2); `node_config`: what every
    node is started with (e.g. `allow-model-factories` for a factory model)."""
    out = Path(out)
    tried = survived = lost = 0
    references: dict[tuple, Path] = {}
    for i, case in enumerate(cases or list(CASES)):
        stage, _, extra = CASES[case]
        key = (stage, tuple(sorted(extra.items())))
        if key not in references:
            references[key] = serve_on(reference_grid(case, len(settings["tasks"]), node_config or {}),
                                       {**settings, **extra}, out / f"reference-{len(references)}", backbone)
        result = run_case(case, settings, out / f"case-{i}", node_config or {}, backbone, references[key])
        tried += 1
        survived += int(result["survived"])
        lost += result["lost"] if result["lost"] is not None else len(records_of(references[key])[0])
    return tried, survived, lost
