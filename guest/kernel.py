"""The guest kernel's execution context: the shared engine (shared/engine.py) with a big lock.

Linux runs the virtio-vsock transport's work items on a workqueue, with socket calls serialised
by locks. Here the `Kernel` is an `Engine` on a thread of its own:

  * `lock` is the big kernel lock: every driver and socket structure is touched only while it is
    held. Socket calls from program threads take it briefly and wait on Conditions built on it.
  * `queue_work(fn)` / `call_later(delay, fn)` run fn on the kernel's worker thread, lock held.
  * Interrupts: each queue's call doorbell has a thread of its own (`add_doorbell`) that runs the
    driver's callback itself, lock held, as a vring_interrupt handler does: no relay.
"""
from __future__ import annotations

from shared.engine import Engine, TimerHandle

__all__ = ["Kernel", "TimerHandle"]


class Kernel(Engine):
    def __init__(self, name: str = "guest", *, poll_us: int = 0):
        super().__init__(name, poll_us=poll_us)
