"""`fedpeft export`: the adapters the clients actually use (FedSA-LoRA's Ā with each client's B, FedDPA's
local LoRAs), --merge for a single-adapter method (a plain transformers folder with its tokenizer that
computes what base + adapter compute), and the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedpeft.errors import FedPeftError


def _adapter_state(backbone, folder):
    """The structured LoRA state (layer.i.module.A/B) of a PEFT folder, loaded the way a user loads it."""
    import copy

    from peft import PeftModel

    from fedpeft.models.adapters import get_lora_state, lora_sites

    return get_lora_state(lora_sites(PeftModel.from_pretrained(copy.deepcopy(backbone.model), str(folder))))


def _demo_run(tiny_cfg, tiny_backbone, method, **kw):
    from fedpeft.run import run

    return run(tiny_cfg(method=method, model_name="tiny_models:tiny_bert", **kw), backbone=tiny_backbone)


def test_fedsa_lora_exports_each_clients_a_and_b_not_the_zero_b_global(tiny_cfg, tiny_backbone, capsys):
    from fedpeft.cli import main
    from fedpeft.records.checkpoint import load_checkpoint
    from fedpeft.run.export import export_run

    result = _demo_run(tiny_cfg, tiny_backbone, "fedsa-lora")
    out = export_run(result.run_dir)
    ckpt = load_checkpoint(result.run_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["adapters"]) == [f"client_{i}" for i in range(4)] and not (out / "global_lora").exists()
    for cid in range(4):
        got = _adapter_state(tiny_backbone, out / f"client_{cid}")
        own = ckpt["client_stores"][cid]["lora"]
        for key, value in got.items():
            want = own[key] if key.endswith(".B") else ckpt["server_state"]["lora"][key]
            assert torch.equal(value, want), key
        assert any(v.abs().sum() > 0 for k, v in got.items() if k.endswith(".B"))  # a trained B, not the init 0
        assert manifest["adapters"][f"client_{cid}"]["clients"] == [cid]
    card = (out / "README.md").read_text()
    assert "# fedsa-lora on tiny_models:tiny_bert" in card and "| `client_2/` | 2 |" in card
    assert "demo-sentiment × 2, demo-topic × 2" in card and "| demo-topic | 2 | accuracy |" in card
    # one adapter per client: nothing to merge, one line, exit 2
    assert main(["export", str(result.run_dir), "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpeft: error: --merge folds one adapter") and len(err.strip().splitlines()) == 1
    # without the clients' stores (a deployed Flower run) there is nothing FedSA-LoRA's clients use
    from fedpeft.records.checkpoint import save_checkpoint

    save_checkpoint(result.run_dir, ckpt["round"], ckpt["server_state"], {})
    with pytest.raises(FedPeftError, match="no client stores"):
        export_run(result.run_dir, result.run_dir / "again")


def test_feddpa_exports_the_global_and_every_local_lora(tiny_cfg, tiny_backbone):
    from fedpeft.records.checkpoint import load_checkpoint
    from fedpeft.run.export import export_run

    result = _demo_run(tiny_cfg, tiny_backbone, "feddpa", global_rounds=1)
    out = export_run(result.run_dir)
    ckpt = load_checkpoint(result.run_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["adapters"]) == ["client_0_local", "client_1_local", "client_2_local", "client_3_local",
                                            "global_lora"]
    assert "0.5 × global + 0.5 × the client's local LoRA" in manifest["adapters"]["global_lora"]["use"]
    local = _adapter_state(tiny_backbone, out / "client_1_local")
    assert all(torch.equal(v, ckpt["client_stores"][1]["local_lora"][k]) for k, v in local.items())
    glob = _adapter_state(tiny_backbone, out / "global_lora")
    assert all(torch.equal(v, ckpt["server_state"]["lora"][k]) for k, v in glob.items())


def test_merge_saves_a_transformers_decoder_that_computes_base_plus_adapter(tmp_path, monkeypatch):
    from decoder_helpers import examples, register
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpeft.config import RunConfig
    from fedpeft.data.partition.client import ClientData
    from fedpeft.run import federation as common
    from fedpeft.run import run
    from fedpeft.run.export import export_run

    register(monkeypatch)
    monkeypatch.setattr(common, "build_federation", lambda tasks, **kw: [
        ClientData(i, t, examples(t, 8, i), examples(t, 4, 50 + i), [], [], np.zeros(0)) for i, t in enumerate(tasks)])
    cfg = RunConfig(method="fedit", tasks=["tiny-copy", "tiny-reverse"], model_name="tiny_models:tiny_llama",
                    global_rounds=1, local_epochs=2, batch_size=4, lr=5e-2, rank=2, max_length=48, max_new_tokens=4,
                    quiet=True, output_dir=str(tmp_path / "run"))
    result = run(cfg)
    out = export_run(result.run_dir, merge=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merged"] == {"path": "merged", "loads_with": "AutoModelForCausalLM", "adapter": "global_lora"}
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    from tiny_models import tiny_llama

    base = tiny_llama().model
    with_adapter = PeftModel.from_pretrained(base, str(out / "global_lora")).eval()
    ids = torch.tensor([tokenizer("copy: red sun =>")["input_ids"]])
    with torch.no_grad():
        want = with_adapter(input_ids=ids).logits
        got = merged.eval()(input_ids=ids).logits
        plain = tiny_llama().model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-4)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft") and "exported after round 1 of 1" in card
    assert 'AutoModelForCausalLM.from_pretrained("merged")' in card and "| `merged/` | all |" in card
    assert "## Final metrics" in card and "| tiny-copy | 1 | token_f1 |" in card


def test_client_stores_of_a_flower_sim_run_come_from_client_state(tmp_path):
    from fedpeft.engines.flower.records import store_to_bytes
    from fedpeft.run.export import client_stores

    folder = tmp_path / "client_state" / "key"
    folder.mkdir(parents=True)
    for pid, rnd in ((0, 1), (0, 2), (1, 2), (1, 3)):
        (folder / f"client-{pid}-round{rnd}.pt").write_bytes(store_to_bytes({"round": torch.tensor(rnd)}))
    stores = client_stores(tmp_path, {"round": 2, "client_stores": {}})
    assert {pid: int(s["round"]) for pid, s in stores.items()} == {0: 2, 1: 2}  # the checkpoint's round, not later
    assert client_stores(tmp_path / "none", {"round": 2, "client_stores": {}}) == {}
