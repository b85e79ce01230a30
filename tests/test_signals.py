"""shared/signals.py: a stop signal's callback runs on a thread of its own, never inside the
handler (where the main thread may hold the very lock the callback takes)."""
import os
import signal
import threading
import time

from shared.signals import on_stop_signals


def test_callback_runs_off_the_signal_handler_so_a_held_lock_does_not_deadlock():
    prev = signal.getsignal(signal.SIGUSR1)
    lock = threading.Lock()            # like an Event's Condition lock: not re-entrant
    got = []
    done = threading.Event()

    def callback(signum):
        ok = lock.acquire(timeout=2)   # in the handler, with the lock held below: never granted
        got.append((signum, ok, threading.current_thread() is threading.main_thread()))
        if ok:
            lock.release()
        done.set()
    try:
        on_stop_signals(callback, signals=(signal.SIGUSR1,))
        with lock:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)            # the handler has run on this thread by now, lock held
            assert not got
        assert done.wait(5) and got == [(signal.SIGUSR1, True, False)]
    finally:
        signal.signal(signal.SIGUSR1, prev)
