"""Killed runs lose nothing: the short version of benchmarks/faults.py's kill/resume campaign.

Real `fedpeft run` processes are killed with SIGKILL inside the history write, inside the checkpoint
write, between the two (while metrics.csv is written) and at a random instant, each followed by
`fedpeft run --resume`; every resumed run must end with the records, events, summary and final
checkpoint of an uninterrupted run. The long campaign (24 kill points, FedLEASE and FedDPA, runs
killed twice) is `python benchmarks/faults.py`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FAULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "faults.py"


@pytest.fixture(scope="module")
def faults():
    spec = importlib.util.spec_from_file_location("fedpeft_faults", FAULTS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(faults, tmp_path):
    said = []
    out = faults.kill_resume_campaign(4, methods=["fedit"], work=tmp_path, seed=1, say=said.append)
    report = "\n".join(said + out.notes)
    assert out.tried >= 3, report
    assert out.survived == out.tried and out.lost == 0, report
    kinds = " ".join(out.notes)
    assert "during history write" in kinds and "during checkpoint write" in kinds, report
