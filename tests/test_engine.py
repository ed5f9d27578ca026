"""The in-process engine and FedIT on a tiny random BERT: weighting, heads, bytes, resume, failures."""

import json
import logging

import pytest
import torch

from fedpeft.algorithms.base import Message
from fedpeft.algorithms.tensors import weighted_mean
from fedpeft.algorithms.fedit import LORA_PREFIX, FedIT
from fedpeft.config import RunConfig
from fedpeft.run.assemble import build_algorithm
from fedpeft.run.federation import prepare_clients
from fedpeft.run import run


def _setup(cfg, backbone):
    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    alg = build_algorithm(cfg, backbone, infos)
    assert isinstance(alg, FedIT)
    return alg, clients


def test_weighted_mean_uses_data_sizes_exactly():
    a = {"x": torch.tensor([1.0, 2.0])}
    b = {"x": torch.tensor([5.0, 6.0])}
    out = weighted_mean([a, b], [1, 3])
    assert torch.equal(out["x"], torch.tensor([0.25 * 1 + 0.75 * 5, 0.25 * 2 + 0.75 * 6]))
    same = weighted_mean([a, a, a], [1, 2, 7])
    assert torch.equal(same["x"], a["x"])  # identical uploads aggregate to the same tensor


def test_fedit_aggregate_is_data_size_weighted(tiny_cfg, tiny_backbone):
    alg, clients = _setup(tiny_cfg(), tiny_backbone)
    state = alg.init()
    key = next(iter(state["lora"]))
    ups = {}
    for cid, (value, n) in enumerate([(1.0, 10), (3.0, 30)]):
        tensors = {LORA_PREFIX + k: torch.full_like(v, value) for k, v in state["lora"].items()}
        ups[cid] = Message(tensors, {"num_examples": n})
    state = alg.aggregate(state, 1, ups)
    assert torch.allclose(state["lora"][key], torch.full_like(state["lora"][key], 2.5))


def test_reply_with_nan_or_wrong_shape_is_rejected_and_logged(tiny_cfg, tiny_backbone, caplog):
    alg, _ = _setup(tiny_cfg(), tiny_backbone)
    state = alg.init()
    good = {LORA_PREFIX + k: torch.ones_like(v) for k, v in state["lora"].items()}
    nan = {k: v.clone() for k, v in good.items()}
    next(iter(nan.values()))[0, 0] = float("nan")
    bad_shape = {k: v.clone() for k, v in good.items()}
    first = next(iter(bad_shape))
    bad_shape[first] = torch.ones(3, 3)
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        logging.getLogger("fedpeft").propagate = True
        state = alg.aggregate(state, 4, {0: Message(good, {"num_examples": 5}),
                                         1: Message(nan, {"num_examples": 500}),
                                         2: Message(bad_shape, {"num_examples": 500})})
    for k, v in state["lora"].items():
        assert torch.equal(v, torch.ones_like(v)), k
    text = caplog.text
    assert "client 1" in text and "NaN" in text and "client 2" in text and "shape" in text


def test_round_trip_leaves_backbone_bit_identical(tiny_cfg, tiny_backbone):
    cfg = tiny_cfg(head_policy="local")
    alg, clients = _setup(cfg, tiny_backbone)
    model = alg.runtime.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and "heads." not in n}
    state = alg.init()
    ins = alg.configure(state, 1, list(range(len(alg.federation))))
    replies = {c.cid: alg.fit(ins[c.cid], c) for c in clients}
    alg.aggregate(state, 1, replies)
    changed = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert any(not torch.equal(p, frozen.get(n, p * 0)) for n, p in changed.items())
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"backbone tensor {n} changed"
    # The cached backbone the runtime was copied from is untouched too.
    assert not any("lora" in n for n, _ in tiny_backbone.model.named_parameters())


@pytest.mark.parametrize("policy", ["local", "frozen", "shared"])
def test_head_policies(policy, tiny_cfg, tiny_backbone):
    cfg = tiny_cfg(head_policy=policy)
    alg, clients = _setup(cfg, tiny_backbone)
    state = alg.init()
    ins = alg.configure(state, 1, list(range(len(alg.federation))))
    init = {c.cid: {k: v.clone() for k, v in ins[c.cid].tensors.items() if k.startswith("head.")} for c in clients}
    # Every client starts from the same head initialisation of its shape (the common initialisation).
    assert all(torch.equal(init[0][k], init[1][k]) for k in init[0])
    replies = {c.cid: alg.fit(ins[c.cid], c) for c in clients}
    for c in clients:
        sent_head = [k for k in replies[c.cid].tensors if k.startswith("head.")]
        kept = c.store["head"]
        if policy == "frozen":
            assert not sent_head
            assert all(torch.equal(kept[k[5:]], v) for k, v in init[c.cid].items())
        elif policy == "local":
            assert not sent_head
            assert any(not torch.equal(kept[k[5:]], v) for k, v in init[c.cid].items())
        else:
            assert sent_head
    state = alg.aggregate(state, 1, replies)
    nxt = alg.configure(state, 2, list(range(len(alg.federation))))
    heads_down = [k for k in nxt[0].tensors if k.startswith("head.")]
    if policy != "shared":
        assert not heads_down  # after round 1, a local/frozen head never travels
        return
    # Shared: averaged over equal shapes only: the 2-label and 4-label clients keep separate heads.
    h0, h2 = nxt[0].tensors["head.out_proj.weight"], nxt[2].tensors["head.out_proj.weight"]
    assert h0.shape[0] == 2 and h2.shape[0] == 4
    expected = weighted_mean([{"w": replies[c].tensors["head.out_proj.weight"]} for c in (0, 1)],
                             [replies[0].config["num_examples"], replies[1].config["num_examples"]])["w"]
    assert torch.equal(h0, expected)
    assert torch.equal(nxt[1].tensors["head.out_proj.weight"], h0)


def test_bytes_match_closed_form(tiny_cfg, tiny_backbone):
    cfg = tiny_cfg(head_policy="local")
    result = run(cfg, backbone=tiny_backbone)
    hidden, r, layers = 16, cfg.rank, 2
    p_e = layers * 2 * (r * hidden + hidden * r)  # query + value, A and B
    for rec in result.history.records:
        if rec["round"] >= 1:
            assert rec["bytes_up"] == 4 * p_e and rec["bytes_down"] == 4 * p_e
        else:  # round 0: the common LoRA init plus the client's head init
            n_labels = 4 if rec["task"] == "demo-topic" else 2
            p_h = hidden * hidden + hidden + n_labels * hidden + n_labels
            assert rec["bytes_down"] == 4 * (p_e + p_h)


def test_same_seed_same_numbers_and_resume_equals_uninterrupted(tiny_cfg, tiny_backbone, tmp_path):
    full = run(tiny_cfg(global_rounds=3, output_dir=str(tmp_path / "a")), backbone=tiny_backbone)
    again = run(tiny_cfg(global_rounds=3, output_dir=str(tmp_path / "b")), backbone=tiny_backbone)
    stopped = run(tiny_cfg(global_rounds=3, output_dir=str(tmp_path / "c")), backbone=tiny_backbone, stop_after=1)
    assert max(r["round"] for r in stopped.history.rounds) == 1
    resumed = run(RunConfig(resume=str(tmp_path / "c"), quiet=True), backbone=tiny_backbone)  # its settings: config.json

    def metrics(res):
        return [(r["round"], r["client"], r.get("accuracy"), r.get("loss")) for r in
                sorted(res.history.records, key=lambda r: (r["round"], r["client"]))]

    assert metrics(full) == metrics(again)
    assert metrics(full) == metrics(resumed)
    saved = json.loads((tmp_path / "c" / "training_history.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1, 2, 3]


def test_failed_client_is_logged_and_round_completes(tiny_cfg, tiny_backbone, tmp_path):
    cfg = tiny_cfg(global_rounds=2)
    result = run(cfg, backbone=tiny_backbone, fail={(1, 2): RuntimeError("simulated crash")})
    events = [e for e in result.history.events if e["kind"] == "missing_clients"]
    assert events == [dict(events[0], round=1, clients=[2])]
    rec = [r for r in result.history.records if r["round"] == 1 and r["client"] == 2][0]
    assert rec["bytes_up"] == 0 and rec["participated"] is False and "accuracy" in rec
    log_text = (result.run_dir / "training_log.txt").read_text()
    assert "client 2 failed" in log_text and "simulated crash" in log_text


def test_run_folder_contents(tiny_cfg, tiny_backbone):
    result = run(tiny_cfg(), backbone=tiny_backbone)
    for name in ("config.json", "training_log.txt", "training_history.json", "metrics.csv", "summary.md",
                 "learning_curves.png", "checkpoint.pt"):
        assert (result.run_dir / name).is_file(), name
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["tasks"] == ["demo-sentiment", "demo-sentiment", "demo-topic", "demo-topic"]
    hist = json.loads((result.run_dir / "training_history.json").read_text())
    scored = [r for r in hist["records"] if r["round"] >= 1]
    assert len(scored) == 2 * 4 and all("accuracy" in r for r in scored)
    last = hist["rounds"][-1]
    assert last["overall"] == pytest.approx(sum(last["per_task"].values()) / 2)
    summary = (result.run_dir / "summary.md").read_text()
    assert "Overall (mean of task means)" in summary
    assert " s over 2 rounds." in summary  # the round-0 broadcast is not a training round
