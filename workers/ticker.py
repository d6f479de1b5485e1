"""One thread per worker process for the periodic chores of running tasks: renewing session
locks (``workers.lock``) and reading cancel flags (``workers.cancel``).

Each task used to start a thread per chore and join it at its end; starting and joining
threads was a visible share of a short task's cost. The ticker's thread starts with the first
chore of its process (again in a process forked from it: threads do not survive a fork) and
then sleeps until the next chore is due. A chore runs on that thread, so it must be short (a
Redis round trip) and must not raise.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Chore:
    """A function the ticker calls every ``period_s`` until it returns False or is cancelled."""

    def __init__(self, ticker: Ticker, period_s: float, run: Callable[[], bool]) -> None:
        self.period_s = period_s
        self.run = run
        self.cancelled = False
        self._ticker = ticker

    def cancel(self) -> None:
        """Call it no more; a call already under way finishes."""
        self._ticker.drop(self)


class Ticker:
    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._due: list[tuple[float, int, Chore]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def every(self, period_s: float, run: Callable[[], bool]) -> Chore:
        """Call ``run`` every ``period_s`` (counted from the end of its last call), the first
        time ``period_s`` from now."""
        chore = Chore(self, period_s, run)
        with self._wake:
            self._schedule(chore)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ticker", daemon=True)
                self._thread.start()
            self._wake.notify()
        return chore

    def drop(self, chore: Chore) -> None:
        with self._wake:
            chore.cancelled = True
            # Removed at once, not when it falls due: a task's chores end long before that.
            self._due = [entry for entry in self._due if entry[2] is not chore]
            heapq.heapify(self._due)

    def _schedule(self, chore: Chore) -> None:
        heapq.heappush(self._due, (time.monotonic() + chore.period_s, next(self._order), chore))

    def _next(self) -> Chore:
        with self._wake:
            while True:
                if not self._due:
                    self._wake.wait()
                    continue
                delay = self._due[0][0] - time.monotonic()
                if delay <= 0:
                    return heapq.heappop(self._due)[2]
                self._wake.wait(delay)

    def _loop(self) -> None:
        while True:
            chore = self._next()
            try:
                again = chore.run()
            except Exception:
                log.exception("periodic chore %r failed; it runs no more", chore.run)
                again = False
            with self._wake:
                if again and not chore.cancelled:
                    self._schedule(chore)


_ticker = Ticker()


def every(period_s: float, run: Callable[[], bool]) -> Chore:
    """Run ``run`` every ``period_s`` on this process's ticker thread (see :class:`Ticker`)."""
    return _ticker.every(period_s, run)


def _forked() -> None:
    global _ticker
    _ticker = Ticker()


os.register_at_fork(after_in_child=_forked)
