"""The guest kernel's execution context: one big lock, a workqueue and timers.

Linux runs the virtio-vsock transport's work items (rx_work, tx_work, event_work, send_pkt_work,
loopback_work) on a workqueue, with socket calls serialised by locks. Here:

  * `lock` is the big kernel lock: every driver and socket structure is touched only while it is
    held. Socket calls from program threads take it briefly and wait on Conditions built on it.
  * `queue_work(fn)` runs fn() on the single worker thread with the lock held; a work item that is
    already pending is not queued twice (queue_work's semantics).
  * `call_later(delay, fn)` runs fn() on the worker thread (lock held) after `delay` seconds.

Interrupt threads (guest/virtio_dev.py) only call `queue_work`, like an IRQ handler scheduling
bottom-half work.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)


class TimerHandle:
    __slots__ = ("deadline", "fn", "cancelled")

    def __init__(self, deadline: float, fn: Callable[[], None]):
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Kernel:
    def __init__(self, name: str = "guest"):
        self.name = name
        self.lock = threading.RLock()
        self._cv = threading.Condition(threading.Lock())
        self._queue: deque[Callable[[], None]] = deque()
        self._pending: set = set()
        self._timers: list = []
        self._seq = itertools.count()
        self._stop = False
        self._idle = True
        self._thread: threading.Thread | None = None
        self.work_errors = 0

    # --- scheduling (any thread) ---------------------------------------------------------------
    def queue_work(self, fn: Callable[[], None]) -> bool:
        with self._cv:
            if fn in self._pending:
                return False
            self._pending.add(fn)
            self._queue.append(fn)
            self._cv.notify()
            return True

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        h = TimerHandle(time.monotonic() + max(0.0, delay), fn)
        with self._cv:
            heapq.heappush(self._timers, (h.deadline, next(self._seq), h))
            self._cv.notify()
        return h

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-kworker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until no work is queued or running (tests and orderly shutdown)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._cv:
                if not self._queue and self._idle:
                    return True
            time.sleep(0.001)
        return False

    # --- the worker thread ----------------------------------------------------------------------
    def _next(self) -> Callable[[], None] | None:
        with self._cv:
            while True:
                if self._stop:
                    return None
                now = time.monotonic()
                while self._timers and (self._timers[0][2].cancelled or self._timers[0][0] <= now):
                    _, _, h = heapq.heappop(self._timers)
                    if not h.cancelled:
                        self._queue.append(h.fn)
                if self._queue:
                    fn = self._queue.popleft()
                    self._pending.discard(fn)
                    self._idle = False
                    return fn
                self._idle = True
                timeout = self._timers[0][0] - now if self._timers else None
                self._cv.wait(timeout)

    def _run(self) -> None:
        while (fn := self._next()) is not None:
            try:
                with self.lock:
                    fn()
            except Exception:  # a driver bug must not kill the kernel
                self.work_errors += 1
                log.exception("work item %r failed", fn)
            finally:
                with self._cv:
                    self._idle = not self._queue
