"""Socket-like AF_VSOCK stream sockets, written once for programs in the guest and in the host.

Theory of operation
-------------------
A `VsockFamily` is the address family of one endpoint (af_vsock's role): `socket()` makes a
`VsockSocket`, a thin blocking-capable wrapper over one `VsockSock` of the endpoint's pure
`VsockCore` (shared/vsock/proto.py), which holds all protocol state and decides everything;
this layer only waits. Two families exist:

    GuestVsock  guest/vsock/socket.py    over the guest transport (kernel lock, kernel timers)
    HostVsock   host/vsock/endpoint.py   over a host device process's VhostVsock (CID 2)

The family interface (what a subclass provides; all of it is used with `lock` held, except
`lock` itself):

    lock            an RLock held around every core call; the core's packets go out and come
                    in under it too (the family's runner holds it while it feeds the core)
    current_core    the live VsockCore, or None when there is none (never raises)
    core            current_core, or OSError(ENODEV) when the device is not up
    up              True while the device is probed/running: connect() needs it
    local_cid       this endpoint's CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID)
    call_later(delay, fn) -> handle with cancel(); fn later runs with `lock` held
    cancel_pkt(sk)  drop the socket's packets still queued for the ring
                    (vsock_transport_cancel_pkt)

and, for the fast path, optionally (the base class gives harmless defaults):

    batch           a context manager (shared/batch.py) around a send: the packets it makes
                    cost one kick or interrupt decision at its end
    doorbell()      the engine's DoorbellThread of the ring that brings this endpoint's
                    packets (the guest's rx interrupt, the host's tx kick), or None: a waiting
                    call serves that ring itself (run to completion, polling with the
                    engine's adaptive budget; shared/engine.py)
    stats           a dict whose "socket_wakeups" counts sleeps that ended in a wake-up

A socket keeps the core it was made on. A family whose core is replaced (the host device's
stop() on a guest reset) must first reset the old core's connected sockets (ECONNRESET) and
wake its bound ones; a socket whose core is no longer `current_core` is *stale*: bind, listen,
connect and accept on it fail with ENODEV, reads and writes fail with the core's error.

Locking: every call takes `family.lock`, calls the core, and leaves. A call that must wait
(connect, accept, send without credit, recv without data) waits in `VsockSocket._wait`, the one
place that sleeps: it serves the family's doorbell itself when no other thread does (run to
completion: it runs the ring work, polls, sleeps on the doorbell, so a packet for it costs no
hand-off to another thread), else it sleeps on the socket's own `threading.Condition(lock)`,
which releases the lock while asleep. The core calls the socket's `wake` hook whenever it
became readable or writable or changed state (always with the lock held), and the hook
notifies the Condition when a thread sleeps on it.

Timeouts follow Python's socket module: `settimeout(None)` blocks, `0.0` (setblocking(False))
never waits (BlockingIOError EAGAIN, or EINPROGRESS from connect), `t > 0` gives up after t
seconds with TimeoutError (errno ETIMEDOUT). A blocking connect waits the socket timeout, or
`connect_timeout` (2 s, af_vsock's VSOCK_DEFAULT_CONNECT_TIMEOUT) when none is set; on expiry the
core's connect_timeout moves the socket to CLOSE and the family's cancel_pkt drops its queued
REQUEST (vsock_connect_timeout). close() is release(): the core lingers with SHUTDOWN and a close
timeout, which a family timer (call_later + core.tick) enforces. close() calls cancel_pkt only
for a socket still connecting (af_vsock cancels on an abandoned connect): an established
socket's queued data and SHUTDOWN must still reach the peer.

Errors are OSError with af_vsock's errno (Python maps them to ConnectionRefusedError,
ConnectionResetError, TimeoutError, BlockingIOError, BrokenPipeError...).
"""
from __future__ import annotations

import contextlib
import errno
import threading
import time

from shared.engine import WAIT_TIMEOUT
from shared.constants import VMADDR_CID_ANY, VMADDR_PORT_ANY, VSOCK_DEFAULT_CONNECT_TIMEOUT
from shared.vsock.proto import SockState, VsockSock

SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2
U32 = 0xFFFFFFFF
DEFAULT_BACKLOG = 128


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{what}: {errno.errorcode.get(code, code)}")


def _addr(address) -> tuple[int, int]:
    """Check a (cid, port) address (struct sockaddr_vm)."""
    if (not isinstance(address, tuple) or len(address) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in address)):
        raise _err(errno.EINVAL, f"address must be a (cid, port) tuple of ints, not {address!r}")
    cid, port = address
    if not (0 <= cid <= U32 and 0 <= port <= U32):
        raise _err(errno.EINVAL, f"address {address!r} out of range")
    return cid, port


class VsockFamily:
    """AF_VSOCK of one endpoint: a socket factory. Subclasses provide the interface above."""

    lock: threading.RLock
    what = "vsock"                      # for error messages: "virtio-vsock device", ...
    batch = contextlib.nullcontext()    # the fast path's one-kick-per-send (a Batch)
    stats: dict = {}                    # "socket_wakeups"

    def doorbell(self):
        """The DoorbellThread (shared/engine.py) whose ring brings this endpoint's packets, for
        a waiting call to serve itself (run to completion); None: wait on the Condition."""
        return None

    # --- the family interface (subclasses) -----------------------------------------------------
    @property
    def current_core(self):
        raise NotImplementedError

    @property
    def up(self) -> bool:
        raise NotImplementedError

    @property
    def local_cid(self) -> int:
        raise NotImplementedError

    def call_later(self, delay: float, fn):
        raise NotImplementedError

    def cancel_pkt(self, sk: VsockSock) -> int:
        raise NotImplementedError

    @property
    def core(self):
        core = self.current_core
        if core is None or not self.up:
            raise _err(errno.ENODEV, f"no {self.what}")
        return core

    # --- sockets -------------------------------------------------------------------------------
    def socket(self) -> "VsockSocket":
        with self.lock:
            core = self.core
            return VsockSocket(self, core, core.socket())

    def create_connection(self, address, timeout: float | None = None) -> "VsockSocket":
        """socket() + connect(), closing the socket if the connect fails."""
        s = self.socket()
        s.settimeout(timeout)
        try:
            s.connect(address)
        except BaseException:
            s.close()
            raise
        return s

    def create_server(self, port: int, backlog: int = DEFAULT_BACKLOG) -> "VsockSocket":
        """socket() + bind((ANY, port)) + listen(backlog)."""
        s = self.socket()
        try:
            s.bind((VMADDR_CID_ANY, port))
            s.listen(backlog)
        except BaseException:
            s.close()
            raise
        return s


def reset_core(core, err: int = errno.ECONNRESET) -> None:
    """A family's core is going away: fail its connected sockets with `err` and wake the rest
    (listeners), whose waiters then find their socket stale. Call with the family lock held."""
    core.reset_connected(err)
    for sk in list(core.bound.values()):
        sk.wake()


class RecvView:
    """Received bytes lent by the transport (VsockSocket.recv_view): `data` is a memoryview of
    them, valid until release(), which gives the buffer back to the ring (once; also at the end
    of a `with` block) and ends `data` (reading it then raises ValueError). Hold it briefly: a
    lent buffer is a ring slot the peer waits for. After a device reset the buffer belongs to
    the guest again: read nothing from a view whose socket has failed."""

    __slots__ = ("data", "_loan", "_lock")

    def __init__(self, data: memoryview, loan, lock):
        self.data = data
        self._loan = loan
        self._lock = lock

    def __len__(self) -> int:
        return len(self.data) if self._lock is not None else 0

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        loan, self._loan = self._loan, None
        try:
            self.data.release()
        except BufferError:         # the caller exported it further: its exports keep it alive
            pass
        if loan is not None:
            with lock:
                loan.release()

    def __enter__(self) -> "RecvView":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class VsockSocket:
    """One AF_VSOCK SOCK_STREAM socket (struct socket + the waiting af_vsock does)."""

    def __init__(self, family: VsockFamily, core, sk: VsockSock):
        self._family = family
        self._lock = family.lock
        self._core = core
        self._sk = sk
        self._cv = threading.Condition(family.lock)
        self._timeout: float | None = None
        self._closed = False
        self._connect_seq = 0                      # numbers connect attempts (stale timers)
        self._connect_pending = False              # a non-blocking connect awaits its report
        self._waiters = 0                          # threads asleep on _cv
        self._serving = None                       # the doorbell our waiting call serves
        self.connect_timeout = VSOCK_DEFAULT_CONNECT_TIMEOUT   # SO_VM_SOCKETS_CONNECT_TIMEOUT
        sk.wake = self._wake
        sk.data = self

    # --- plumbing -----------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiters:       # a Condition nobody waits on is not notified
            with self._cv:      # RLock: re-entered when the core calls us with it held
                self._cv.notify_all()
        db = self._serving
        if db is not None and db.lead_owner != threading.get_ident():
            db.nudge()          # our thread serves the ring, asleep on its doorbell: wake it

    @property
    def waiting(self) -> int:
        """Threads blocked in a call on this socket (asleep on its Condition, or serving its
        ring); tests synchronise on it instead of sleeping."""
        return self._waiters + (self._serving is not None)

    def _stale(self) -> bool:
        """The family's core was replaced (device reset): this socket's core is gone."""
        return self._family.current_core is not self._core

    def _check(self, live: bool = False) -> None:
        if self._closed:
            raise _err(errno.EBADF, "socket is closed")
        if live and self._stale():
            raise _err(errno.ENODEV, f"the {self._family.what} was reset")

    def _deadline(self, timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def _wait(self, ready, deadline: float | None, serve: bool = True, burst: int = 1) -> bool:
        """Wait (lock held) until ready(), the socket is closed or stale; False on timeout.

        The one place a socket call sleeps. Run to completion (shared/engine.py): when the
        family has a doorbell whose ring brings this socket's packets, the calling thread serves
        that ring itself (polls it, sleeps on its doorbell, runs the ring work when it rings);
        only when another thread already serves it does this one sleep on its Condition, which
        that thread's ring work notifies. An accept() does not serve (serve=False): a listener
        waits for connections for long stretches, while the threads that wait for data on a
        connection should be the ones woken by the ring (one wake-up per round trip)."""
        fam = self._family
        done = lambda: ready() or self._closed or self._stale()      # noqa: E731
        if done():
            return True
        stats = fam.stats
        db = fam.doorbell() if serve else None
        while not done():
            if db is not None:
                self._serving = db
                try:
                    r = db.serve(done, deadline, burst)
                finally:
                    self._serving = None
                if r is not None:
                    return r or done()
                db.followers += 1
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                if db is not None:
                    db.followers -= 1
                return False
            if db is not None:       # bounded: the server may leave, then this thread serves
                left = WAIT_TIMEOUT if left is None else min(left, WAIT_TIMEOUT)
            self._waiters += 1
            try:
                self._cv.wait(left)
            finally:
                self._waiters -= 1
                if db is not None:
                    db.followers -= 1
            stats["socket_wakeups"] = stats.get("socket_wakeups", 0) + 1
            db = fam.doorbell() if serve else None
        return True

    # --- timeouts -----------------------------------------------------------------------------
    def settimeout(self, timeout: float | None) -> None:
        if timeout is not None:
            timeout = float(timeout)
            if timeout < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    # --- addresses ----------------------------------------------------------------------------
    def bind(self, address) -> None:
        """vsock_bind: the CID must be VMADDR_CID_ANY or ours; port ANY picks an ephemeral one."""
        cid, port = _addr(address)
        with self._lock:
            self._check(live=True)
            if cid not in (VMADDR_CID_ANY, self._core.local_cid):
                raise _err(errno.EADDRNOTAVAIL, f"bind: {cid} is not this endpoint's CID")
            self._core.bind(self._sk, port)

    def getsockname(self) -> tuple[int, int]:
        with self._lock:
            self._check()
            return self._sk.local_cid, self._sk.local_port

    def getpeername(self) -> tuple[int, int]:
        with self._lock:
            self._check()
            if self._sk.state not in (SockState.ESTABLISHED, SockState.CLOSING):
                raise _err(errno.ENOTCONN, "getpeername")
            return self._sk.remote_cid, self._sk.remote_port

    @property
    def local_cid(self) -> int:
        return self._family.local_cid

    # --- server side --------------------------------------------------------------------------
    def listen(self, backlog: int = DEFAULT_BACKLOG) -> None:
        with self._lock:
            self._check(live=True)
            self._core.listen(self._sk, backlog)

    def accept(self) -> tuple["VsockSocket", tuple[int, int]]:
        """vsock_accept: the oldest connected child, waiting for one if need be."""
        with self._lock:
            self._check(live=True)
            sk = self._sk
            if sk.state != SockState.LISTEN:
                raise _err(errno.EINVAL, "accept: socket is not listening")
            deadline = self._deadline(self._timeout)
            while True:
                child = self._core.accept(sk)
                if child is not None:
                    return (VsockSocket(self._family, self._core, child),
                            (child.remote_cid, child.remote_port))
                if self._timeout == 0.0:
                    raise _err(errno.EAGAIN, "accept")
                if not self._wait(lambda: bool(sk.accept_queue) or sk.state != SockState.LISTEN,
                                  deadline, serve=False):
                    raise _err(errno.ETIMEDOUT, "accept timed out")
                self._check(live=True)

    # --- client side --------------------------------------------------------------------------
    def connect(self, address) -> None:
        """vsock_connect: REQUEST, then wait for RESPONSE (ESTABLISHED) or RST (ECONNREFUSED)."""
        cid, port = _addr(address)
        with self._lock:
            self._check()
            if not self._family.up or self._stale():
                raise _err(errno.ENODEV, f"connect: the {self._family.what} is gone")
            sk = self._sk
            if self._connect_pending and sk.state != SockState.SYN_SENT:
                # the outcome of an earlier non-blocking connect is reported once
                self._connect_pending = False
                if sk.state == SockState.CLOSE and sk.err:
                    code, sk.err = sk.err, 0
                    raise _err(code, "connect")
            self._core.connect(sk, cid, port)      # EISCONN, EALREADY, EINVAL, EADDRINUSE
            self._connect_seq += 1
            gen = self._connect_seq
            timeout = self.connect_timeout if self._timeout is None else self._timeout
            if self._timeout == 0.0:
                # the af_vsock connect_work timer still bounds a non-blocking connect
                self._connect_pending = True
                self._family.call_later(self.connect_timeout, lambda: self._connect_expired(gen))
                raise _err(errno.EINPROGRESS, "connect")
            ok = self._wait(lambda: sk.state != SockState.SYN_SENT, self._deadline(timeout))
            self._check()
            if not ok:
                self._connect_expired(gen)
            if sk.state == SockState.ESTABLISHED:
                return
            code = sk.err or (errno.ENODEV if self._stale() else errno.ECONNRESET)
            sk.err = 0                 # sock_error(): reported once
            raise _err(code, "connect")

    def _connect_expired(self, gen: int) -> None:
        """vsock_connect_timeout: still SYN_SENT -> CLOSE/ETIMEDOUT, drop the queued REQUEST."""
        if gen != self._connect_seq or self._sk.state != SockState.SYN_SENT:
            return
        if self._core.connect_timeout(self._sk) and not self._stale():
            self._family.cancel_pkt(self._sk)

    def connect_ex(self, address) -> int:
        try:
            self.connect(address)
        except OSError as e:
            if e.errno is None:
                raise
            return e.errno
        return 0

    # --- data ---------------------------------------------------------------------------------
    def send(self, data) -> int:
        """vsock_stream_sendmsg: queue as much as the peer's credit allows; wait for credit."""
        return self._send(memoryview(data).cast("B"), self._deadline(self._timeout))

    def sendall(self, data) -> None:
        timeout = self._timeout
        deadline = None if timeout is None else time.monotonic() + timeout   # one for the call
        if type(data) is bytes:             # the common case: no view needed unless partial
            off = self._send(data, deadline)
            if off == len(data):
                return
            mv = memoryview(data)
        else:
            mv = memoryview(data).cast("B")
            off = self._send(mv, deadline)
        while off < len(mv):
            off += self._send(mv[off:], deadline)

    def _send(self, mv, deadline: float | None) -> int:
        """Send what the credit allows of mv (bytes, or a byte memoryview), waiting for credit."""
        with self._lock:
            if self._closed:
                raise _err(errno.EBADF, "socket is closed")
            sk, core = self._sk, self._core
            while True:
                with self._family.batch:  # the packets of this send: one kick or interrupt
                    n = core.send(sk, mv)     # EPIPE, the socket error, ENOTCONN
                if n or not len(mv):
                    return n
                # No credit: the peer's CREDIT_UPDATE (or any packet of it) wakes us.
                if self._timeout == 0.0:
                    raise _err(errno.EAGAIN, "send")
                if not self._wait(lambda: core.writable(sk), deadline):
                    raise _err(errno.ETIMEDOUT, "send timed out")
                self._check()
                if self._stale() and not core.writable(sk):
                    raise _err(errno.ECONNRESET, "send")

    def recv(self, bufsize: int) -> bytes:
        """vsock_stream_recvmsg: up to bufsize bytes; b"" at end of stream."""
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        return self._recv(self._core.recv, bufsize)

    def _recv(self, take, arg):
        """Wait until take(sk, arg) (the core's recv or recv_into) has something to give."""
        with self._lock:
            self._check()
            sk, core = self._sk, self._core
            if sk.state == SockState.LISTEN:
                raise _err(errno.ENOTCONN, "recv on a listening socket")
            deadline = self._deadline(self._timeout)
            readable = core.readable
            while True:
                if readable(sk) or self._timeout == 0.0:
                    return take(sk, arg)    # EAGAIN only when not readable (non-blocking)
                if self._stale():           # nothing will ever arrive on a dead core
                    raise _err(errno.ECONNRESET, "recv")
                if not self._wait(lambda: readable(sk), deadline, burst=core.rx_burst(sk)):
                    raise _err(errno.ETIMEDOUT, "recv timed out")
                self._check()

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        """Like recv, into `buffer`: each byte is copied once, from where the transport left it
        (a lent ring buffer: guest RAM) into the caller's buffer."""
        mv = memoryview(buffer).cast("B")
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        n = nbytes or len(mv)
        if n > len(mv):
            raise ValueError("buffer too small for requested bytes")
        return self._recv(self._core.recv_into, mv[:n] if n < len(mv) else mv)

    def recv_view(self, max_bytes: int = 65536) -> "RecvView":
        """Zero-copy receive: a RecvView of up to max_bytes received bytes where they lie (with
        the fast path, the guest buffer the transport lent), read through `.data`; `release()`
        hands the buffer back to the ring. An empty view at end of stream. Waits like recv."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        view, loan = self._recv(self._core.recv_view, max_bytes)
        return RecvView(view, loan, self._lock)

    # --- buffer size (SO_VM_SOCKETS_BUFFER_SIZE) ----------------------------------------------
    def set_buffer_size(self, n: int) -> int:
        with self._lock:
            self._check()
            return self._core.set_buffer_size(self._sk, n)

    def get_buffer_size(self) -> int:
        with self._lock:
            return self._sk.buf_alloc

    # --- teardown -----------------------------------------------------------------------------
    def shutdown(self, how: int) -> None:
        with self._lock:
            self._check()
            self._core.shutdown(self._sk, how)

    def close(self) -> None:
        """vsock_release: the core lingers (SHUTDOWN, close timeout) or resets; waiters wake."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sk, core = self._sk, self._core
            connecting = sk.state == SockState.SYN_SENT
            core.release(sk)
            if self._stale():
                # the core is gone: nothing of it reaches a ring any more, no timer to run
                core.lingering.discard(sk)
                sk.close_deadline = None
            else:
                if connecting:
                    # a connect abandoned by close, like an interrupted vsock_connect: its
                    # REQUEST must not go out after the socket is gone
                    self._family.cancel_pkt(sk)
                if sk.close_deadline is not None:
                    # virtio_transport_close's delayed close_work: RST and forget on expiry
                    delay = max(0.0, sk.close_deadline - core.clock()) + 0.001
                    self._family.call_later(delay, lambda: core.tick())
            self._cv.notify_all()
            if self._serving is not None:
                self._serving.nudge()

    def detach(self) -> None:
        raise _err(errno.EOPNOTSUPP, "detach is not supported on vsock sockets")

    def fileno(self) -> int:
        raise _err(errno.EOPNOTSUPP, "vsock sockets of this emulation have no file descriptor")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def state(self) -> SockState:
        return self._sk.state

    def __enter__(self) -> "VsockSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        sk = self._sk
        return (f"<VsockSocket {'closed ' if self._closed else ''}{sk.state.name} "
                f"{sk.local_cid}:{sk.local_port} -> {sk.remote_cid}:{sk.remote_port}>")


__all__ = ["VsockFamily", "VsockSocket", "RecvView", "reset_core", "SHUT_RD", "SHUT_WR", "SHUT_RDWR",
           "VMADDR_CID_ANY", "VMADDR_PORT_ANY", "DEFAULT_BACKLOG"]
