"""Shorter waits inside the pinned Flower (1.41–1.42) on a deployment's message path.

Flower waits in fixed steps that, added up, cost a deployed round several seconds that are neither
training nor transfer: a SuperNode asks the SuperLink for work every 3 s when idle and checks for
its ClientApp's reply every 0.5 s, and whoever reads a message's objects (the ClientApp from its
SuperNode, a SuperNode or the ServerApp from the SuperLink) retries an object that is not there yet
after 1 s, then 2 s, ... . These functions replace those waits through the Flower modules' own
names (`time`, `pull_objects`), leaving Flower's code as it is (the fedpeft ClientApp worker pulls its
task's message with the short retries itself, engines/flower/worker.py):
idle asks back off from 50 ms to 1 s, reply checks every 50 ms, object retries from 50 ms doubling
to 0.2 s. Each is applied once per process, by the process that runs that part of Flower.

The object retries are capped at 0.2 s, not 1 s: an object is missing only while its sender is still
pushing it (a SuperNode creates its ClientApp task before it has pulled the message's objects), so the
retries last a transfer, and a 1-s step overshot it by up to a second per hop. The idle asks keep 1 s:
an idle node asks for as long as it is idle, and every SuperNode of a federation does (benchmarks/
README.md, flower_overhead.py).
"""

from __future__ import annotations

import functools
import time as _time

IDLE_FIRST, IDLE_MAX, REPLY_WAIT = 0.05, 1.0, 0.05
OBJECT_BACKOFF, OBJECT_BACKOFF_CAP = 0.05, 0.2


class Backoff:
    """The waits of one polling loop: `first` after work, then 1.5× longer per empty poll, up to `cap`.
    Shared by the SuperNode's idle asks (PollingClock), the server's reply pulls (server.py `exchange`)
    and the ClientApp worker's task asks (worker.py `serve_tasks`)."""

    FACTOR = 1.5

    def __init__(self, first: float, cap: float):
        self.first, self.cap = first, cap
        self._wait = first

    def next(self) -> float:
        """The wait to take now; the one after it grows."""
        wait = self._wait
        self._wait = min(self.cap, wait * self.FACTOR)
        return wait

    def reset(self) -> None:
        """Work came: the next wait is `first` again."""
        self._wait = self.first


class PollingClock:
    """Stands in for the `time` module inside Flower's SuperNode loop: every attribute is the real
    one except `sleep`, whose 3-s idle wait backs off from IDLE_FIRST to IDLE_MAX (restarting after
    work, i.e. when the previous idle wait ended more than IDLE_MAX + 0.5 s ago) and whose 0.5-s
    reply wait is REPLY_WAIT."""

    def __init__(self):
        self._idle = Backoff(IDLE_FIRST, IDLE_MAX)
        self._last_idle_end = 0.0

    def __getattr__(self, name):
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == 3:
            if _time.monotonic() - self._last_idle_end > IDLE_MAX + 0.5:  # the node worked since
                self._idle.reset()
            _time.sleep(self._idle.next())
            self._last_idle_end = _time.monotonic()
        elif seconds == 0.5:
            _time.sleep(REPLY_WAIT)
        else:
            _time.sleep(seconds)


def _faster(fn):
    if getattr(fn, "_fedpeft_fast", False):
        return fn
    fast = functools.partial(fn, initial_backoff=OBJECT_BACKOFF, backoff_cap=OBJECT_BACKOFF_CAP)
    fast._fedpeft_fast = True
    return fast


def supernode() -> None:
    """In a SuperNode process: short idle asks and reply checks, fast object retries."""
    import flwr.supernode.start_client_internal as loop

    if not isinstance(loop.time, PollingClock):
        loop.time = PollingClock()
    loop.pull_objects = _faster(loop.pull_objects)


def serverapp() -> None:
    """In the ServerApp process: fast retries of the replies' objects."""
    try:
        import flwr.superlink.grid.http_grid as grid
    except ImportError:  # a Flower without the HTTP grid: nothing to shorten
        return
    grid.pull_objects = _faster(grid.pull_objects)
