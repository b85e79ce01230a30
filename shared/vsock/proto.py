"""The virtio-vsock stream protocol and credit flow control, written once for both ends.

Theory of operation
-------------------
This is Linux's net/vmw_vsock/virtio_transport_common.c plus the slice of af_vsock.c
bookkeeping it leans on (bind tables, ephemeral ports, accept queues, socket errors), as pure
code: packets come in through `VsockCore.recv_pkt`, packets go out through the `send_pkt`
callback handed to the constructor (an RW packet's payload may be a view of the sender's buffer,
valid only during that call: the transport copies it once, into guest RAM or its own queue), and nothing here blocks, sleeps, spawns or reads a real
clock (time comes from the injectable `clock`, and close timeouts only fire from `tick`).
The guest transport (guest/vsock/transport.py) and the host device (host/vsock/device.py)
each own one `VsockCore`; the runner that drives it holds one lock around every call and
wires each socket's `wake` hook to a Condition. The core itself is not thread-safe.

A `VsockSock` is `struct vsock_sock` and `struct virtio_vsock_sock` in one object. Sockets
are found by two tables, as in af_vsock:

    connected  (local_port, remote_cid, remote_port) -> sock   SYN_SENT, ESTABLISHED, CLOSING
    bound      local_port -> sock                               every socket that bind() named

Children made by a listener (and sockets handed over by the `unbound_request` hook) are only
in `connected`: they share their listener's port. Unlike Linux, a connecting socket goes in
`connected` at connect() time, and a packet that reaches a connected socket through the
bound table alone (wrong peer) is answered as if no socket were there: a hostile peer cannot
inject into someone else's stream by guessing a port.

Receive rules (virtio_transport_recv_pkt and its per-state helpers). Before dispatch: a type
other than STREAM gets an RST (reset_no_sock); no socket gets an RST, never in answer to an
RST; the packet's buf_alloc/fwd_cnt are copied into the socket from EVERY packet
(virtio_transport_space_update) and writers are woken if credit opened.

    state        op               action
    LISTEN       REQUEST          backlog full -> RST; else child ESTABLISHED, RESPONSE (reply)
    LISTEN       (other)          RST (reply), unless the packet is an RST
    SYN_SENT     RESPONSE         ESTABLISHED
    SYN_SENT     INVALID          ignored
    SYN_SENT     RST              CLOSE, err ECONNREFUSED
    SYN_SENT     (other)          RST (reply), CLOSE, err EPROTO
    ESTABLISHED  RW               enqueue; bytes beyond buf_alloc are dropped and counted
    ESTABLISHED  CREDIT_REQUEST   CREDIT_UPDATE (reply)
    ESTABLISHED  CREDIT_UPDATE    wake writers (the credit was already copied)
    ESTABLISHED  SHUTDOWN         peer_shutdown |= flags; both bits and nothing left to
                                  read -> RST and close
    ESTABLISHED  RST              close: peer_shutdown = both, CLOSING (reads drain, then EOF)
    ESTABLISHED  (other)          ignored
    CLOSING      RST              close completes (a released socket is forgotten)
    CLOSING      (other)          ignored
    CLOSE        (any)            RST (reply): bound but neither listening nor connected

Credit (virtio spec §Socket Device "Flow control"; virtio_transport_common.c). The sender may have at
most `peer_free = peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight, all counters u32
with wrap-around. Every outgoing packet of a socket advertises the socket's own buf_alloc and
fwd_cnt (virtio_transport_inc_tx_pkt) and records last_fwd_cnt = fwd_cnt. After a dequeue
the receiver decides whether to send an explicit CREDIT_UPDATE (the h2 "window increment to
advertise" shape lives in `_credit_update_due`):

    "every-read"  2016-17: after every dequeue that advanced fwd_cnt
    "low-space"   2019:    fwd_cnt advanced and W - (fwd_cnt - last_fwd_cnt) < 64 KiB,
                           W = min(buf_alloc, peer_buf_alloc): the window a sender that also
                           caps at its own buffer (current Linux) can use
    "rcvlowat"    2024:    as low-space, or rx_bytes < SO_RCVLOWAT (the vsock_test
                           "credit update + low rx_bytes" fix)
    "half-window" ours:    as low-space, or once half of W was read since the last
                           advertisement (TCP's receive-window update): a sender whose
                           reader keeps up never runs dry. Under low-space it runs out of
                           credit once per window and both sides stall while the update
                           travels; this costs one CREDIT_UPDATE per W/2 of a bulk stream.

Close (virtio_transport_close). release() sends RST at once if the peer already shut both
ways; otherwise SHUTDOWN(RCV|SEND) and a close timeout (VSOCK_CLOSE_TIMEOUT, 8 s): the peer's
RST, or its own SHUTDOWN(both), ends it early; else tick() sends RST and forgets it.

Legal call order per socket (the socket layer):

    socket() [bind()] listen() {accept()} release()
    socket() [bind()] connect() {send() | recv() | shutdown() | set_buffer_size()} release()

Socket-layer errors are raised as OSError(errno, message), as af_vsock returns them.
"""

from __future__ import annotations

import enum
import errno
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from shared.constants import (
    VIRTIO_VSOCK_DEFAULT_BUF_SIZE,
    VIRTIO_VSOCK_DEFAULT_MAX_BUF_SIZE,
    VIRTIO_VSOCK_DEFAULT_MIN_BUF_SIZE,
    VIRTIO_VSOCK_MAX_BUF_SIZE,
    VIRTIO_VSOCK_MAX_PKT_BUF_SIZE,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_INVALID,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_MASK,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_ANY,
    VMADDR_PORT_ANY,
    VSOCK_CLOSE_TIMEOUT,
)
from shared.vsock.packet import Packet, op_name

U32 = 0xFFFFFFFF
LAST_RESERVED_PORT = 1023          # af_vsock: ephemeral ports start above this
SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2   # socket.SHUT_* (how = mode - 1)
CREDIT_POLICIES = ("every-read", "low-space", "rcvlowat", "half-window")


class SockState(enum.IntEnum):
    """sk_state, with the TCP_* values af_vsock uses."""
    ESTABLISHED = 1
    SYN_SENT = 2
    CLOSE = 7
    LISTEN = 10
    CLOSING = 11


def _no_wake() -> None:
    pass


LEND_MIN = 4096     # smaller payloads are copied: a copy costs less than a loan's bookkeeping
BURST_MAX = 16      # a bulk reader asks to be woken after at most this many packets
BULK_PKT = 16 * 1024   # a packet this big marks a bulk stream (rx_burst); smaller: request/response


class Loan:
    """Received payload lent by the transport instead of copied: a view of the buffer it arrived
    in (a guest rx buffer, or a guest tx buffer on the host) and what gives that buffer back
    (return it to its pool, or add_used on the host). The core queues it like bytes and calls
    `release()` once the reader has consumed all of it (or the data is dropped), so the payload
    is copied once, from the ring's buffer straight into the reader's (recv_into), as vhost
    zerocopy and AF_XDP hand buffers back only when their user is done with them."""

    __slots__ = ("view", "done", "refs")

    def __init__(self, view: memoryview, release: Callable[[], None]):
        self.view = view
        self.done = release
        self.refs = 1               # the queue's hold, plus one per zero-copy view handed out

    def __len__(self) -> int:
        return len(self.view)

    def release(self) -> None:
        """Drop one hold; the buffer goes back to the transport with the last one."""
        self.refs -= 1
        if not self.refs:
            self.done()


@dataclass(slots=True, eq=False)
class VsockSock:
    """One stream socket: vsock_sock (addresses, state, shutdown) + virtio_vsock_sock (credit)."""

    # addresses (VMADDR_*_ANY = unset)
    local_cid: int = VMADDR_CID_ANY
    local_port: int = VMADDR_PORT_ANY
    remote_cid: int = VMADDR_CID_ANY
    remote_port: int = VMADDR_PORT_ANY
    state: SockState = SockState.CLOSE
    err: int = 0                   # pending socket error (errno), 0 = none; sticky until connect()
    shutdown: int = 0              # SHUTDOWN bits we sent (RCV=1, SEND=2)
    peer_shutdown: int = 0         # SHUTDOWN bits the peer sent; sticky (spec: hints are permanent)
    done: bool = False             # SOCK_DONE: an RST ended the connection (sent or received)
    released: bool = False         # the owner called release(); lingering until RST or timeout
    # tx side (tx_lock in Linux)
    tx_cnt: int = 0                # u32: bytes we have sent, free-running
    peer_fwd_cnt: int = 0          # u32: bytes the peer has consumed (from its last header)
    peer_buf_alloc: int = 0        # the peer's receive buffer (from its last header)
    # rx side (rx_lock in Linux)
    buf_alloc: int = VIRTIO_VSOCK_DEFAULT_BUF_SIZE   # our receive buffer, advertised
    fwd_cnt: int = 0               # u32: bytes we have consumed, free-running
    last_fwd_cnt: int = 0          # fwd_cnt as last advertised to the peer
    rx_bytes: int = 0              # bytes queued in rx_queue not yet read
    rx_queue: deque = field(default_factory=deque)   # bytes/memoryview chunks
    rx_off: int = 0                # bytes of rx_queue[0] already read
    rcvlowat: int = 1              # SO_RCVLOWAT (only the "rcvlowat" credit policy reads it)
    rx_last: int = 0               # payload bytes of the last RW packet received (burst hint)
    # listener side
    backlog: int = 0
    accept_queue: deque = field(default_factory=deque)   # children not yet accept()ed
    parent: "VsockSock | None" = None                   # listener, while in its accept_queue
    close_deadline: float | None = None                 # close timeout, while lingering
    # hooks for the owner
    wake: Callable[[], None] = _no_wake   # called when readable/writable/state may have changed
    data: object = None                   # free slot for the owner (e.g. a bridged Unix socket)
    # counters
    rx_dropped_bytes: int = 0      # RW bytes dropped: beyond buf_alloc, or after release
    rx_total: int = 0              # RW payload bytes enqueued
    tx_total: int = 0              # RW payload bytes sent
    # credit flow counters (for monitors: tools.monitor's connection view)
    credit_update_tx: int = 0      # CREDIT_UPDATE packets sent
    credit_update_rx: int = 0      # CREDIT_UPDATE packets received
    credit_request_tx: int = 0     # CREDIT_REQUEST packets sent
    credit_request_rx: int = 0     # CREDIT_REQUEST packets received
    credit_stalls: int = 0         # send() calls that found no credit at all

    def snapshot(self) -> dict:
        """Read-only figures of this connection for monitors (docs/monitor.md, "connection")."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        peer_free = max(0, self.peer_buf_alloc - in_flight)
        return {"local": f"{self.local_cid}:{self.local_port}",
                "remote": f"{self.remote_cid}:{self.remote_port}",
                "state": self.state.name, "tx_bytes": self.tx_total, "rx_bytes": self.rx_total,
                "rx_queued": self.rx_bytes, "buf_alloc": self.buf_alloc, "fwd_cnt": self.fwd_cnt,
                "peer_buf_alloc": self.peer_buf_alloc, "peer_fwd_cnt": self.peer_fwd_cnt,
                "tx_cnt": self.tx_cnt, "peer_free": peer_free,
                "credit_update_tx": self.credit_update_tx, "credit_update_rx": self.credit_update_rx,
                "credit_request_tx": self.credit_request_tx,
                "credit_request_rx": self.credit_request_rx,
                "credit_stalls": self.credit_stalls,
                "stalled": self.state == SockState.ESTABLISHED and peer_free == 0,
                "rx_dropped_bytes": self.rx_dropped_bytes}

    def __repr__(self) -> str:
        return (f"VsockSock({self.state.name} {self.local_cid}:{self.local_port}->"
                f"{self.remote_cid}:{self.remote_port} err={self.err} "
                f"shut={self.shutdown}/{self.peer_shutdown} rx={self.rx_bytes} "
                f"tx_cnt={self.tx_cnt} fwd_cnt={self.fwd_cnt})")


def _oserror(code: int, what: str) -> OSError:
    return OSError(code, f"{what}: {errno.errorcode.get(code, code)}")


class VsockCore:
    """The socket table and stream state machine of one vsock endpoint (one local CID)."""

    def __init__(self, local_cid: int, send_pkt: Callable[[Packet], object], *,
                 buf_size: int = VIRTIO_VSOCK_DEFAULT_BUF_SIZE,
                 credit_policy: str = "every-read",
                 clock: Callable[[], float] = time.monotonic,
                 close_timeout: float = VSOCK_CLOSE_TIMEOUT,
                 buf_size_min: int = VIRTIO_VSOCK_DEFAULT_MIN_BUF_SIZE,
                 buf_size_max: int | None = None,
                 max_pkt_len: int = VIRTIO_VSOCK_MAX_PKT_BUF_SIZE,
                 unbound_request: Callable[[Packet], VsockSock | None] | None = None):
        if credit_policy not in CREDIT_POLICIES:
            raise ValueError(f"credit_policy must be one of {CREDIT_POLICIES}, "
                             f"not {credit_policy!r}")
        if not 0 < max_pkt_len <= VIRTIO_VSOCK_MAX_PKT_BUF_SIZE:
            raise ValueError(f"max_pkt_len must be in 1..{VIRTIO_VSOCK_MAX_PKT_BUF_SIZE}")
        if buf_size_max is None:      # 256 KiB, or buf_size if that is larger
            buf_size_max = max(VIRTIO_VSOCK_DEFAULT_MAX_BUF_SIZE, buf_size)
        if not 0 <= buf_size_min <= buf_size_max <= VIRTIO_VSOCK_MAX_BUF_SIZE:
            raise ValueError("need 0 <= buf_size_min <= buf_size_max <= 2^32-1")
        self.local_cid = local_cid
        self._send = send_pkt
        self.buf_size = min(max(buf_size, buf_size_min), buf_size_max)
        self.buf_size_min = buf_size_min
        self.buf_size_max = buf_size_max
        self.credit_policy = credit_policy
        self.clock = clock
        self.close_timeout = close_timeout
        self.max_pkt_len = max_pkt_len       # 64 KiB; a transport may ask for less
        self.unbound_request = unbound_request
        # The transport's fast path for an RW packet (send_rw(sk, payload) -> bool): True when
        # it put the packet on its ring itself (header from sk, payload copied once), False to
        # take the ordinary path (a Packet through send_pkt).
        self.send_rw: Callable[[VsockSock, memoryview], bool] | None = None
        self.bound: dict[int, VsockSock] = {}
        self.connected: dict[tuple[int, int, int], VsockSock] = {}
        self.lingering: set[VsockSock] = set()   # released, waiting for RST or close timeout
        self._next_port = LAST_RESERVED_PORT + 1
        self.stats = {
            "rx": Counter(),          # packets received, by op name
            "tx": Counter(),          # packets sent, by op name
            "resets_sent": 0,
            "rx_dropped_bytes": 0,    # RW bytes dropped (beyond buf_alloc, or after release)
            "rx_no_sock": 0,          # packets for which no socket was found
            "rx_bad_type": 0,         # packets with a type other than STREAM
            "rx_ignored": 0,          # packets with no meaning in the socket's state
            "rx_bytes": 0,            # RW payload bytes enqueued
            "tx_bytes": 0,            # RW payload bytes sent
        }

    # ------------------------------------------------------------------ socket layer (af_vsock)

    def set_local_cid(self, cid: int) -> None:
        """The guest CID changed (TRANSPORT_RESET re-read it): new packets carry the new one."""
        self.local_cid = cid

    def socket(self) -> VsockSock:
        """A new unbound stream socket (virtio_transport_do_socket_init)."""
        return VsockSock(local_cid=self.local_cid, buf_alloc=self.buf_size)

    def bind(self, sk: VsockSock, port: int) -> None:
        """Bind to `port` (VMADDR_PORT_ANY: the next free ephemeral port, from 1024 up)."""
        self._check_open(sk)
        if sk.local_port != VMADDR_PORT_ANY:
            raise _oserror(errno.EINVAL, "bind: socket already bound")
        if port == VMADDR_PORT_ANY:
            port = self._ephemeral_port()
        elif not 0 <= port < VMADDR_PORT_ANY:
            raise _oserror(errno.EINVAL, f"bind: bad port {port}")
        elif port in self.bound:
            raise _oserror(errno.EADDRINUSE, f"bind: port {port} in use")
        sk.local_cid = self.local_cid
        sk.local_port = port
        self.bound[port] = sk

    def listen(self, sk: VsockSock, backlog: int) -> None:
        """Start accepting connections (af_vsock vsock_listen: bound, not connected)."""
        self._check_open(sk)
        if sk.local_port == VMADDR_PORT_ANY or sk.state not in (SockState.CLOSE,
                                                                 SockState.LISTEN):
            raise _oserror(errno.EINVAL, "listen: socket not bound or already connected")
        sk.backlog = max(0, backlog)
        sk.state = SockState.LISTEN

    def connect(self, sk: VsockSock, cid: int, port: int) -> None:
        """Send REQUEST and enter SYN_SENT (auto-binds). Completion arrives via recv_pkt:
        state ESTABLISHED, or CLOSE with sk.err set; the runner times out with connect_timeout."""
        self._check_open(sk)
        if sk.state == SockState.ESTABLISHED:
            raise _oserror(errno.EISCONN, "connect")
        if sk.state == SockState.SYN_SENT:
            raise _oserror(errno.EALREADY, "connect")
        if sk.state != SockState.CLOSE:      # LISTEN, CLOSING
            raise _oserror(errno.EINVAL, f"connect in state {sk.state.name}")
        if not (0 <= cid <= U32 and 0 <= port < VMADDR_PORT_ANY) or cid == VMADDR_CID_ANY:
            raise _oserror(errno.EINVAL, f"connect: bad address {cid}:{port}")
        if sk.local_port == VMADDR_PORT_ANY:
            self.bind(sk, VMADDR_PORT_ANY)
        key = (sk.local_port, cid, port)
        if key in self.connected:
            raise _oserror(errno.EADDRINUSE, f"connect: {key} already connected")
        sk.remote_cid, sk.remote_port = cid, port
        sk.err = 0
        sk.shutdown = sk.peer_shutdown = 0
        sk.done = False
        sk.state = SockState.SYN_SENT
        self.connected[key] = sk
        self._send_pkt_info(sk, VIRTIO_VSOCK_OP_REQUEST)

    def connect_timeout(self, sk: VsockSock) -> bool:
        """af_vsock's connect timeout: SYN_SENT -> CLOSE with ETIMEDOUT. The port stays bound
        (a retry reuses it); the runner should also cancel_pkt(sk) on its transport."""
        if sk.state != SockState.SYN_SENT:
            return False
        self._unlink_connected(sk)
        sk.state = SockState.CLOSE
        sk.err = errno.ETIMEDOUT
        sk.wake()
        return True

    def accept(self, listener: VsockSock) -> VsockSock | None:
        """The oldest un-accepted child, or None."""
        self._check_open(listener)
        if listener.state != SockState.LISTEN:
            raise _oserror(errno.EINVAL, "accept: socket is not listening")
        if not listener.accept_queue:
            return None
        child = listener.accept_queue.popleft()
        child.parent = None
        return child

    def send(self, sk: VsockSock, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of `data` as the peer's credit allows, as RW packets of at most
        max_pkt_len bytes (virtio_transport_send_pkt_info). Returns the bytes taken: 0 when
        there is no credit (no CREDIT_REQUEST is sent, as Linux does not)."""
        if sk.released:                 # _check_open, written out: every write comes this way
            raise _oserror(errno.EBADF, "socket already released")
        # af_vsock vsock_stream_sendmsg: shutdown first, then socket error, then state.
        if sk.shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND or sk.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV:
            raise _oserror(errno.EPIPE, "send after shutdown")
        if sk.err:
            raise _oserror(sk.err, "send")
        if sk.state != SockState.ESTABLISHED:
            raise _oserror(errno.ENOTCONN, "send")
        step = self.max_pkt_len
        # bytes of one packet go as they are (no view to make); anything else as a byte view,
        # sliced per packet without a copy
        mv = data if type(data) is bytes and len(data) <= step else memoryview(data).cast("B")
        size = len(mv)
        total = min(size, self.has_space(sk))         # virtio_transport_get_credit
        if not total and size:
            sk.credit_stalls += 1
        off = 0
        fast = self.send_rw
        stats = self.stats
        while off < total:
            n = min(total - off, step)
            sk.tx_cnt = (sk.tx_cnt + n) & U32
            # The payload is a view of the caller's buffer (the whole of it when it is one
            # packet: no slice): the transport copies it once, into guest RAM (or into its
            # queue), before this call returns.
            chunk = mv if n == size else mv[off:off + n]
            if fast is not None and fast(sk, chunk):
                sk.last_fwd_cnt = sk.fwd_cnt        # the header advertised it
                stats["tx"]["RW"] += 1
            else:
                self._send_pkt_info(sk, VIRTIO_VSOCK_OP_RW, payload=chunk)
            off += n
        sk.tx_total += total
        stats["tx_bytes"] += total
        return total

    def rw_room(self, sk: VsockSock) -> int:
        """Bytes one RW packet of sk may carry now, for a transport that fills the packet from
        the source itself (the host bridge reads a Unix socket straight into a guest rx buffer):
        0 when send() would raise or find no credit (the caller then takes send()'s path)."""
        if (sk.released or sk.err or sk.state != SockState.ESTABLISHED
                or sk.shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND
                or sk.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV):
            return 0
        return min(self.has_space(sk), self.max_pkt_len)

    def rw_filled(self, sk: VsockSock, n: int) -> None:
        """Account an RW packet of n <= rw_room(sk) bytes that the transport filled and put on
        its ring itself (its header advertised buf_alloc and fwd_cnt): send()'s bookkeeping."""
        sk.tx_cnt = (sk.tx_cnt + n) & U32
        sk.last_fwd_cnt = sk.fwd_cnt
        sk.tx_total += n
        self.stats["tx"]["RW"] += 1
        self.stats["tx_bytes"] += n

    def recv(self, sk: VsockSock, n: int) -> bytes:
        """Dequeue up to n bytes. b"" = end of stream (peer shut SEND or reset, queue drained;
        or we shut RCV). BlockingIOError(EAGAIN) when nothing is queued yet."""
        self._check_open(sk)
        if n < 0:
            raise _oserror(errno.EINVAL, "recv: negative length")
        if sk.state not in (SockState.ESTABLISHED, SockState.CLOSING):
            if sk.done:
                return b""
            raise _oserror(sk.err or errno.ENOTCONN, "recv")
        if sk.shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV or n == 0:
            return b""
        if not sk.rx_bytes:
            if sk.err:
                raise _oserror(sk.err, "recv")
            if sk.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND or sk.done:
                return b""
            raise BlockingIOError(errno.EAGAIN, "recv: no data queued")
        data = self._dequeue(sk, n)
        self._consumed(sk, len(data))
        return data

    def recv_into(self, sk: VsockSock, buf: memoryview) -> int:
        """Like recv, into `buf` (a writable byte memoryview): each queued chunk is copied once,
        from where it lies (a lent ring buffer, or our copy) into the caller's buffer."""
        if sk.rx_bytes and sk.state is SockState.ESTABLISHED and not sk.shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV:
            want = len(buf)                      # the fast case: data queued, nothing odd
        else:
            data = self.recv(sk, len(buf))       # the rules (EOF, errors, EAGAIN) in one place
            buf[:len(data)] = data
            return len(data)
        q = sk.rx_queue
        got = 0
        while got < want and q:
            chunk = q[0]
            off = sk.rx_off
            if type(chunk) is Loan:
                src = chunk.view
            else:
                src = chunk
            k = min(len(src) - off, want - got)
            buf[got:got + k] = src[off:off + k] if (off or k < len(src)) else src
            got += k
            if off + k == len(src):
                q.popleft()
                sk.rx_off = 0
                if type(chunk) is Loan:
                    chunk.release()
            else:
                sk.rx_off = off + k
        sk.rx_bytes -= got
        self._consumed(sk, got)
        return got

    def recv_view(self, sk: VsockSock, n: int) -> tuple[memoryview, "Loan | None"]:
        """Zero-copy receive: up to n bytes of the head chunk as a view of where they lie (a lent
        ring buffer, or our copy), and the Loan to release when the caller is done with it (None
        for our own copy). The bytes count as consumed at once (credit for the peer); the ring
        buffer is handed back only at the release, as AF_XDP frames return to the fill ring.
        b"" (an empty view) at end of stream; BlockingIOError like recv."""
        if not (sk.rx_bytes and sk.state is SockState.ESTABLISHED
                and not sk.shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV):
            return memoryview(self.recv(sk, min(n, 65536))), None   # EOF, errors, EAGAIN, CLOSING
        q = sk.rx_queue
        chunk = q[0]
        off = sk.rx_off
        loan = chunk if type(chunk) is Loan else None
        src = loan.view if loan is not None else memoryview(chunk)
        k = min(len(src) - off, n)
        view = src[off:off + k]
        if loan is not None:
            loan.refs += 1                       # the caller's hold
        if off + k == len(src):
            q.popleft()
            sk.rx_off = 0
            if loan is not None:
                loan.release()                   # the queue's hold
        else:
            sk.rx_off = off + k
        sk.rx_bytes -= k
        self._consumed(sk, k)
        return view, loan

    def _consumed(self, sk: VsockSock, n: int) -> None:
        # virtio_transport_stream_do_dequeue: the consumed bytes become credit for the peer.
        sk.fwd_cnt = (sk.fwd_cnt + n) & U32
        if self._credit_update_due(sk):
            self._send_pkt_info(sk, VIRTIO_VSOCK_OP_CREDIT_UPDATE)

    def shutdown(self, sk: VsockSock, how: int) -> None:
        """shutdown(2): SHUT_RD/SHUT_WR/SHUT_RDWR -> SHUTDOWN with RCV/SEND bits (sticky)."""
        self._check_open(sk)
        if how not in (SHUT_RD, SHUT_WR, SHUT_RDWR):
            raise _oserror(errno.EINVAL, f"shutdown: bad how {how}")
        if sk.state not in (SockState.ESTABLISHED, SockState.SYN_SENT, SockState.CLOSING):
            raise _oserror(errno.ENOTCONN, "shutdown")
        mode = how + 1          # RCV_SHUTDOWN=1, SEND_SHUTDOWN=2: the virtio bits share the values
        sk.shutdown |= mode
        if not sk.done:
            self._send_pkt_info(sk, VIRTIO_VSOCK_OP_SHUTDOWN, flags=mode)
        sk.wake()

    def release(self, sk: VsockSock) -> None:
        """close(2) (virtio_transport_release / virtio_transport_close)."""
        if sk.released:
            return
        sk.released = True
        if sk.state == SockState.LISTEN:
            # Children nobody accepted are reset at once (Linux shuts them down and lingers).
            while sk.accept_queue:
                child = sk.accept_queue.popleft()
                child.parent = None
                child.released = True
                self._send_pkt_info(child, VIRTIO_VSOCK_OP_RST)
                child.done = True
                self._forget(child)
            self._forget(sk)
            sk.state = SockState.CLOSE
        elif sk.state in (SockState.ESTABLISHED, SockState.CLOSING):
            # The owner will never read again: drop what is queued (its credit is moot).
            self.drop_rx(sk)
            if sk.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_MASK == VIRTIO_VSOCK_SHUTDOWN_MASK:
                # The peer already shut both ways: answer with RST and go.
                self._send_pkt_info(sk, VIRTIO_VSOCK_OP_RST)
                sk.done = True
                self._forget(sk)
            else:
                if sk.shutdown != VIRTIO_VSOCK_SHUTDOWN_MASK:
                    self._send_pkt_info(sk, VIRTIO_VSOCK_OP_SHUTDOWN,
                                        flags=VIRTIO_VSOCK_SHUTDOWN_MASK)
                sk.close_deadline = self.clock() + self.close_timeout
                self.lingering.add(sk)
        else:                       # CLOSE, SYN_SENT: nothing to tell the peer
            self._forget(sk)
            sk.state = SockState.CLOSE
        sk.shutdown = VIRTIO_VSOCK_SHUTDOWN_MASK
        sk.wake()

    def set_buffer_size(self, sk: VsockSock, n: int) -> int:
        """SO_VM_SOCKETS_BUFFER_SIZE: clamp to [buf_size_min, buf_size_max], advertise it.
        Returns the size set."""
        self._check_open(sk)
        n = min(max(n, self.buf_size_min), self.buf_size_max)
        sk.buf_alloc = n
        if sk.state == SockState.ESTABLISHED:
            self._send_pkt_info(sk, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        return n

    def set_rcvlowat(self, sk: VsockSock, n: int) -> None:
        """SO_RCVLOWAT (virtio_transport_notify_set_rcvlowat): if fewer bytes are queued than
        the new mark and the peer has not heard of our last reads, tell it now."""
        self._check_open(sk)
        sk.rcvlowat = max(1, n)
        if (sk.state == SockState.ESTABLISHED and sk.rx_bytes < sk.rcvlowat
                and sk.fwd_cnt != sk.last_fwd_cnt):
            self._send_pkt_info(sk, VIRTIO_VSOCK_OP_CREDIT_UPDATE)

    # queries ---------------------------------------------------------------------------------

    @staticmethod
    def has_data(sk: VsockSock) -> int:
        """Bytes queued for reading (virtio_transport_stream_has_data)."""
        return sk.rx_bytes

    def has_space(self, sk: VsockSock) -> int:
        """Bytes of credit: min(peer_buf_alloc, buf_alloc) - (tx_cnt - peer_fwd_cnt), u32, >= 0.

        The peer's window is clamped to our own buffer, as current Linux's
        virtio_transport_has_space does: a peer advertising a 4 GiB buf_alloc it never drains
        can make us queue at most buf_alloc bytes for it, not 4 GiB. The "every-read" policy is
        the 2016-17 seeds', whose arithmetic has no clamp: peer_buf_alloc - (tx_cnt -
        peer_fwd_cnt) (virtio_transport_get_credit)."""
        in_flight = (sk.tx_cnt - sk.peer_fwd_cnt) & U32
        if self.credit_policy == "every-read":
            return max(0, sk.peer_buf_alloc - in_flight)
        return max(0, min(sk.peer_buf_alloc, sk.buf_alloc) - in_flight)

    def readable(self, sk: VsockSock) -> bool:
        """poll(POLLIN): data, EOF, an error, or (listener) a child to accept."""
        if sk.state == SockState.LISTEN:
            return bool(sk.accept_queue)
        return bool(sk.rx_bytes or sk.err or sk.done
                    or sk.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND
                    or sk.shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV)

    def writable(self, sk: VsockSock) -> bool:
        """poll(POLLOUT): credit to send, or a send would fail at once (EPIPE, error)."""
        if sk.err or sk.shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND \
                or sk.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV:
            return True
        return sk.state == SockState.ESTABLISHED and self.has_space(sk) > 0

    def next_deadline(self) -> float | None:
        """The earliest close timeout pending, for a runner deciding how long to sleep."""
        return min((sk.close_deadline for sk in self.lingering), default=None)

    # ------------------------------------------------------------------ transport side

    def recv_pkt(self, pkt: Packet) -> None:
        """One packet from the peer (virtio_transport_recv_pkt). Never raises for bad input."""
        self.stats["rx"][op_name(pkt.op)] += 1
        if pkt.type != VIRTIO_VSOCK_TYPE_STREAM:
            self.stats["rx_bad_type"] += 1
            self._reset_no_sock(pkt)
            return
        sk = self._lookup(pkt)
        if sk is not None:
            if pkt.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
                sk.credit_update_rx += 1
            elif pkt.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
                sk.credit_request_rx += 1
        if sk is None:
            if (pkt.op == VIRTIO_VSOCK_OP_REQUEST and self.unbound_request is not None
                    and pkt.dst_cid == self.local_cid):
                self._recv_unbound_request(pkt)
                return
            self.stats["rx_no_sock"] += 1
            self._reset_no_sock(pkt)
            return
        # virtio_transport_space_update: every header carries the peer's credit.
        self._space_update(sk, pkt)
        # Update CID in case it has changed after a transport reset event.
        sk.local_cid = pkt.dst_cid
        handler = _RECV_RULES.get((sk.state, pkt.op)) or _STATE_DEFAULT[sk.state]
        handler(self, sk, pkt)

    def rx_rw(self, sk: VsockSock, buf_alloc: int, fwd_cnt: int, payload) -> None:
        """recv_pkt's fast path for an RW packet the transport matched to an ESTABLISHED socket
        of `connected` ((dst_port, src_cid, src_port) with dst_cid our CID, type STREAM): the
        credit update and the enqueue of recv_pkt, without a Packet. `payload` is bytes (ours
        to keep) or a Loan (released when read or dropped)."""
        self.stats["rx"]["RW"] += 1
        sk.peer_buf_alloc = buf_alloc               # virtio_transport_space_update
        sk.peer_fwd_cnt = fwd_cnt
        n = len(payload)
        if not n:
            if self.has_space(sk) > 0:
                sk.wake()
            return
        if sk.released or sk.rx_bytes + n > sk.buf_alloc:
            sk.rx_dropped_bytes += n
            self.stats["rx_dropped_bytes"] += n
            if type(payload) is Loan:
                payload.release()
            sk.wake()
            return
        sk.rx_queue.append(payload)
        sk.rx_bytes += n
        sk.rx_total += n
        sk.rx_last = n
        self.stats["rx_bytes"] += n
        sk.wake()

    def rx_burst(self, sk: VsockSock) -> int:
        """How many more packets a reader of sk may wait for before being woken (interrupt
        moderation): 1, unless the peer has been sending bulk packets (at least BULK_PKT bytes:
        full ones, or what a bridge read from its socket), and then as many as the
        credit the peer can still have allows (our buffer less what it sent since our last
        advertised fwd_cnt, an upper bound), less one for safety, at most BURST_MAX. The
        seeds' mode (every-read) never moderates."""
        if sk.rx_last < BULK_PKT or self.credit_policy == "every-read":
            return 1
        unacked = (sk.rx_total - sk.last_fwd_cnt) & U32
        return max(1, min(BURST_MAX, (sk.buf_alloc - unacked) // self.max_pkt_len - 1))

    def tick(self, now: float | None = None) -> int:
        """Run close timeouts due by `now` (virtio_transport_close_timeout): RST and forget.
        Returns how many fired."""
        if now is None:
            now = self.clock()
        due = [sk for sk in self.lingering if sk.close_deadline <= now]
        for sk in due:
            if not sk.done:
                self._send_pkt_info(sk, VIRTIO_VSOCK_OP_RST)
                sk.done = True
                sk.peer_shutdown = VIRTIO_VSOCK_SHUTDOWN_MASK
                sk.state = SockState.CLOSING
            self._forget(sk)
            sk.wake()
        return len(due)

    def reset_connected(self, err: int = errno.ECONNRESET) -> int:
        """TRANSPORT_RESET (virtio_vsock_reset_sock for each connected socket): every
        connecting/connected socket -> CLOSE with `err`, out of the connected table. Listeners
        and bindings stay; lingering released sockets are forgotten. Returns the count."""
        socks = list(self.connected.values())
        for sk in socks:
            self._unlink_connected(sk)
            self.drop_rx(sk)        # unreadable from now on; lent buffers go back at once
            sk.state = SockState.CLOSE
            sk.err = err
            if sk.released:
                self._forget(sk)
            sk.wake()
        return len(socks)

    # ------------------------------------------------------------------ receive rules

    def _lookup(self, pkt: Packet) -> VsockSock | None:
        if pkt.dst_cid != self.local_cid:
            return None
        sk = self.connected.get((pkt.dst_port, pkt.src_cid, pkt.src_port))
        if sk is not None:
            return sk
        sk = self.bound.get(pkt.dst_port)
        # A bound socket that is connected to someone else is not this packet's socket.
        if sk is not None and sk.state in (SockState.LISTEN, SockState.CLOSE):
            return sk
        return None

    def _space_update(self, sk: VsockSock, pkt: Packet) -> None:
        sk.peer_buf_alloc = pkt.buf_alloc
        sk.peer_fwd_cnt = pkt.fwd_cnt
        if self.has_space(sk) > 0:
            sk.wake()

    def _listen_request(self, sk: VsockSock, pkt: Packet) -> None:
        # sk_acceptq_is_full: more than `backlog` children already waiting.
        if len(sk.accept_queue) > sk.backlog:
            self._reset_no_sock(pkt)
            return
        child = VsockSock(local_cid=pkt.dst_cid, local_port=pkt.dst_port,
                          remote_cid=pkt.src_cid, remote_port=pkt.src_port,
                          state=SockState.ESTABLISHED, buf_alloc=sk.buf_alloc,
                          rcvlowat=sk.rcvlowat, parent=sk)
        self._space_update(child, pkt)
        self.connected[(child.local_port, child.remote_cid, child.remote_port)] = child
        sk.accept_queue.append(child)
        self._send_pkt_info(child, VIRTIO_VSOCK_OP_RESPONSE, reply=True)
        sk.wake()

    def _recv_unbound_request(self, pkt: Packet) -> None:
        """No listener on the port: ask the owner (the host bridge) for a socket."""
        try:
            sk = self.unbound_request(pkt)
        except OSError:
            sk = None
        if sk is None:
            self.stats["rx_no_sock"] += 1
            self._reset_no_sock(pkt)
            return
        if sk.state != SockState.CLOSE or sk.local_port != VMADDR_PORT_ANY or sk.released:
            raise ValueError(f"unbound_request must return a fresh socket(), got {sk!r}")
        sk.local_cid, sk.local_port = pkt.dst_cid, pkt.dst_port
        sk.remote_cid, sk.remote_port = pkt.src_cid, pkt.src_port
        sk.state = SockState.ESTABLISHED
        self._space_update(sk, pkt)
        self.connected[(sk.local_port, sk.remote_cid, sk.remote_port)] = sk
        self._send_pkt_info(sk, VIRTIO_VSOCK_OP_RESPONSE, reply=True)
        sk.wake()

    def _connecting_response(self, sk: VsockSock, pkt: Packet) -> None:
        sk.state = SockState.ESTABLISHED
        sk.wake()

    def _connecting_rst(self, sk: VsockSock, pkt: Packet) -> None:
        self._connect_failed(sk, errno.ECONNREFUSED)

    def _connecting_other(self, sk: VsockSock, pkt: Packet) -> None:
        # virtio_transport_recv_connecting: anything but RESPONSE/INVALID/RST is a protocol
        # error; reset the peer and fail the connect.
        self._send_pkt_info(sk, VIRTIO_VSOCK_OP_RST, reply=True)
        self._connect_failed(sk, errno.EPROTO)

    def _connect_failed(self, sk: VsockSock, err: int) -> None:
        self._unlink_connected(sk)
        sk.state = SockState.CLOSE
        sk.err = err
        if sk.released:
            self._forget(sk)
        sk.wake()

    def _enqueue(self, sk: VsockSock, pkt: Packet) -> None:
        n = len(pkt.payload)
        if not n:
            return
        # Drop what would overrun our advertised buffer (a peer ignoring credit), and
        # anything for a socket its owner has closed.
        if sk.released or sk.rx_bytes + n > sk.buf_alloc:
            sk.rx_dropped_bytes += n
            self.stats["rx_dropped_bytes"] += n
            return
        payload = pkt.payload
        # Keep our own copy: a memoryview may alias a buffer the transport will reuse.
        sk.rx_queue.append(payload if type(payload) is bytes else bytes(payload))
        sk.rx_bytes += n
        sk.rx_total += n
        self.stats["rx_bytes"] += n
        sk.wake()

    def _credit_request(self, sk: VsockSock, pkt: Packet) -> None:
        self._send_pkt_info(sk, VIRTIO_VSOCK_OP_CREDIT_UPDATE, reply=True)

    def _credit_update(self, sk: VsockSock, pkt: Packet) -> None:
        sk.wake()       # the credit itself was taken by _space_update

    def _peer_shutdown(self, sk: VsockSock, pkt: Packet) -> None:
        flags = pkt.flags & VIRTIO_VSOCK_SHUTDOWN_MASK
        sk.peer_shutdown |= flags
        if (sk.peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_MASK and not sk.rx_bytes
                and not sk.done):
            self._send_pkt_info(sk, VIRTIO_VSOCK_OP_RST)
            self._do_close(sk)
        elif flags:
            sk.wake()

    def _peer_reset(self, sk: VsockSock, pkt: Packet) -> None:
        self._do_close(sk)

    def _do_close(self, sk: VsockSock) -> None:
        """virtio_transport_do_close: the connection is over; reads drain, then EOF."""
        sk.done = True
        sk.peer_shutdown = VIRTIO_VSOCK_SHUTDOWN_MASK
        sk.state = SockState.CLOSING
        if sk.released:
            self._forget(sk)       # cancels the close timeout
        sk.wake()

    def _reset_reply(self, sk: VsockSock, pkt: Packet) -> None:
        self._reset_no_sock(pkt)

    def _ignore(self, sk: VsockSock, pkt: Packet) -> None:
        self.stats["rx_ignored"] += 1

    # ------------------------------------------------------------------ sending

    def _send_pkt_info(self, sk: VsockSock, op: int, *, flags: int = 0,
                       payload: bytes = b"", reply: bool = False) -> None:
        # virtio_transport_inc_tx_pkt: every header advertises our buffer and consumption.
        pkt = Packet(self.local_cid, sk.remote_cid, sk.local_port, sk.remote_port,
                     VIRTIO_VSOCK_TYPE_STREAM, op, flags, sk.buf_alloc, sk.fwd_cnt,
                     payload, reply, sk)
        sk.last_fwd_cnt = sk.fwd_cnt
        self._emit(pkt)

    def _reset_no_sock(self, pkt: Packet) -> None:
        """virtio_transport_reset_no_sock: RST back to the sender; never in answer to an RST."""
        if pkt.op == VIRTIO_VSOCK_OP_RST:
            return
        self._emit(Packet(pkt.dst_cid, pkt.src_cid, pkt.dst_port, pkt.src_port, pkt.type,
                          VIRTIO_VSOCK_OP_RST, 0, 0, 0, b"", True, None))

    def _emit(self, pkt: Packet) -> None:
        self.stats["tx"][op_name(pkt.op)] += 1
        sk = pkt.owner
        if sk is not None:
            if pkt.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
                sk.credit_update_tx += 1
            elif pkt.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
                sk.credit_request_tx += 1
        if pkt.op == VIRTIO_VSOCK_OP_RST:
            self.stats["resets_sent"] += 1
        self._send(pkt)

    def _credit_update_due(self, sk: VsockSock) -> bool:
        """Whether a dequeue should be followed by an explicit CREDIT_UPDATE (the policy)."""
        if sk.state != SockState.ESTABLISHED or sk.released or sk.fwd_cnt == sk.last_fwd_cnt:
            return False
        if self.credit_policy == "every-read":
            return True
        # The window the peer can actually use: current Linux senders also stop at their own
        # buf_alloc (virtio_transport_has_space takes the smaller of the two), so a receiver
        # with the larger buffer must speak up before the *smaller* window runs out, or both
        # wait forever (a socat in a Linux guest stalled at exactly 256 KiB against a 1 MiB host).
        window = min(sk.buf_alloc, sk.peer_buf_alloc) if sk.peer_buf_alloc else sk.buf_alloc
        read = (sk.fwd_cnt - sk.last_fwd_cnt) & U32
        if window - read < VIRTIO_VSOCK_MAX_PKT_BUF_SIZE:
            return True
        if self.credit_policy == "half-window":
            return read >= window - window // 2
        return self.credit_policy == "rcvlowat" and sk.rx_bytes < sk.rcvlowat

    # ------------------------------------------------------------------ bookkeeping

    @staticmethod
    def _dequeue(sk: VsockSock, n: int) -> bytes:
        out = []
        want = n
        q = sk.rx_queue
        while want and q:
            chunk = q[0]
            off = sk.rx_off
            loan = chunk if type(chunk) is Loan else None
            if loan is not None:
                chunk = loan.view
            avail = len(chunk) - off
            if avail <= want:
                out.append(bytes(chunk[off:]) if loan is not None else (chunk[off:] if off else chunk))
                q.popleft()
                sk.rx_off = 0
                want -= avail
                if loan is not None:
                    loan.release()
            else:
                out.append(chunk[off:off + want] if loan is None else bytes(chunk[off:off + want]))
                sk.rx_off = off + want
                want = 0
        data = out[0] if len(out) == 1 and type(out[0]) is bytes else b"".join(out)
        sk.rx_bytes -= len(data)
        return data

    @staticmethod
    def drop_rx(sk: VsockSock) -> int:
        """Drop what is queued for reading (lent buffers given back); returns the bytes."""
        q = sk.rx_queue
        n = sk.rx_bytes
        while q:
            chunk = q.popleft()
            if type(chunk) is Loan:
                chunk.release()
        sk.rx_off = sk.rx_bytes = 0
        return n

    def drop_loans(self) -> None:
        """The transport takes back every buffer it lent (its rings are going away): the data
        of every socket holding one is dropped. Socket states are the caller's to reset."""
        for sk in list(self.connected.values()) + list(self.bound.values()):
            if any(type(c) is Loan for c in sk.rx_queue):
                self.drop_rx(sk)

    def _ephemeral_port(self) -> int:
        # af_vsock __vsock_bind_connectible: a rolling counter above the reserved ports,
        # skipping ports in use. Scanning len(bound)+1 candidates always finds a free one.
        for _ in range(len(self.bound) + 1):
            port = self._next_port
            self._next_port = port + 1 if port + 1 < VMADDR_PORT_ANY else LAST_RESERVED_PORT + 1
            if port not in self.bound:
                return port
        raise _oserror(errno.EADDRNOTAVAIL, "bind: no ephemeral port free")

    def _unlink_connected(self, sk: VsockSock) -> None:
        key = (sk.local_port, sk.remote_cid, sk.remote_port)
        if self.connected.get(key) is sk:
            del self.connected[key]

    def _forget(self, sk: VsockSock) -> None:
        """vsock_remove_sock: out of every table; close timeout cancelled."""
        self._unlink_connected(sk)
        if self.bound.get(sk.local_port) is sk:
            del self.bound[sk.local_port]
        self.lingering.discard(sk)
        sk.close_deadline = None
        if sk.parent is not None:
            try:
                sk.parent.accept_queue.remove(sk)
            except ValueError:
                pass
            sk.parent = None

    @staticmethod
    def _check_open(sk: VsockSock) -> None:
        if sk.released:
            raise _oserror(errno.EBADF, "socket already released")


# Per-state receive rules: (state, op) -> handler; a missing key falls to the state's default.
_S = SockState
_RECV_RULES: dict[tuple[SockState, int], Callable[[VsockCore, VsockSock, Packet], None]] = {
    (_S.LISTEN, VIRTIO_VSOCK_OP_REQUEST): VsockCore._listen_request,
    (_S.SYN_SENT, VIRTIO_VSOCK_OP_RESPONSE): VsockCore._connecting_response,
    (_S.SYN_SENT, VIRTIO_VSOCK_OP_INVALID): VsockCore._ignore,
    (_S.SYN_SENT, VIRTIO_VSOCK_OP_RST): VsockCore._connecting_rst,
    (_S.ESTABLISHED, VIRTIO_VSOCK_OP_RW): VsockCore._enqueue,
    (_S.ESTABLISHED, VIRTIO_VSOCK_OP_CREDIT_REQUEST): VsockCore._credit_request,
    (_S.ESTABLISHED, VIRTIO_VSOCK_OP_CREDIT_UPDATE): VsockCore._credit_update,
    (_S.ESTABLISHED, VIRTIO_VSOCK_OP_SHUTDOWN): VsockCore._peer_shutdown,
    (_S.ESTABLISHED, VIRTIO_VSOCK_OP_RST): VsockCore._peer_reset,
    (_S.CLOSING, VIRTIO_VSOCK_OP_RST): VsockCore._peer_reset,
}
_STATE_DEFAULT: dict[SockState, Callable[[VsockCore, VsockSock, Packet], None]] = {
    _S.LISTEN: VsockCore._reset_reply,
    _S.SYN_SENT: VsockCore._connecting_other,
    _S.ESTABLISHED: VsockCore._ignore,
    _S.CLOSING: VsockCore._ignore,
    _S.CLOSE: VsockCore._reset_reply,
}
del _S
