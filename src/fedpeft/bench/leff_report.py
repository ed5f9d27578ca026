"""results.md of a LEFF suite: metric, client memory, client compute and bytes per method, next to the
LEFF paper's Table 1 (DeBERTaV3-Base, GLUE, α = 0.05) and Table 5 (peak client memory) figures.
A generation suite (E2E) gets the five E2E metrics of the last round instead, read from each run's
training_history.json (means over the clients' test MRs, all scored with the same global model),
next to Table 1's GPT-2 E2E row.

Client memory is fedpeft's analytic figure (float32 parameters held + gradients and AdamW moments of
the trained ones; activations excluded), not a measured peak; the paper's is measured GPU memory.
"""

from __future__ import annotations

import math
from typing import Any

from fedpeft.bench.tables import mean_std, task_columns

# The LEFF paper's Table 1 (×100) and Table 5 (DeBERTaV3-Base peak client memory, GB), as
# docs/methods/leff.md#reference-results lists them.
PAPER_TABLE1 = {
    "fedavg-full": {"cola": 28.36, "sst2": 81.08, "mrpc": 71.45, "stsb": 87.07, "qnli": 65.26, "rte": 52.17},
    "fedbitfit": {"cola": 4.65, "sst2": 70.30, "mrpc": 69.49, "stsb": 71.64, "qnli": 59.82, "rte": 45.90},
    "fedlora": {"cola": 6.31, "sst2": 70.49, "mrpc": 68.38, "stsb": 78.40, "qnli": 58.97, "rte": 43.07},
    "slora": {"cola": 21.82, "sst2": 72.44, "mrpc": 69.00, "stsb": 80.35, "qnli": 60.68, "rte": 50.97},
    "leff": {"cola": 27.74, "sst2": 79.30, "mrpc": 70.00, "stsb": 85.00, "qnli": 63.24, "rte": 51.89},
}
PAPER_MEMORY_GB = {"fedavg-full": 3.841, "fedlora": 2.644, "fedbitfit": 2.198, "leff": 2.136, "slora": 2.644}


# The LEFF paper's Table 1, GPT-2 Medium on E2E: BLEU, NIST, METEOR, ROUGE-L, CIDEr.
NLG_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
PAPER_E2E = {
    "fedavg-full": (0.5878, 8.0645, 0.4123, 0.6405, 1.7848),
    "fedbitfit": (0.5570, 7.3859, 0.3443, 0.5917, 1.4059),
    "fedlora": (0.5402, 7.0344, 0.3625, 0.5857, 1.3712),
    "slora": (0.5700, 7.9592, 0.4001, 0.6243, 1.7322),
    "leff": (0.5799, 8.0296, 0.4064, 0.6346, 1.7521),
}


def nlg_values(row: dict[str, Any]) -> dict[str, float] | None:
    """The last scored round's NLG metrics of the row's run (a generation task), or None."""
    from pathlib import Path

    from fedpeft.bench.runs import read_history
    from fedpeft.data.tasks import TASKS, get_task

    if not row.get("run_dir") or not Path(row["run_dir"], "training_history.json").is_file():
        return None
    rounds = [r for r in read_history(Path(row["run_dir"]))["rounds"] if r.get("overall") is not None]
    if not rounds:
        return None
    for task, metrics in rounds[-1].get("per_task_metrics", {}).items():
        if task in TASKS and get_task(task).is_generation and all(m in metrics for m in NLG_METRICS):
            return {m: metrics[m] for m in NLG_METRICS}
    return None


def leff_nlg_markdown(rows: list[dict[str, Any]], values: list[dict[str, float]], *, title: str,
                      description: str = "") -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    groups = {lbl: [(r, v) for r, v in zip(rows, values) if r["label"] == lbl] for lbl in labels}

    def stat(lbl, col):
        return mean_std([v[col] for _, v in groups[lbl]] if col in NLG_METRICS or col == "avg"
                        else [r[col] for r, _ in groups[lbl] if r.get(col) is not None])

    for v in values:
        v["avg"] = sum(v[m] for m in NLG_METRICS) / len(NLG_METRICS)
    mem = {lbl: stat(lbl, "peak_client_memory_bytes")[0] for lbl in labels}

    def rel(lbl, ref):
        if not mem.get(ref) or mem.get(lbl) is None or math.isnan(mem[lbl]) or math.isnan(mem[ref]):
            return "—"
        return f"{(mem[lbl] / mem[ref] - 1) * 100:+.0f} %"

    lines = [f"# {title}", ""] + ([description, ""] if description else []) + [
        "E2E metrics of the global model after the last round (BLEU, METEOR, ROUGE-L in [0, 1]; NIST and "
        "CIDEr raw; Avg = mean of the five, as in the paper), each the mean over the clients' test MRs, mean ± "
        "sample std over seeds. Paper: Table 1, GPT-2 Medium on the full E2E set, 20 rounds. Client memory: "
        "fedpeft's analytic float32 figure (parameters + gradients and AdamW moments of the trained ones; "
        "activations excluded). Bytes: per client per round, steady state.", "",
        "| label | BLEU | NIST | METEOR | ROUGE-L | CIDEr | Avg | paper BLEU/NIST/METEOR/ROUGE-L/CIDEr | client memory MB "
        "| vs fedavg-full | vs fedlora | client compute s/round | KB up | KB down | s/round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lbl in labels:
        method = groups[lbl][0][0]["method"]
        paper = PAPER_E2E.get(method)
        lines.append(
            f"| {lbl} | " + " | ".join(_fmt(stat(lbl, m), 1, 4) for m in (*NLG_METRICS, "avg"))
            + " | " + ("/".join(f"{x:.4f}" for x in paper) if paper else "—")
            + f" | {_fmt(stat(lbl, 'peak_client_memory_bytes'), 1e-6, 1)} | {rel(lbl, 'fedavg-full')} | "
            f"{rel(lbl, 'fedlora')} | {_fmt(stat(lbl, 'client_compute_seconds'), 1, 2)} | "
            f"{_fmt(stat(lbl, 'steady_bytes_up_per_client_round'), 1e-3, 1)} | "
            f"{_fmt(stat(lbl, 'steady_bytes_down_per_client_round'), 1e-3, 1)} | {_fmt(stat(lbl, 'seconds_per_round'), 1, 1)} |")
    order = sorted(labels, key=lambda lbl: -stat(lbl, "avg")[0])
    lines += ["", "Ranking by Avg (mean): " + " > ".join(order),
              "Paper (Table 1, E2E): FedAvg ≥ LEFF > SLoRA > FedBitFit > FedLoRA by Avg."]
    return "\n".join(lines) + "\n"


def _fmt(ms, scale=1.0, digits=2) -> str:
    m, s = ms
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "—"
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if s is not None else "")


# The references of a LEFF suite's paired comparisons (bench/stats.py): LEFF itself, for its variants
# (importance against uniform sampling, budgets, r_c = 1), and FedAvg-full, the paper's upper line.
LEFF_REFERENCES = ("leff", "fedavg-full")


def leff_markdown(rows: list[dict[str, Any]], *, title: str, description: str = "", paired: list[str] = (),
                  values: list[dict[str, float] | None] | None = None) -> str:
    """results.md of a LEFF suite; `paired`: the paired-comparison section (bench/stats.py markdown_lines),
    for classification suites (generation runs save no predictions); `values`: the rows' nlg_values, when
    the caller has read them already."""
    from fedpeft.bench.leff_sampling import sampling_lines

    values = [nlg_values(r) for r in rows] if values is None else values
    if rows and all(v is not None for v in values):
        return leff_nlg_markdown(rows, values, title=title, description=description) + "\n".join(sampling_lines(rows))
    tasks = [t for t in task_columns(rows) if t not in ("peak_client_memory_bytes", "client_compute_seconds")]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    groups = {lbl: [r for r in rows if r["label"] == lbl] for lbl in labels}

    def stat(lbl, col):
        return mean_std([r[col] for r in groups[lbl] if r.get(col) is not None])

    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += [
        "Metric × 100 at the last round (global model on the validation clients), mean ± sample std over "
        "seeds. Client memory: fedpeft's analytic float32 figure (parameters held + gradients and AdamW "
        "moments of the trained ones; activations excluded), the largest over clients and rounds. Client "
        "compute: seconds of forward + backward + step per client per round. Bytes: per client per round in "
        "the steady state (uploads of every round; broadcasts that rounds 2..T trained from).", "",
        "| label | " + " | ".join(tasks) + " | paper " + "/".join(tasks) + " | client memory MB | vs fedavg-full "
        "| vs fedlora | paper GB | client compute s/round | KB up | KB down | s/round |",
        "|---|" + "---|" * len(tasks) + "---|---|---|---|---|---|---|---|---|",
    ]
    mem = {lbl: stat(lbl, "peak_client_memory_bytes")[0] for lbl in labels}

    def rel(lbl, ref):
        if ref not in mem or not mem.get(ref) or mem.get(lbl) is None or math.isnan(mem[lbl]) or math.isnan(mem[ref]):
            return "—"
        return f"{(mem[lbl] / mem[ref] - 1) * 100:+.0f} %"

    for lbl in labels:
        method = groups[lbl][0]["method"]
        paper = PAPER_TABLE1.get(method, {})
        lines.append(
            f"| {lbl} | " + " | ".join(_fmt(stat(lbl, t), 100) for t in tasks)
            + " | " + "/".join(f"{paper[t]:.2f}" if t in paper else "—" for t in tasks)
            + f" | {_fmt(stat(lbl, 'peak_client_memory_bytes'), 1e-6, 1)} | {rel(lbl, 'fedavg-full')} | "
            f"{rel(lbl, 'fedlora')} | {PAPER_MEMORY_GB.get(method, '—')} | "
            f"{_fmt(stat(lbl, 'client_compute_seconds'), 1, 2)} | "
            f"{_fmt(stat(lbl, 'steady_bytes_up_per_client_round'), 1e-3, 1)} | "
            f"{_fmt(stat(lbl, 'steady_bytes_down_per_client_round'), 1e-3, 1)} | {_fmt(stat(lbl, 'seconds_per_round'), 1, 1)} |")
    order = sorted(labels, key=lambda lbl: -stat(lbl, "overall")[0])
    lines += ["", "Ranking by metric (mean): " + " > ".join(order),
              "Paper (Table 1, α = 0.05): FedAvg ≥ LEFF > SLoRA > FedLoRA ≈ FedBitFit; Table 5 memory, "
              "DeBERTaV3-Base: LEFF −44 % vs FedAvg, −19 % vs FedLoRA."]
    lines += list(paired) + sampling_lines(rows)
    return "\n".join(lines) + "\n"
