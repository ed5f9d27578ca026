"""The model card `fedpeft export` writes (README.md in the export folder): what was trained, on which
base model and data, for how many rounds, how well it scored at the end, and how to load each file.

The metrics are those of the last scored round (the headline figure, never the best round: picking it
would select on test data), from the run's training_history.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig

# Hub ids of the packaged models, for the card's `base_model` (a local cache path says nothing to a reader).
PACKAGED_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def model_card(run_dir: Path, cfg: RunConfig, manifest: dict[str, Any]) -> str:
    from fedpeft.methods import METHODS

    history = _history(run_dir)
    hub_id = PACKAGED_HUB_IDS.get(cfg.model_name) or (cfg.model_name if "/" in cfg.model_name
                                                        and not Path(cfg.model_name).exists() else None)
    front = ["---", "library_name: peft", "tags: [fedpeft, federated-learning, lora, " + cfg.method + "]"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front.append("---")
    method = METHODS[cfg.method]
    rounds_done = manifest["round"]
    lines = front + [
        "", f"# {cfg.method} on {cfg.model_name}", "",
        f"Federated parameter-efficient fine-tuning with fedpeft. **{cfg.method}**: {method.summary}. "
        f"{len(cfg.tasks)} clients; exported after round {rounds_done} of {cfg.global_rounds}"
        f"{'' if rounds_done >= cfg.global_rounds else ' (the run stopped early)'}.", "",
        "## Base model", "", f"- `{cfg.model_name}`" + (f" (`{hub_id}`)" if hub_id and hub_id != cfg.model_name else "")
        + f"; LoRA rank {cfg.rank}, alpha {cfg.lora_alpha:g} on {', '.join(cfg.target_modules) or 'no modules'}", "",
        "## Data", "", *_data_lines(cfg), "",
        "## Training", "",
        f"- {_n(cfg.global_rounds, 'round')}" + (f" ({cfg.warmup_rounds} of them warmup)" if cfg.has_warmup else "")
        + f", {_n(cfg.local_epochs, 'local epoch')} per round, learning rate {cfg.lr:g}, batch size {cfg.batch_size}, "
        f"seed {cfg.seed}, engine {cfg.engine}", "",
        "## Final metrics", "", *_metric_lines(history), "",
        "## Files", "", "| file | clients | how it is used |", "|---|---|---|",
    ]
    for name, entry in manifest["adapters"].items():
        clients = entry.get("clients", "")
        who = "all" if clients == "all" else ", ".join(map(str, clients)) if clients else "none"
        lines.append(f"| `{entry['path']}/` | {who} | {entry.get('use', '')} |")
        if entry.get("routers"):
            lines.append(f"| `{entry['routers']}` | {who} | the routers of {name}'s cluster |")
    if manifest.get("heads"):
        lines.append("| `heads/client_<i>.safetensors` | each | the client's classification head |")
    if manifest.get("merged"):
        lines.append(f"| `{manifest['merged']['path']}/` | all | the base model with "
                     f"`{manifest['merged']['adapter']}` merged into its weights |")
    lines += ["", "`manifest.json` lists the same, with which client uses which adapter.", "",
              "## Use", "", "```python", *_usage(cfg, manifest), "```", ""]
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _history(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "training_history.json").read_text())
    except (OSError, ValueError):
        return None


def _data_lines(cfg: RunConfig) -> list[str]:
    counts = {t: cfg.tasks.count(t) for t in dict.fromkeys(cfg.tasks)}
    lines = ["- tasks (clients): " + ", ".join(f"{t} × {n}" for t, n in counts.items())]
    if cfg.dataset:
        what = cfg.label_kind + (f" ({', '.join(cfg.label_names)})" if cfg.label_kind == "classification" else "")
        cols = (f"prompt `{cfg.prompt_column}` → target `{cfg.target_column}`" if cfg.label_kind == "generation"
                else f"text {', '.join(f'`{c}`' for c in cfg.text_columns)}, label `{cfg.label_column}`")
        lines.append(f"- {cfg.dataset_name}: `{Path(cfg.dataset).name}`, {what}; {cols}; test examples from "
                     + (f"`{Path(cfg.test_file).name}`" if cfg.test_file else f"a {cfg.test_fraction:.0%} hold-out")
                     + (f"; one client per value of `{cfg.client_column}`" if cfg.client_column else ""))
    part = ("one client per value of the client column" if cfg.client_column else
            f"`{cfg.partition}`" + (f" (alpha {cfg.alpha:g})" if cfg.partition in ("dirichlet", "dirichlet_cut") else "")
            + (f", label split `{cfg.label_split}`" if cfg.partition == "task" else ""))
    lines.append(f"- partition {part}; up to {cfg.train_samples} training and {cfg.test_samples} test examples per "
                 "client" + (f" ({', '.join(cfg.task_samples)})" if cfg.task_samples else ""))
    return lines


def _metric_lines(history: dict | None) -> list[str]:
    rounds = [r for r in (history or {}).get("rounds", []) if r.get("phase") != "warmup" and r.get("overall") is not None]
    if not rounds:
        return ["No round was scored."]
    last = rounds[-1]
    clients: dict[str, int] = {}
    for r in (history or {}).get("records", []):
        if r["round"] == last["round"]:
            clients[r["task"]] = clients.get(r["task"], 0) + 1
    lines = [f"Round {last['round']}, the last one scored; per task the mean over its clients' own test data.", "",
             "| task | clients | metric | value |", "|---|---|---|---|"]
    for task, metrics in last["per_task_metrics"].items():
        for metric, value in metrics.items():
            lines.append(f"| {task} | {clients.get(task, '?')} | {metric} | {value:.4f} |")
    lines += ["", f"Overall (mean of the task means of each task's primary metric): **{last['overall']:.4f}**"]
    return lines


def _usage(cfg: RunConfig, manifest: dict[str, Any]) -> list[str]:
    causal = cfg.head_policy == "none"
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    base = PACKAGED_HUB_IDS.get(cfg.model_name, manifest["base_model"])
    if manifest.get("merged"):
        path = manifest["merged"]["path"]
        if "tokenizer" in manifest["merged"]:  # not saved (a model factory's own tokenizer)
            return [f"from transformers import {auto}", "", f'model = {auto}.from_pretrained("{path}")']
        return [f"from transformers import {auto}, AutoTokenizer", "",
                f'model = {auto}.from_pretrained("{path}")', f'tokenizer = AutoTokenizer.from_pretrained("{path}")']
    first = next(iter(manifest["adapters"].values()))["path"]
    return ["from peft import PeftModel", f"from transformers import {auto}", "",
            f'base = {auto}.from_pretrained("{base}")', f'model = PeftModel.from_pretrained(base, "{first}")']
