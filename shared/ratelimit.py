"""Log lines a hostile peer can cause, rate-limited: the first in full, then counts.

`RateLimitedLog(interval).log(logger, line)` logs `line` at WARNING when nothing was logged in the
last `interval` seconds; otherwise it only counts, and the next line that gets through says how
many were suppressed ("... (and N more like it in the last 10 s)"). One hostile guest that breaks
its rings on every kick thus costs at most one line per interval per device.
"""
from __future__ import annotations

import logging
import time

DEFAULT_INTERVAL = 10.0


class RateLimitedLog:
    def __init__(self, interval: float = DEFAULT_INTERVAL, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self.suppressed = 0          # since the last line that got through
        self.total = 0               # every call
        self._last: float | None = None

    def log(self, logger: logging.Logger, line: str, level: int = logging.WARNING) -> bool:
        """Log now (True) or count it (False)."""
        self.total += 1
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            line = f"{line} (and {self.suppressed} more in the last {now - self._last:.0f} s)"
        self.suppressed = 0
        self._last = now
        logger.log(level, "%s", line)
        return True
