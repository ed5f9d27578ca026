"""Devices and precision: how `--device` and `--precision` resolve on different hardware (capabilities
monkeypatched, so an AVX2 machine and one with AVX-512 BF16 are both checked on any machine), what a
run records and says, that an explicit `device="cpu"` and `auto` give the same run on a machine
without a GPU, gradient checkpointing, and the k-bit preparation of decoders."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fedpeft import hardware
from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError

AVX2 = hardware.CpuInfo("AMD EPYC (test)", "AVX2", frozenset({"avx", "avx2", "fma"}))
AVX512_BF16 = hardware.CpuInfo("AMD EPYC (test)", "AVX512", frozenset({"avx2", "avx512f", "avx512_bf16"}))
AMX = hardware.CpuInfo("Intel Xeon (test)", "AVX512", frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"}))


@pytest.fixture
def cpu_is(monkeypatch):
    """Make this process see a CPU of the given capabilities and no GPU."""
    def use(info: hardware.CpuInfo):
        monkeypatch.setattr(hardware, "cpu_info", lambda: info)
        monkeypatch.setattr(hardware, "cuda_available", lambda: False)

    return use


@pytest.fixture
def gpu_is(monkeypatch):
    """Make this process see a CUDA GPU (with or without native bf16) next to an AVX2 CPU."""
    def use(native_bf16: bool, count: int = 1):
        monkeypatch.setattr(hardware, "cpu_info", lambda: AVX2)
        monkeypatch.setattr(hardware, "cuda_available", lambda: True)
        monkeypatch.setattr(hardware, "cuda_native_bf16", lambda device="cuda": native_bf16)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return use


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize("info, expected", [(AVX512_BF16, "bf16"), (AMX, "bf16"), (AVX2, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_has_native_bf16(cpu_is, info, expected):
    cpu_is(info)
    assert hardware.resolve_precision("auto", "cpu") == expected
    cfg = RunConfig(tasks=["demo-sentiment"] * 2, model_name="tiny_models:tiny_bert").resolved(model_type="bert")
    assert (cfg.device, cfg.precision) == ("cpu", expected)
    assert cfg.resolved(model_type="bert").to_dict() == cfg.to_dict()  # resolving again changes nothing


def test_explicit_precisions_are_kept_and_fp16_needs_cuda(cpu_is):
    cpu_is(AVX2)
    assert hardware.resolve_precision("bf16", "cpu") == "bf16"  # kept: the run log warns (below)
    cpu_is(AVX512_BF16)
    assert hardware.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(FedPeftError, match="fp16.*CUDA GPUs only"):
        RunConfig(tasks=["demo-sentiment"], precision="fp16").resolved(model_type="bert")
    with pytest.raises(FedPeftError, match="unknown --precision"):
        RunConfig(precision="half")


def test_auto_on_a_gpu_follows_its_bf16_support(gpu_is):
    gpu_is(native_bf16=True)
    assert hardware.resolve_device("auto") == "cuda"
    assert hardware.resolve_precision("auto", "cuda") == "bf16"
    assert hardware.resolve_precision("fp16", "cuda:0") == "fp16"
    gpu_is(native_bf16=False)  # e.g. a V100 or T4: float32 unless asked for fp16
    assert hardware.resolve_precision("auto", "cuda") == "fp32"
    # the CPU of a GPU machine is judged on its own flags
    assert hardware.resolve_precision("auto", "cpu") == "fp32"


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_with_the_measured_cost(cpu_is, monkeypatch, caplog):
    cpu_is(AVX2)
    monkeypatch.setattr(hardware, "bf16_cost_on_cpu", lambda n=256: (114.0, 1.3))
    with caplog.at_level(logging.INFO, logger="fedpeft"):
        hardware.announce("cpu", "bf16")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "without native bf16" in warnings[0] and "1.3 GFLOP/s in bf16 against 114.0" in warnings[0]
    assert "87.7× slower" in warnings[0] and "--precision auto" in warnings[0]
    caplog.clear()
    cpu_is(AVX512_BF16)
    with caplog.at_level(logging.INFO, logger="fedpeft"):
        hardware.announce("cpu", "bf16")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "runs bf16 natively" in caplog.records[0].getMessage()


def test_the_bf16_cost_is_measured_once_per_process(monkeypatch):
    calls = []

    def probe(dtype_name="fp32", **kw):
        calls.append((dtype_name, kw["n"]))
        return {"fp32": 100.0, "bf16": 2.0}[dtype_name]

    hardware.bf16_cost_on_cpu.cache_clear()
    monkeypatch.setattr(hardware, "matmul_gflops", probe)
    try:
        assert hardware.bf16_cost_on_cpu() == (100.0, 2.0)
        assert hardware.bf16_cost_on_cpu() == (100.0, 2.0)
        assert calls == [("fp32", 256), ("bf16", 256)]
    finally:
        hardware.bf16_cost_on_cpu.cache_clear()


def test_the_matmul_probe_measures_this_machine():
    assert hardware.matmul_gflops("fp32", n=64, repeats=1, min_seconds=0.001) > 0
    summary = hardware.machine_summary()
    assert "torch CPU capability" in summary and "load average" in summary


def test_cpuinfo_flags_are_read_from_proc_cpuinfo(tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                    "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    model, flags = hardware._read_cpuinfo(str(fake))
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx512_bf16", "amx_bf16"} <= flags
    assert hardware._read_cpuinfo(str(tmp_path / "missing")) == ("", frozenset())
    info = hardware.cpu_info()  # this machine: whatever it is, described in one line
    assert info.capability and info.describe().startswith(info.model)


def test_autocast_follows_the_device_type(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype: seen.append((device_type, dtype)) or "ctx")
    assert hardware.autocast("bf16", "cuda:1") == "ctx"
    assert hardware.autocast("fp16", torch.device("cuda", 0)) == "ctx"
    hardware.autocast("bf16", torch.device("cpu"))
    assert seen == [("cuda", torch.bfloat16), ("cuda", torch.float16), ("cpu", torch.bfloat16)]
    with pytest.raises(ValueError, match="resolved"):
        hardware.autocast("auto", "cpu")


# ------------------------------------------------------------------ devices
def test_device_syntax_and_resolution(cpu_is, gpu_is):
    for ok in ("auto", "cpu", "cuda", "cuda:3", "mps"):
        assert RunConfig(device=ok).device == ok
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "tpu"):
        with pytest.raises(FedPeftError, match="unknown --device"):
            RunConfig(device=bad)
    cpu_is(AVX2)
    assert hardware.resolve_device("auto") == "cpu"
    with pytest.raises(FedPeftError, match="no CUDA GPU is visible"):
        RunConfig(tasks=["demo-sentiment"], device="cuda").resolved(model_type="bert")
    gpu_is(native_bf16=True, count=2)
    assert hardware.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(FedPeftError, match="shows 2 CUDA GPU"):
        hardware.resolve_device("cuda:2")


def test_flower_sim_clients_compute_where_their_ray_resources_put_them(cpu_is, gpu_is):
    from fedpeft.run.flower import node_config_of

    sim = dict(tasks=["demo-sentiment"] * 2, engine="flower-sim")
    cpu_is(AVX512_BF16)
    assert RunConfig(**sim).resolved(model_type="bert").device == "cpu"
    with pytest.raises(FedPeftError, match="needs a CUDA GPU"):
        RunConfig(**sim, client_gpus=0.25).resolved(model_type="bert")
    gpu_is(native_bf16=True)
    # a GPU share puts the clients on the GPU; without one they stay on the CPU even when a GPU is there
    cfg = RunConfig(**sim, client_gpus=0.25).resolved(model_type="bert")
    assert (cfg.device, cfg.precision) == ("cuda", "bf16")
    assert RunConfig(**sim).resolved(model_type="bert").device == "cpu"
    with pytest.raises(FedPeftError, match="--client-gpus"):
        RunConfig(**sim, device="cuda").resolved(model_type="bert")
    with pytest.raises(FedPeftError, match="keeps them off the GPU"):
        RunConfig(**sim, device="cpu", client_gpus=0.5).resolved(model_type="bert")
    # each simulated client: cuda with a share (Ray shows it its GPU as cuda:0), the CPU without
    assert node_config_of(cfg.to_dict(), {"partition-id": 0}, simulated=True).device == "cuda"
    no_share = RunConfig(**sim).resolved(model_type="bert").to_dict()
    assert node_config_of(no_share, {"partition-id": 0}, simulated=True).device == "cpu"
    # a deployed node computes on its own device (node config), auto by default, whatever the server has
    served = RunConfig(tasks=["demo-sentiment"] * 2, engine="flower", device="cuda:0").to_dict()
    assert node_config_of(served, {"partition-id": 1}).device == "auto"
    assert node_config_of(served, {"partition-id": 1, "device": "cpu"}).device == "cpu"


def test_quantization_needs_the_gpu_as_the_device(gpu_is, monkeypatch):
    import importlib.util

    from fedpeft.models import decoders

    import transformers  # noqa: F401  (imported before find_spec is patched)

    gpu_is(native_bf16=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # "bitsandbytes is installed"
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(FedPeftError, match="--device is cpu"):
        decoders.check_quantization("8bit", "cpu")
    decoders.check_quantization("4bit", "cuda:1")
    monkeypatch.setattr("transformers.BitsAndBytesConfig", lambda **kw: kw)
    assert decoders.quantization_kwargs("8bit", "cuda:1")["device_map"] == {"": 1}
    assert decoders.quantization_kwargs("8bit", "auto")["device_map"] == {"": 0}


# ------------------------------------------------------------------ a run on cpu, explicit or auto
def _comparable(records):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


@pytest.mark.parametrize("method", ["fedit", "fedlease", "leff"])
def test_device_cpu_and_auto_give_the_same_run_on_a_machine_without_gpu(method, tiny_cfg, tmp_path):
    """On a machine without a GPU `auto` is the CPU: the same records, bit for bit, and config.json
    says what was used. Precision is left at its default (auto) in both."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --device auto resolves to it")
    from fedpeft.records.checkpoint import load_checkpoint
    from fedpeft.run import run
    from tiny_models import tiny_bert

    kw = dict(method=method, precision="auto")
    if method == "fedlease":
        kw.update(global_rounds=2, warmup_rounds=1)  # warmup, clustering, one round of the mixture
    elif method == "leff":  # 4 blocks: budgets of 1 leave segments that are distilled
        kw.update(tasks=["demo-sentiment"] * 3, global_rounds=1, partition="dirichlet_cut", alpha=1.0,
                  proxy_dataset="demo", distill_steps=2, distill_examples=64, importance_examples=16)
    else:
        kw.update(global_rounds=1)
    backbone = tiny_bert(seed=0, layers=4)
    runs = {}
    for device in ("cpu", "auto"):
        res = run(tiny_cfg(**kw, device=device, output_dir=str(tmp_path / device)), backbone=backbone)
        saved = json.loads((res.run_dir / "config.json").read_text())
        assert saved["device"] == "cpu" and saved["precision"] == hardware.resolve_precision("auto", "cpu")
        assert "hardware: device cpu" in (res.run_dir / "training_log.txt").read_text()  # and why this precision
        runs[device] = (_comparable(res.history.records), load_checkpoint(res.run_dir)["server_state"])
    assert runs["cpu"][0] == runs["auto"][0]
    _assert_same_tensors(runs["cpu"][1], runs["auto"][1])


def _assert_same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        assert a.device.type == hardware.WIRE_DEVICE and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if not str(k).endswith("seconds"):  # LEFF's round info times its importance pass and distillation
                _assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tensors(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------ fp16's gradient scaler
def test_fp16_training_uses_a_gradient_scaler_and_tracks_fp32(tiny_cfg, tiny_backbone, monkeypatch):
    """The fp16 path (CUDA-only as a run setting) exercised through CPU autocast: the scaler is made,
    steps, and training lands near the fp32 result."""
    from fedpeft.run.assemble import bound
    from fedpeft.training import train_local

    made = []
    real = torch.amp.GradScaler

    def spy(device_type):
        made.append(device_type)
        return real(device_type)

    monkeypatch.setattr(torch.amp, "GradScaler", spy)
    alg, clients = bound(tiny_cfg(), tiny_backbone)
    client = clients[0]
    alg.load_for_eval(alg.configure(alg.init(), 1, [c.cid for c in clients])[client.cid], client)
    start = {k: v.clone() for k, v in alg.runtime.model.state_dict().items()}
    params = [p for n, p in alg.runtime.model.named_parameters() if "lora_" in n]
    losses = {}
    for precision in ("fp32", "fp16"):
        alg.runtime.model.load_state_dict(start)
        for p in params:
            p.requires_grad_(True)
        losses[precision] = train_local(alg.runtime.model, client.train, params, epochs=2, lr=5e-3, batch_size=8,
                                        seed=1, precision=precision).loss
    assert made == ["cpu"]
    assert losses["fp16"] == pytest.approx(losses["fp32"], rel=2e-2)


# ------------------------------------------------------------------ gradient checkpointing
def _decoder_loss_and_grads(backbone, checkpointing: bool):
    from fedpeft.algorithms.fedit import FedIT
    from fedpeft.models.adapters import init_lora_state, lora_parameters, set_lora_state
    from fedpeft.seeding import torch_generator

    # the model's own (padded) forward here; the varlen path's checkpointing: tests/test_decoder_varlen.py
    cfg = RunConfig(method="fedit", tasks=["e2e"], target_modules=["q_proj", "v_proj"], rank=2, lora_dropout=0.1,
                    device="cpu", precision="fp32", gradient_checkpointing=checkpointing, decoder_path="padded")
    alg = FedIT(cfg)
    rt = alg.place_runtime(alg.build_runtime(backbone))
    set_lora_state(rt.sites, init_lora_state(rt.sites, torch_generator(0, "gc"), b_std=0.1))  # B ≠ 0: A gets gradients
    params = lora_parameters(rt.sites)
    for p in params:
        p.requires_grad_(True)
    calls = []
    layer = rt.model.lm.model.layers[0]
    handle = layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 200, (4, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # one left-padded row
    labels = ids.clone()
    labels[:, :12] = -100
    rt.model.train()
    torch.manual_seed(7)  # LoRA dropout draws: the recomputation must replay them
    logits, targets = rt.model(ids, mask, labels)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    loss.backward()
    handle.remove()
    return loss.detach(), [p.grad.clone() for p in params], len(calls), layer.gradient_checkpointing


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_on_the_tiny_decoder():
    from tiny_models import tiny_llama

    backbone = tiny_llama(seed=0)
    loss0, grads0, calls0, on0 = _decoder_loss_and_grads(backbone, False)
    loss1, grads1, calls1, on1 = _decoder_loss_and_grads(backbone, True)
    assert (on0, on1) == (False, True)
    assert (calls0, calls1) == (1, 2)  # with checkpointing the block runs again in the backward pass
    assert torch.equal(loss0, loss1)
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in grads0)


def test_gradient_checkpointing_runs_a_decoder_federation(tiny_cfg, tmp_path, monkeypatch):
    """FedLEASE on the tiny decoder, checkpointed, on the padding-free path: its warmup LoRA and its mixture
    train and give the records of the plain run."""
    from decoder_helpers import make_clients, register
    from fedpeft.engines.local import LocalEngine
    from fedpeft.records.history import RunHistory
    from fedpeft.run.assemble import build_algorithm
    from tiny_models import tiny_llama

    register(monkeypatch)
    backbone = tiny_llama(seed=0)
    out = {}
    for gc in (False, True):
        cfg = RunConfig(method="fedlease", tasks=["tiny-copy", "tiny-copy", "tiny-reverse", "tiny-reverse"],
                        global_rounds=2, warmup_rounds=1, local_epochs=1, batch_size=4, eval_batch_size=8,
                        max_length=64, rank=2, lr=1e-2, max_new_tokens=6, gen_batch_size=4, device="cpu",
                        precision="fp32", gradient_checkpointing=gc, decoder_path="varlen", quiet=True)
        infos, clients = make_clients(backbone.tokenizer, tasks=cfg.tasks)
        alg = build_algorithm(cfg, backbone, infos)
        history = RunHistory(tmp_path / str(gc), {"method": cfg.method})
        (tmp_path / str(gc)).mkdir()
        LocalEngine(alg, clients, history, tmp_path / str(gc)).run()
        out[gc] = _comparable(history.records)
        # still on after the mixture replaced the warmup LoRA layers
        assert alg.runtime.extra["num_experts"] >= 1
        assert alg.runtime.model.lm.model.layers[0].gradient_checkpointing is gc
    for plain, ckpt in zip(out[False], out[True]):
        assert plain.keys() == ckpt.keys()
        for k, v in plain.items():
            assert ckpt[k] == (pytest.approx(v, rel=1e-5, abs=1e-7) if isinstance(v, float) else v), k


# ------------------------------------------------------------------ k-bit decoders
def test_prepare_kbit_freezes_and_upcasts_half_weights():
    from fedpeft.models.placement import prepare_kbit
    from tiny_models import tiny_llama

    model = tiny_llama(seed=0).model
    model.to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(True)
    prepare_kbit(model)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


def test_a_kbit_decoder_is_prepared_for_training_when_loaded(tmp_path, monkeypatch):
    """The loader's k-bit path (bitsandbytes replaced by a plain load: no GPU here) runs PEFT's
    prepare_model_for_kbit_training on the loaded decoder."""
    from fedpeft.models import backbone as backbone_mod, decoders, placement
    from tiny_models import tiny_llama

    tiny = tiny_llama(seed=0)
    folder = tmp_path / "tiny-llama"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    seen = []
    monkeypatch.setattr(decoders, "quantization_kwargs", lambda q, device="auto": seen.append((q, device)) or {})
    real = placement.prepare_kbit
    monkeypatch.setattr(placement, "prepare_kbit", lambda m: seen.append("prepared") or real(m))
    backbone_mod._load_causal_cached.cache_clear()
    try:
        loaded = backbone_mod.load_backbone(str(folder), kind="causal", quantization="8bit", device="cuda:1")
    finally:
        backbone_mod._load_causal_cached.cache_clear()
    assert seen == [("8bit", "cuda:1"), "prepared"]
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_a_gpu_run_exports_on_a_machine_without_one(tiny_cfg, tmp_path, cpu_is):
    """Export computes nothing: a run folder whose config.json says cuda and fp16 exports here."""
    from fedpeft.run import run
    from fedpeft.run.export import export_run

    res = run(tiny_cfg(model_name="tiny_models:tiny_bert", global_rounds=1))
    saved = json.loads((res.run_dir / "config.json").read_text())
    saved.update(device="cuda", precision="fp16")
    (res.run_dir / "config.json").write_text(json.dumps(saved))
    cpu_is(AVX2)
    out = export_run(res.run_dir)
    assert (out / "global_lora" / "adapter_model.safetensors").is_file()


def test_bench_compares_a_saved_gpu_run_by_precision_not_by_device(tmp_path, cpu_is):
    """A bench folder made on a GPU (device cuda, bf16) is the suite's run on a CPU with native bf16
    (the device is where a run computes, not what it computes), and not on an AVX2 CPU, where auto
    means fp32: the saved device is never resolved again, here where that GPU does not exist."""
    from types import SimpleNamespace

    from fedpeft.bench.matrix import check_same_settings

    bert = SimpleNamespace(model_type="bert")
    cpu_is(AVX512_BF16)
    plan = RunConfig(tasks=["demo-sentiment"] * 2, engine="flower-sim", client_gpus=0.0)
    saved = {**plan.resolved(model_type="bert").to_dict(), "device": "cuda", "precision": "bf16"}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_same_settings(tmp_path, plan, bert)
    cpu_is(AVX2)
    with pytest.raises(FedPeftError, match="precision='bf16'.*'fp32'"):
        check_same_settings(tmp_path, plan, bert)
