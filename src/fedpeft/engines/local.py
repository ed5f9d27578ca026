"""The in-process engine: the whole federation in one process, ONE backbone in memory.

Each round: the broadcast computed after the previous aggregation goes to every client, each client
fits (its adapter and head state swapped into the shared model), the server aggregates, the new
broadcast is computed once, and every client is evaluated on the message the algorithm's
`configure_evaluate` makes: by default exactly the state it will train with next, so the score
describes the model the client holds and every engine gives the same numbers
(docs/methods/fedlease.md#evaluation-timing). Bytes are counted per client per round; a checkpoint is
written after each round.

Byte convention (docs/methods/fedlease.md#communication): a round's `bytes_down` is the broadcast
made after that round's aggregation; the very first broadcast is recorded as round 0.

A client whose fit raises, or whose reply the algorithm rejects (`rejected_reply` events: NaN/Inf,
wrong tensors, bad num_examples), gets back the store it had before that round: its head, personal
LoRA, routers and optimiser state are as if it had not trained (`_roll_back`), its record says
`participated: false` (and `rejected: true`), and it is evaluated with that restored state. A round
in which no client replied, or every update was rejected, stops the run (`RunFailed`) with the
previous round's checkpoint intact.
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from fedpeft.algorithms.base import Algorithm, Client, Message
from fedpeft.errors import RunFailed
from fedpeft.records.artifacts import write_artifacts
from fedpeft.records.checkpoint import load_checkpoint, save_checkpoint
from fedpeft.records.history import RunHistory

REJECTED = "rejected_reply"  # the event kind algorithms/replies.py records for a rejected reply

log = logging.getLogger("fedpeft")


class LocalEngine:
    def __init__(self, algorithm: Algorithm, clients: list[Client], history: RunHistory, run_dir: Path,
                 *, progress=None, fail: dict[tuple[int, int], Exception] | None = None):
        self.alg = algorithm
        self.clients = clients
        self.history = history
        self.run_dir = run_dir
        self.progress = progress
        self._fail = fail or {}  # (round, client) → exception to raise: failure injection for tests
        self._before: dict[int, dict[str, Any]] = {}  # client → its store before this round's fit
        self.rejected: set[int] = set()  # clients whose reply of the current round was rejected

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        alg, rounds = self.alg, self.alg.num_rounds
        if resume:
            ckpt = load_checkpoint(self.run_dir)
            state, start = ckpt["server_state"], ckpt["round"] + 1
            for c in self.clients:
                c.store = ckpt["client_stores"].get(c.cid, {})
            # The history is written before the checkpoint: what a killed process recorded of the
            # rounds after the checkpoint is redone now, so it must not count twice.
            self.history.truncate(ckpt["round"])
            log.info("resuming after round %d of %d", ckpt["round"], rounds)
        else:
            state, start = alg.init(), 1
        broadcast = alg.configure(state, start)
        self._take_events()
        if start == 1:
            self.history.add_round(0, "init", [{"round": 0, "phase": "init", "client": c.cid, "task": c.info.task,
                                                "bytes_up": 0, "bytes_down": broadcast[c.cid].nbytes}
                                               for c in self.clients], {"seconds": 0.0})
        for rnd in range(start, rounds + 1):
            t0 = time.perf_counter()
            phase = alg.phase(rnd)
            replies, fit_info = self._fit_all(rnd, phase, broadcast)
            missing = [c.cid for c in self.clients if c.cid not in replies]
            if missing:
                log.warning("round %d: no reply from clients %s; aggregating the %d replies that arrived",
                            rnd, missing, len(replies))
                self.history.add_event(kind="missing_clients", round=rnd, clients=missing)
            if not replies:  # nothing to aggregate: the run cannot go on
                first = self._first_error
                raise RunFailed(f"round {rnd}: no client replied ({type(first).__name__}: {first}); the run stopped "
                                f"with the checkpoint of round {rnd - 1}: fix the cause, then continue with --resume "
                                f"{self.run_dir}") from first
            t_agg = time.perf_counter()
            state = alg.aggregate(state, rnd, replies)
            agg_seconds = time.perf_counter() - t_agg
            events = self._take_events()
            self.rejected = {e["client"] for e in events if e.get("kind") == REJECTED and e.get("round") == rnd}
            self._roll_back(rnd, sorted(self.rejected & set(replies)))
            updates = [cid for cid, r in replies.items() if r.config.get("participated", True)]
            if self.rejected and all(cid in self.rejected for cid in updates):
                reasons = "; ".join(f"client {e['client']}: {e.get('reason')}" for e in events
                                    if e.get("kind") == REJECTED and e.get("round") == rnd)
                raise RunFailed(f"round {rnd}: every client's update was rejected ({reasons}); the run stopped with "
                                f"the checkpoint of round {rnd - 1} (the rejected_reply events are in "
                                f"training_history.json): fix the cause, then continue with --resume {self.run_dir}")
            broadcast = alg.configure(state, rnd + 1)
            self._take_events()
            evaluation = alg.configure_evaluate(state, rnd, broadcast)
            records = self._evaluate_all(rnd, phase, broadcast, evaluation, replies, fit_info)
            for rec in records:
                if rec["client"] in self.rejected:  # its update was not used: it did not take part
                    rec.update(participated=False, rejected=True)
                    rec.pop("train_loss", None)
            entry = self.history.add_round(rnd, phase, records, {
                "seconds": time.perf_counter() - t0, "aggregate_seconds": agg_seconds,
                "missing": missing, "rejected": sorted(self.rejected), **alg.round_info(state, rnd)})
            # The method's files first, then the history, then the checkpoint: a run killed between
            # two of these writes redoes round rnd on resume and rewrites all three (the history's
            # records of rounds after the checkpoint are dropped then: RunHistory.truncate).
            write_artifacts(self.run_dir, alg.artifacts(state, rnd, records))
            self.history.save()
            save_checkpoint(self.run_dir, rnd, state, {c.cid: c.store for c in self.clients},
                            settings=alg.cfg.shaping_settings())
            self._before = {}
            self._report(rnd, rounds, phase, entry)
            if stop_after is not None and rnd >= stop_after:
                log.info("stopping after round %d as asked", rnd)
                break
        return state

    # ------------------------------------------------------------ steps
    def _take_events(self) -> list[dict[str, Any]]:
        """The events the algorithm recorded in its last hook (clustering, rejected replies, ...)."""
        events = self.alg.take_events()
        for event in events:
            self.history.add_event(**event)
        return events

    def _roll_back(self, rnd: int, cids: list[int]) -> None:
        """Give these clients the store they had before this round's fit (their rejected update
        never happened). On the in-process engine the engine holds that copy; an engine whose
        clients live elsewhere extends this to tell them (engines/flower)."""
        for c in self.clients:
            if c.cid in cids and c.cid in self._before:
                c.store = self._before[c.cid]
                log.warning("round %d: client %d's state is rolled back to before the round (its update was rejected)",
                            rnd, c.cid)

    def _fit_all(self, rnd: int, phase: str, broadcast: dict[int, Message]):
        replies, info = {}, {}
        self._first_error = None
        self._before = {}
        for i, c in enumerate(self.clients):
            if self.progress:
                self.progress.update(f"round {rnd}/{self.alg.num_rounds} ({phase}): client {i + 1}/{len(self.clients)} training")
            t0 = time.perf_counter()
            self._before[c.cid] = copy.deepcopy(c.store)
            try:
                if (rnd, c.cid) in self._fail:
                    raise self._fail[(rnd, c.cid)]
                reply = self.alg.fit(broadcast[c.cid], c)
            except Exception as exc:  # a failing client must not take the round down, nor keep half a fit
                c.store = self._before[c.cid]
                log.warning("round %d: client %d failed during fit: %s", rnd, c.cid, exc)
                log.debug("%s", traceback.format_exc())
                self._first_error = self._first_error or exc
                continue
            replies[c.cid] = reply
            info[c.cid] = time.perf_counter() - t0
        return replies, info

    def _evaluate_all(self, rnd, phase, broadcast, evaluation, replies, fit_info):
        records = []
        for i, c in enumerate(self.clients):
            if self.progress:
                self.progress.update(f"round {rnd}/{self.alg.num_rounds} ({phase}): client {i + 1}/{len(self.clients)} evaluating")
            metrics = self.alg.evaluate(evaluation[c.cid], c)
            rec = {"round": rnd, "phase": phase, "client": c.cid, "task": c.info.task, **metrics}
            records.append(client_record(rec, replies.get(c.cid), broadcast[c.cid], fit_info.get(c.cid),
                                         evaluation[c.cid]))
        return records

    def _report(self, rnd, rounds, phase, entry):
        tasks = ", ".join(f"{t} {v:.4f}" for t, v in entry["per_task"].items() if v is not None)
        overall = f"{entry['overall']:.4f}" if entry["overall"] is not None else "-"
        log.info("round %d/%d (%s): overall %s | %s | %.1f s, %.2f MB up, %.2f MB down", rnd, rounds, phase,
                 overall, tasks, entry["seconds"], entry["bytes_up"] / 1e6, entry["bytes_down"] / 1e6)
        if self.progress:
            self.progress.advance_round()


def client_record(rec: dict[str, Any], reply: Message | None, instruction: Message, fit_seconds: float | None,
                  evaluation: Message | None = None) -> dict[str, Any]:
    """Add a client's round bookkeeping to its evaluation record: bytes both ways, whether it
    replied, and what its fit reported. Every engine writes records through this. An evaluate
    message other than the broadcast (`Algorithm.configure_evaluate`) is counted apart, as
    `bytes_eval_down`: `bytes_down` stays the training broadcast alone."""
    rec.update({"bytes_up": reply.nbytes if reply else 0, "bytes_down": instruction.nbytes,
                "participated": reply is not None})
    if evaluation is not None and evaluation is not instruction:
        rec["bytes_eval_down"] = evaluation.nbytes
    if reply is not None:
        rec["train_loss"] = reply.config.get("train_loss")
        rec["fit_seconds"] = fit_seconds
        for k in ("compute_seconds", "real_tokens", "padded_tokens"):
            if k in reply.config:
                rec[k] = reply.config[k]
    return rec
