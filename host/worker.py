"""The vhost worker: the one thread that runs a device's work (drivers/vhost/vhost.c vhost_worker).

Each device connection gets its own process (host/daemon.py), and in it one VhostWorker:

  * `run()` loops on a selector over registered file objects (the control socket, bridged Unix
    sockets, ...) and a wake-up socketpair, running queued work and due timers in between. All
    device and control-session state is touched only on this thread, so it needs no locks.
  * `queue_work(fn)` (any thread) schedules fn; a pending fn is not queued twice (vhost_work_queue).
  * `add_kick(doorbell, fn)` starts a poll thread (vhost_poll) that waits on a kick doorbell with a
    timeout (a semaphore cannot be select()ed; the timeout is how it notices shutdown) and queues
    fn whenever the guest kicked.
  * `register(fileobj, events, callback)` / `modify` / `unregister`: callback(mask) runs on the
    worker thread when the file object is ready.
  * `call_later(delay, fn)` runs fn on the worker thread after delay seconds.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

POLL_TIMEOUT = 0.2


class TimerHandle:
    __slots__ = ("deadline", "fn", "cancelled")

    def __init__(self, deadline: float, fn):
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VhostWorker:
    def __init__(self, name: str = "vhost"):
        self.name = name
        self.sel = selectors.DefaultSelector()
        self._wr, self._ww = socket.socketpair()
        self._wr.setblocking(False)
        self._ww.setblocking(False)
        self.sel.register(self._wr, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._queue: deque = deque()
        self._pending: set = set()
        self._timers: list = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._pollers: list[threading.Thread] = []
        self._thread_id: int | None = None
        self.work_errors = 0

    # --- any thread ---------------------------------------------------------------------------
    def queue_work(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if fn in self._pending:
                return
            self._pending.add(fn)
            self._queue.append(fn)
        self._wake()

    def _wake(self) -> None:
        try:
            self._ww.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or shutting down

    def add_kick(self, doorbell, fn: Callable[[], None], name: str = "kick") -> threading.Thread:
        def poll() -> None:
            while not self._stop.is_set():
                try:
                    n = doorbell.wait(POLL_TIMEOUT)
                except Exception as e:  # the semaphore went away under us
                    log.debug("%s: doorbell wait failed: %s", name, e)
                    return
                if n:
                    self.queue_work(fn)
        t = threading.Thread(target=poll, name=f"{self.name}-{name}", daemon=True)
        t.start()
        self._pollers.append(t)
        return t

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        h = TimerHandle(time.monotonic() + max(0.0, delay), fn)
        with self._lock:
            heapq.heappush(self._timers, (h.deadline, next(self._seq), h))
        self._wake()
        return h

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # --- worker thread only -------------------------------------------------------------------
    def register(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        self.sel.register(fileobj, events, callback)

    def modify(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        self.sel.modify(fileobj, events, callback)

    def unregister(self, fileobj) -> None:
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def run(self) -> None:
        self._thread_id = threading.get_ident()
        while not self._stop.is_set():
            timeout = self._run_due()
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    try:
                        while self._wr.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                self._call(key.data, mask)
            self._run_queue()
        self._shutdown()

    def _call(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:
            self.work_errors += 1
            log.exception("%s: work %r failed", self.name, fn)

    def _run_queue(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                fn = self._queue.popleft()
                self._pending.discard(fn)
            self._call(fn)

    def _run_due(self) -> float | None:
        """Run expired timers and queued work; return the selector timeout."""
        self._run_queue()
        now = time.monotonic()
        due = []
        with self._lock:
            while self._timers and (self._timers[0][2].cancelled or self._timers[0][0] <= now):
                _, _, h = heapq.heappop(self._timers)
                if not h.cancelled:
                    due.append(h.fn)
            nxt = self._timers[0][0] - now if self._timers else None
            busy = bool(self._queue)
        for fn in due:
            self._call(fn)
        if busy or due:
            return 0
        return POLL_TIMEOUT if nxt is None else max(0.0, min(nxt, POLL_TIMEOUT))

    def _shutdown(self) -> None:
        for t in self._pollers:
            t.join(POLL_TIMEOUT * 3)
        self._pollers.clear()
        for key in list(self.sel.get_map().values()):
            if key.fileobj is not self._wr:
                self.unregister(key.fileobj)
        self.sel.close()
        self._wr.close()
        self._ww.close()
