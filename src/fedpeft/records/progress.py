"""Progress: a live bar over rounds and clients on a terminal, nothing extra in logs or CI.

While the bar is live, console log lines are printed through rich's console (above the bar), so
the two never overwrite each other; the log file is unaffected.
"""

from __future__ import annotations

import logging
import sys


class _ConsoleHandler(logging.Handler):
    def __init__(self, console, level: int):
        super().__init__(level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(self.format(record), markup=False, highlight=False)


class Progress:
    def __init__(self, total_rounds: int, enabled: bool):
        self._bar = None
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn(),
                                     transient=True)
            self._task = self._bar.add_task("starting", total=total_rounds)
            self._route_console_logs()
            self._bar.start()

    def _route_console_logs(self) -> None:
        root = logging.getLogger("fedpeft")
        for h in list(root.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                    and getattr(h, "stream", None) is sys.stderr:
                new = _ConsoleHandler(self._bar.console, h.level)
                new.setFormatter(h.formatter)
                new._fedpeft = True
                root.removeHandler(h)
                root.addHandler(new)
                self._swapped.append((h, new))

    def update(self, text: str) -> None:
        if self._bar:
            self._bar.update(self._task, description=text)

    def advance_round(self) -> None:
        if self._bar:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar:
            self._bar.stop()
            root = logging.getLogger("fedpeft")
            for old, new in self._swapped:
                root.removeHandler(new)
                root.addHandler(old)
            self._swapped = []
