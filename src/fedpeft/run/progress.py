"""Progress: a live bar over rounds and clients on a terminal, nothing extra in logs or CI."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total_rounds: int, enabled: bool):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                                     TimeElapsedColumn(), transient=True)
            self._task = self._bar.add_task("starting", total=total_rounds)
            self._bar.start()

    def update(self, text: str) -> None:
        if self._bar:
            self._bar.update(self._task, description=text)

    def advance_round(self) -> None:
        if self._bar:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar:
            self._bar.stop()
