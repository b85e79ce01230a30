"""The engine both sides run on: work, timers, file readiness and doorbell waits, written once.

Theory of operation
-------------------
Linux runs a virtio driver's bottom halves on a workqueue and vhost's handlers on one worker
thread per device, and in both the code that notices an event does the work (vhost_poll queues
the handler on the very worker that runs it; NAPI polls in the interrupt's softirq). An `Engine`
is that, for a guest kernel and for a host device process alike:

  * `lock` is the big lock (the guest kernel's, or the device's). Everything the engine runs —
    queued work, timers, file callbacks and doorbell handlers — runs with it held, so the state
    behind them needs no other lock. Program threads take it around their socket calls.
  * `queue_work(fn)` runs fn soon on the engine thread; a pending fn is not queued twice
    (queue_work / vhost_work_queue). `call_later(delay, fn)` runs fn after delay seconds.
  * `register(fileobj, events, cb)` / `modify` / `unregister`: cb(mask) runs on the engine thread
    when the file object is ready (selectors).
  * `add_doorbell(db, handler, poll=...)` starts one thread that sleeps on a doorbell (a POSIX
    semaphore cannot be select()ed) and, when it rings, runs `handler()` itself, lock held: no
    relay through another thread. A wait that times out re-checks the ring through `poll.pending`
    (a wake-up lost to a missing barrier would show up here, counted as `missed_wakeups`).
  * Adaptive polling (vhost's busyloop_timeout, NAPI): with `poll_us > 0` a doorbell thread that
    just did work keeps polling the ring for `poll_us` microseconds with notifications suppressed
    (`poll.suppress`), running the handler whenever work appears, then re-arms notifications
    (`poll.rearm`, which re-checks the ring after publishing) and sleeps. Between polls it yields
    the GIL (time.sleep(0)), so other threads of the process keep running. `poll_us = 0` is pure
    doorbells; an idle engine only wakes once per WAIT_TIMEOUT to look at its stop flag.

Run to completion (leader/followers). A program thread that must wait for what a doorbell's ring
brings (a socket call on the guest's rx ring, or on the host's tx ring) does not sleep on a
Condition while another thread runs the ring work and wakes it: it *serves* the doorbell itself
(`DoorbellThread.serve`): it runs the ring work, polls for a while if it has a poll budget, then
sleeps on the doorbell in the doorbell thread's place and, when it rings, runs the ring work on
its own thread and returns as soon as its own socket is ready. Other threads whose sockets the
ring work touched are woken through their own Conditions (only those that wait). The doorbell
thread serves only while no caller does: it parks while a caller leads, and for PARK_S after the
last one left (a caller that comes back for more takes the doorbell at no cost); a caller that
finds the doorbell thread asleep on the doorbell rings the doorbell once to take its place. A
64 B round trip thus wakes two threads (one per side), as a bare ring does. The poll budget is
adaptive, as KVM's halt polling: it grows when a sleep ended within POLL_GROW windows (a peer
that sleeps too adds its own wake-up), and halves once POLL_MISSES windows in a row found
nothing, so polling only costs where it pays (halving at the first miss made a polling
request/response pair fall back to sleeping for good: one miss, one side sleeps, the other's
next window misses too).

Moderation (EVENT_IDX, NAPI). A burst server returns with notifications off (the consumer is busy
with what it took); whoever sleeps on the doorbell next re-arms first. A doorbell thread whose
ring expects a burst (PollOps.burst: a bulk stream within its credit, such as a bridged guest
sender) asks, right after work, to be rung only after that many buffers, sleeps at most
MODERATE_S and looks at the ring anyway; an empty moderated sleep re-arms for the very next
buffer, so an idle ring costs nothing.

`run()` runs the engine loop on the calling thread (a host device process's main thread);
`start()` runs it on a thread of its own (the guest kernel's worker). `stats` counts what the
monitor and benchmarks show: wakeups (doorbell waits that returned rings), handler runs, polled
hits, time spent polling, missed wake-ups and work items.
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
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

WAIT_TIMEOUT = 0.2        # seconds a doorbell thread or the loop sleeps before looking at stop
IDLE_WAIT = 0.5           # an idle doorbell thread's sleep (stop rings it awake; a lost wake-up
                          # costs at most this long, counted in missed_wakeups)
PARK_S = 0.02             # a doorbell thread stays parked this long after a caller served its ring
MODERATE_S = 0.0005       # longest sleep of a server that asked to be notified only after a burst
POLL_MIN_NS = 2_000       # an adaptive poll budget below this is no poll at all
POLL_MISSES = 4           # consecutive empty poll windows before the budget halves
POLL_GROW = 4             # a sleep shorter than this many windows grows the budget back


def released(lock):
    """Release an RLock fully (whatever its recursion depth), as Condition.wait does; returns
    the state for `restore`. The RLock's own save/restore protocol (the one Condition uses)."""
    return lock._release_save()


def restore(lock, state) -> None:
    lock._acquire_restore(state)


class TimerHandle:
    __slots__ = ("deadline", "fn", "cancelled")

    def __init__(self, deadline: float, fn: Callable[[], None]):
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class PollOps:
    """How a doorbell handler's ring is polled (all called with the engine lock held).

    pending()   is there work on the ring? (a cheap index compare)
    suppress()  ask the other side not to notify while we poll
    rearm()     ask for notifications again; True when work raced in (poll again)
    handler()   what runs for work found by polling, when it differs from the doorbell's
                handler (a device counts kicks in the latter)
    delay(k)    re-arm asking to be notified only after k more buffers (EVENT_IDX moderation);
                True when work raced in
    burst()     how many buffers the producer is expected to add soon (a bulk stream within its
                credit); above 1, the doorbell thread, right after work, sleeps moderated:
                delay(burst()), at most MODERATE_S, then looks at the ring anyway
    """
    pending: Callable[[], bool]
    suppress: Callable[[], None] | None = None
    rearm: Callable[[], bool] | None = None
    handler: Callable[[], None] | None = None   # for work found by polling (default: the doorbell's)
    delay: Callable[[int], bool] | None = None
    burst: Callable[[], int] | None = None    # buffers the producer should add soon (>1: the
                                              # doorbell thread moderates like a burst serve)


class DoorbellThread:
    """One thread sleeping on one doorbell and running its handler (vhost_poll + the worker)."""

    def __init__(self, engine: "Engine", db, handler: Callable[[], None], poll: PollOps | None,
                 name: str, poll_us: int):
        self.engine = engine
        self.db = db
        self.handler = handler
        self.poll = poll
        self.poll_ns = max(0, int(poll_us)) * 1000
        self.stopped = False
        self.wakeups = 0                  # this doorbell's share of the engine's counters
        self.polled_ns = 0
        # run to completion: whoever holds `leader` sleeps on the doorbell (thread or caller)
        self.leader = threading.Lock()
        self.lead_owner: int | None = None   # ident of the caller serving the ring, if any
        self.want_lead = 0                # callers taking the doorbell from its thread
        self.last_lead = 0.0              # when the last caller stopped serving (monotonic)
        self.followers = 0                # callers waiting on their Condition meanwhile
        self.budget_ns = self.poll_ns     # adaptive poll budget of serving callers
        self.poll_misses = 0              # consecutive poll windows that found nothing
        self.served = 0                   # sleeps on the doorbell by callers (not the thread)
        self.disarmed = False             # a burst server left notifications off: re-arm first
        self.after_work = False           # the thread's last wake-up found work (moderate next)
        self._unpark = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"{engine.name}-{name}", daemon=True)

    def stop(self) -> None:
        """Stop soon; never blocks, safe with the engine lock held."""
        self.stopped = True
        self._unpark.set()
        self.nudge()                  # out of its sleep on the doorbell now

    def join(self, timeout: float = WAIT_TIMEOUT * 3) -> None:
        if self.thread is not threading.current_thread() and self.thread.is_alive():
            self.thread.join(timeout)

    def _run_handler(self, polled: bool = False) -> None:
        try:
            if polled and self.poll.handler is not None:
                self.poll.handler()
            else:
                self.handler()
        except Exception:  # a handler bug must not end the thread
            self.engine.work_errors += 1
            log.exception("%s: doorbell handler %r failed", self.engine.name, self.handler)

    def _parked(self) -> bool:
        """Does a caller serve the ring (or did one a moment ago, with nobody else waiting)?"""
        return (self.lead_owner is not None or self.want_lead > 0
                or (not self.followers and time.monotonic() - self.last_lead < PARK_S))

    def _loop(self) -> None:
        eng = self.engine
        lock = eng.lock
        stats = eng.stats
        stopping = eng._stop.is_set
        poll = self.poll
        leader = self.leader
        while not self.stopped and not stopping():
            if self._parked():
                self._unpark.wait(PARK_S)
                self._unpark.clear()
                continue
            if not leader.acquire(timeout=WAIT_TIMEOUT):
                continue
            try:
                if self.want_lead:
                    continue
                wait_s, moderated = IDLE_WAIT, False
                expect = self.after_work and poll is not None and poll.burst is not None
                if expect or self.disarmed:
                    with lock:
                        # Right after work, with a burst expected (a bulk stream within its
                        # credit): ask to be rung only after that many buffers, and look at the
                        # ring after MODERATE_S anyway, as a moderated serve() does. Else
                        # re-arm what a burst server left off (NAPI).
                        k = poll.burst() if expect else 1
                        if k > 1:
                            self.disarmed = False
                            raced = poll.delay(k)
                            wait_s, moderated = MODERATE_S, True
                        else:
                            raced = self._arm_for_sleep()
                        if raced:           # buffers raced in while re-arming: take them
                            stats["handler_runs"] += 1
                            self._run_handler(polled=True)
                            continue
                self.after_work = False
                t0 = time.perf_counter_ns()
                n = self.db.wait(wait_s)
            except Exception:       # closed or unlinked under us: the queue is going away
                return
            finally:
                leader.release()
            with lock:
                if self.stopped:
                    return
                if n:
                    stats["wakeups"] += 1
                    self.wakeups += 1
                    self._grow_budget(t0)
                elif poll is not None and poll.pending():
                    if not moderated:           # a burst that stopped short is no lost wake-up
                        stats["missed_wakeups"] += 1   # work waited for a doorbell that never rang
                elif moderated and poll.delay(1):
                    pass                        # re-armed for the very next buffer; one raced in
                else:
                    continue                    # (moderated: re-armed for the next buffer)
                stats["handler_runs"] += 1
                self._run_handler(polled=not n)
                self.after_work = True
                if (self.poll_ns and poll is not None and self.budget_ns >= POLL_MIN_NS
                        and not self._parked()):
                    self._poll_for(lambda: False, None)     # vhost busyloop, NAPI: then sleep

    # --- run to completion: a caller serves the ring itself ------------------------------------
    def serve(self, done: Callable[[], bool], deadline: float | None,
              burst: int = 1) -> bool | None:
        """Serve this doorbell's ring from the calling thread until done() (True) or the
        deadline (False); None when another caller already serves it (wait on your Condition:
        the server's ring work wakes you). Called, and returns, with the engine lock held.
        Work done by another thread (the engine's queued work, a timer) that makes done() true
        must `nudge()` the server, which may be asleep on the doorbell.

        burst > 1 (a reader of a bulk stream that expects that many more buffers, within the
        peer's credit): the server asks to be notified only after `burst` more buffers
        (interrupt moderation, as virtio-net's coalescing and NAPI do), and sleeps at most
        MODERATE_S, then looks at the ring anyway, so a burst that stops short costs that
        much latency, no more."""
        if self.stopped or self.lead_owner is not None:
            return None
        lock = self.engine.lock
        if not self.leader.acquire(False):
            # The doorbell thread sleeps on the doorbell: ring it once to take its place.
            self.want_lead += 1
            try:
                try:
                    self.db.ring()
                except Exception:
                    return None
                state = released(lock)
                try:
                    got = self.leader.acquire(timeout=WAIT_TIMEOUT)
                finally:
                    restore(lock, state)
            finally:
                self.want_lead -= 1
            if not got:
                return None
        self.lead_owner = threading.get_ident()
        try:
            if burst > 1 and self.poll is not None and self.poll.delay is not None:
                try:
                    return self._serve(done, deadline, burst)
                finally:
                    # NAPI's rule: the consumer is busy with what it took, so no interrupt
                    # while it is (each would be a wasted doorbell). Whoever sleeps on the
                    # doorbell next re-arms first (_arm_for_sleep).
                    self._disarm()
            return self._serve(done, deadline)
        finally:
            self.lead_owner = None
            self.last_lead = time.monotonic()
            self.leader.release()
            if self.followers:
                self._unpark.set()        # someone still waits: the doorbell thread serves on

    def _disarm(self) -> None:
        """Ask the other side not to notify (poll.suppress); the next sleeper re-arms."""
        if self.poll.suppress is not None and self.poll.rearm is not None:
            self.poll.suppress()
            self.disarmed = True
        elif self.poll.delay(1):            # no suppress: leave it armed for the next buffer
            self.nudge()

    def _arm_for_sleep(self) -> bool:
        """Before sleeping on the doorbell: re-arm notifications a server left suppressed.
        True when work raced in while they were off (run the ring work instead of sleeping)."""
        if not self.disarmed:
            return False
        self.disarmed = False
        return bool(self.poll.rearm())

    def nudge(self) -> None:
        """Wake the caller serving this ring (its wait ends as if the doorbell rang)."""
        try:
            self.db.ring()
        except Exception:
            pass

    def _serve(self, done, deadline: float | None, burst: int = 1) -> bool | None:
        eng = self.engine
        lock = eng.lock
        stats = eng.stats
        poll = self.poll
        clock = time.monotonic
        moderate = burst > 1 and poll is not None and poll.delay is not None
        while True:
            if self.stopped or eng._stop.is_set():
                return None
            if poll is None or poll.pending():
                stats["handler_runs"] += 1
                self._run_handler(polled=True)
                if done():
                    return True
            if poll is not None and self.budget_ns >= POLL_MIN_NS and self._poll_for(done, deadline):
                return True
            left = WAIT_TIMEOUT if deadline is None else min(WAIT_TIMEOUT, deadline - clock())
            if left <= 0:
                return False
            if moderate:
                self.disarmed = False
                if poll.delay(burst):
                    continue                # buffers raced in while re-arming: take them
                left = min(left, MODERATE_S)
            elif poll is not None and self._arm_for_sleep():
                continue                    # buffers raced in while re-arming: take them
            state = released(lock)
            t0 = time.perf_counter_ns()
            try:
                n = self.db.wait(left)
            except Exception:
                n = -1
            finally:
                restore(lock, state)
            if n < 0:
                return None
            self.served += 1
            if n:
                stats["wakeups"] += 1
                self.wakeups += 1
                self._grow_budget(t0)
                stats["handler_runs"] += 1
                self._run_handler(polled=False)
            elif moderate:
                if poll.pending():          # a burst that stopped short of `burst` buffers
                    stats["handler_runs"] += 1
                    self._run_handler(polled=True)
            elif poll is not None and poll.pending():
                stats["missed_wakeups"] += 1
            if done():      # another thread's work (a timer, requeued work) may have done it
                return True

    def _grow_budget(self, t0: int) -> None:
        """A sleep that ended within POLL_GROW windows: poll again next time (KVM's halt
        polling grows its window the same way). Not within one window: what ended the sleep
        also paid the peer's own wake-up, which a peer that polls too does not pay (a request/
        response pair where both sides poll answers within a window; where both sleep, each
        side's sleep is a whole round trip)."""
        if self.poll_ns and time.perf_counter_ns() - t0 < POLL_GROW * self.poll_ns:
            self.budget_ns = min(self.poll_ns, max(2 * self.budget_ns, self.poll_ns // 4))

    def _poll_for(self, done, deadline: float | None) -> bool:
        """Poll the ring for up to budget_ns with notifications suppressed, running the ring work
        on what appears; True when done() came true. Lock held (released between polls)."""
        eng = self.engine
        lock = eng.lock
        stats = eng.stats
        poll = self.poll
        clock = time.perf_counter_ns
        t0 = clock()
        end = t0 + self.budget_ns
        if deadline is not None:
            end = min(end, t0 + int((deadline - time.monotonic()) * 1e9))
        hit = ok = False
        if poll.suppress is not None:
            poll.suppress()
        try:
            while True:
                if poll.pending():
                    hit = True
                    stats["poll_hits"] += 1
                    stats["handler_runs"] += 1
                    self._run_handler(polled=True)
                    if done():
                        ok = True
                        return True
                    if poll.suppress is not None:
                        poll.suppress()        # the ring work re-armed on its way out
                if clock() >= end:
                    break
                restore(lock, released(lock))  # let this process's other threads in
            if poll.rearm is not None and poll.rearm():
                stats["poll_hits"] += 1
                stats["handler_runs"] += 1
                self._run_handler(polled=True)
                ok = done()
                return ok
            return False
        finally:
            spent = clock() - t0
            stats["poll_ns"] += spent
            self.polled_ns += spent
            if hit or ok:
                self.poll_misses = 0
            else:
                self.poll_misses += 1
                if self.poll_misses >= POLL_MISSES:
                    self.budget_ns //= 2        # polls keep finding nothing: poll less


class Engine:
    def __init__(self, name: str = "engine", *, poll_us: int = 0, lock=None):
        self.name = name
        self.poll_us = poll_us
        self.lock = lock if lock is not None else threading.RLock()
        self.sel = selectors.DefaultSelector()
        self._wr, self._ww = socket.socketpair()
        self._wr.setblocking(False)
        self._ww.setblocking(False)
        self.sel.register(self._wr, selectors.EVENT_READ, None)
        self._qlock = threading.Lock()
        self._queue: deque = deque()
        self._pending: set = set()
        self._timers: list = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._idle = True
        self._closed = False
        self.doorbells: list[DoorbellThread] = []
        self.work_errors = 0
        self.stats = {"wakeups": 0, "missed_wakeups": 0, "handler_runs": 0, "poll_hits": 0,
                      "poll_ns": 0, "work_items": 0}

    # --- any thread ---------------------------------------------------------------------------
    def queue_work(self, fn: Callable[[], None]) -> bool:
        """Run fn on the engine thread soon; False if it was already pending."""
        with self._qlock:
            if fn in self._pending:
                return False
            self._pending.add(fn)
            self._queue.append(fn)
        if threading.get_ident() != self._thread_id:
            self._wake()                 # the engine thread drains its queue before selecting
        return True

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        h = TimerHandle(time.monotonic() + max(0.0, delay), fn)
        with self._qlock:
            heapq.heappush(self._timers, (h.deadline, next(self._seq), h))
        if threading.get_ident() != self._thread_id:
            self._wake()
        return h

    def add_doorbell(self, db, handler: Callable[[], None], *, poll: PollOps | None = None,
                     name: str = "doorbell", poll_us: int | None = None) -> DoorbellThread:
        """Sleep on `db` in a thread of its own and run handler() there when it rings."""
        t = DoorbellThread(self, db, handler, poll, name, self.poll_us if poll_us is None else poll_us)
        self.doorbells.append(t)
        t.thread.start()
        return t

    def remove_doorbell(self, t: DoorbellThread) -> None:
        """Stop a doorbell thread (it exits within WAIT_TIMEOUT; never blocks)."""
        t.stop()
        try:
            self.doorbells.remove(t)
        except ValueError:
            pass

    def add_kick(self, doorbell, fn: Callable[[], None], name: str = "kick") -> DoorbellThread:
        """vhost_poll_start: fn runs, lock held, in the thread that waits on the kick doorbell."""
        return self.add_doorbell(doorbell, fn, name=name, poll_us=0)

    def _wake(self) -> None:
        try:
            self._ww.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or shutting down

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop and every doorbell thread; with a timeout, also wait for them."""
        self._stop.set()
        for t in self.doorbells:
            t.stop()
        self._wake()
        if timeout is not None:
            self.join(timeout)

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for t in list(self.doorbells):
            t.join()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until no work is queued or running (tests and orderly shutdown)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._qlock:
                if not self._queue and self._idle:
                    return True
            time.sleep(0.001)
        return False

    # --- file objects (engine thread, or before it runs) -------------------------------------
    def register(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        self.sel.register(fileobj, events, callback)

    def modify(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        self.sel.modify(fileobj, events, callback)

    def unregister(self, fileobj) -> None:
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    # --- the loop -----------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop on a thread of its own (the guest kernel's worker)."""
        self._thread = threading.Thread(target=self.run, name=f"{self.name}-kworker", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run work, timers and file callbacks on this thread until stop()."""
        self._thread_id = threading.get_ident()
        try:
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
                key = None              # no callback (and what it holds) is kept alive while we sleep
                self._run_queue()
        finally:
            self._shutdown()

    def _call(self, fn, *args) -> None:
        try:
            with self.lock:
                fn(*args)
        except Exception:
            self.work_errors += 1
            log.exception("%s: work %r failed", self.name, fn)

    def _run_queue(self) -> None:
        while True:
            with self._qlock:
                if not self._queue:
                    self._idle = True
                    return
                fn = self._queue.popleft()
                self._pending.discard(fn)
                self._idle = False
            self.stats["work_items"] += 1
            self._call(fn)

    def _run_due(self) -> float:
        """Run queued work and expired timers; return how long select may sleep."""
        self._run_queue()
        now = time.monotonic()
        due = []
        with self._qlock:
            while self._timers and (self._timers[0][2].cancelled or self._timers[0][0] <= now):
                _, _, h = heapq.heappop(self._timers)
                if not h.cancelled:
                    due.append(h.fn)
            nxt = self._timers[0][0] - now if self._timers else None
        for fn in due:
            self._call(fn)
        with self._qlock:
            busy = bool(self._queue)
        if busy or due:
            return 0
        return WAIT_TIMEOUT if nxt is None else max(0.0, min(nxt, WAIT_TIMEOUT))

    def _shutdown(self) -> None:
        for t in self.doorbells:
            t.stop()
        for t in list(self.doorbells):
            t.join()
        self.doorbells.clear()
        for key in list(self.sel.get_map().values()):
            if key.fileobj is not self._wr:
                self.unregister(key.fileobj)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sel.close()
        except Exception:
            pass
        self._wr.close()
        self._ww.close()
