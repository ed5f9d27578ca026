"""`fedpeft export RUN_DIR [--merge]`: the trained adapters of a run as standard PEFT LoRA folders, a
model card, and (--merge) the base model with its one adapter folded in.

The run is rebuilt from its saved, resolved config.json (model, quantization, targets, method), its
checkpoint is loaded, and the method writes the adapters its clients actually use (`Algorithm.export`):
FedLEASE one `expert_<j>/` per expert with `routers_cluster_<j>.safetensors` beside them, FedIT and
the methods built on it `global_lora/`, IFCA `cluster_<k>/`, FedSA-LoRA one `client_<i>/` per client
(the averaged A with that client's B), FedDPA `global_lora/` and every client's `client_<i>_local/`;
every folder loads with `peft.PeftModel.from_pretrained`. Per-client parts come from the clients'
stores, which the run folder holds for the local engine (the checkpoint) and flower-sim
(client_state/); a deployed Flower run keeps them on its nodes. Client heads go to
`heads/client_<i>.safetensors`. `manifest.json` says which client uses which adapter and how.

`--merge` (methods whose clients all use one adapter alone: FedIT, FFA-LoRA, FedProx, FedLoRA, SLoRA)
folds that adapter into the base weights and saves `merged/`, a plain transformers folder with the
tokenizer (AutoModelForCausalLM for a decoder, AutoModel for an encoder, whose heads stay in heads/).
README.md is a model card: method, base model, data, rounds and the final metrics (run/model_card.py).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError
from fedpeft.atomic import atomic_write, atomic_write_json
from fedpeft.hardware import CPU
from fedpeft.records.checkpoint import load_checkpoint
from fedpeft.run.assemble import build_algorithm, settle

log = logging.getLogger("fedpeft")


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, *, merge: bool = False) -> Path:
    from safetensors.torch import save_file

    from fedpeft.models.backbone import resolve_model_path
    from fedpeft.run.model_card import model_card

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FedPeftError(f"{run_dir} is not a fedpeft run folder (no config.json)")
    saved = RunConfig.load(run_dir / "config.json")
    # Export computes nothing: the adapters are written from the checkpoint, on the CPU, whatever device
    # and precision the run trained with (a GPU run exports on a machine without one).
    cfg, backbone = settle(dataclasses.replace(saved, device=CPU, precision="fp32", engine="local", client_gpus=0.0))
    ckpt = load_checkpoint(run_dir)
    algorithm = build_algorithm(cfg, backbone)
    if merge:
        check_mergeable(cfg, algorithm)
    out = Path(out_dir) if out_dir else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    base_path, _ = resolve_model_path(cfg.model_name)
    stores = client_stores(run_dir, ckpt)
    adapters = algorithm.export(ckpt["server_state"], backbone, out, base_path, stores=stores)
    manifest: dict[str, Any] = {"method": cfg.method, "base_model": base_path, "round": ckpt["round"],
                                "adapters": adapters}
    client_to_expert = {str(c): j for c, j in sorted(ckpt["server_state"].get("cluster_of", {}).items())}
    if client_to_expert:
        manifest["client_to_expert"] = client_to_expert
    if not stores:
        manifest["client_stores"] = "not in this run folder (a deployed Flower run keeps them on its nodes)"
    heads = out / "heads"
    for cid, store in sorted(stores.items()):
        if "head" in store:
            heads.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in store["head"].items()}, str(heads / f"client_{cid}.safetensors"))
    if heads.is_dir():
        manifest["heads"] = "heads/client_<i>.safetensors: each client's classification head"
    if merge:
        (name, entry), = adapters.items()
        manifest["merged"] = merge_adapter(backbone, out / entry["path"], out / "merged")
        manifest["merged"]["adapter"] = name
    atomic_write(out / "README.md", model_card(run_dir, cfg, manifest))
    atomic_write_json(out / "manifest.json", manifest)
    log.info("exported %d adapter(s)%s to %s", len(adapters), " and the merged model" if merge else "", out)
    return out


def check_mergeable(cfg: RunConfig, algorithm) -> None:
    """--merge needs one adapter that every client uses alone, on a model loaded in full precision."""
    if not algorithm.exports_one_adapter:
        raise FedPeftError(f"--merge folds one adapter into the base weights, but {cfg.method}'s clients do not all "
                           "use one adapter alone (per-client adapters, clusters, experts or a mixture): export "
                           "without --merge, or merge a run of fedit, ffa-lora, fedprox, fedlora or slora")
    if cfg.quantization != "none":
        raise FedPeftError(f"--merge needs the base weights in full precision; this run loaded the decoder in "
                           f"{cfg.quantization}: export without --merge")


def merge_adapter(backbone, adapter_dir: Path, folder: Path) -> dict[str, Any]:
    """The base model with the PEFT adapter in `adapter_dir` folded into its weights, saved with the
    tokenizer as a plain transformers folder; the manifest's entry for it."""
    import torch
    from peft import PeftModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = PeftModel.from_pretrained(copy.deepcopy(backbone.model), str(adapter_dir))
    with torch.no_grad():
        merged = model.merge_and_unload()
    merged.save_pretrained(str(folder))
    entry: dict[str, Any] = {"path": folder.name, "loads_with": "AutoModelForCausalLM" if backbone.is_causal
                             else "AutoModel (the encoder; classification heads are in heads/)"}
    if callable(getattr(backbone.tokenizer, "save_pretrained", None)):
        backbone.tokenizer.save_pretrained(str(folder))
    else:
        entry["tokenizer"] = "not saved: the model factory's tokenizer has no save_pretrained"
    return entry


def client_stores(run_dir: Path, ckpt: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The clients' stores at the checkpoint's round: the local engine's checkpoint holds them (or,
    with --client-store disk, its client_stores/ files); a flower-sim run's are the client_state/
    files of that round. Empty when the run folder has none."""
    if ckpt.get("client_stores"):
        return {int(c): s for c, s in ckpt["client_stores"].items()}
    if (run_dir / "client_stores").is_dir():  # --client-store disk: one file per client
        from fedpeft.engines.client_stores import stores_as_of

        return stores_as_of(run_dir / "client_stores", ckpt["round"])
    found: dict[int, tuple[int, Path]] = {}
    for path in (run_dir / "client_state").glob("*/client-*-round*.pt"):
        try:
            pid, rnd = int(path.stem.split("-")[1]), int(path.stem.rsplit("round", 1)[1])
        except (IndexError, ValueError):
            continue
        if rnd <= ckpt["round"] and rnd > found.get(pid, (-1, path))[0]:
            found[pid] = (rnd, path)
    if not found:
        return {}
    from fedpeft.engines.flower.records import store_from_bytes

    return {pid: store_from_bytes(path.read_bytes()) for pid, (_, path) in sorted(found.items())}
