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
from fedpeft.engines.client_stores import make_stores
from fedpeft.engines.participation import participants, scored
from fedpeft.errors import RunFailed
from fedpeft.metrics import EXAMPLES
from fedpeft.records.artifacts import write_artifacts
from fedpeft.records.checkpoint import load_checkpoint, save_checkpoint
from fedpeft.records.history import RunHistory
from fedpeft.records.predictions import write_predictions

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
        self.stores = make_stores(algorithm.cfg.client_store, clients, run_dir)
        self._before: dict[int, dict[str, Any]] = {}  # client → its store before this round's fit
        self.rejected: set[int] = set()  # clients whose reply of the current round was rejected
        self._examples: dict[int, dict[str, Any]] = {}  # the round's per-example outcomes (engines that score remotely: none)

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        alg, rounds = self.alg, self.alg.num_rounds
        if resume:
            ckpt = load_checkpoint(self.run_dir)
            state, start = ckpt["server_state"], ckpt["round"] + 1
            self.stores.restore(ckpt["client_stores"], ckpt["round"])
            # The history is written before the checkpoint: what a killed process recorded of the
            # rounds after the checkpoint is redone now, so it must not count twice.
            self.history.truncate(ckpt["round"])
            log.info("resuming after round %d of %d", ckpt["round"], rounds)
        else:
            state, start = alg.init(), 1
        n = len(self.clients)
        sample = participants(alg.cfg, n, start)
        broadcast = alg.configure(state, start, sample)
        self._take_events()
        if start == 1:
            self.history.add_round(0, "init", [{"round": 0, "phase": "init", "client": cid,
                                                "task": self.clients[cid].info.task, "bytes_up": 0,
                                                "bytes_down": broadcast[cid].nbytes} for cid in sample],
                                   {"seconds": 0.0})
        for rnd in range(start, rounds + 1):
            t0 = time.perf_counter()
            phase = alg.phase(rnd)
            replies, fit_info = self._fit_all(rnd, phase, broadcast)
            missing = [cid for cid in sample if cid not in replies]
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
            # the next round's sample; after the last round every client, for what it is scored with
            next_sample = participants(alg.cfg, n, rnd + 1) if rnd < rounds else list(range(n))
            next_broadcast = alg.configure(state, rnd + 1, next_sample)
            configure_seconds = time.perf_counter() - t_agg - agg_seconds
            self._take_events()
            t_eval = time.perf_counter()
            evaluation = alg.configure_evaluate(state, rnd, scored(alg.cfg, n, rnd, rounds, sample), next_broadcast)
            records = self._evaluate_all(rnd, phase, sample, next_broadcast, evaluation, replies, fit_info)
            eval_seconds = time.perf_counter() - t_eval
            for rec in records:
                if rec["client"] in self.rejected:  # its update was not used: it did not take part
                    rec.update(participated=False, rejected=True)
                    rec.pop("train_loss", None)
            # the clients' own work (fit and evaluate, timed around each call); the rest of the
            # round is the server's: sampling, configure, aggregation (with clustering), bookkeeping
            client_seconds = sum(fit_info.values()) + self._eval_seconds
            info = {"seconds": time.perf_counter() - t0, "aggregate_seconds": agg_seconds,
                    "configure_seconds": configure_seconds, "evaluate_seconds": eval_seconds,
                    "client_seconds": client_seconds, "missing": missing, "rejected": sorted(self.rejected),
                    **alg.round_info(state, rnd)}
            if len(sample) < n:
                info["participants"] = sample
            entry = self.history.add_round(rnd, phase, records, info)
            # The method's files first, then the history, then the checkpoint: a run killed between
            # two of these writes redoes round rnd on resume and rewrites all three (the history's
            # records of rounds after the checkpoint are dropped then: RunHistory.truncate).
            write_artifacts(self.run_dir, alg.artifacts(state, rnd, records))
            write_predictions(self.run_dir, rnd, self._examples)
            self.history.save()
            save_checkpoint(self.run_dir, rnd, state, self.stores.for_checkpoint(),
                            settings=alg.cfg.shaping_settings())
            self._before = {}
            self._report(rnd, rounds, phase, entry)
            if stop_after is not None and rnd >= stop_after:
                log.info("stopping after round %d as asked", rnd)
                break
            broadcast, sample = next_broadcast, next_sample
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
        for cid in cids:
            if cid in self._before:
                c = self.clients[cid]
                c.store = self._before[cid]
                self.stores.save(c, rnd)
                log.warning("round %d: client %d's state is rolled back to before the round (its update was rejected)",
                            rnd, c.cid)

    def _fit_all(self, rnd: int, phase: str, broadcast: dict[int, Message]):
        """Every client of the round's sample (the broadcast's keys) trains."""
        replies, info = {}, {}
        self._first_error = None
        self._before = {}
        for i, cid in enumerate(sorted(broadcast)):
            c = self.clients[cid]
            if self.progress:
                self.progress.update(f"round {rnd}/{self.alg.num_rounds} ({phase}): client {i + 1}/{len(broadcast)} training")
            t0 = time.perf_counter()
            self.stores.load(c)
            self._before[c.cid] = copy.deepcopy(c.store)
            try:
                if (rnd, c.cid) in self._fail:
                    raise self._fail[(rnd, c.cid)]
                reply = self.alg.fit(broadcast[c.cid], c)
                self.stores.save(c, rnd)
            except Exception as exc:  # a failing client must not take the round down, nor keep half a fit
                c.store = self._before.get(c.cid, {})
                self.stores.save(c, rnd)
                log.warning("round %d: client %d failed during fit: %s", rnd, c.cid, exc)
                log.debug("%s", traceback.format_exc())
                self._first_error = self._first_error or exc
                continue
            replies[c.cid] = reply
            info[c.cid] = time.perf_counter() - t0
        return replies, info

    def _evaluate_all(self, rnd, phase, sample, broadcast, evaluation, replies, fit_info):
        """Score the clients in `evaluation`; one record per client that trained, is scored, or is
        sent the next broadcast (the others have nothing to record this round)."""
        records = []
        self._eval_seconds = 0.0
        self._examples = {}  # client -> its per-example outcome this round (predictions.npz), not a record field
        for i, cid in enumerate(sorted(evaluation)):
            t0 = time.perf_counter()
            if self.progress:
                self.progress.update(f"round {rnd}/{self.alg.num_rounds} ({phase}): client {i + 1}/{len(evaluation)} evaluating")
            c = self.clients[cid]
            self.stores.load(c)
            metrics = self.alg.evaluate(evaluation[cid], c)
            examples = metrics.pop(EXAMPLES, None)
            if examples is not None:
                self._examples[cid] = examples
            self.stores.save(c, rnd)
            self._eval_seconds += time.perf_counter() - t0
            records.append({"round": rnd, "phase": phase, "client": cid, "task": self.clients[cid].info.task, **metrics})
        return self._bookkeeping(rnd, phase, records, sample, broadcast, evaluation, replies, fit_info)

    def _bookkeeping(self, rnd, phase, records, sample, broadcast, evaluation, replies, fit_info):
        """Bytes and participation of every client the round touched, merged into its record."""
        by_client = {r["client"]: r for r in records}
        out = []
        for cid in sorted(set(sample) | set(evaluation) | set(broadcast)):
            rec = by_client.get(cid) or {"round": rnd, "phase": phase, "client": cid, "task": self.clients[cid].info.task}
            rec["sampled"] = cid in sample
            out.append(client_record(rec, replies.get(cid), broadcast.get(cid), fit_info.get(cid), evaluation.get(cid)))
        return out

    def _report(self, rnd, rounds, phase, entry):
        tasks = ", ".join(f"{t} {v:.4f}" for t, v in entry["per_task"].items() if v is not None)
        overall = f"{entry['overall']:.4f}" if entry["overall"] is not None else "-"
        log.info("round %d/%d (%s): overall %s | %s | %.1f s, %.2f MB up, %.2f MB down", rnd, rounds, phase,
                 overall, tasks, entry["seconds"], entry["bytes_up"] / 1e6, entry["bytes_down"] / 1e6)
        if self.progress:
            self.progress.advance_round()


def client_record(rec: dict[str, Any], reply: Message | None, instruction: Message | None,
                  fit_seconds: float | None, evaluation: Message | None = None) -> dict[str, Any]:
    """Add a client's round bookkeeping to its evaluation record: bytes both ways, whether it
    replied, and what its fit reported. Every engine writes records through this. An evaluate
    message other than the broadcast (`Algorithm.configure_evaluate`) is counted apart, as
    `bytes_eval_down`: `bytes_down` stays the training broadcast alone."""
    rec.update({"bytes_up": reply.nbytes if reply else 0, "bytes_down": instruction.nbytes if instruction else 0,
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
