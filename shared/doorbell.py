"""Doorbells: kicks (driver -> device) and interrupts (device -> driver) with eventfd semantics.

`ring()` adds one to the counter and never blocks; `wait(timeout)` sleeps until the counter is
non-zero, drains it and returns how many rings it consumed, or returns 0 when the timeout passes
(a worker uses the timeout to notice shutdown: a POSIX semaphore cannot be select()ed).

Implementations:
  SemDoorbell    a posix_ipc named semaphore, mode 0600, unguessable name (the default wire kind,
                 "posix_sem" in the control protocol)
  LocalDoorbell  a threading.Condition counter, for single-process tests and in-process peers

  EventFdDoorbell  an eventfd passed over SCM_RIGHTS (vhost-user SET_VRING_KICK/CALL/ERR, or the
                 native "eventfd" kind with --doorbell eventfd); select()able through fileno()

The seam: a doorbell is *selectable* when it has `fileno()` (`selectable(db)`). A runner waits on
a selectable kick on its engine's selector (no thread); a semaphore needs a thread of its own.
Device logic only ever sees the Doorbell protocol.
"""
from __future__ import annotations

import os
import select
import threading
from typing import Protocol

import posix_ipc


class DoorbellClosed(Exception):
    """wait() on a doorbell that was closed."""


class Doorbell(Protocol):
    def ring(self) -> None: ...
    def wait(self, timeout: float | None) -> int: ...
    def close(self) -> None: ...
    # optional: def fileno(self) -> int, for doorbells a selector can wait on (read() drains)


def selectable(db) -> bool:
    """Can a selector wait on this doorbell (it has fileno(); an eventfd, not a semaphore)?"""
    return callable(getattr(db, "fileno", None))


class SemDoorbell:
    """A named POSIX semaphore used as an eventfd-like counter.

    close() while another thread is blocked in wait() must not unmap the semaphore under it
    (sem_close would, and the waiter would fault when its timed wait returns): the close is
    deferred until the last waiter leaves, and later waits raise DoorbellClosed.
    """

    kind = "posix_sem"

    def __init__(self, name: str, create: bool = False):
        flags = posix_ipc.O_CREX if create else 0
        self.name = name
        self._sem = posix_ipc.Semaphore(name, flags, mode=0o600, initial_value=0)
        self._lock = threading.Lock()
        self._waiters = 0
        self._closing = False
        self._closed = False

    def ring(self) -> None:
        if self._closing:
            return
        self._sem.release()

    def wait(self, timeout: float | None) -> int:
        with self._lock:
            if self._closing:
                raise DoorbellClosed(self.name)
            self._waiters += 1
        try:
            try:
                self._sem.acquire(timeout)
            except posix_ipc.BusyError:
                return 0
            n = 1
            sem = self._sem
            while sem.value:  # drain: eventfd read returns the whole counter (no exception
                try:          # per wake-up: sem_getvalue first, a trywait only if it pays)
                    sem.acquire(0)
                except posix_ipc.BusyError:
                    break
                n += 1
            return n
        finally:
            with self._lock:
                self._waiters -= 1
                if self._closing and self._waiters == 0:
                    self._really_close()

    def pending(self) -> int:
        return self._sem.value

    def _really_close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sem.close()
            except posix_ipc.ExistentialError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if self._waiters == 0:
                self._really_close()

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_semaphore(self.name)
        except posix_ipc.ExistentialError:
            pass

    def spec(self) -> dict:
        return {"kind": self.kind, "name": self.name}


class LocalDoorbell:
    """An in-process counter with the same semantics (tests, loopback peers)."""

    kind = "local"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0
        self.rings = 0

    def ring(self) -> None:
        with self._cond:
            self._count += 1
            self.rings += 1
            self._cond.notify()

    def wait(self, timeout: float | None) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: self._count > 0, timeout):
                return 0
            n, self._count = self._count, 0
            return n

    def pending(self) -> int:
        return self._count

    def close(self) -> None:
        pass


class EventFdDoorbell:
    """An eventfd (Linux eventfd(2)): ring() adds 1, wait() select()s then reads the counter.

    Owns `fd` (closed by close()). The fd is made non-blocking: a read that races another reader
    returns 0 instead of blocking (QEMU's event notifiers are EFD_NONBLOCK already).
    """

    kind = "eventfd"

    def __init__(self, fd: int | None = None, name: str | None = None):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if fd is None else fd
        os.set_blocking(self.fd, False)
        self.name = name or f"eventfd:{self.fd}"   # the frontend's label: queues sharing it share a waiter

    def spec(self) -> dict:
        """How a native control message names it; the fd goes with the message (SCM_RIGHTS)."""
        return {"kind": "eventfd", "name": self.name}

    def fileno(self) -> int:
        return self.fd

    def ring(self) -> None:
        if self.fd < 0:
            return
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:         # the counter is at its maximum: already signalled
            pass

    def read(self) -> int:
        """Drain the counter without waiting: how many rings were pending (0 if none)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float | None) -> int:
        if self.fd < 0:
            raise DoorbellClosed(self.name)
        r, _, _ = select.select([self.fd], [], [], timeout)
        return self.read() if r else 0

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def open_doorbell(spec: dict) -> SemDoorbell:
    """Open a doorbell named in a control message; raises ValueError on a bad spec."""
    if not isinstance(spec, dict) or spec.get("kind") != "posix_sem" or not isinstance(spec.get("name"), str):
        raise ValueError(f"unsupported doorbell {spec!r}")
    name = spec["name"]
    if not name.startswith("/ve-") or len(name) > 64:
        raise ValueError(f"doorbell name {name!r} is not one of ours")
    try:
        return SemDoorbell(name, create=False)
    except posix_ipc.ExistentialError:
        raise ValueError(f"doorbell {name!r} does not exist") from None
