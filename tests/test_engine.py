"""The shared engine (shared/engine.py): work, timers, files and doorbell threads, in one process."""
from __future__ import annotations

import socket
import threading
import time

from shared.barrier import mb
from shared.batch import Batch
from shared.doorbell import LocalDoorbell
from shared.engine import WAIT_TIMEOUT, Engine, PollOps
from tests.waiting import wait_until


def test_work_runs_once_with_the_lock_held_on_the_engine_thread():
    eng = Engine("t")
    seen = []

    def work():
        seen.append((threading.current_thread().name, eng.lock._is_owned()))
    # a pending item is not queued twice (queue_work semantics): nothing runs it yet
    assert eng.queue_work(work)
    assert not eng.queue_work(work)
    eng.start()
    try:
        assert eng.flush()
        assert seen == [("t-kworker", True)]          # once, on the engine thread, lock held
        assert eng.queue_work(work)                   # no longer pending: queued again
        assert eng.flush()
        assert len(seen) == 2
    finally:
        eng.stop(timeout=2)


def test_timers_fire_in_order_and_cancel():
    eng = Engine("t")
    order = []
    eng.start()
    try:
        eng.call_later(0.03, lambda: order.append("b"))
        eng.call_later(0.01, lambda: order.append("a"))
        h = eng.call_later(0.02, lambda: order.append("never"))
        h.cancel()
        # one thread runs timers in deadline order: the cancelled one (0.02) was due before "b"
        assert wait_until(lambda: len(order) == 2) and order == ["a", "b"]
    finally:
        eng.stop(timeout=2)


def test_file_callbacks_run_with_the_lock():
    eng = Engine("t")
    a, b = socket.socketpair()
    got = []

    def on_read(mask):
        got.append((a.recv(10), eng.lock._is_owned()))
    eng.register(a, 1, on_read)
    eng.start()
    try:
        b.send(b"hi")
        assert wait_until(lambda: got)
        assert got == [(b"hi", True)]
    finally:
        eng.stop(timeout=2)
        a.close()
        b.close()


def test_doorbell_handler_runs_on_the_waking_thread_itself():
    """No relay: the thread that wakes on the doorbell runs the handler, lock held."""
    eng = Engine("t")                       # never started: doorbell threads need no loop
    db = LocalDoorbell()
    ran = []
    t = eng.add_doorbell(db, lambda: ran.append((threading.current_thread(), eng.lock._is_owned())),
                         name="irq0")
    try:
        db.ring()
        assert wait_until(lambda: ran)
        assert ran[0] == (t.thread, True)
        assert eng.stats["wakeups"] == 1 and eng.stats["handler_runs"] == 1
        assert eng.stats["work_items"] == 0          # nothing went through the work queue
    finally:
        eng.remove_doorbell(t)
        t.join()
    assert not t.thread.is_alive()


def test_a_lost_wakeup_is_recovered_at_the_timeout_and_counted():
    eng = Engine("t")
    db = LocalDoorbell()
    ring = {"work": 0}
    handled = []

    def handler():
        handled.append(ring["work"])
        ring["work"] = 0
    t = eng.add_doorbell(db, handler, poll=PollOps(pending=lambda: ring["work"] > 0), name="q")
    try:
        ring["work"] = 3                    # work published, doorbell never rung
        assert wait_until(lambda: handled, WAIT_TIMEOUT * 5)
        assert handled == [3] and eng.stats["missed_wakeups"] == 1
    finally:
        eng.remove_doorbell(t)
        t.join()


def test_busy_poll_finds_work_without_a_doorbell_and_rearms():
    """With poll_us, after work the thread polls with notifications suppressed; work that
    appears within the window is handled without any ring of the doorbell."""
    eng = Engine("t", poll_us=200_000)
    db = LocalDoorbell()
    state = {"work": 0, "suppressed": False, "rearmed": 0}
    handled = []

    def handler():
        handled.append(state["work"])
        state["work"] = 0

    def suppress():
        state["suppressed"] = True

    def rearm():
        state["suppressed"] = False
        state["rearmed"] += 1
        return False
    t = eng.add_doorbell(db, handler, poll=PollOps(lambda: state["work"] > 0, suppress, rearm),
                         name="q")
    try:
        state["work"] = 1
        db.ring()
        assert wait_until(lambda: handled == [1])
        assert wait_until(lambda: state["suppressed"])      # polling, notifications off
        with eng.lock:
            state["work"] = 2                               # no ring: the poller sees it
        assert wait_until(lambda: handled == [1, 2])
        assert eng.stats["poll_hits"] >= 1 and db.rings == 1
        assert wait_until(lambda: state["rearmed"] >= 1, 2.0)   # window over: re-armed
        assert not state["suppressed"]
        assert eng.stats["poll_ns"] > 0
    finally:
        eng.remove_doorbell(t)
        t.join()


def test_idle_doorbell_threads_only_wake_at_the_timeout():
    eng = Engine("t", poll_us=50)
    db = LocalDoorbell()
    calls = []
    t = eng.add_doorbell(db, lambda: calls.append(1), poll=PollOps(lambda: False), name="q")
    try:
        time.sleep(WAIT_TIMEOUT * 2.5)      # the thing under test: nothing happens in this time
        assert not calls and eng.stats["wakeups"] == 0 and eng.stats["poll_ns"] == 0
    finally:
        eng.remove_doorbell(t)
        t.join()


def test_stop_ends_the_loop_and_doorbell_threads():
    eng = Engine("t")
    db = LocalDoorbell()
    t = eng.add_doorbell(db, lambda: None, name="q")
    eng.start()
    eng.stop(timeout=3)
    assert not t.thread.is_alive()
    assert not eng._thread.is_alive()
    # after stop: queue_work answers (True: queued, nothing will run it; a second time False:
    # already pending) and never raises or runs the function
    ran = []
    fn = lambda: ran.append(1)                        # noqa: E731
    assert eng.queue_work(fn) is True
    assert eng.queue_work(fn) is False
    assert ran == []                                  # the loop is gone: nothing runs it


def test_batch_defers_to_the_outermost_exit_once():
    b = Batch()
    calls = []
    flush = lambda: calls.append("flush")             # noqa: E731
    b.defer(flush)
    assert calls == ["flush"]                         # outside a batch: at once
    with b:
        with b:
            b.defer(flush)
            b.defer(flush)
        assert calls == ["flush"]
    assert calls == ["flush", "flush"]


def test_mb_is_one_atomic_read_modify_write(monkeypatch):
    """mb()'s claim (shared/barrier.py): a full barrier because it performs an atomic RMW, the
    uncontended acquire of a lock (lock cmpxchg on x86), and leaves the lock free for the next."""
    from shared import barrier
    ops = []
    monkeypatch.setattr(barrier, "_acquire", lambda: (ops.append("acquire"), barrier._fence.acquire())[1])
    monkeypatch.setattr(barrier, "_release", lambda: (ops.append("release"), barrier._fence.release())[1])
    mb()
    assert ops == ["acquire", "release"] and not barrier._fence.locked()
    done = []
    threads = [threading.Thread(target=lambda: ([mb() for _ in range(2000)], done.append(1)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(done) == 4 and not barrier._fence.locked()    # callable from every thread at once
