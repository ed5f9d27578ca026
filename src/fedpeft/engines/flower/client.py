"""The ClientApp side: a SuperNode's client runs the algorithm's `fit` / `evaluate` on its own data.

Every message carries, in its `fedpeft` control record, the run's config, the federation (ClientInfo
list) and the stage ("query", "fit", "evaluate") with the round. The client's identity is its
`partition-id` (node config; the Simulation Engine sets it per virtual node). Node config may also
give `data-dir` (this machine's data root) and `state-dir` (where the client keeps its store between
runs, so a resumed server finds its clients' state), and `allow-model-factories` (run/flower.py).

The client decides its own paths: the store folder is the node's `state-dir` (or, for flower-sim, the
folder the simulated ClientApp was made with), and the file names under it are derived here (a hash
of the run key, the partition id, the round number), never a name the server sent.

The client's `store` lives in `Context.state` as torch-serialised bytes, tagged by where it was
left: `fit<r>` after the fit of round r, `round<r>` after its evaluation. A fit of round r starts
from the latest `round<k>` with k < r, an evaluation of round r from `fit<r>` if the client trained
in round r; that is the local engine's sequence, whatever process handles the message. When the
server rejected the fit reply of round r, its evaluate message says `rollback`, and the client
evaluates (and keeps) the store that fit started from, as the in-process engine rolls it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from fedpeft.engines.flower.records import (
    CONTROL, METRICS, control_of, encode_config, from_records, store_from_bytes, store_to_bytes, to_records)

log = logging.getLogger("fedpeft")

STATE_RECORD = "fedpeft.store"


def run_key(cfg_dict: dict[str, Any], run_dir) -> str:
    """Identifies a run across server restarts: its config (without the fields resuming changes) and
    the name of its run folder."""
    volatile = ("resume", "quiet", "threads", "round_timeout", "output_dir")
    stable = {k: v for k, v in cfg_dict.items() if k not in volatile}
    text = json.dumps(stable, sort_keys=True) + Path(run_dir).name
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def make_client_app(setup, *, state_dir: str | None = None):
    """A Flower ClientApp whose every message goes to `handle` with `setup(control, node_config)`,
    the run layer's function that returns this node's (algorithm, client) for the run. `state_dir`:
    where stores are kept when the node config names no `state-dir` (flower-sim: the run folder)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def _query(message, context):
        return handle(message, context, setup, state_dir=state_dir)

    @app.train()
    def _train(message, context):
        return handle(message, context, setup, state_dir=state_dir)

    @app.evaluate()
    def _evaluate(message, context):
        return handle(message, context, setup, state_dir=state_dir)

    return app


def handle(message, context, setup, *, state_dir: str | None = None):
    """Every message type of the fedpeft ClientApp lands here."""
    from flwr.app import Message as FlowerMessage, MetricRecord, RecordDict

    from fedpeft.errors import FedPeftError

    ctl = control_of(message.content)
    stage = ctl.get("stage")
    rnd = ctl.get("round", 0)
    if stage not in ("query", "fit", "evaluate") or not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise FedPeftError(f"not a fedpeft message: stage {str(stage)[:40]!r}, round {str(rnd)[:40]!r}")
    if not isinstance(ctl.get("run_key"), str):
        raise FedPeftError("not a fedpeft message: no run key")
    pid = partition_id(context.node_config)
    alg, client = setup(ctl, context.node_config)
    if stage == "query":
        info = client.info
        reply = {"client_id": info.client_id, "task": info.task, "num_labels": info.num_labels,
                 "num_examples": info.num_examples}
        return FlowerMessage(RecordDict({CONTROL: encode_config(reply)}), reply_to=message)
    state_dir = _state_dir(context.node_config, state_dir, ctl["run_key"])
    # The server rejected this round's fit reply: evaluate (and keep) the store from before that fit.
    rollback = stage == "evaluate" and ctl.get("rollback") is True
    client.store = _load_store(context, "fit" if rollback else stage, rnd, pid, state_dir, ctl["run_key"])
    if rollback:
        log.warning("client %d: the server rejected its update of round %d: back to its store from before it", pid, rnd)
    instruction = from_records(message.content)
    if stage == "fit":
        reply = alg.fit(instruction, client)
        _save_store(context, f"fit{rnd}", client.store, ctl["run_key"])
        return FlowerMessage(to_records(reply), reply_to=message)
    if stage == "evaluate":
        from fedpeft.metrics import EXAMPLES

        metrics = alg.evaluate(instruction, client)
        metrics.pop(EXAMPLES, None)  # per-example outcomes describe the client's test data: they stay here
        _save_store(context, f"round{rnd}", client.store, ctl["run_key"], state_dir=state_dir, pid=pid, rnd=rnd)
        return FlowerMessage(RecordDict({METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})}),
                             reply_to=message)
    raise ValueError(f"unknown fedpeft stage {stage!r}")


def partition_id(node_config) -> int:
    if "partition-id" not in node_config:
        from fedpeft.errors import FedPeftError

        raise FedPeftError("this SuperNode has no partition-id: start it with --node-config 'partition-id=K' "
                           "(K = the client's index in --tasks)")
    return int(node_config["partition-id"])


# ------------------------------------------------------------ the store across messages
def _state_dir(node_config, default: str | None, key: str) -> Path | None:
    """The node's own folder for this run's stores: `state-dir` from the node config (it wins), else the
    ClientApp's default; the sub-folder is named by a hash of the run key, never by the key itself."""
    root = node_config.get("state-dir") or default
    if not root:
        return None
    return Path(str(root)) / ("run-" + hashlib.sha256(key.encode()).hexdigest()[:16])


def _tags(context, key: str) -> dict[str, bytes]:
    rec = context.state.config_records.get(STATE_RECORD)
    if rec is None or rec.get("run_key") != key:
        return {}
    return {k: v for k, v in rec.items() if k != "run_key"}


def _load_store(context, stage: str, rnd: int, pid: int, state_dir: Path | None, key: str) -> dict[str, Any]:
    tags = _tags(context, key)
    if stage == "evaluate" and f"fit{rnd}" in tags:
        return store_from_bytes(tags[f"fit{rnd}"])
    done = [int(t[5:]) for t in tags if t.startswith("round") and int(t[5:]) < rnd]
    on_disk = []
    if state_dir is not None and state_dir.is_dir():
        on_disk = [int(p.stem.rsplit("round", 1)[1]) for p in state_dir.glob(f"client-{pid}-round*.pt")
                   if int(p.stem.rsplit("round", 1)[1]) < rnd]
    best_mem, best_disk = max(done, default=0), max(on_disk, default=0)
    if best_mem and best_mem >= best_disk:
        return store_from_bytes(tags[f"round{best_mem}"])
    if best_disk:
        log.info("client %d: store of round %d read from %s", pid, best_disk, state_dir)
        return store_from_bytes((state_dir / f"client-{pid}-round{best_disk}.pt").read_bytes())
    return {}


def _save_store(context, tag: str, store: dict[str, Any], key: str, *, state_dir: Path | None = None,
                pid: int | None = None, rnd: int | None = None) -> None:
    from flwr.app import ConfigRecord

    blob = store_to_bytes(store)
    tags = _tags(context, key)
    tags[tag] = blob
    if tag.startswith("round"):  # keep the last two round-end stores, drop fits they supersede
        rounds = sorted(int(t[5:]) for t in tags if t.startswith("round"))
        keep = {f"round{r}" for r in rounds[-2:]}
        tags = {t: b for t, b in tags.items() if t in keep or (t.startswith("fit") and int(t[3:]) > rnd)}
    context.state.config_records[STATE_RECORD] = ConfigRecord({"run_key": key, **tags})
    if state_dir is not None and tag.startswith("round"):
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / f"client-{pid}-round{rnd}.pt.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, state_dir / f"client-{pid}-round{rnd}.pt")
        for old in state_dir.glob(f"client-{pid}-round*.pt"):
            if int(old.stem.rsplit("round", 1)[1]) < rnd - 1:
                old.unlink(missing_ok=True)
