"""Run to completion (shared/engine.py DoorbellThread.serve): a caller that must wait serves the
doorbell itself, in one process, with LocalDoorbells and a ring stand-in."""
from __future__ import annotations

import threading
import time

from shared.doorbell import LocalDoorbell
from shared.engine import MODERATE_S, POLL_GROW, POLL_MISSES, Engine, PollOps
from tests.waiting import wait_until


class Ring:
    """A stand-in ring: `items` the producer added, `taken` what the handler consumed; the
    handler records which thread ran it."""

    def __init__(self):
        self.items = 0
        self.taken = 0
        self.threads: list[str] = []
        self.delays: list[int] = []
        self.notify_after = 1            # the consumer's "notify me after k more" (EVENT_IDX)
        self.rearms = 0

    def handler(self):
        if self.items != self.taken:      # who consumed (a handler run finding nothing is not)
            self.threads.append(threading.current_thread().name)
        self.taken = self.items

    def pending(self) -> bool:
        return self.items != self.taken

    def delay(self, k: int) -> bool:
        self.delays.append(k)
        self.notify_after = k
        return self.pending()

    def suppress(self) -> None:
        self.notify_after = 0            # no doorbell at all (NAPI's interrupts off)

    def rearm(self) -> bool:
        self.rearms += 1
        self.notify_after = 1
        return self.pending()

    def produce(self, db, n: int = 1):
        """Add n items; ring the doorbell only when the consumer's event index says so."""
        before = self.items - self.taken
        self.items += n
        if before < self.notify_after <= before + n:
            db.ring()


def make(poll=True, burst=None):
    eng = Engine("t")
    eng.start()
    db = LocalDoorbell()
    ring = Ring()
    ops = PollOps(pending=ring.pending, suppress=ring.suppress, rearm=ring.rearm,
                  delay=ring.delay, burst=burst) if poll else None
    t = eng.add_doorbell(db, ring.handler, poll=ops, name="irq")
    return eng, db, ring, t


def test_a_waiting_caller_runs_the_ring_work_on_its_own_thread():
    eng, db, ring, t = make()
    try:
        def producer():
            wait_until(lambda: t.lead_owner is not None, what="caller serving the ring")
            ring.produce(db)
        threading.Thread(target=producer, name="producer").start()
        with eng.lock:
            assert t.serve(lambda: ring.taken >= 1, time.monotonic() + 5) is True
        assert ring.threads == [threading.current_thread().name]   # not the doorbell thread
        assert t.served >= 1 and t.lead_owner is None
    finally:
        eng.stop(timeout=2)


def test_the_doorbell_thread_parks_while_a_caller_serves_and_serves_again_after():
    eng, db, ring, t = make()
    try:
        with eng.lock:
            assert t.serve(lambda: False, time.monotonic() + 0.05) is False     # timed out
        ring.produce(db)                      # nobody serves now: the doorbell thread takes it
        deadline = time.monotonic() + 3
        while ring.taken < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ring.taken == 1 and ring.threads[-1] == "t-irq"
    finally:
        eng.stop(timeout=2)


def test_a_second_caller_does_not_serve_while_the_first_does():
    eng, db, ring, t = make()
    try:
        got = []
        started = threading.Event()

        def first():
            with eng.lock:
                started.set()
                got.append(t.serve(lambda: ring.taken >= 1, time.monotonic() + 5))
        th = threading.Thread(target=first, name="first")
        th.start()
        started.wait(2)
        wait_until(lambda: t.lead_owner is not None, what="first caller serving the ring")
        rings = db.rings
        with eng.lock:
            assert t.serve(lambda: True, None) is None       # another thread serves
        assert db.rings == rings      # and it was left alone: not rung out of its sleep
        ring.produce(db)
        th.join(5)
        assert got == [True] and ring.threads == ["first"]
    finally:
        eng.stop(timeout=2)


def test_work_done_elsewhere_ends_the_serve_when_nudged():
    """The server sleeps on the doorbell; another thread makes done() true and nudges it (what a
    socket's wake does): the serve returns at once, not at its timeout."""
    eng, db, ring, t = make()
    try:
        flag = []

        def other():
            wait_until(lambda: t.lead_owner is not None, what="caller serving the ring")
            with eng.lock:
                flag.append(1)
                t.nudge()
        threading.Thread(target=other).start()
        t0 = time.monotonic()
        with eng.lock:
            assert t.serve(lambda: bool(flag), time.monotonic() + 5) is True
        assert time.monotonic() - t0 < 1.0
    finally:
        eng.stop(timeout=2)


def test_a_burst_reader_asks_for_the_doorbell_after_the_burst_and_sleeps_at_most_moderate_s():
    eng, db, ring, t = make()
    try:
        def producer():
            wait_until(lambda: 4 in ring.delays, what="reader asking for a burst of 4")
            ring.produce(db, 2)               # a burst shorter than the 4 asked for: no doorbell
        threading.Thread(target=producer).start()
        t0 = time.monotonic()
        with eng.lock:
            assert t.serve(lambda: ring.taken >= 2, time.monotonic() + 5, burst=4) is True
        took = time.monotonic() - t0
        assert 4 in ring.delays                       # asked to be told after 4 more
        assert took < 0.02 + 10 * MODERATE_S + 0.5    # found by its bounded sleep, not 0.2 s+
    finally:
        eng.stop(timeout=2)


def test_a_burst_reader_leaves_notifications_off_and_the_next_sleeper_rearms_first():
    """NAPI: while the reader works through what it took, the producer must not ring (each
    ring would be a wasted doorbell); the doorbell thread, before it sleeps again, re-arms and
    so still hears the next item."""
    eng, db, ring, t = make()
    try:
        ring.produce(db, 2)
        with eng.lock:
            assert t.serve(lambda: ring.taken >= 2, time.monotonic() + 5, burst=4) is True
            assert ring.notify_after == 0             # off while the reader is busy
            rearms = ring.rearms
            ring.produce(db)                          # no doorbell rings for it
            assert db.wait(0) == 0
        # the doorbell thread leads again after PARK_S, re-arms, finds the item and takes it
        wait_until(lambda: ring.taken == ring.items, what="the doorbell thread taking the item")
        assert ring.rearms > rearms
        wait_until(lambda: ring.notify_after == 1, what="the ring re-armed before sleeping")
        ring.produce(db)                              # and it still hears the next one
        wait_until(lambda: ring.taken == ring.items, what="the next item taken")
    finally:
        eng.stop(timeout=2)


def test_the_doorbell_thread_moderates_after_work_when_a_burst_is_expected():
    """PollOps.burst (a bulk stream within its credit, e.g. a bridged guest sender): after work,
    the doorbell thread asks to be rung only after that many buffers, finds a shorter burst by
    its bounded sleep (MODERATE_S), and once a moderated sleep finds nothing it re-arms for the
    very next buffer; none of this counts as a lost wake-up."""
    eng, db, ring, t = make(burst=lambda: 4)
    try:
        real_wait, real_delay = db.wait, ring.delay

        def delay(k):                   # the producer adds 2 while the thread sleeps, moderated
            r = real_delay(k)
            if k == 4 and ring.items == 1:
                def wait(timeout):
                    db.wait = real_wait
                    ring.produce(db, 2)           # short of 4: no doorbell rings
                    return real_wait(timeout)
                db.wait = wait
            return r
        ring.delay = t.poll.delay = delay
        wait_until(lambda: ring.notify_after == 1, what="the thread asleep, armed")
        ring.produce(db)                              # rings: the thread takes it
        wait_until(lambda: ring.taken == 3, what="the short burst found by the bounded sleep")
        assert 4 in ring.delays
        wait_until(lambda: ring.notify_after == 1 and ring.delays[-1] == 1,
                   what="re-armed for the very next buffer after an empty moderated sleep")
        ring.produce(db)
        wait_until(lambda: ring.taken == 4, what="the next item")
        assert eng.stats["missed_wakeups"] == 0
    finally:
        eng.stop(timeout=2)


def test_the_poll_budget_halves_only_after_several_empty_windows_and_grows_back():
    """Adaptive polling (--poll-us): one empty window must not halve the budget (a polling
    request/response pair would fall back to sleeping for good); POLL_MISSES in a row do, a
    window that finds work resets the count, and a sleep within POLL_GROW windows grows it."""
    import time as _t
    eng = Engine("t", poll_us=50)
    db = LocalDoorbell()
    ring = Ring()
    t = eng.add_doorbell(db, ring.handler, poll=PollOps(pending=ring.pending), name="irq")
    try:
        full = t.poll_ns
        with eng.lock:
            for _ in range(POLL_MISSES - 1):
                assert t._poll_for(lambda: False, None) is False
            assert t.budget_ns == full                   # a few misses: still the whole window
            ring.items += 1                              # a window that finds work
            t._poll_for(lambda: False, None)
            assert t.poll_misses == 0 and t.budget_ns == full
            for _ in range(POLL_MISSES):
                t._poll_for(lambda: False, None)
            assert t.budget_ns == full // 2              # POLL_MISSES in a row: halved
            t._poll_for(lambda: False, None)
            assert t.budget_ns == full // 4              # and on while they keep missing
            t._grow_budget(_t.perf_counter_ns() - (POLL_GROW * full) // 2)
            assert t.budget_ns == full // 2              # a sleep within POLL_GROW windows
            t._grow_budget(_t.perf_counter_ns() - 2 * POLL_GROW * full)
            assert t.budget_ns == full // 2              # a long sleep: no growth
    finally:
        eng.stop(timeout=2)
