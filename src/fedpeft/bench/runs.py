"""The run folders of a bench matrix, OUT/<suite>/<label>-seed<k>/: where one is, whether it is
finished (summary.md written and training_history.json holding the round config.json's
global_rounds names) and its training history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpeft.bench.suites import Suite
from fedpeft.errors import FedPeftError


def run_dir_for(out: Path, suite: Suite, label: str, seed: int) -> Path:
    return Path(out) / suite.name / f"{label}-seed{seed}"


def is_finished(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    if not ((run_dir / "summary.md").is_file() and (run_dir / "training_history.json").is_file()
            and (run_dir / "config.json").is_file()):
        return False
    try:
        rounds = json.loads((run_dir / "training_history.json").read_text())["rounds"]
        total = json.loads((run_dir / "config.json").read_text())["global_rounds"]
    except (ValueError, KeyError, OSError):
        return False
    return any(r.get("round") == total for r in rounds)


def read_history(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "training_history.json").read_text())
    except (OSError, ValueError) as exc:
        raise FedPeftError(f"cannot read {run_dir}/training_history.json: {exc}") from None
