"""Run assembly: the one place a run is built from its settings (assemble.py), for the CLI and bench
(start.py), the Flower apps (flower.py) and export (export.py); federation.py builds the clients' data."""

from fedpeft.run.assemble import bound
from fedpeft.run.start import RunResult, run

__all__ = ["RunResult", "bound", "run"]
