"""Writing a method's artifacts (algorithms/base.py `Artifact`) into the run folder."""

from __future__ import annotations

import logging
from pathlib import Path

from fedpeft.atomic import atomic_write_json

log = logging.getLogger("fedpeft")


def write_artifacts(run_dir: Path, artifacts) -> list[Path]:
    """JSON data is written atomically; a figure that fails to draw is a warning: a plot never loses a run."""
    written = []
    for art in artifacts:
        path = Path(run_dir) / art.name
        if art.draw is not None:
            try:
                art.draw(path)
            except Exception as exc:
                log.warning("could not draw %s: %s", art.name, exc)
                continue
        else:
            atomic_write_json(path, art.data)
        written.append(path)
    return written
