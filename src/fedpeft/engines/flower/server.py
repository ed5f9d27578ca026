"""The ServerApp side: the local engine's round loop, with fit and evaluate sent through a Flower Grid.

`FlowerEngine` subclasses `LocalEngine`, so the round loop, the byte convention, missing-client
events, checkpoints and history records are the same code; only `_fit_all` / `_evaluate_all` differ:
they send one Flower message per client and take the replies that arrive within `round_timeout`.
A reply with an error, or none at all (node killed, disconnected, timed out), makes the client
missing for that step. Every reply's records are written to `wire.jsonl` (the payload audit).

`discover` finds the nodes and asks each for its ClientInfo (a "query" message; the client id is the
node's `partition-id`); the run layer (run/flower.py) binds the algorithm and runs this engine.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from fedpeft.algorithms.base import Algorithm, Client, ClientInfo
from fedpeft.engines.flower.client import run_key
from fedpeft.engines.flower.records import CONTROL, METRICS, control_of, from_records, to_records, wire_summary
from fedpeft.engines.local import LocalEngine
from fedpeft.errors import FedPeftError

log = logging.getLogger("fedpeft")


class FlowerEngine(LocalEngine):
    def __init__(self, algorithm: Algorithm, grid, node_of: dict[int, int], control: dict[str, Any], history,
                 run_dir: Path, *, timeout: float, progress=None):
        clients = [Client(info, None, None, False) for info in algorithm.federation]  # the server holds no data
        super().__init__(algorithm, clients, history, run_dir, progress=progress)
        self.grid, self.node_of, self.control, self.timeout = grid, node_of, control, timeout
        self._gone: set[int] = set()  # clients that did not answer in this round: not asked to evaluate
        self._strangers: set[int] = set()  # nodes that are not (or not valid) clients of this run

    def _send(self, stage: str, rnd: int, payloads: dict[int, Any]) -> tuple[dict[int, Any], dict[int, float]]:
        """Send one message per client, wait for the replies; {client: content}, {client: seconds}.
        Clients that did not answer at all (not connected, timed out) are remembered in `_gone`."""
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
        replies = self.grid.send_and_receive(msgs, timeout=self.timeout)
        # An error the SuperLink makes for a message (its node stopped sending heartbeats, the reply
        # expired) comes from the SuperLink, not the node: find its client by the message it answers.
        cid_of_msg = {m.metadata.message_id: cid_of[m.metadata.dst_node_id] for m in msgs if m.metadata.message_id}
        for reply in replies:
            node = reply.metadata.src_node_id
            cid = cid_of.get(node, cid_of_msg.get(reply.metadata.reply_to_message_id))
            if cid is None:
                continue
            answered.add(cid)
            if reply.has_error():
                reason = (reply.error.reason or "").strip().splitlines()
                log.warning("round %d: client %d failed during %s: %s", rnd, cid, stage,
                            reason[-1] if reason else f"Flower error {reply.error.code}")
                if node not in cid_of:  # no word from the node itself: gone, not asked again this round
                    self._gone.add(cid)
                continue
            out[cid] = reply.content
            seconds[cid] = reply.metadata.created_at - t0
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
            found, infos = query_nodes(self.grid, sorted(new), self.control, self.timeout)
            for cid, node in found.items():
                if cid in lost and infos[cid] == self.alg.federation[cid]:
                    log.info("round %d: client %d is back as node %d", rnd, cid, node)
                    self.node_of[cid] = node
            self._strangers |= new - set(self.node_of.values())
        return online

    def _control(self, stage: str, rnd: int) -> dict[str, Any]:
        return {**self.control, "stage": stage, "round": rnd}

    def _fit_all(self, rnd, phase, broadcast):
        if self.progress:
            self.progress.update(f"round {rnd}/{self.alg.num_rounds} ({phase}): {len(broadcast)} clients training")
        self._gone = set()
        payloads = {cid: to_records(msg, self._control("fit", rnd)) for cid, msg in sorted(broadcast.items())}
        contents, seconds = self._send("fit", rnd, payloads)
        replies, info = {}, {}
        for cid in sorted(contents):
            self._audit(rnd, cid, "fit", contents[cid])
            replies[cid] = from_records(contents[cid])
            info[cid] = seconds[cid]
        self._first_error = FedPeftError(f"round {rnd}: no client replied (see the warnings above)")
        return replies, info

    def _evaluate_all(self, rnd, phase, sample, broadcast, evaluation, replies, fit_info):
        if self.progress:
            self.progress.update(f"round {rnd}/{self.alg.num_rounds} ({phase}): {len(evaluation)} clients evaluating")
        asked = [cid for cid in sorted(evaluation) if cid not in self._gone]  # a client that crashed in fit still scores
        contents, _ = self._send("evaluate", rnd, {cid: to_records(evaluation[cid], self._control("evaluate", rnd))
                                                   for cid in asked})
        records = []
        self._eval_seconds = 0.0  # the nodes' work is not timed here: client_seconds is the fits' round trips
        for cid in sorted(evaluation):
            rec = {"round": rnd, "phase": phase, "client": cid, "task": self.clients[cid].info.task}
            if cid in contents:
                self._audit(rnd, cid, "evaluate", contents[cid])
                rec.update(dict(contents[cid][METRICS]))
            records.append(rec)
        return self._bookkeeping(rnd, phase, records, sample, broadcast, evaluation, replies, fit_info)

    def _audit(self, rnd: int, cid: int, stage: str, content) -> None:
        line = {"round": rnd, "client": cid, "stage": stage, "records": wire_summary(content)}
        with open(self.run_dir / "wire.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")


def query_nodes(grid, nodes: list[int], control: dict[str, Any], timeout: float) -> tuple[dict[int, int], dict[int, ClientInfo]]:
    """Ask `nodes` who they are: ({client_id: node_id}, {client_id: ClientInfo})."""
    from flwr.app import Message as FlowerMessage, RecordDict

    from fedpeft.engines.flower.records import encode_config

    node_of: dict[int, int] = {}
    infos: dict[int, ClientInfo] = {}
    msgs = [FlowerMessage(RecordDict({CONTROL: encode_config({**control, "stage": "query"})}),
                          dst_node_id=x, message_type="query") for x in nodes]
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = (reply.error.reason or "").strip().splitlines()
            log.warning("node %d could not join: %s", node, reason[-1] if reason else reply.error.code)
            continue
        info = ClientInfo(**control_of(reply.content))
        if info.client_id in node_of:
            raise FedPeftError(f"two SuperNodes claim partition-id {info.client_id}: give each node its own "
                               "--node-config 'partition-id=K'")
        node_of[info.client_id], infos[info.client_id] = node, info
    return node_of, infos


def discover(grid, cfg, control: dict[str, Any], timeout: float) -> tuple[dict[int, int], list[ClientInfo]]:
    """Wait for one node per client and ask each who it is: ({client_id: node_id}, ClientInfo list)."""
    n = len(cfg.tasks)
    deadline = time.time() + timeout
    node_of: dict[int, int] = {}
    infos: dict[int, ClientInfo] = {}
    asked: set[int] = set()
    while len(infos) < n:
        nodes = [x for x in grid.get_node_ids() if x not in asked]
        if nodes:
            asked |= set(nodes)
            found, found_infos = query_nodes(grid, nodes, control, max(1.0, deadline - time.time()))
            for cid, node in found.items():
                if cid in node_of:
                    raise FedPeftError(f"two SuperNodes claim partition-id {cid}: give each node its own "
                                       "--node-config 'partition-id=K'")
                node_of[cid], infos[cid] = node, found_infos[cid]
                log.info("client %d (%s, %d examples) is node %d", cid, infos[cid].task, infos[cid].num_examples, node)
        if len(infos) < n:
            if time.time() > deadline:
                missing = sorted(set(range(n)) - set(infos))
                raise FedPeftError(f"clients {missing} never joined within {timeout:.0f} s: start a SuperNode for each "
                                   "with --node-config 'partition-id=K', or raise --round-timeout")
            time.sleep(0.5)
    return node_of, [infos[i] for i in range(n)]
