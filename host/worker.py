"""The vhost worker of one device process: the shared engine (shared/engine.py).

drivers/vhost/vhost.c runs a device's work on one worker thread; here the `VhostWorker` is an
`Engine` whose loop runs on the device process's main thread (control socket, bridged Unix
sockets, queued work, timers) and whose kick doorbells each have a thread that runs the device's
handler itself, under the same lock (vhost_poll): no relay between threads.
"""
from __future__ import annotations

from shared.engine import WAIT_TIMEOUT, Engine, TimerHandle

POLL_TIMEOUT = WAIT_TIMEOUT

__all__ = ["VhostWorker", "TimerHandle", "POLL_TIMEOUT"]


class VhostWorker(Engine):
    def __init__(self, name: str = "vhost", *, poll_us: int = 0, lock=None):
        super().__init__(name, poll_us=poll_us, lock=lock)
