"""The ServerApp side: the local engine's round loop, with fit and evaluate sent through a Flower Grid.

`FlowerEngine` subclasses `LocalEngine`, so the round loop, the byte convention, missing-client
events, checkpoints and history records are the same code; only `_fit_all` / `_evaluate_all` differ:
they send one Flower message per client and take the replies that arrive within `round_timeout`.
A reply with an error, or none at all (node killed, disconnected, timed out), makes the client
missing for that step. Every reply's records are written to `wire.jsonl` (the payload audit).

`discover` finds the nodes and asks each for its ClientInfo (a "query" message; the client id is the
node's `partition-id`); the run layer (run/flower.py) binds the algorithm and runs this engine.

No reply is trusted: every query, fit and evaluate reply passes `schema.py` before any value in it is
used, against what the server itself expects (its federation definition, its model's dtypes and
heads, byte bounds per reply and per round). A reply that fails is logged, recorded as a
`rejected_reply` event and treated as a missing client; it never raises out of the round.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from fedpeft.algorithms.base import Algorithm, Client, ClientInfo
from fedpeft.engines.flower.client import run_key
from fedpeft.engines.flower import schema
from fedpeft.engines.flower.records import CONTROL, to_records, wire_summary
from fedpeft.engines.local import LocalEngine
from fedpeft.errors import FedPeftError

MIB = 1 << 20
BOUNDS_FILE = "flower_bounds.json"  # the largest message the server sent in this run (the byte bounds' base)

log = logging.getLogger("fedpeft")


class FlowerEngine(LocalEngine):
    def __init__(self, algorithm: Algorithm, grid, node_of: dict[int, int], control: dict[str, Any], history,
                 run_dir: Path, *, timeout: float, progress=None, max_reply_bytes: int = 0, max_round_bytes: int = 0):
        from fedpeft.engines.flower import polling

        polling.serverapp()
        clients = [Client(info, None, None, False) for info in algorithm.federation]  # the server holds no data
        super().__init__(algorithm, clients, history, run_dir, progress=progress)
        self.grid, self.node_of, self.control, self.timeout = grid, node_of, control, timeout
        self._gone: set[int] = set()  # clients that did not answer in this round: not asked to evaluate
        self._strangers: set[int] = set()  # nodes that are not (or not valid) clients of this run
        self._max_reply, self._max_round = max_reply_bytes, max_round_bytes  # 0: derived from the messages sent
        self._dtypes, self._max_numel = schema.model_dtypes_and_numel(algorithm.runtime.model)
        heads = algorithm.heads.inits() if algorithm.heads is not None else {}
        self._heads = {n: schema.head_schema(init) for n, init in heads.items()}
        self._sent = self._load_sent()

    # ------------------------------------------------------------ byte bounds
    def _load_sent(self) -> int:
        try:
            return int(json.loads((self.run_dir / BOUNDS_FILE).read_text())["largest_message_bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _note_sent(self, messages) -> None:
        """Remember the largest message sent (kept in the run folder, so a resumed run has it too)."""
        largest = max((m.nbytes for m in messages), default=0)
        if largest > self._sent:
            from fedpeft.atomic import atomic_write

            self._sent = largest
            atomic_write(self.run_dir / BOUNDS_FILE, json.dumps({"largest_message_bytes": largest}))

    def reply_bound(self) -> int:
        """Bytes one reply may hold: the setting, else twice the largest message the server has sent in
        this run (an honest upload is never larger than what the server sends: every method's first
        instruction carries the common initialisation of everything a client trains), plus 1 MiB."""
        return self._max_reply or 2 * self._sent + MIB

    def round_bound(self, n: int) -> int:
        """Bytes all the replies of one round may hold: the setting, else n honest replies with room
        (n × (largest message + 1 MiB)) plus one reply bound."""
        return self._max_round or n * (self._sent + MIB) + self.reply_bound()

    def _reject(self, rnd: int, cid: int, stage: str, reason: str) -> None:
        log.warning("round %d: rejected the %s reply of client %d: %s", rnd, stage, cid, reason)
        self.history.add_event(kind="rejected_reply", round=rnd, client=cid, stage=stage, reason=reason)

    # ------------------------------------------------------------ messages
    def _send(self, stage: str, rnd: int, payloads: dict[int, Any]) -> tuple[dict[int, Any], dict[int, float]]:
        """Send one message per client, wait for the replies; {client: content}, {client: seconds}.
        Clients that did not answer at all (not connected, timed out) are remembered in `_gone`. A
        reply counts only from the node the message went to, answering that message."""
        from flwr.app import Message as FlowerMessage

        online = self._online(rnd)
        msgs, cid_of = [], {}
        for cid, content in payloads.items():
            node = self.node_of[cid]
            if node not in online:
                log.warning("round %d: client %d (node %d) is not connected", rnd, cid, node)
                self._gone.add(cid)
                continue
            msgs.append(FlowerMessage(content, dst_node_id=node, message_type="train" if stage == "fit" else "evaluate",
                                      group_id=str(rnd)))
            cid_of[node] = cid
        t0 = time.time()
        out, seconds, answered = {}, {}, set()
        replies = exchange(self.grid, msgs, self.timeout)
        elapsed = time.time() - t0
        # An error the SuperLink makes for a message (its node stopped sending heartbeats, the reply
        # expired) comes from the SuperLink, not the node: find its client by the message it answers.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
        for reply in replies:
            try:
                node, answers = reply.metadata.src_node_id, reply.metadata.reply_to_message_id
                has_error = reply.has_error()
            except Exception:  # noqa: BLE001 - a reply without the metadata Flower gives it
                continue
            if node in cid_of:
                if answers and sent_to and sent_to.get(answers) != node:
                    continue  # answers a message that was not sent to this node
                cid = cid_of[node]
            elif has_error and answers in sent_to:
                cid = cid_of[sent_to[answers]]
            else:
                continue
            if cid in answered:
                continue  # one reply per client and step: the first
            answered.add(cid)
            if has_error:
                reason = str(reply.error.reason or "").strip().splitlines()
                log.warning("round %d: client %d failed during %s: %s", rnd, cid, stage,
                            reason[-1][:500] if reason else f"Flower error {reply.error.code}")
                if node not in cid_of:  # no word from the node itself: gone, not asked again this round
                    self._gone.add(cid)
                continue
            out[cid] = reply.content
            took = getattr(reply.metadata, "created_at", None)
            took = took - t0 if isinstance(took, (int, float)) and not isinstance(took, bool) else None
            # the node sets created_at: a value outside the wait is not believed
            seconds[cid] = took if took is not None and 0.0 <= took <= elapsed + 1.0 else elapsed
        late = sorted(set(cid_of.values()) - answered)
        if late:
            log.warning("round %d: no %s reply from clients %s within %.0f s", rnd, stage, late, self.timeout)
            self._gone |= set(late)
        return out, seconds

    def _online(self, rnd: int) -> set[int]:
        """Connected nodes; a client whose node is gone but that came back as a new node (a restarted
        SuperNode without authentication gets a new node id) is found again by its partition-id."""
        online = set(self.grid.get_node_ids())
        lost = {cid for cid, node in self.node_of.items() if node not in online}
        new = online - set(self.node_of.values()) - self._strangers
        if lost and new:
            found, infos, _ = query_nodes(self.grid, sorted(new), self.control, self.timeout, self.alg.cfg)
            for cid, node in found.items():
                if cid in lost and infos[cid] == self.alg.federation[cid]:
                    log.info("round %d: client %d is back as node %d", rnd, cid, node)
                    self.node_of[cid] = node
            self._strangers |= new - set(self.node_of.values())
        return online

    def _control(self, stage: str, rnd: int) -> dict[str, Any]:
        return {**self.control, "stage": stage, "round": rnd}

    def _schema(self, cid: int) -> schema.ReplySchema:
        info = self.alg.federation[cid]
        return schema.ReplySchema(client=info, dtypes=self._dtypes, heads=self._heads.get(info.num_labels, {}),
                                  max_numel=self._max_numel, max_reply_bytes=self.reply_bound())

    def _fit_all(self, rnd, phase, broadcast):
        if self.progress:
            self.progress.update(f"round {rnd}/{self.alg.num_rounds} ({phase}): {len(broadcast)} clients training")
        self._gone = set()
        self._note_sent(broadcast.values())
        payloads = {cid: to_records(msg, self._control("fit", rnd)) for cid, msg in sorted(broadcast.items())}
        contents, seconds = self._send("fit", rnd, payloads)
        replies, info = {}, {}
        budget = self.round_bound(len(broadcast))
        # Smallest replies first: an honest reply is never pushed out of the round's bound by larger ones.
        sizes = {cid: _size(content) for cid, content in contents.items()}
        for cid in sorted(contents, key=lambda c: (sizes[c], c)):
            try:
                if sizes[cid] > budget:
                    raise schema.Rejected(f"the round's replies would exceed the bound of "
                                          f"{self.round_bound(len(broadcast))} bytes per round")
                reply = schema.check_fit(contents[cid], self._schema(cid))
            except schema.Rejected as exc:
                self._reject(rnd, cid, "fit", str(exc))
                continue
            budget -= sizes[cid]
            self._audit(rnd, cid, "fit", contents[cid])
            replies[cid] = reply
            info[cid] = seconds[cid]
        rejected = len(contents) - len(replies)
        self._first_error = FedPeftError(
            f"round {rnd}: no usable reply ({len(broadcast) - len(contents)} clients did not reply, "
            f"{rejected} replies were rejected; see the warnings above)")
        return dict(sorted(replies.items())), info

    def _evaluate_all(self, rnd, phase, sample, broadcast, evaluation, replies, fit_info):
        if self.progress:
            self.progress.update(f"round {rnd}/{self.alg.num_rounds} ({phase}): {len(evaluation)} clients evaluating")
        asked = [cid for cid in sorted(evaluation) if cid not in self._gone]  # a client that crashed in fit still scores
        self._note_sent(evaluation[cid] for cid in asked)
        # A fit reply rejected here or by the method (an unexpected tensor name, a wrong shape for this
        # round) was not used: the client's record says it did not take part, and its evaluate message
        # tells it to roll back to its store from before that fit, as the in-process engine does.
        refused = {e.get("client") for e in self.history.events
                   if e.get("kind") == "rejected_reply" and e.get("round") == rnd and e.get("stage") != "evaluate"}
        contents, _ = self._send("evaluate", rnd, {
            cid: to_records(evaluation[cid], {**self._control("evaluate", rnd), **({"rollback": True} if cid in refused else {})})
            for cid in asked})
        replies = {cid: r for cid, r in replies.items() if cid not in refused}
        records = []
        self._eval_seconds = 0.0  # the nodes' work is not timed here: client_seconds is the fits' round trips
        for cid in sorted(evaluation):
            rec = {"round": rnd, "phase": phase, "client": cid, "task": self.clients[cid].info.task}
            if cid in contents:
                try:
                    if _size(contents[cid]) > schema.MAX_METRICS * 1024:
                        raise schema.Rejected("the evaluate reply is larger than any set of metrics")
                    metrics = schema.check_metrics(contents[cid])
                except schema.Rejected as exc:
                    self._reject(rnd, cid, "evaluate", str(exc))
                else:
                    self._audit(rnd, cid, "evaluate", contents[cid])
                    rec.update(metrics)
            records.append(rec)
        return self._bookkeeping(rnd, phase, records, sample, broadcast, evaluation, replies, fit_info)

    def _audit(self, rnd: int, cid: int, stage: str, content) -> None:
        line = {"round": rnd, "client": cid, "stage": stage, "records": wire_summary(content)}
        with open(self.run_dir / "wire.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")


def exchange(grid, messages: list, timeout: float, *, first_poll: float = 0.05, max_poll: float = 0.2) -> list:
    """Push `messages` and pull their replies until all arrived or `timeout` passed: Flower's
    `Grid.send_and_receive`, which waits 3 s between pulls (up to 3 s of idle latency per message on
    a deployment), with pulls every 50 ms at first, backing off to `max_poll` (0.2 s: one process
    asking, and a 1-s step left the last reply waiting up to a second, twice per round). A grid
    without push/pull (a test double) is asked with send_and_receive."""
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    from fedpeft.engines.flower.polling import Backoff

    pending = set(grid.push_messages(messages))
    end = time.time() + timeout
    out: list = []
    waits = Backoff(first_poll, max_poll)
    while pending:
        got = list(grid.pull_messages(pending))
        out.extend(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.time() >= end:
            break
        time.sleep(min(waits.next(), max(0.0, end - time.time())))
    return out


def _size(content) -> int:
    try:
        return schema.record_bytes(content)
    except Exception:  # noqa: BLE001 - not even records: the schema check rejects it
        return 0


def expected_client(cfg) -> Any:
    """`cid → (task, num_labels, most training examples)` from the server's own settings: the run's
    `tasks` and sizes, never what a node says. Under a Dirichlet cut a client may hold up to all the
    examples drawn for its task."""
    from fedpeft.data.tasks import get_task

    train, _ = cfg.samples_for_tasks()
    per_task = {t: cfg.tasks.count(t) for t in cfg.tasks}

    def info(cid: int):
        task = cfg.tasks[cid]
        most = train[task] * (per_task[task] if cfg.partition == "dirichlet" else 1)
        return task, get_task(task).num_labels, most

    return info


def query_nodes(grid, nodes: list[int], control: dict[str, Any], timeout: float, cfg
                ) -> tuple[dict[int, int], dict[int, ClientInfo], list[dict[str, Any]]]:
    """Ask `nodes` who they are: ({client_id: node_id}, {client_id: ClientInfo}, rejections). A node
    whose answer fails the check, or that claims a partition another node already holds, is left out."""
    from flwr.app import Message as FlowerMessage, RecordDict

    from fedpeft.engines.flower.records import encode_config

    node_of: dict[int, int] = {}
    infos: dict[int, ClientInfo] = {}
    rejected: list[dict[str, Any]] = []
    expect = expected_client(cfg)
    msgs = [FlowerMessage(RecordDict({CONTROL: encode_config({**control, "stage": "query"})}),
                          dst_node_id=x, message_type="query") for x in nodes]
    asked = set(nodes)
    for reply in exchange(grid, msgs, timeout):
        try:
            node = reply.metadata.src_node_id
            if node not in asked:
                continue
            asked.discard(node)  # one answer per node
            if reply.has_error():
                reason = str(reply.error.reason or "").strip().splitlines()
                log.warning("node %d could not join: %s", node, reason[-1][:500] if reason else reply.error.code)
                continue
            info = schema.check_query(reply.content, node, len(cfg.tasks), expect)
            if info.client_id in node_of:
                raise schema.Rejected(f"node {node} claims partition-id {info.client_id}, which node "
                                      f"{node_of[info.client_id]} holds (use SuperNode authentication)")
        except schema.Rejected as exc:
            log.warning("node %d was not let in: %s", node, exc)
            rejected.append({"node": node, "reason": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001 - whatever a node sent, it cannot stop the discovery
            log.warning("node %s was not let in: a malformed reply (%s)", getattr(reply.metadata, "src_node_id", "?"),
                        type(exc).__name__)
            continue
        node_of[info.client_id], infos[info.client_id] = node, info
    return node_of, infos, rejected


def discover(grid, cfg, control: dict[str, Any], timeout: float
             ) -> tuple[dict[int, int], list[ClientInfo], list[dict[str, Any]]]:
    """Wait for one node per client and ask each who it is: ({client_id: node_id}, ClientInfo list,
    the nodes that were not let in and why)."""
    n = len(cfg.tasks)
    deadline = time.time() + timeout
    node_of: dict[int, int] = {}
    infos: dict[int, ClientInfo] = {}
    asked: set[int] = set()
    rejected: list[dict[str, Any]] = []
    while len(infos) < n:
        nodes = [x for x in grid.get_node_ids() if x not in asked]
        if nodes:
            asked |= set(nodes)
            found, found_infos, bad = query_nodes(grid, nodes, control, max(1.0, deadline - time.time()), cfg)
            rejected += bad
            for cid, node in found.items():
                if cid in node_of:
                    log.warning("node %d was not let in: it claims partition-id %d, which node %d holds "
                                "(use SuperNode authentication)", node, cid, node_of[cid])
                    rejected.append({"node": node, "reason": f"claims partition-id {cid}, held by node {node_of[cid]}"})
                    continue
                node_of[cid], infos[cid] = node, found_infos[cid]
                log.info("client %d (%s, %d examples) is node %d", cid, infos[cid].task, infos[cid].num_examples, node)
        if len(infos) < n:
            if time.time() > deadline:
                missing = sorted(set(range(n)) - set(infos))
                raise FedPeftError(f"clients {missing} never joined within {timeout:.0f} s: start a SuperNode for each "
                                   "with --node-config 'partition-id=K', or raise --round-timeout")
            time.sleep(0.5)
    return node_of, [infos[i] for i in range(n)], rejected
