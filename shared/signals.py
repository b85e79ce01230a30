"""Stop signals handled outside the signal handler.

A Python signal handler runs on the main thread between two bytecodes, possibly while that thread
holds a lock: `threading.Event.set()` from a handler deadlocks when the signal lands inside the
main thread's own `event.wait()` (the Event's Condition lock is not re-entrant). A guest hung that
way on Ctrl-C until SIGKILL, leaving its shared memory behind.

    on_stop_signals(callback)

installs handlers that only write the signal number to a pipe; a daemon thread reads the pipe and
calls `callback(signum)` there, where taking locks is safe.

    die_with_parent(parent_pid)

makes a forked child get SIGTERM when its parent dies (a device process must not outlive a
SIGKILLed host: its guest would never see EOF).
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
from typing import Callable


def on_stop_signals(callback: Callable[[int], None],
                    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)

    def handler(signum, _frame) -> None:
        try:
            os.write(w, bytes([signum]))
        except (BlockingIOError, InterruptedError):
            pass                        # the pipe is full: a stop is already on its way

    def watch() -> None:
        while True:
            try:
                data = os.read(r, 64)
            except InterruptedError:
                continue
            if not data:
                return
            for signum in data:
                callback(signum)

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()
    for s in signals:
        signal.signal(s, handler)


def die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG(SIGTERM) in a forked child; SIGTERM now if the parent is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:                 # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
