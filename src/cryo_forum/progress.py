"""Progress of long work on stderr: a live bar on a terminal, a few plain lines in a log file.

A carriage-return bar written into a log file leaves one unreadable line; when stderr is not a terminal,
progress is logged instead at every tenth of the work and at most every ``interval`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("cryo_forum")


class _Silent:
    def update(self, count: int) -> None:
        pass


class _LogLines:
    """Counts work and logs a line at each tenth done (and at most every ``interval`` seconds)."""

    def __init__(self, total: int, unit: str, description: str, interval: float) -> None:
        self.total, self.unit, self.description, self.interval = max(int(total), 0), unit, description, interval
        self.done = 0
        self.started = self.last = time.monotonic()
        self.next_tenth = 1

    def update(self, count: int) -> None:
        self.done += int(count)
        now = time.monotonic()
        tenth = 10 * self.done // self.total if self.total else 10
        if tenth >= self.next_tenth and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            self.next_tenth = tenth + 1
            rate = self.done / max(now - self.started, 1e-9)
            log.info(
                f"{self.description}: {self.done} / {self.total} {self.unit}s "
                f"({100 * self.done / max(self.total, 1):.0f} %, {now - self.started:.0f} s, {rate:.0f} {self.unit}s/s)"
            )


@contextlib.contextmanager
def progress(
    total: int, unit: str = "particle", description: str = "progress", enabled: bool = True, interval: float = 5.0
) -> Iterator:
    """Yield an object with ``update(count)``; shows nothing unless ``enabled``."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, unit=unit, desc=description, file=sys.stderr) as bar:
            yield bar
    elif enabled:
        yield _LogLines(total, unit, description, interval)
    else:
        yield _Silent()
