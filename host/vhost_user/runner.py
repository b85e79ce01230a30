"""The vhost-user backend loop: a listening socket, one frontend at a time, one VhostWorker.

    VhostUserBackend(socket_path, kind, opts).run()

serves one device kind (kinds.py: VsockKind(cid) or NetKind(spec); the runner itself is
device-neutral: the kind makes a device per frontend and attaches what it owns). It listens on
`socket_path` (QEMU's `-chardev socket,path=...` connects to it), accepts one frontend (a second
one is refused while the first is connected), reads with recvmsg (socket.recv_fds: the
memory table's and the rings' fds arrive by SCM_RIGHTS), feeds the codec and the session and sends
the replies. Kick eventfds are registered on the worker's selector directly (no poller threads):
when one is readable the runner drains it and calls device.kick_received. On EOF or a malformed
message the connection is closed, the device reset and a new one made for the next frontend.

`serve(pairs, opts)` runs one such backend per (socket, kind) pair (a bare int is a vsock CID),
each in a process of its own (as the daemon does for native guests), and forwards SIGTERM/SIGINT
to them.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from functools import partial
from pathlib import Path

from shared.doorbell import EventFdDoorbell
from shared.stats import remove_stats, write_stats

from host.worker import VhostWorker
from shared import unixsock

from . import codec
from .kinds import VsockKind
from .memfd import map_memory_table
from .session import VhostUserSession

log = logging.getLogger("host.vhost_user")

RECV_SIZE = 4096
_R, _W = 1, 2


class VhostUserBackend:
    def __init__(self, path: Path, kind, opts):
        self.path = Path(path)
        self.kind = VsockKind(kind, opts) if isinstance(kind, int) else kind
        self.opts = opts
        self.worker = VhostWorker(name=f"vhost-user-{self.kind.device}-{self.path.name}")
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.decoder: codec.Decoder | None = None
        self.session: VhostUserSession | None = None
        self.device = None
        self.kicks: dict[int, object] = {}       # queue -> registered kick doorbell
        self.connections = 0
        self.opened = False

    # --- setup ----------------------------------------------------------------------------------
    @property
    def cid(self):
        return getattr(self.kind, "cid", None)

    def bind(self) -> None:
        """Claim and listen on the socket, then open what the kind holds for its whole life."""
        unixsock.claim(self.path, f"host: {self.path} is already served by another backend")
        self.listener = unixsock.listen(self.path, 4)
        if not self.opened:
            try:
                self.kind.open()
            except (ValueError, OSError) as e:
                self.listener.close()
                self.listener = None
                unixsock.unlink(self.path)
                raise SystemExit(f"host: {self.path}: {getattr(e, 'strerror', None) or e}") from None
            self.opened = True
        log.info("vhost-user-%s backend for %s listening on %s", self.kind.device, self.kind.label,
                 self.path)

    def _new_device(self):
        dev = self.kind.new_device(self.worker)
        dev.worker = self.worker
        dev.lock = self.worker.lock        # one big lock: engine work, kicks and control
        return dev

    # --- connections ----------------------------------------------------------------------------
    def _on_accept(self, mask: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.conn is not None:
            log.warning("vhost-user %s: refused a second frontend (one is connected)", self.path)
            conn.close()
            return
        self.connections += 1
        conn.setblocking(False)
        self.conn = conn
        self.decoder = codec.Decoder()
        self.device = self._new_device()
        self.session = VhostUserSession(self.device, attach_memory=map_memory_table,
                                        open_doorbell=EventFdDoorbell,
                                        name=f"vhost-user[{self.kind.label}]")
        self.worker.register(conn, _R, self._on_conn)
        log.info("vhost-user %s: frontend connected (connection %d)", self.path, self.connections)

    def _on_conn(self, mask: int) -> None:
        for _ in range(64):                      # a burst of messages, then let others run
            if self.conn is None or not self._read_message():
                return

    def _read_message(self) -> bool:
        """Read and handle one message; False when there is nothing more to read now.

        The header is read alone with recvmsg: a frontend sends each message with one sendmsg,
        so its fds come with its first bytes (libvhost-user's vu_message_read does the same);
        reading more could join the next message and its fds to this one.
        """
        conn = self.conn
        try:
            data, fds, flags, _ = socket.recv_fds(conn, codec.HEADER.size, codec.MAX_FDS)
        except BlockingIOError:
            return False
        except OSError as e:
            log.info("vhost-user %s: connection error: %s", self.path, e)
            self._disconnect()
            return False
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            log.warning("vhost-user %s: too many fds in one message (control data truncated); "
                        "closing the connection", self.path)
            self._disconnect()
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            log.info("vhost-user %s: frontend closed the connection", self.path)
            self._disconnect()
            return False
        try:
            reqs = self.decoder.feed(data, fds)
            if not reqs:
                rest = self._read_exact(codec.HEADER.size - len(data)) if len(data) < codec.HEADER.size else b""
                reqs = self.decoder.feed(rest)
                if not reqs:
                    size = codec.HEADER.unpack_from(bytes(self.decoder.buf))[2]
                    reqs = self.decoder.feed(self._read_exact(size))
        except codec.VhostUserError as e:
            log.warning("vhost-user %s: malformed message: %s; closing the connection", self.path, e)
            self._disconnect()
            return False
        except OSError as e:
            log.warning("vhost-user %s: message cut short: %s; closing the connection", self.path, e)
            self._disconnect()
            return False
        for req in reqs:
            out = self.session.handle(req)
            if out.replies and not self._send(b"".join(out.replies)):
                self._disconnect()
                return False
            self._sync_kicks()
            self.kind.sync(self.device)          # e.g. the net backend attached at the start
            for q in out.started:
                self.worker.queue_work(partial(self._kick, q))   # kicks that came before the start
            if out.close:
                self._disconnect()
                return False
        return True

    def _read_exact(self, n: int) -> bytes:
        """The rest of a message the frontend is sending (blocking, bounded by a timeout)."""
        buf = bytearray()
        self.conn.settimeout(5.0)
        try:
            while len(buf) < n:
                chunk = self.conn.recv(n - len(buf))
                if not chunk:
                    raise OSError("EOF in the middle of a message")
                buf += chunk
        finally:
            self.conn.setblocking(False)
        return bytes(buf)

    def _send(self, data: bytes) -> bool:
        try:
            self.conn.setblocking(True)
            self.conn.settimeout(5.0)
            self.conn.sendall(data)
            return True
        except OSError as e:
            log.info("vhost-user %s: cannot send a reply: %s", self.path, e)
            return False
        finally:
            try:
                self.conn.setblocking(False)
            except OSError:
                pass

    def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        self.worker.unregister(conn)
        for q in list(self.kicks):
            self.worker.unregister(self.kicks.pop(q))
        if self.decoder is not None:
            self.decoder.close()
        if self.device is not None:
            with self.device.lock:
                self.kind.detach(self.device)
        if self.session is not None:
            self.session.close()         # stop, reset: memory unmapped, fds closed, bridge down
        self.session = None
        self.device = None
        conn.close()
        log.info("vhost-user %s: ready for the next frontend", self.path)

    # --- kicks ----------------------------------------------------------------------------------
    def _sync_kicks(self) -> None:
        """Register exactly the kick eventfds the device holds now (replaced at any time)."""
        dev = self.device
        for q in range(dev.num_queues):
            db = dev.kicks[q]
            cur = self.kicks.get(q)
            if cur is db:
                continue
            if cur is not None:
                self.worker.unregister(cur)
                del self.kicks[q]
            if db is not None:
                self.worker.register(db, _R, partial(self._on_kick, q, db))
                self.kicks[q] = db

    def _on_kick(self, q: int, db, mask: int) -> None:
        if self.kicks.get(q) is not db:
            return
        db.read()
        self._kick(q)

    def _kick(self, q: int) -> None:
        dev, sess = self.device, self.session
        if dev is None or sess is None or not sess.ring_started(q):
            return                       # not started: the eventfd keeps it until the start
        db = dev.kicks[q]
        if db is not None:
            db.read()
        with dev.lock:
            dev.kick_received(q)

    # --- stats ----------------------------------------------------------------------------------
    def _write_stats(self) -> None:
        dev = self.device
        try:
            write_stats(self.opts.run_dir, "device", {
                "guest": f"vhost-user:{self.path.name}", **self.kind.stats_fields(),
                "guest_pid": 0, "status": dev.status if dev else 0,
                "stats": dev.get_stats() if dev else {}, "connections": self.connections})
        except OSError as e:
            log.debug("cannot write stats: %s", e)
        if not self.worker.stopping:
            self.worker.call_later(self.opts.stats_interval, self._write_stats)

    # --- run ------------------------------------------------------------------------------------
    def run(self) -> int:
        if self.listener is None:
            self.bind()
        self.worker.register(self.listener, _R, self._on_accept)
        self._write_stats()
        try:
            self.worker.run()
        finally:
            self.close()
        return 0

    def close(self) -> None:
        self._disconnect()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            unixsock.unlink(self.path)
        self.kind.close()
        remove_stats(self.opts.run_dir, "device")


def serve(pairs: list[tuple[Path, object]], opts) -> int:
    """One backend process per (socket, kind or vsock CID); returns when all have ended or on
    SIGTERM/SIGINT."""
    from host.daemon import _die_with_parent
    backends = []
    for path, kind in pairs:
        b = VhostUserBackend(path, kind, opts)
        try:
            b.bind()
        except (OSError, SystemExit) as e:
            for other in backends:
                other.listener.close()
                other.path.unlink(missing_ok=True)
                other.kind.close()
            if isinstance(e, SystemExit):
                raise
            raise SystemExit(f"host: cannot listen on {path}: {e.strerror}") from None
        backends.append(b)
    if opts.pcap:
        from shared.vsock.pcap import PcapWriter
        PcapWriter(opts.pcap).close()        # the file header; backends append records
    parent = os.getpid()
    children: dict[int, VhostUserBackend] = {}
    for b in backends:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for other in backends:
                    if other is not b:
                        other.listener.close()
                _die_with_parent(parent)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, lambda *_: b.worker.stop())
                code = b.run()
            except BaseException:
                log.exception("vhost-user backend failed")
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = b
        b.listener.close()
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while children and not stop:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            b = children.pop(pid, None)
            log.warning("vhost-user backend for %s ended (status %#x)", b.path if b else pid, status)
        else:
            time.sleep(0.1)
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 3
    while children and time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.05)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    for b in backends:
        b.path.unlink(missing_ok=True)
        b.kind.close()
    return 0
