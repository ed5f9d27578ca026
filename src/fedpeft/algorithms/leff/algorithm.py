"""LEFF (Shen et al., NeurIPS 2025): layer-wise federated fine-tuning of full transformer blocks.

Each round (docs/methods/leff.md#round-overview): the server scores the global blocks on its importance
batch, draws for every participant a block 𝓛_i of L_i consecutive layers, distils the layers before and
after it into students, and sends Θ_i = (students, the global blocks 𝓛_i, 𝒜); the client trains
𝓛_i and 𝒜 with the students and embeddings frozen and uploads 𝓛_i (keyed by global layer index)
and 𝒜; the server averages each layer over the clients that trained it (Eq. 8) and 𝒜 over all.

The runtime holds ONE model: the global one. A client model is assembled from shared modules by
swapping the encoder's block list for [prefix student] + [global blocks 𝓛_i] + [suffix student]
for the duration of the local run; students live in scratch blocks the client loads from its
instruction. On an encoder 𝒜 is the classification head (structure.py says how DeBERTa's set maps
onto BERT's), trained and averaged over all participants: the head policy `shared` (or `frozen` with
--no-train-head-set), whatever --head-policy says. On a decoder (GPT-2, Llama; generation tasks such
as E2E) the model is a `CausalLM`, 𝒜 is the final norm (+ an untied lm_head), the embeddings (and a
tied LM head) are frozen, the loss is the LM loss on the target tokens, the importance batch is
proxy text (the texts right after the distillation subset) and the global model is scored by
generation with the task's NLG metrics. With L_i = L for every client there is one block, no student,
and a round is exactly a D_i-weighted FedAvg-full round: `FedAvgFull` is this class with L_i = L, so the
two share one code path (docs/methods/leff.md#reduction-to-fedavg-full).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpeft.algorithms.base import Algorithm, Client, Message, Runtime
from fedpeft.algorithms.heads import HEAD_PREFIX
from fedpeft.algorithms.leff.blocks import (ASET_PREFIX, EMB_PREFIX, block_key, layerwise_mean, load_params,
                                            module_params, parse_block_key, update_importance)
from fedpeft.algorithms.leff.distill import TeacherCache, caches_teacher, distill_segment, student_depth
from fedpeft.algorithms.leff.runtime import assembled, build_leff_runtime, scratch_blocks
from fedpeft.algorithms.leff.sampling import (block_probabilities, block_scores, block_starts, draw_block,
                                              layer_importance)
from fedpeft.algorithms.local_training import fit_report
from fedpeft.algorithms.replies import accept
from fedpeft.algorithms.tensors import is_synced, mark_synced, on_wire, prefixed, unprefixed, weighted_mean
from fedpeft.errors import FedPeftError
from fedpeft.hardware import autocast
from fedpeft.seeding import derive_seed

log = logging.getLogger("fedpeft")


class LEFF(Algorithm):
    name = "leff"

    def __init__(self, cfg):
        # The head is part of 𝒜, trained by every client and averaged over all participants: the
        # resolved head policy is `shared` (`frozen` with --no-train-head-set), RunConfig.resolved().
        super().__init__(cfg)
        self.budgets: list[int] = []
        # Caches, rebuilt on demand (server state lives in `state` only):
        self._students: dict[tuple[int, int, int], list[nn.Module]] = {}  # (round, a, b) → distilled student
        # --distill-reuse unchanged: (a, b) → the last student distilled for blocks a..b, the round, and
        # the teacher tensors of blocks 0..b it was distilled from (references into that round's state)
        self._reusable: dict[tuple[int, int], dict[str, Any]] = {}
        # --distill-teacher cached: this round's segments, and the teacher cache built for them on first need
        self._round_segments: set[tuple[int, int]] = set()
        self._teacher_cache: TeacherCache | None = None
        self._server_batch = None  # the encoded importance batch
        self._proxy = None  # the encoded proxy texts
        self._runtime_holds: Any = None  # which global state the runtime model holds now

    # ------------------------------------------------------------ model
    def build_runtime(self, backbone) -> Runtime:
        return build_leff_runtime(backbone, self.name, self.cfg.encoder_path)

    @property
    def is_causal(self) -> bool:
        return self.runtime.extra["causal"]

    @property
    def num_layers(self) -> int:
        return len(self.runtime.sites)

    def bind(self, runtime, federation):
        super().bind(runtime, federation)
        tasks = sorted({c.task for c in federation})
        if len(tasks) != 1:
            raise FedPeftError(f"{self.name} runs one task per federation (it trains and scores one global "
                               f"model); the clients have {', '.join(tasks)}: give the same task to every client")
        self.budgets = self.client_budgets()
        too_big = [b for b in self.budgets if b > self.num_layers]
        if too_big:
            raise FedPeftError(f"--layer-budgets {too_big[0]} exceeds the model's {self.num_layers} layers: "
                               f"give budgets between 1 and {self.num_layers}")

    def client_budgets(self) -> list[int]:
        """L_i per client: the list cycled over the clients, or uniform:a-b drawn once per client
        from the seed and fixed for the run."""
        spec = self.cfg.parse_layer_budgets()
        n = len(self.federation)
        if isinstance(spec, tuple):
            lo, hi = spec
            return [int(np.random.default_rng(derive_seed(self.cfg.seed, "leff-budget", c)).integers(lo, hi + 1))
                    for c in range(n)]
        return [spec[c % len(spec)] for c in range(n)]

    def blocks(self) -> list[nn.Module]:
        return self.runtime.sites

    # ------------------------------------------------------------ server
    def init(self) -> dict[str, Any]:
        return {"blocks": {l: module_params(b) for l, b in enumerate(self.blocks())},
                "aset": on_wire(self.aset()),
                "head_init": self.heads.inits(), "heads": {}}

    def aset(self) -> dict[str, nn.Parameter]:
        return self.runtime.extra["aset"]

    def set_aset(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.aset().items():
                p.copy_(values[n])

    def load_global(self, state) -> None:
        """Put Θ_g (blocks and the head set) into the runtime model."""
        if self._runtime_holds is state:
            return
        for l, blk in enumerate(self.blocks()):
            load_params(blk, state["blocks"][l], f"global block {l}")
        self.set_aset(state["aset"])
        if self.has_head:
            n = self.federation[0].num_labels
            self.runtime.model.use_head(n, self.heads.global_head(state, n), trainable=False)
        self._runtime_holds = state

    def importance(self, state) -> list[float]:
        """I_l (Eq. 4) of every block on the server batch, held out of every client's pool
        (docs/methods/leff.md#server-importance-batch): task loss on held-out labelled
        examples for a classifier, LM loss on proxy texts (disjoint from the distillation ones) for a
        decoder, the latter over micro-batches whose gradients add up to the whole batch's."""
        from fedpeft.data.batching import collate
        from fedpeft.training import task_loss, to_device

        if self._server_batch is None:
            from fedpeft.algorithms.leff.server_data import importance_batch, importance_lm_batch

            tok = self.runtime.extra["tokenizer"]
            self._server_batch = (importance_lm_batch(self.cfg, tok) if self.is_causal
                                  else importance_batch(self.cfg, self.federation[0].task, tok))
        self.load_global(state)
        data, regression = self._server_batch, self.federation[0].num_labels == 1
        if self.is_causal:
            return layer_importance(self.runtime.model, [list(b.parameters()) for b in self.blocks()],
                                    lambda: self._lm_losses(data))

        def loss_fn():
            batch = to_device(collate(data, list(range(len(data)))), self.device)
            labels = batch.pop("labels")
            return task_loss(self.runtime.model(**batch), labels, regression)

        return layer_importance(self.runtime.model, [list(b.parameters()) for b in self.blocks()], loss_fn)

    def _lm_losses(self, data):
        """Summed token cross-entropy of each micro-batch over the batch's target-token count, so the
        parts add up to the mean LM loss of the whole server batch."""
        import torch.nn.functional as F

        from fedpeft.data.batching import collate
        from fedpeft.training import to_device

        # Targets of a row: positions max(p, 1).. (position 0 has no context to predict it from).
        total = max(1, sum(len(x) - max(int(p), 1) for x, p in zip(data.input_ids, data.prompt_lengths)))
        size = self.cfg.eval_batch_size
        for start in range(0, len(data), size):
            batch = to_device(collate(data, list(range(start, min(start + size, len(data))))), self.device)
            logits, targets = self.runtime.model(**batch)
            yield F.cross_entropy(logits.float(), targets, reduction="sum") / total

    def proxy(self):
        if self._proxy is None:
            from fedpeft.algorithms.leff.server_data import encode_texts, proxy_texts

            self._proxy = encode_texts(proxy_texts(self.cfg), self.runtime.extra["tokenizer"], self.cfg.max_length)
        return self._proxy

    def student(self, state, rnd: int, a: int, b: int, infos: list, reused: list | None = None) -> list[nn.Module]:
        """The student of global blocks a..b for this round: distilled once per (round, segment) and shared
        by every client that needs it. With --distill-reuse unchanged, the student of an earlier round
        when blocks 0..b are still the tensors it was distilled from (`reused` says so)."""
        key = (rnd, a, b)
        if key not in self._students:
            n, m = b - a + 1, student_depth(b - a + 1, self.cfg.compression_rate)
            distil = m < n and self.cfg.distill_steps > 0
            teacher = [state["blocks"][l] for l in range(b + 1)]
            if distil and self.cfg.distill_reuse == "unchanged":
                prev = self._reusable.get((a, b))
                if prev is not None and _same_blocks(prev["teacher"], teacher):
                    self._students[key] = prev["student"]
                    if reused is not None:
                        reused.append({"segment": [a, b], "from_round": prev["round"]})
                    return prev["student"]
            self.load_global(state)
            cache = self.teacher_cache(state) if distil else None
            precision = self.cfg.precision if self.cfg.distill_precision == "run" else "fp32"
            with autocast(precision, next(self.blocks()[0].parameters()).device):
                student, info = distill_segment(
                    self.runtime.extra["embeddings"], self.blocks(), a, b, self.proxy() if distil else None,
                    rate=self.cfg.compression_rate, alpha=self.cfg.distill_alpha, steps=self.cfg.distill_steps,
                    lr=self.cfg.distill_lr, batch_size=self.cfg.distill_batch_size,
                    seed=derive_seed(self.cfg.seed, "leff-distill", rnd, a, b), owner=self.runtime.extra["block_owner"][0],
                    teacher_cache=cache)
            self._students[key] = student
            infos.append(info)
            if distil and self.cfg.distill_reuse == "unchanged":
                self._reusable[(a, b)] = {"teacher": teacher, "student": student, "round": rnd}
        return self._students[key]

    def teacher_cache(self, state) -> TeacherCache | None:
        """The round's teacher cache under --distill-teacher cached (built once, for every segment of
        the round), else None. The runtime holds Θ_g (`load_global`) when this is called."""
        owner = self.runtime.extra["block_owner"][0]
        if self.cfg.distill_teacher != "cached" or not caches_teacher(owner):
            return None
        if self._teacher_cache is None:
            t = time.perf_counter()
            self._teacher_cache = TeacherCache(
                self.runtime.extra["embeddings"], self.blocks(), self.proxy(),
                starts={a for a, _ in self._round_segments}, ends={b for _, b in self._round_segments},
                chunk=max(self.cfg.distill_batch_size, 64), owner=owner)
            self._teacher_cache_seconds = time.perf_counter() - t
        return self._teacher_cache

    def configure(self, state, rnd, clients):
        if rnd > self.num_rounds:  # the engine's look-ahead after the last round: nothing to train
            return {cid: Message({}, {"round": rnd}) for cid in clients}
        self._students = {k: v for k, v in self._students.items() if k[0] == rnd}
        L, cfg = self.num_layers, self.cfg
        part = list(clients)
        starts = {b: block_starts(L, b, cfg.blocks) for b in {self.budgets[c] for c in part}}
        t0 = time.perf_counter()
        scores = None
        if cfg.sampling == "importance" and any(len(s) > 1 for s in starts.values()):
            scores = self.importance(state) if cfg.importance_source == "server_batch" else state.get("update_scores")
        t_imp = time.perf_counter() - t0
        probs = {b: (block_probabilities(block_scores(scores, s, b), normalise=cfg.importance_normalise,
                                         temperature=cfg.importance_temperature)
                     if scores is not None else np.full(len(s), 1.0 / len(s))) for b, s in starts.items()}
        out, assigned, distilled, reused, memory, sent = {}, {}, [], [], {}, {}
        t1 = time.perf_counter()
        ks = {cid: starts[self.budgets[cid]][0] if len(starts[self.budgets[cid]]) == 1 else draw_block(
            cfg.sampling, starts[self.budgets[cid]], probs[self.budgets[cid]], seed=cfg.seed, rnd=rnd, client=cid)
            for cid in part}
        self._round_segments = ({(0, k - 1) for cid, k in ks.items() if k > 0}
                                | {(k + self.budgets[cid], L - 1) for cid, k in ks.items() if k + self.budgets[cid] < L})
        self._teacher_cache, self._teacher_cache_seconds = None, 0.0
        for cid in part:
            c = self.federation[cid]
            b = self.budgets[cid]
            k = ks[cid]
            pre = self.student(state, rnd, 0, k - 1, distilled, reused) if k > 0 else []
            suf = self.student(state, rnd, k + b, L - 1, distilled, reused) if k + b < L else []
            tensors = {block_key(l, n): t for l in range(k, k + b) for n, t in state["blocks"][l].items()}
            for tag, student in (("pre", pre), ("suf", suf)):
                for j, blk in enumerate(student):
                    if id(blk) not in sent:  # one wire copy of a student, however many clients get it
                        sent[id(blk)] = module_params(blk)
                    tensors.update(prefixed(f"{tag}.{j}.", sent[id(blk)]))
            tensors.update(self.heads.download(state, c))
            if self.cfg.train_head_set:
                tensors.update({ASET_PREFIX + n: t for n, t in state["aset"].items()})
            if not is_synced(state, cid):  # the frozen embeddings, until the client first replies
                tensors.update(prefixed(EMB_PREFIX, self._embeddings_on_wire()))
            out[cid] = Message(tensors, {"round": rnd, "block_start": k, "budget": b,
                                         "m_pre": len(pre), "m_suf": len(suf)})
            assigned[cid] = (k, b)
            memory[cid] = self.client_memory(b, len(pre) + len(suf))
        self._teacher_cache = None  # its tensors are this round's: free them
        # What aggregate(rnd) must check the replies against, and what round_info(rnd) reports:
        # kept in the state, for this round and the one before (the engine configures r + 1 before
        # it records round r).
        state["assigned"] = {r: a for r, a in state.get("assigned", {}).items() if r >= rnd - 1}
        state["assigned"][rnd] = assigned
        state["round_info"] = {r: i for r, i in state.get("round_info", {}).items() if r >= rnd - 1}
        state["round_info"][rnd] = {
            "blocks": {cid: [k, k + b - 1] for cid, (k, b) in assigned.items()},
            "budgets": {cid: b for cid, (_, b) in assigned.items()},
            "importance": scores, "block_probabilities": {b: p.tolist() for b, p in probs.items()},
            "importance_seconds": t_imp, "distill_seconds": time.perf_counter() - t1, "distilled": distilled,
            **({"reused": reused} if self.cfg.distill_reuse != "off" else {}),
            **({"teacher_cache_seconds": self._teacher_cache_seconds} if self.cfg.distill_teacher == "cached" else {}),
            "client_memory_bytes": memory, "peak_client_memory_bytes": max(memory.values(), default=0),
        }
        self.record_event("leff_blocks", round=rnd, blocks=state["round_info"][rnd]["blocks"],
                          client_memory_bytes=memory)
        log.info("round %d: blocks %s", rnd, " ".join(f"c{cid}:{k}-{k + b - 1}" for cid, (k, b) in assigned.items()))
        return out

    def _embeddings_on_wire(self) -> dict[str, torch.Tensor]:
        """The frozen embeddings as sent to a client that never received them (copied once per process)."""
        if "emb_wire" not in self.runtime.extra:
            self.runtime.extra["emb_wire"] = on_wire(self.runtime.extra["emb_params"])
        return self.runtime.extra["emb_wire"]

    def configure_evaluate(self, state, rnd, clients, broadcast):
        """Θ_g for every client to score after every round (LEFF scores the global model): all blocks,
        𝒜 and the global head, plus the frozen embeddings to a client that never received them.
        Counted as `bytes_eval_down`."""
        tensors = {block_key(l, k): t for l, blk in state["blocks"].items() for k, t in blk.items()}
        tensors.update(prefixed(ASET_PREFIX, state["aset"]))
        if self.has_head:
            tensors.update(prefixed(HEAD_PREFIX, self.heads.global_head(state, self.federation[0].num_labels)))
        emb = prefixed(EMB_PREFIX, self._embeddings_on_wire())
        return {cid: Message({**tensors, **({} if is_synced(state, cid) else emb)}, {"round": rnd}) for cid in clients}

    def client_memory(self, budget: int, student_layers: int) -> int:
        """Client model memory, float32: parameters held + gradients and AdamW moments of the trained
        ones (3 × trained). Activations are not included."""
        p_blk = sum(p.numel() for p in self.blocks()[0].parameters())
        p_emb = sum(p.numel() for p in self.runtime.extra["emb_params"].values())
        n = self.federation[0].num_labels
        p_head = sum(p.numel() for p in self.aset().values())
        if self.has_head:
            p_head += sum(v.numel() for v in self.heads.inits()[n].values())
        trained = budget * p_blk + (p_head if self.cfg.head_policy == "shared" else 0)
        return 4 * (p_emb + (budget + student_layers) * p_blk + p_head) + 4 * 3 * trained

    def round_info(self, state, rnd: int) -> dict[str, Any]:
        info = dict(state.get("round_info", {}).get(rnd, {}))
        info.pop("client_memory_bytes", None)  # per client: in the round's leff_blocks event
        return info

    def aggregate(self, state, rnd, replies):
        assigned = state.get("assigned", {}).get(rnd, {})
        ok = {}
        for cid, reply in sorted(replies.items()):
            if cid not in assigned:
                log.warning("round %d: ignored a reply from client %d, which was not assigned a block", rnd, cid)
                continue
            k, b = assigned[cid]
            expected = {block_key(l, n): t.shape for l in range(k, k + b) for n, t in state["blocks"][l].items()}
            if self.cfg.train_head_set:
                expected.update({ASET_PREFIX + n: t.shape for n, t in state["aset"].items()})
            ok.update(accept(self, rnd, {cid: reply}, expected))
        if not ok:
            return state
        uploads = {cid: {} for cid in ok}
        for cid, reply in ok.items():
            for key, t in reply.tensors.items():
                if key.startswith((HEAD_PREFIX, ASET_PREFIX)):
                    continue
                layer, name = parse_block_key(key)
                uploads[cid].setdefault(layer, {})[name] = t
        old = state["blocks"]
        state["blocks"] = layerwise_mean(old, uploads, {c: r.config["num_examples"] for c, r in ok.items()})
        if self.cfg.importance_source == "last_update":
            state["update_scores"] = update_importance(old, state["blocks"], self.cfg.lr)
        self.heads.aggregate(state, ok)
        if self.cfg.train_head_set and state["aset"]:  # 𝒜: D_i-weighted over all participants
            state["aset"] = weighted_mean([{n[len(ASET_PREFIX):]: t for n, t in r.tensors.items() if n.startswith(ASET_PREFIX)}
                                           for r in ok.values()], [r.config["num_examples"] for r in ok.values()])
        mark_synced(state, ok)
        self._runtime_holds = None
        return state

    # ------------------------------------------------------------ client
    def load_for_eval(self, instruction, client):
        """LEFF scores the global model Θ_g, not a client's compressed model
        (docs/methods/leff.md#evaluating-the-global-model): every block, 𝒜 and the head, from the
        evaluate message `configure_evaluate` made (nothing else is read)."""
        tensors = instruction.tensors
        emb = unprefixed(EMB_PREFIX, tensors)
        if emb:
            load_params(self.runtime.extra["emb_params"], emb, "embeddings")
        for l, blk in enumerate(self.blocks()):
            load_params(blk, unprefixed(f"block.{l}.", tensors), f"global block {l}")
        self.set_aset(unprefixed(ASET_PREFIX, tensors))
        if self.has_head:
            self.runtime.model.use_head(client.info.num_labels, unprefixed(HEAD_PREFIX, tensors), trainable=False)
        self._runtime_holds = None

    def fit(self, instruction: Message, client: Client) -> Message:
        conf = instruction.config
        self._runtime_holds = None  # the runtime's blocks and head now hold this client's state
        tensors = instruction.tensors
        emb = {k[len(EMB_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMB_PREFIX)}
        if emb:
            load_params(self.runtime.extra["emb_params"], emb, "embeddings")
        k, b = conf["block_start"], conf["budget"]
        blocks = self.blocks()[k:k + b]
        for i, blk in enumerate(blocks):
            prefix = f"block.{k + i}."
            load_params(blk, {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}, f"block {k + i}")
        pre = self._load_student(tensors, "pre", conf["m_pre"], 0)
        suf = self._load_student(tensors, "suf", conf["m_suf"], conf["m_pre"])
        aset = {k[len(ASET_PREFIX):]: v for k, v in tensors.items() if k.startswith(ASET_PREFIX)}
        if aset:
            self.set_aset(aset)
        self.heads.load(instruction, client)
        for p in self.runtime.model.parameters():
            p.requires_grad_(False)
        params = [p for blk in blocks for p in blk.parameters()]
        if self.cfg.train_head_set:
            params += list(self.aset().values())
        for p in self.heads.params():
            p.requires_grad_(True)
        with assembled(self.runtime, pre + blocks + suf):
            stats = self.train_client(client, params, tag="fit", rnd=conf["round"])
        up = {block_key(k + i, n): t for i, blk in enumerate(blocks) for n, t in module_params(blk).items()}
        if self.cfg.train_head_set:
            up.update(prefixed(ASET_PREFIX, on_wire(self.aset())))
        return Message({**up, **self.heads.keep(client)}, {**fit_report(client, stats), "block_start": k, "budget": b})

    def _load_student(self, tensors, tag: str, count: int, offset: int) -> list[nn.Module]:
        student = scratch_blocks(self.runtime, count, offset)
        for j, blk in enumerate(student):
            prefix = f"{tag}.{j}."
            load_params(blk, {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)},
                        f"student {tag} block {j}")
        return student


def _same_blocks(old: list[dict[str, torch.Tensor]], new: list[dict[str, torch.Tensor]]) -> bool:
    """Are these the same block tensors? A layer nobody trained keeps its very tensors (layerwise_mean);
    otherwise compared by value."""
    if len(old) != len(new):
        return False
    for o, n in zip(old, new):
        if o is n:
            continue
        if o.keys() != n.keys() or any(o[k] is not n[k] and not torch.equal(o[k], n[k]) for k in o):
            return False
    return True
