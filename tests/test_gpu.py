"""On a CUDA GPU: FedIT, FedLEASE and LEFF run one round each on `cuda` and land where the CPU run lands,
within a bf16-sized tolerance; flower-sim puts a client with a GPU share on its GPU. Every test here is
marked `gpu` and skipped, with the reason, where torch sees no CUDA device.

Both runs are float32 and dropout-free (a tiny BERT built without dropout, LoRA dropout 0, a head without
dropout): CPU and GPU draw dropout masks from different generators, so with dropout on they would train
on different masks. What remains is the rounding of different kernels.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")]

BF16_RTOL, BF16_ATOL = 1.6e-2, 1e-4  # torch.testing's bf16 rtol; atol for values near 0


def dropout_free_bert(layers: int = 4):
    from transformers import BertConfig, BertModel

    from fedpeft.models.backbone import Backbone
    from tiny_tokenizer import tiny_tokenizer

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                     vocab_size=200, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name="tiny-bert-nodrop", model=model, tokenizer=tiny_tokenizer(200), model_type="bert",
                    hidden_size=16, num_layers=layers)


@pytest.fixture
def no_head_dropout(monkeypatch):
    from fedpeft.models import task_model

    monkeypatch.setattr(task_model, "ClassificationHead",
                        functools.partial(task_model.ClassificationHead, dropout=0.0))


METHODS = {
    "fedit": dict(global_rounds=1),
    "fedlease": dict(global_rounds=2, warmup_rounds=1),  # the warmup round, then one round of the mixture
    "leff": dict(tasks=["demo-sentiment"] * 3, global_rounds=1, partition="dirichlet_cut", alpha=1.0,
                 proxy_dataset="demo", distill_steps=2, distill_examples=64, importance_examples=16),
}


def _run(tiny_cfg, tmp_path, method, device, **extra):
    from fedpeft.records.checkpoint import load_checkpoint
    from fedpeft.run import run

    cfg = tiny_cfg(method=method, device=device, precision="fp32", lora_dropout=0.0,
                   output_dir=str(tmp_path / f"{method}-{device}-{extra.get('engine', 'local')}"),
                   **{**METHODS[method], **extra})
    res = run(cfg, backbone=dropout_free_bert())
    return res.history.records, load_checkpoint(res.run_dir)["server_state"]


def _close(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert a.device.type == "cpu", f"{where} is on {a.device}: the server state must stay on the CPU"
        torch.testing.assert_close(a, b, rtol=BF16_RTOL, atol=BF16_ATOL, msg=where)
    elif isinstance(a, dict):
        for k in a:
            if not str(k).endswith("seconds"):
                _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=BF16_RTOL, abs=BF16_ATOL), where
    else:
        assert a == b, where


@pytest.mark.parametrize("method", list(METHODS))
def test_one_round_on_cuda_matches_the_cpu(method, tiny_cfg, tmp_path, no_head_dropout):
    cpu_records, cpu_state = _run(tiny_cfg, tmp_path, method, "cpu")
    gpu_records, gpu_state = _run(tiny_cfg, tmp_path, method, "cuda")
    for c, g in zip(cpu_records, gpu_records):
        for key in ("loss", "train_loss"):
            if c.get(key) is not None:
                assert g[key] == pytest.approx(c[key], rel=BF16_RTOL, abs=BF16_ATOL), (key, c["client"])
    _close(cpu_state, gpu_state, "server_state")


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_half_precisions_train_on_cuda(precision, tiny_cfg, tmp_path):
    """auto (bf16 on Ampere and later), bf16 and fp16 (with the gradient scaler) give finite losses."""
    import math

    from fedpeft.run import run

    res = run(tiny_cfg(device="cuda", precision=precision, output_dir=str(tmp_path / precision)),
              backbone=dropout_free_bert(2))
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["loss"]) for r in res.history.records)


@pytest.mark.flower
def test_flower_sim_clients_with_a_gpu_share_train_on_the_gpu(tiny_cfg, tmp_path, no_head_dropout):
    """--client-gpus 0.5: two simulated clients share the GPU, and the round lands where the local
    engine's round on cuda lands."""
    pytest.importorskip("flwr")
    local_records, local_state = _run(tiny_cfg, tmp_path, "fedit", "cuda")
    sim_records, sim_state = _run(tiny_cfg, tmp_path, "fedit", "auto", engine="flower-sim", client_gpus=0.5,
                                  client_cpus=1.0, threads=1)
    for c, g in zip(sorted(local_records, key=lambda r: (r["round"], r["client"])),
                    sorted(sim_records, key=lambda r: (r["round"], r["client"]))):
        assert g["train_loss"] == pytest.approx(c["train_loss"], rel=BF16_RTOL, abs=BF16_ATOL)
    _close(local_state, sim_state, "server_state")
