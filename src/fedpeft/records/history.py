"""The run folder: log, config, every metric of every client every round, summary, plot.

Files: config.json, training_log.txt, training_history.json, metrics.csv, summary.md,
learning_curves.png (and whatever a method adds, e.g. FedLEASE's client maps).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fedpeft.atomic import atomic_write, atomic_write_json
from fedpeft.errors import FedPeftError

log = logging.getLogger("fedpeft")

RECORD_ORDER = ["round", "phase", "client", "task", "accuracy", "f1", "matthews", "pearson", "spearman",
                "loss", "train_loss", "bytes_up", "bytes_down", "fit_seconds", "participated"]


def setup_logging(run_dir: Path | None, quiet: bool) -> None:
    """Console: INFO (WARNING if quiet) on stderr; file: everything to training_log.txt."""
    root = logging.getLogger("fedpeft")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_fedpeft", False):
            root.removeHandler(h)
            h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    console._fedpeft = True
    root.addHandler(console)
    if run_dir is not None:
        fh = logging.FileHandler(run_dir / "training_log.txt", mode="a")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        fh._fedpeft = True
        root.addHandler(fh)
    root.propagate = False


class RunHistory:
    def __init__(self, run_dir: Path, meta: dict[str, Any]):
        self.run_dir = run_dir
        self.meta = meta
        self.records: list[dict[str, Any]] = []  # one per client per round
        self.rounds: list[dict[str, Any]] = []  # one per round: summary, comm, timings
        self.events: list[dict[str, Any]] = []  # missing clients, rejected replies, clustering...
        self.listeners: list[Any] = []  # experiment trackers (records/tracking.py): on_round, on_finish

    # ------------------------------------------------------------ recording
    def add_round(self, rnd: int, phase: str, records: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        from fedpeft.data.tasks import get_task
        from fedpeft.metrics import summarize

        self.records = [r for r in self.records if r["round"] != rnd] + records
        # Scored = carries its task's primary metric (a client evaluated before it could be scored,
        # e.g. a FedLEASE late joiner, carries none).
        scored = [r for r in records if get_task(r["task"]).primary_metric in r]
        summary = summarize(scored) if scored else {"per_task": {}, "overall": None, "client_macro": None}
        entry = {"round": rnd, "phase": phase, "overall": summary["overall"],
                 "client_macro": summary["client_macro"], "per_task_metrics": summary["per_task"],
                 "per_task": {t: _primary(t, m) for t, m in summary["per_task"].items()},
                 "bytes_up": sum(r.get("bytes_up", 0) for r in records),
                 "bytes_down": sum(r.get("bytes_down", 0) for r in records), **extra}
        self.rounds = [r for r in self.rounds if r["round"] != rnd] + [entry]
        self._notify("on_round", entry)
        return entry

    def _notify(self, hook: str, *args: Any) -> None:
        """Tell the listeners; one that fails is dropped with a warning: tracking never loses a run."""
        for listener in list(self.listeners):
            try:
                getattr(listener, hook)(*args)
            except Exception as exc:
                log.warning("%s stopped tracking this run: %s", type(listener).__name__, exc)
                self.listeners.remove(listener)

    def add_event(self, **event: Any) -> None:
        self.events.append({"time": time.time(), **event})

    def truncate(self, rnd: int) -> None:
        """Forget the rounds, records and events after round `rnd`: a resumed run redoes those rounds
        from the checkpoint of round `rnd`, so what a killed process recorded of them (the history is
        written before the checkpoint) must not count twice. Events name the round they belong to
        (a round's broadcast events name the next round, and are made again when it is configured)."""
        self.rounds = [r for r in self.rounds if r["round"] <= rnd]
        self.records = [r for r in self.records if r["round"] <= rnd]
        self.events = [e for e in self.events if e.get("round", 0) <= rnd]

    # ------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "rounds": self.rounds, "records": self.records, "events": self.events}

    @classmethod
    def open(cls, run_dir: Path, meta: dict[str, Any], *, resume: bool) -> "RunHistory":
        """The run's history: continued from training_history.json when resuming, else a new one."""
        path = Path(run_dir) / "training_history.json"
        if resume and path.exists():
            return read_history(run_dir)
        return cls(Path(run_dir), meta)

    @classmethod
    def from_json(cls, run_dir: Path, data: dict[str, Any]) -> "RunHistory":
        h = cls(run_dir, data.get("meta", {}))
        h.rounds, h.records, h.events = data["rounds"], data["records"], data.get("events", [])
        return h

    def save(self) -> None:
        atomic_write_json(self.run_dir / "training_history.json", self.to_json(), indent=1)
        keys = [k for k in RECORD_ORDER if any(k in r for r in self.records)]
        # Per-layer detail ("name/part" keys) stays in the JSON; the CSV keeps one column per metric.
        keys += sorted({k for r in self.records for k in r if "/" not in k} - set(keys))
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        for r in sorted(self.records, key=lambda r: (r["round"], r["client"])):
            writer.writerow({k: _fmt(r.get(k)) for k in keys})
        atomic_write(self.run_dir / "metrics.csv", buf.getvalue())

    def headline(self) -> dict[str, Any] | None:
        """The last scored non-warmup round: the headline figure is the last round, since picking the best
        one would select on test data (docs/methods/fedlease.md#headline-figure)."""
        scored = [r for r in self.rounds if r["phase"] != "warmup" and r["overall"] is not None]
        return scored[-1] if scored else None

    def best(self) -> dict[str, Any] | None:
        scored = [r for r in self.rounds if r["phase"] != "warmup" and r["overall"] is not None]
        return max(scored, key=lambda r: r["overall"]) if scored else None

    def summary_markdown(self) -> str:
        last, best = self.headline(), self.best()
        if last is None:
            return f"# Summary\n\nNo round was scored.\n\n{self._faults_line()}\n"
        tasks = list(last["per_task_metrics"])
        lines = [f"# Summary: {self.meta.get('method', '?')} on {self.meta.get('model_name', '?')}", "",
                 f"Last round (r = {last['round']}), the headline figure. Per-task metrics are means over that task's clients; "
                 "'overall' is the mean of the task means of each task's primary metric.", "",
                 "| task | clients | " + " | ".join(["metric", "value"]) + " |", "|---|---|---|---|"]
        clients_per_task = {}
        for r in self.records:
            if r["round"] == last["round"]:
                clients_per_task[r["task"]] = clients_per_task.get(r["task"], 0) + 1
        for t in tasks:
            for m, v in last["per_task_metrics"][t].items():
                lines.append(f"| {t} | {clients_per_task.get(t, '?')} | {m} | {v:.4f} |")
        lines += ["", f"**Overall (mean of task means): {last['overall']:.4f}**  ",
                  f"Client-macro mean: {last['client_macro']:.4f}  "]
        if best and best["round"] != last["round"]:
            lines.append(f"Best round (r = {best['round']}): {best['overall']:.4f}  ")
        up = sum(r["bytes_up"] for r in self.rounds)
        down = sum(r["bytes_down"] for r in self.rounds)
        lines += ["", f"Communication, all clients, all rounds: {up / 1e6:.3f} MB up, {down / 1e6:.3f} MB down.",
                  self._faults_line(),
                  # round 0 is the initial broadcast, not a training round
                  f"Wall time: {sum(r.get('seconds', 0) for r in self.rounds):.1f} s over "
                  f"{sum(1 for r in self.rounds if r.get('round', 0) > 0)} rounds."]
        dp = next((r for r in sorted(self.rounds, key=lambda r: -r["round"]) if "dp_epsilon" in r), None)
        if dp:  # --dp: the privacy spent by the end (algorithms/privacy.py)
            lines += ["", f"Privacy: user-level ({dp['dp_epsilon']:.4g}, {dp['dp_delta']:g})-DP after round {dp['round']} "
                          f"({dp['dp_mode']} DP: updates clipped to C = {dp['dp_clip']:g}, noise sigma = {dp['dp_noise']:.4g}; "
                          "RDP accountant, one client's data replaced)."]
        return "\n".join(lines) + "\n"

    def _faults_line(self) -> str:
        """Rejected updates (rolled back on their client, left out of the aggregation) and missing replies."""
        rejected = [e for e in self.events if e.get("kind") == "rejected_reply"]
        missing = sum(len(e.get("clients", [])) for e in self.events if e.get("kind") == "missing_clients")
        text = f"Rejected updates: {len(rejected)}"
        if rejected:
            shown = "; ".join(f"round {e.get('round')} client {e.get('client')}: {e.get('reason')}" for e in rejected[:5])
            text += f" ({shown}{'; ...' if len(rejected) > 5 else ''}; see the rejected_reply events)"
        return text + f". Missing replies: {missing}."

    def finish(self) -> None:
        self.save()
        atomic_write(self.run_dir / "summary.md", self.summary_markdown())
        try:
            from fedpeft.records.plots import plot_learning_curves

            plot_learning_curves(self.to_json(), self.run_dir / "learning_curves.png")
        except Exception as exc:  # a plot must never lose a finished run
            log.warning("could not draw the learning curves: %s", exc)
        self._notify("on_finish", self.run_dir)


HISTORY = "training_history.json"


def read_history(run_dir: str | Path) -> RunHistory:
    """A run folder's training_history.json, checked: one FedPeftError for a folder that is not a
    run, or a history that is unreadable or not what fedpeft writes (damaged or edited)."""
    run_dir = Path(run_dir)
    path = run_dir / HISTORY
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FedPeftError(f"{run_dir} is not a fedpeft run folder: {path.name} {what}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError, RecursionError) as exc:
        raise FedPeftError(f"{path} is damaged ({' '.join(str(exc).split())}): restore it from a backup, "
                           "or start the run again with --overwrite") from None
    problem = _history_problem(data)
    if problem:
        raise FedPeftError(f"{path} is not a fedpeft training history ({problem}): restore it from a backup, "
                           "or start the run again with --overwrite")
    return RunHistory.from_json(run_dir, data)


def _history_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not an object"
    for key in ("rounds", "records"):
        if not isinstance(data.get(key), list):
            return f"no {key!r} list"
    if not isinstance(data.get("events", []), list) or not isinstance(data.get("meta", {}), dict):
        return "'events' is not a list or 'meta' not an object"
    for key, needs in (("rounds", {"round": int, "phase": str}),
                       ("records", {"round": int, "client": int, "task": str})):
        for i, item in enumerate(data[key]):
            if not isinstance(item, dict):
                return f"{key}[{i}] is not an object"
            for field, typ in needs.items():
                if not isinstance(item.get(field), typ) or isinstance(item.get(field), bool):
                    return f"{key}[{i}] has no valid {field!r}"
    for i, event in enumerate(data.get("events", [])):
        if not isinstance(event, dict):
            return f"events[{i}] is not an object"
    return None


def _primary(task: str, metrics: dict[str, float]) -> float | None:
    from fedpeft.data.tasks import get_task

    return metrics.get(get_task(task).primary_metric)


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v
