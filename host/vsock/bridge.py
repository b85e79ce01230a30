"""Hybrid vsock: Unix sockets on the host bridged to vsock streams in one guest (the Firecracker and vhost-device-vsock hybrid protocol).

Theory of operation
-------------------
Any host program reaches the guest with a Unix socket, as Firecracker's and rust-vmm's
vhost-device-vsock "hybrid vsock" do; the bridge runs on the device's worker thread and owns:

    <run-dir>/vsock-<cid>.sock     listener (0600). A host program connects and writes one line
                                   `CONNECT <port>\\n` (decimal, at most 32 bytes); the bridge
                                   opens a stream from a host port (round robin in [2^30, 2^31),
                                   Firecracker's allocator) to the guest's <port>, and once the
                                   guest accepts it answers `OK <host port>\\n` (Firecracker) or
                                   `OK <guest port>\\n` (vhost-device-vsock). A refused or timed
                                   out connect closes the Unix connection.
    <run-dir>/vsock-<cid>.sock_<P> not ours: when the guest connects to CID 2 port P and the host
                                   core has no listener there, the core asks `unbound_request`;
                                   the bridge connects to this path (never blocking) and hands
                                   back a core socket bridged to it, or None (the core answers RST).

Each bridged pair (`BridgeConn`) moves bytes both ways without ever holding more than one chunk in
each direction, so the vsock credit is the flow control end to end:

    Unix -> guest  read straight into the guest's next rx buffers (device.fill_rw: one copy,
                   kernel -> guest RAM, as vhost-net's handle_rx), one packet at a time and
                   never more than the credit (core.rw_room), up to one chunk per step. When
                   that path cannot take it (a packet queued before, no rx buffer, capture on),
                   read one chunk into a buffer only when the previous one is fully accepted by
                   core.send (credit-limited); a remainder stops reading until the core
                   socket's `wake` says there is credit again.
    guest -> Unix  take one chunk (at most CHUNK bytes in at most MAX_IOV pieces) from the core
                   only when the previous one is fully written to the Unix socket; the rest
                   waits for EVENT_WRITE. The pieces are views of where the guest's bytes lie
                   (core.recv_view: a lent tx buffer, or the core's copy), written with one
                   sendmsg, so the payload is copied once, guest RAM -> the Unix socket; each
                   lent buffer goes back to the guest (its loan released) once it is fully
                   written. Not taking from the core is what keeps the guest's data in the host
                   core's receive buffer and holds back its credit (fwd_cnt), so a slow Unix
                   reader slows the guest sender.

Shutdown: EOF from the Unix side -> core.shutdown(SEND) once the pending data is sent (half
close); the guest's SEND shutdown (drained) -> Unix shutdown(SHUT_WR); both -> release. An RST,
a reset or an error on either side closes both. Every callback runs on the worker thread; the
core's `wake` hook only queues the connection's pump (it may fire inside core calls).
"""
from __future__ import annotations

import errno
import logging
from collections import deque
import selectors
import socket
from pathlib import Path

from shared import unixsock
from shared.constants import VSOCK_DEFAULT_CONNECT_TIMEOUT
from shared.vsock.proto import SHUT_WR, SockState

log = logging.getLogger(__name__)

MAX_CONNECT_LINE = 32           # `CONNECT <port>\n`, bounded
CHUNK = 256 * 1024              # bytes moved per step in each direction
MAX_IOV = 64                    # guest -> Unix: pieces per chunk (one sendmsg; IOV_MAX is 1024)
READ_BURST = 4                  # Unix reads per readiness callback while the guest takes them all
HANDSHAKE_TIMEOUT = 10.0        # a host program that never sends its CONNECT line is dropped
HOST_PORT_FIRST = 1 << 30       # Firecracker: host-side ports for host-initiated connections
HOST_PORT_END = 1 << 31
ACCEPT_BATCH = 64
# Our Unix sockets' SO_SNDBUF (the kernel caps it at net.core.wmem_max). An AF_UNIX stream
# charges what waits in the peer's queue to the sender's buffer, so the default (~208 KiB, less
# than one CHUNK) made guest -> Unix stop on EAGAIN and go round EVENT_WRITE about once per
# chunk. A few chunks of room let one readiness callback write several. What waits there is
# bounded by this, so a slow Unix reader still slows the guest sender.
UNIX_SNDBUF = 1 << 20
RX_BACKLOG_PKTS = 128           # device's send_pkt_list at or above this: stop reading Unix sockets
BACKLOG_RETRY = 0.01            # then look again this often (seconds)

_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE

# BridgeConn states
HANDSHAKE, CONNECTING, OPEN, CLOSED = "handshake", "connecting", "open", "closed"


def parse_connect(line: bytes, dialect: str = "firecracker") -> int | None:
    """The guest port of a `CONNECT <port>` line (without its newline), or None if malformed.

    Firecracker wants the keyword as written; vhost-device-vsock compares it case-insensitively.
    Words are whitespace-separated; the port is a decimal u32 other than VMADDR_PORT_ANY.
    """
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        return None
    if len(words) != 2:
        return None
    kw, port = words
    if (kw.upper() if dialect == "vhost-device-vsock" else kw) != "CONNECT":
        return None
    if not port.isascii() or not port.isdigit() or len(port) > 10:
        return None
    p = int(port)
    return p if p < 0xFFFFFFFF else None


class BridgeConn:
    """One Unix connection and the core socket it is bridged to."""

    __slots__ = ("bridge", "unix", "sk", "state", "inbound", "line", "to_guest", "to_unix",
                 "unix_eof", "shut_sent", "guest_eof", "events", "timer", "guest_port",
                 "host_port", "pump", "on_ready", "wake", "rbuf", "backoff", "reader")

    def __init__(self, bridge: "VsockBridge", unix: socket.socket, inbound: bool):
        self.bridge = bridge
        self.unix = unix
        self.sk = None
        self.state = HANDSHAKE if inbound else OPEN
        self.inbound = inbound            # True: host -> guest (CONNECT line)
        self.line = b""                   # the CONNECT line read so far
        self.to_guest = b""               # read from Unix, not yet accepted by core.send
        self.rbuf: bytearray | None = None  # what Unix reads land in (to_guest views it)
        # received from the guest, not yet written to Unix: [view, Loan | None] pieces
        self.to_unix: deque[list] = deque()
        self.unix_eof = False             # the Unix side sent EOF
        self.shut_sent = False            # core.shutdown(SEND) done
        self.guest_eof = False            # guest's SEND shutdown passed on (SHUT_WR)
        self.events = 0                   # selector events registered
        self.timer = None
        self.guest_port = 0
        self.host_port = 0
        self.backoff = None               # timer while the device's rx backlog is full
        # One callable each, created once: queue_work deduplicates by identity/equality.
        self.pump = lambda: bridge._pump(self)
        self.on_ready = lambda mask: bridge._on_unix(self, mask)
        self.wake = lambda *_: bridge.schedule(self.pump)
        self.reader = _reader(unix)       # device.fill_rw's readinto: Unix -> guest buffers

    def __repr__(self) -> str:
        d = "in" if self.inbound else "out"
        return f"<BridgeConn {d} {self.state} host:{self.host_port} guest:{self.guest_port}>"


class VsockBridge:
    def __init__(self, device, worker, run_dir, guest_cid: int, dialect: str = "firecracker",
                 *, connect_timeout: float = VSOCK_DEFAULT_CONNECT_TIMEOUT):
        if dialect not in ("firecracker", "vhost-device-vsock"):
            raise ValueError(f"unknown hybrid vsock dialect {dialect!r}")
        self.device = device
        self.worker = worker
        self.run_dir = Path(run_dir)
        self.guest_cid = guest_cid
        self.dialect = dialect
        self.connect_timeout = connect_timeout
        self.path = self.run_dir / f"vsock-{guest_cid}.sock"
        self.listener: socket.socket | None = None
        self.conns: set[BridgeConn] = set()
        self._next_port = HOST_PORT_FIRST
        self.stats = {"connections_in": 0, "connections_out": 0, "refused_in": 0,
                      "refused_out": 0, "malformed": 0, "bytes_to_guest": 0, "bytes_to_host": 0}

    @property
    def core(self):
        return self.device.core

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen on <run-dir>/vsock-<cid>.sock (stale file removed, mode 0600)."""
        unixsock.unlink(self.path)      # a stale socket of a previous host: the CID is ours now
        s = self.listener = unixsock.listen(self.path, 64)
        self.worker.register(s, _R, self._on_accept)
        self.core.unbound_request = self.unbound_request
        log.info("vsock bridge for CID %d on %s (%s dialect)", self.guest_cid, self.path, self.dialect)

    def stop(self) -> None:
        for c in list(self.conns):
            self._close(c, release=True)
        if self.listener is not None:
            self.worker.unregister(self.listener)
            self.listener.close()
            self.listener = None
            unixsock.unlink(self.path)
        if self.core.unbound_request == self.unbound_request:
            self.core.unbound_request = None

    # --- host -> guest --------------------------------------------------------------------------
    def _on_accept(self, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                unix, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:        # e.g. EMFILE: leave it queued, log once per event
                log.warning("vsock bridge %s: accept failed: %s", self.path, e)
                return
            unix.setblocking(False)
            _set_sndbuf(unix)
            c = BridgeConn(self, unix, inbound=True)
            self.conns.add(c)
            c.timer = self.worker.call_later(HANDSHAKE_TIMEOUT, lambda c=c: self._timeout(c))
            self._set_events(c, _R)

    def _read_line(self, c: BridgeConn) -> None:
        try:
            data = c.unix.recv(MAX_CONNECT_LINE - len(c.line))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        if not data:
            self._close(c)
            return
        c.line += data
        nl = c.line.find(b"\n")
        if nl < 0:
            if len(c.line) >= MAX_CONNECT_LINE:
                self._malformed(c, c.line)
            return
        line, c.to_guest = c.line[:nl], c.line[nl + 1:]   # bytes after the line are stream data
        c.line = b""
        port = parse_connect(line, self.dialect)
        if port is None:
            self._malformed(c, line)
            return
        self._connect(c, port)

    def _malformed(self, c: BridgeConn, line: bytes) -> None:
        self.stats["malformed"] += 1
        log.info("vsock bridge %s: malformed CONNECT line %r", self.path, line[:MAX_CONNECT_LINE])
        self._close(c)

    def alloc_host_port(self) -> int:
        """Round robin in [2^30, 2^31), skipping ports in use (Firecracker's allocate_local_port)."""
        used = {x.host_port for x in self.conns if x.inbound}
        for _ in range(len(used) + 1):
            p = self._next_port
            self._next_port = p + 1 if p + 1 < HOST_PORT_END else HOST_PORT_FIRST
            if p not in used:
                return p
        raise OSError(errno.EADDRNOTAVAIL, "no free host-side vsock port")

    def _connect(self, c: BridgeConn, port: int) -> None:
        core = self.core
        c.guest_port = port
        self._set_events(c, 0)
        sk = core.socket()
        sk.data = c
        sk.wake = c.wake
        c.sk = sk
        try:
            for _ in range(16):
                c.host_port = self.alloc_host_port()
                try:
                    core.bind(sk, c.host_port)
                    break
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise
            else:
                raise OSError(errno.EADDRNOTAVAIL, "no free host-side vsock port")
            core.connect(sk, self.guest_cid, port)
        except OSError as e:
            log.info("vsock bridge %s: connect to port %d failed: %s", self.path, port, e)
            self.stats["refused_in"] += 1
            self._close(c, release=True)
            return
        c.state = CONNECTING
        if c.timer is not None:
            c.timer.cancel()
        c.timer = self.worker.call_later(self.connect_timeout, lambda: self._timeout(c))
        self.worker.queue_work(c.pump)

    def _timeout(self, c: BridgeConn) -> None:
        with self.device.lock:
            c.timer = None
            if c.state == HANDSHAKE:
                log.info("vsock bridge %s: no CONNECT line within %.0f s", self.path, HANDSHAKE_TIMEOUT)
                self._close(c)
            elif c.state == CONNECTING:
                self.stats["refused_in"] += 1
                log.info("vsock bridge %s: connect to guest port %d timed out", self.path, c.guest_port)
                self.core.connect_timeout(c.sk)     # SYN_SENT -> CLOSE, ETIMEDOUT
                self._close(c, release=True)

    # --- guest -> host --------------------------------------------------------------------------
    def unbound_request(self, pkt):
        """VsockCore hook: a REQUEST for host port P with no listener -> `<path>_P` or None (RST)."""
        target = f"{self.path}_{pkt.dst_port}"
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.setblocking(False)
        try:
            unix.connect(target)        # AF_UNIX: completes at once or fails (EAGAIN: backlog full)
        except OSError as e:
            unix.close()
            self.stats["refused_out"] += 1
            log.debug("vsock bridge: guest port %d -> %s: %s", pkt.src_port, target, e)
            return None
        _set_sndbuf(unix)
        c = BridgeConn(self, unix, inbound=False)
        sk = self.core.socket()
        sk.data = c
        sk.wake = c.wake
        c.sk = sk
        c.guest_port = pkt.src_port
        c.host_port = pkt.dst_port
        self.conns.add(c)
        self.stats["connections_out"] += 1
        self._set_events(c, _R)
        self.worker.queue_work(c.pump)
        return sk

    def schedule(self, pump) -> None:
        """A core socket's wake hook (it fires inside core calls, so never pump right there):
        inside a device batch (a kick being handled, a host program's call) the pump runs at
        the batch's end on the same thread; otherwise the worker runs it."""
        batch = self.device.batch
        if batch.depth:
            batch.defer(pump)
        else:
            self.worker.queue_work(pump)

    # --- the data path --------------------------------------------------------------------------
    def _on_unix(self, c: BridgeConn, mask: int) -> None:
        with self.device.lock, self.device.batch:
            try:
                if c.state == HANDSHAKE:
                    self._read_line(c)
                    return
                if c.state != OPEN:
                    return
                for _ in range(READ_BURST):        # several chunks per wake-up, one interrupt
                    full = self._read_unix(c) if mask & _R else False
                    if c.state != OPEN:
                        break
                    self._pump_open(c)
                    if (not full or c.state != OPEN or c.to_guest or c.unix_eof
                            or not c.events & _R):
                        break
            except Exception:   # a bridge bug must not take the worker down: drop this connection
                log.exception("vsock bridge %s: %r failed", self.path, c)
                self._close(c, release=True)

    def _pump(self, c: BridgeConn) -> None:
        with self.device.lock, self.device.batch:
            try:
                if c.state == CONNECTING:
                    self._check_connected(c)
                if c.state == OPEN:
                    self._pump_open(c)
            except Exception:
                log.exception("vsock bridge %s: %r failed", self.path, c)
                self._close(c, release=True)

    def _check_connected(self, c: BridgeConn) -> None:
        st = c.sk.state
        if st == SockState.ESTABLISHED:
            c.state = OPEN
            if c.timer is not None:
                c.timer.cancel()
                c.timer = None
            self.stats["connections_in"] += 1
            ok = c.host_port if self.dialect == "firecracker" else c.guest_port
            c.to_unix.append([memoryview(b"OK %d\n" % ok), None])
        elif st != SockState.SYN_SENT or c.sk.err:
            # RST from the guest (nothing listening), or an error: the Unix connection just closes.
            self.stats["refused_in"] += 1
            log.info("vsock bridge %s: guest port %d refused the connection", self.path, c.guest_port)
            self._close(c, release=True)

    def _guest_can_take(self, c: BridgeConn) -> bool:
        """Read a Unix socket only while its guest can take more: the core socket has credit
        (the core's wake brings us back when credit opens) and the device's rx backlog
        (send_pkt_list, packets the guest has not given rx buffers for) is short (we look again
        after BACKLOG_RETRY). So a guest that never drains rx bounds what the host holds."""
        if c.sk is None or self.core.has_space(c.sk) <= 0:
            return False
        if len(getattr(self.device, "send_pkt_list", ())) >= RX_BACKLOG_PKTS:
            if c.backoff is None:
                def retry(c=c):
                    c.backoff = None
                    if c.state == OPEN:
                        self.worker.queue_work(c.pump)
                c.backoff = self.worker.call_later(BACKLOG_RETRY, retry)
            return False
        return True

    def _read_unix(self, c: BridgeConn) -> bool:
        """Read one chunk from the Unix side; True if it filled the buffer (more may wait)."""
        if c.to_guest or c.unix_eof or not self._guest_can_take(c):
            return False
        fill = getattr(self.device, "fill_rw", None)
        if fill is not None:
            full = self._fill_guest(c, fill)
            if full is not None:
                return full
        if c.rbuf is None:
            c.rbuf = bytearray(CHUNK)
        try:
            n = c.unix.recv_into(c.rbuf)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._close(c, release=True)
            return False
        if n:
            c.to_guest = memoryview(c.rbuf)[:n]    # core.send copies it into guest RAM (or queues a copy)
        else:
            c.unix_eof = True
        return n == CHUNK

    def _fill_guest(self, c: BridgeConn, fill) -> bool | None:
        """Unix -> guest rx buffers directly, packet by packet, each at most the credit left,
        up to CHUNK bytes. True if every read filled what it asked for (more may wait), None
        if the device's fill path could not take the first packet (use the buffered path)."""
        core, sk = self.core, c.sk
        moved = 0
        while moved < CHUNK:
            room = core.rw_room(sk)
            if not room:
                return False            # no credit: the core's wake brings us back
            try:
                n = fill(sk, c.reader, room)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self._close(c, release=True)
                return False
            if n is None:
                return None if not moved else True
            if not n:
                c.unix_eof = True
                return False
            core.rw_filled(sk, n)
            self.stats["bytes_to_guest"] += n
            moved += n
            if c.reader.short:
                return False            # the Unix socket is drained for now
        return True

    def _pump_open(self, c: BridgeConn) -> None:
        core, sk = self.core, c.sk
        # Unix -> guest: what was read, as far as the credit goes.
        if c.to_guest:
            try:
                n = core.send(sk, c.to_guest)
            except OSError as e:
                log.debug("vsock bridge %r: send to guest: %s", c, e)
                self._close(c, release=True)
                return
            if n:
                self.stats["bytes_to_guest"] += n
                c.to_guest = c.to_guest[n:]
        if c.unix_eof and not c.to_guest and not c.shut_sent:
            c.shut_sent = True
            try:
                core.shutdown(sk, SHUT_WR)
            except OSError:
                pass
        # guest -> Unix: one chunk at a time, only as fast as the Unix side takes it.
        while True:
            if c.to_unix:
                if not self._write_unix(c):
                    return
                if c.to_unix:
                    break               # the rest waits for EVENT_WRITE
            if c.guest_eof or not core.readable(sk):
                break                   # nothing queued: the core's wake brings us back
            try:
                view, loan = core.recv_view(sk, CHUNK)
            except BlockingIOError:
                break                   # nothing queued: the core's wake brings us back
            except OSError as e:        # ECONNRESET (transport reset) and friends
                log.debug("vsock bridge %r: recv from guest: %s", c, e)
                self._close(c, release=True)
                return
            if view:
                self._take_chunk(c, view, loan)
                continue
            # End of stream: the guest shut SEND (half close), or the connection was reset.
            c.guest_eof = True
            if sk.done or sk.state != SockState.ESTABLISHED:
                self._close(c, release=True)
                return
            try:
                c.unix.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(c, release=True)
                return
            break
        if c.unix_eof and c.shut_sent and c.guest_eof and not c.to_unix:
            self._close(c, release=True)        # both directions done
            return
        self._update_events(c)

    def _take_chunk(self, c: BridgeConn, view: memoryview, loan) -> None:
        """One chunk for the Unix side: the first piece (taken), then more pieces of what is
        queued, up to CHUNK bytes and MAX_IOV pieces. recv_view counts each piece as consumed
        (the guest's credit) as it is taken: taking no more than one chunk ahead of the Unix
        socket is what keeps the flow control end to end."""
        core, sk, q = self.core, c.sk, c.to_unix
        q.append([view, loan])
        total = len(view)
        while total < CHUNK and len(q) < MAX_IOV and sk.rx_bytes:
            view, loan = core.recv_view(sk, CHUNK - total)
            if not view:
                break
            q.append([view, loan])
            total += len(view)
        self.stats["bytes_to_host"] += total

    def _write_unix(self, c: BridgeConn) -> bool:
        """Write what is pending to the Unix socket (one sendmsg); each lent piece fully written
        goes back to the guest, a partial one keeps its tail. False: the connection closed."""
        q = c.to_unix
        try:
            n = c.unix.sendmsg([p[0] for p in q]) if len(q) > 1 else c.unix.send(q[0][0])
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:            # the Unix peer is gone
            log.debug("vsock bridge %r: write to Unix: %s", c, e)
            self._close(c, release=True)
            return False
        while n:
            piece = q[0]
            k = len(piece[0])
            if n < k:
                piece[0] = piece[0][n:]
                break
            n -= k
            q.popleft()
            if piece[1] is not None:
                piece[1].release()      # the guest's buffer is written: it may go back
        return True

    def _update_events(self, c: BridgeConn) -> None:
        ev = 0
        if c.state == OPEN:
            if not c.to_guest and not c.unix_eof and self._guest_can_take(c):
                ev |= _R
            if c.to_unix:
                ev |= _W
        self._set_events(c, ev)

    def _set_events(self, c: BridgeConn, ev: int) -> None:
        if ev == c.events:
            return
        if c.events == 0:
            self.worker.register(c.unix, ev, c.on_ready)
        elif ev == 0:
            self.worker.unregister(c.unix)
        else:
            self.worker.modify(c.unix, ev, c.on_ready)
        c.events = ev

    # --- teardown -------------------------------------------------------------------------------
    def _close(self, c: BridgeConn, release: bool = False) -> None:
        """Close the Unix side; with release, also release the core socket (SHUTDOWN/RST)."""
        if c.state == CLOSED:
            return
        c.state = CLOSED
        self.conns.discard(c)
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        if c.backoff is not None:
            c.backoff.cancel()
            c.backoff = None
        self._set_events(c, 0)
        try:
            c.unix.close()
        except OSError:
            pass
        # Drop the buffers and the callables that refer back to c: a closed connection is a
        # reference cycle, and the cyclic GC counts objects, not bytes, so a 256 KiB buffer
        # held by cyclic garbage can wait for a full collection (a stress run grew by 80 MiB).
        c.rbuf = None
        c.to_guest = b""
        self._drop_to_unix(c)
        c.pump = c.on_ready = c.wake = c.reader = _noop
        sk, c.sk = c.sk, None
        if sk is not None:
            sk.wake = _noop
            sk.data = None
            if release:
                try:
                    self.core.release(sk)
                except OSError as e:
                    log.debug("vsock bridge: release: %s", e)


    @staticmethod
    def _drop_to_unix(c: BridgeConn) -> None:
        """Forget what was not written; lent guest buffers go back (no view of guest RAM may
        outlive the connection: the device releases the memory after its stopping hooks)."""
        q = c.to_unix
        while q:
            view, loan = q.popleft()
            view.release()
            if loan is not None:
                loan.release()


def _reader(unix: socket.socket):
    """readinto(buffers) for device.fill_rw: one recv into one buffer, or one recvmsg_into."""
    recv_into, recvmsg_into = unix.recv_into, unix.recvmsg_into

    def readinto(bufs) -> int:
        if len(bufs) == 1:
            n = recv_into(bufs[0])
            readinto.short = n < bufs[0].nbytes
        else:
            n = recvmsg_into(bufs)[0]
            readinto.short = n < sum(b.nbytes for b in bufs)
        return n
    readinto.short = False          # the last read got less than it asked: drained for now
    return readinto


def _set_sndbuf(unix: socket.socket) -> None:
    try:
        unix.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
    except OSError as e:            # a smaller buffer only costs speed
        log.debug("vsock bridge: SO_SNDBUF: %s", e)


def _noop(*_a) -> None:
    pass
