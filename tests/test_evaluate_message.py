"""`Algorithm.configure_evaluate`: a client scores from its evaluate message (and its own store)
alone, so an engine where server and client do not share memory (Flower) gets the local numbers.
LEFF's message is the global model Θ_g, which LEFF scores after every round
(docs/methods/leff.md#evaluating-the-global-model)."""

import math

import pytest
import torch

from fedpeft.metrics import EXAMPLES
from tests.leff_helpers import bound as _bound

L = 4


@pytest.fixture(scope="module")
def bb4():
    from tiny_models import tiny_bert

    return tiny_bert(seed=0, layers=L)


def _leff_cfg(tiny_cfg, **kw):
    base = dict(method="leff", tasks=["demo-sentiment"] * 3, global_rounds=2, proxy_dataset="demo",
                distill_steps=2, distill_examples=64, importance_examples=16, layer_budgets=["1", "2"])
    return tiny_cfg(**{**base, **kw})




def _one_round(alg, clients):
    """Round 1 as the engine drives it: the round's sample (engines/participation.py) trains."""
    from fedpeft.engines.participation import participants

    state = alg.init()
    msgs = alg.configure(state, 1, participants(alg.cfg, len(clients), 1))
    state = alg.aggregate(state, 1, {cid: alg.fit(msgs[cid], clients[cid]) for cid in msgs})
    return state, alg.configure(state, 2, participants(alg.cfg, len(clients), 2))


@pytest.mark.parametrize("method", ["leff", "fedavg-full"])
def test_a_fresh_client_process_scores_what_the_server_process_scores(tiny_cfg, bb4, method):
    """A second algorithm object with its own model (a Flower client: it never saw the server's
    state) gets the same metrics from the evaluate message as the server-side object."""
    cfg = _leff_cfg(tiny_cfg, method=method, participation=0.5)
    server, clients = _bound(cfg, bb4)
    state, broadcast = _one_round(server, clients)
    evaluation = server.configure_evaluate(state, 1, list(range(len(server.federation))), broadcast)
    remote, _ = _bound(cfg, bb4)
    for c in clients:
        ours, theirs = server.evaluate(evaluation[c.cid], c), remote.evaluate(evaluation[c.cid], c)
        # the per-example outcome (not a metric: predictions.npz) is the same prediction for every example
        mine, yours = ours.pop(EXAMPLES), theirs.pop(EXAMPLES)
        assert mine["task"] == yours["task"] and (mine["labels"] == yours["labels"]).all()
        assert (mine["predictions"] == yours["predictions"]).all()
        assert ours.keys() == theirs.keys()
        assert all(math.isclose(ours[k], theirs[k], rel_tol=0, abs_tol=1e-6) for k in ours), (ours, theirs)
    # the remote model now holds Θ_g exactly: every block, and the aggregated head
    for l, blk in enumerate(remote.blocks()):
        assert all(torch.equal(p, state["blocks"][l][n]) for n, p in blk.named_parameters())
    head = server.heads.global_head(state, 2)
    assert all(torch.equal(t, head[k]) for k, t in remote.runtime.model.head_state().items())


def test_leff_evaluate_message_is_the_global_model_and_embeddings_go_once(tiny_cfg, bb4):
    alg, clients = _bound(_leff_cfg(tiny_cfg, participation=0.5), bb4)
    state, broadcast = _one_round(alg, clients)
    evaluation = alg.configure_evaluate(state, 1, list(range(len(alg.federation))), broadcast)
    synced = set(state["synced"])
    assert len(synced) == 2  # ceil(0.5 · 3) participants
    p_blk = sum(p.numel() for p in alg.blocks()[0].parameters())
    p_head = sum(t.numel() for t in alg.heads.global_head(state, 2).values())
    p_emb = sum(p.numel() for p in alg.runtime.extra["embeddings"].parameters())
    for cid, msg in evaluation.items():
        assert {int(k.split(".")[1]) for k in msg.tensors if k.startswith("block.")} == set(range(L))
        assert msg.nbytes == 4 * (L * p_blk + p_head + (0 if cid in synced else p_emb))


def test_eval_bytes_are_counted_apart_from_the_broadcast(tiny_cfg, bb4, tmp_path):
    from fedpeft.run import run

    cfg = _leff_cfg(tiny_cfg, output_dir=str(tmp_path / "leff"))
    alg, _ = _bound(cfg, bb4)
    p_blk = sum(p.numel() for p in alg.blocks()[0].parameters())
    p_head = sum(t.numel() for t in alg.heads.inits()[2].values())
    leff = run(cfg, backbone=bb4).history.records
    fedit = run(tiny_cfg(output_dir=str(tmp_path / "fedit")), backbone=bb4).history.records
    trained = [r for r in leff if r["round"] >= 1]
    assert len(trained) == 6 and {r["bytes_eval_down"] for r in trained} == {4 * (L * p_blk + p_head)}
    assert [r["bytes_down"] for r in trained if r["round"] == 2] == [0, 0, 0]  # the broadcast: after the last round, none
    assert all("bytes_eval_down" not in r for r in fedit)  # the default: the broadcast itself is scored
