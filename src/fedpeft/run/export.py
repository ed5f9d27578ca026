"""`fedpeft export RUN_DIR`: the trained adapters of a run as standard PEFT LoRA folders.

FedLEASE: `export/expert_<j>/` for every expert (loadable with `peft.PeftModel.from_pretrained`),
`export/routers_cluster_<j>.safetensors` beside them (structured keys), and `export/manifest.json`
(which client uses which expert). FedIT-style methods: `export/global_lora/`. Client heads, which
only the in-process engine holds, go to `export/heads/client_<i>.safetensors`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError
from fedpeft.run.checkpoint import load_checkpoint

log = logging.getLogger("fedpeft")


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    from safetensors.torch import save_file

    from fedpeft.models.backbone import load_backbone, resolve_model_path

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FedPeftError(f"{run_dir} is not a fedpeft run folder (no config.json)")
    cfg = RunConfig.load(run_dir / "config.json")
    ckpt = load_checkpoint(run_dir)
    state = ckpt["server_state"]
    out = Path(out_dir) if out_dir else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    from fedpeft.data.tasks import backbone_kind

    backbone = load_backbone(cfg.model_name, kind=backbone_kind(cfg.tasks))  # a decoder for generation runs
    base_path, _ = resolve_model_path(cfg.model_name)
    targets = cfg.target_modules or backbone.default_targets()
    if cfg.method in ("fedlora", "slora") and not cfg.target_modules:  # LoRA on every block linear
        from fedpeft.algorithms.fedlora import block_linears

        targets = block_linears(backbone.model_type)
    manifest = {"method": cfg.method, "base_model": base_path, "round": ckpt["round"], "adapters": {}}

    if "experts" in state:
        import copy

        from fedpeft.models.moe.export import export_expert_as_peft, save_routers
        from fedpeft.models.moe.layer import inject_moe_lora
        from fedpeft.models.moe.state import load_moe_state

        m = state["num_experts"]
        encoder = copy.deepcopy(backbone.model)
        inject_moe_lora(encoder, targets, num_experts=m, own_expert=0, rank=cfg.rank, lora_alpha=cfg.lora_alpha,
                        lora_dropout=cfg.lora_dropout, routing=cfg.routing, top_k=cfg.top_k,
                        renormalize=cfg.renormalize)
        load_moe_state(encoder, state["experts"], strict=True, include_router=False)
        for j in range(m):
            folder = export_expert_as_peft(encoder, j, out / f"expert_{j}", base_path, targets)
            manifest["adapters"][f"expert_{j}"] = {
                "path": folder.name,
                "clients": sorted(c for c, cj in state["cluster_of"].items() if cj == j)}
            if cfg.router_aggregation == "cluster":
                load_moe_state(encoder, state["routers"][j], strict=True, experts=[], include_router=True)
                save_routers(encoder, out / f"routers_cluster_{j}.safetensors")
                manifest["adapters"][f"expert_{j}"]["routers"] = f"routers_cluster_{j}.safetensors"
        manifest["client_to_expert"] = {str(c): j for c, j in sorted(state["cluster_of"].items())}
    elif "lora" in state:
        _export_global_lora(backbone, cfg, targets, state["lora"], out / "global_lora", base_path)
        manifest["adapters"]["global_lora"] = {"path": "global_lora"}
    else:
        raise FedPeftError(f"the checkpoint of {run_dir} holds no adapter to export")

    heads = out / "heads"
    for cid, store in sorted(ckpt["client_stores"].items()):
        if "head" in store:
            heads.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in store["head"].items()}, str(heads / f"client_{cid}.safetensors"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported %d adapter(s) to %s", len(manifest["adapters"]), out)
    return out


def _export_global_lora(backbone, cfg, targets, lora_state, folder: Path, base_path: str) -> None:
    import copy

    from fedpeft.models.adapters import inject_lora, lora_sites, set_lora_state

    rank = next(v for k, v in lora_state.items() if k.endswith(".A")).shape[0]
    model = inject_lora(copy.deepcopy(backbone.model), rank=rank, alpha=cfg.lora_alpha,
                        dropout=cfg.lora_dropout, targets=targets)
    set_lora_state(lora_sites(model), lora_state)
    model.peft_config["default"].base_model_name_or_path = base_path
    with torch.no_grad():
        model.save_pretrained(str(folder))
