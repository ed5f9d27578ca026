"""A bench matrix's evidence, small enough to commit or copy: `fedpeft bench --archive DIR`.

A 3-seed matrix in the papers' regime takes longer than one machine may be lent for, and the
paired comparisons need every run's per-example predictions, not its table row. The archive keeps,
for every finished run of the plan, the records the report, the paired bootstrap and the router
and clustering studies read (EVIDENCE), in the bench's own layout DIR/SUITE/LABEL-seedK/, and
leaves out the model state (checkpoint.pt, client stores), figures and tracking stores. A finished
run counts by the same files there, so `fedpeft bench --out DIR` on another machine reports the
archived runs, pairs new runs with them and trains only what is missing (its config.json is
checked against the suite as any reused folder is).

Machine-local paths (the data root, the run folder) are written as DATA_ROOT and RUN_DIR, so an
archive names no one's file system. An archive never replaces a different run: when DIR already
holds a file of LABEL-seedK with other content, nothing is written and the bench says which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from fedpeft.atomic import atomic_write
from fedpeft.errors import FedPeftError

# What a finished run's evidence is (docs/running.md#what-a-run-writes): the settings, the summary,
# the history with every client's metrics and the router logs, the test predictions the paired
# bootstrap resamples, the log, the per-client table and FedLEASE's clustering records.
EVIDENCE = ("config.json", "summary.md", "training_history.json", "predictions.npz", "training_log.txt",
            "metrics.csv", "clustering.json")
EVIDENCE_PATTERNS = ("lora_client_map_round_*.json",)
TEXT_SUFFIXES = {".json", ".md", ".txt", ".csv"}
DATA_ROOT, RUN_DIR = "DATA_ROOT", "RUN_DIR"


def evidence_files(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    found = [run_dir / name for name in EVIDENCE if (run_dir / name).is_file()]
    for pattern in EVIDENCE_PATTERNS:
        found += sorted(p for p in run_dir.glob(pattern) if p.is_file())
    return found


def _local_paths(run_dir: Path) -> list[tuple[str, str]]:
    """(text, placeholder) for the machine-local paths a run's records name, longest first."""
    pairs = {str(run_dir): RUN_DIR, str(run_dir.resolve()): RUN_DIR}
    try:
        data_dir = json.loads((run_dir / "config.json").read_text()).get("data_dir")
    except (OSError, ValueError):
        data_dir = None
    if data_dir:
        pairs.setdefault(str(data_dir), DATA_ROOT)
        pairs.setdefault(str(Path(data_dir).resolve()), DATA_ROOT)
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def archived_bytes(path: Path, local: list[tuple[str, str]]) -> bytes:
    """The file as the archive keeps it: text with the machine-local paths replaced."""
    data = path.read_bytes()
    if path.suffix not in TEXT_SUFFIXES:
        return data
    text = data.decode("utf-8")
    for old, new in local:
        text = text.replace(old, new)
    return text.encode("utf-8")


def _planned(run_dir: Path) -> dict[str, bytes]:
    local = _local_paths(run_dir)
    return {p.name: archived_bytes(p, local) for p in evidence_files(run_dir)}


def _check_no_clash(run_dir: Path, dest: Path, planned: dict[str, bytes]) -> None:
    clashes = [n for n, data in planned.items() if (dest / n).is_file() and (dest / n).read_bytes() != data]
    if clashes:
        raise FedPeftError(f"{dest} already holds another run ({', '.join(clashes)} differ from {run_dir}'s): "
                           f"remove that folder or choose another --archive")


def archive_runs(pairs: Iterable[tuple[Path, Path]]) -> tuple[int, int]:
    """Copy each run_dir's evidence to its dest; (runs copied, runs already there as they are).

    Raises FedPeftError, writing nothing at all, when a dest holds a file of the same name with other
    content (another run of the same label and seed: never replaced)."""
    plans = [(Path(r), Path(d), _planned(Path(r))) for r, d in pairs if Path(d).resolve() != Path(r).resolve()]
    for run_dir, dest, planned in plans:  # every clash is found before anything is written
        _check_no_clash(run_dir, dest, planned)
    copied = 0
    for run_dir, dest, planned in plans:
        todo = {n: data for n, data in planned.items() if not (dest / n).is_file()}
        dest.mkdir(parents=True, exist_ok=True)
        # config.json and summary.md last: a copy stopped part-way never looks like a finished run.
        for name in sorted(todo, key=lambda n: n in ("config.json", "summary.md")):
            atomic_write(dest / name, todo[name])
        copied += bool(todo)
    return copied, len(plans) - copied
