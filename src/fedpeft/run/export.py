"""`fedpeft export RUN_DIR`: the trained adapters of a run as standard PEFT LoRA folders.

The run is rebuilt from its saved, resolved config.json (model, quantization, targets, method), its
checkpoint is loaded, and the method writes its adapters (`Algorithm.export`): FedLEASE one
`expert_<j>/` per expert with `routers_cluster_<j>.safetensors` beside them, the FedIT family
`global_lora/`; every folder loads with `peft.PeftModel.from_pretrained`. Client heads, which only
the in-process engine holds, go to `heads/client_<i>.safetensors`; `manifest.json` says which client
uses which adapter.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError
from fedpeft.atomic import atomic_write_json
from fedpeft.hardware import CPU
from fedpeft.records.checkpoint import load_checkpoint
from fedpeft.run.assemble import build_algorithm, settle

log = logging.getLogger("fedpeft")


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    from safetensors.torch import save_file

    from fedpeft.models.backbone import resolve_model_path

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FedPeftError(f"{run_dir} is not a fedpeft run folder (no config.json)")
    saved = RunConfig.load(run_dir / "config.json")
    # Export computes nothing: the adapters are written from the checkpoint, on the CPU, whatever device
    # and precision the run trained with (a GPU run exports on a machine without one).
    cfg, backbone = settle(dataclasses.replace(saved, device=CPU, precision="fp32", engine="local", client_gpus=0.0))
    ckpt = load_checkpoint(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    algorithm = build_algorithm(cfg, backbone)
    base_path, _ = resolve_model_path(cfg.model_name)
    adapters = algorithm.export(ckpt["server_state"], backbone, out, base_path)
    manifest = {"method": cfg.method, "base_model": base_path, "round": ckpt["round"], "adapters": adapters}
    client_to_expert = {str(c): j for c, j in sorted(ckpt["server_state"].get("cluster_of", {}).items())}
    if client_to_expert:
        manifest["client_to_expert"] = client_to_expert
    heads = out / "heads"
    for cid, store in sorted(ckpt["client_stores"].items()):
        if "head" in store:
            heads.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in store["head"].items()}, str(heads / f"client_{cid}.safetensors"))
    atomic_write_json(out / "manifest.json", manifest)
    log.info("exported %d adapter(s) to %s", len(manifest["adapters"]), out)
    return out
