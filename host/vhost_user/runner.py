"""The vhost-user transport: a listening socket, one frontend at a time, one DeviceRunner.

    VhostUserBackend(socket_path, kind, opts).run()

serves one device kind (host/devices.py: VsockKind(cid) or NetKind(spec), transport
"vhost-user"). It listens on `socket_path` (QEMU's `-chardev socket,path=...` connects to it),
accepts one frontend (a second one is refused while the first is connected), reads with recvmsg
(socket.recv_fds: the memory table's and the rings' fds arrive by SCM_RIGHTS), feeds the codec
(which drives the one Session, host/session.py) and sends the replies. Everything else, kicks
included (eventfds on the engine's selector, no threads), is the DeviceRunner's (host/runner.py),
as for a native guest. On EOF or a malformed message the connection is closed, the device reset
and a new one made for the next frontend.

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
from pathlib import Path

from shared import unixsock
from shared.signals import die_with_parent
from shared.vsock.pcap import PcapWriter

from host.devices import VsockKind
from host.runner import Connection, DeviceRunner, MAX_FDS, checked_recv

from .codec import HEADER, MAX_PAYLOAD, vhost_user_session

log = logging.getLogger("host.vhost_user")

_R = 1
TIMEOUT = 5.0                    # s to read the rest of a message the frontend is sending


def read_message(sock: socket.socket):
    """A vhost-user connection's reader: one whole message and its fds; None at EOF.

    The header is read alone with recvmsg: a frontend sends each message with one sendmsg, so
    its fds come with its first bytes (libvhost-user's vu_message_read does the same); reading
    more could join the next message and its fds to this one. The rest is read blocking, bounded
    by TIMEOUT.
    """
    got = checked_recv(*socket.recv_fds(sock, HEADER.size, MAX_FDS)[:3])
    if got is None:
        return None
    data, fds = got
    try:
        sock.settimeout(TIMEOUT)
        data += _read_exact(sock, HEADER.size - len(data))
        size = HEADER.unpack_from(data)[2]
        if size <= MAX_PAYLOAD:                  # larger: the codec refuses the header alone
            data += _read_exact(sock, size)
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        sock.setblocking(False)
    return data, fds


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise OSError("EOF in the middle of a message")
        buf += chunk
    return bytes(buf)


class VhostUserBackend:
    def __init__(self, path: Path, kind, opts):
        self.path = Path(path)
        self.kind = VsockKind(kind, opts, "vhost-user") if isinstance(kind, int) else kind
        self.opts = opts
        self.runner = DeviceRunner(self.kind, opts, f"vhost-user-{self.kind.device}-{self.path.name}")
        self.worker = self.runner.worker
        self.listener: socket.socket | None = None
        self.conn: Connection | None = None
        self.connections = 0
        self.opened = False

    @property
    def cid(self):
        return getattr(self.kind, "cid", None)

    @property
    def device(self):
        return self.runner.device

    @property
    def session(self):
        return self.runner.session

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

    # --- connections ----------------------------------------------------------------------------
    def _on_accept(self, mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.conn is not None:
            log.warning("vhost-user %s: refused a second frontend (one is connected)", self.path)
            sock.close()
            return
        self.connections += 1
        dev = self.runner.new_device()
        codec = vhost_user_session(dev, name=f"vhost-user[{self.kind.label}]")
        self.runner.session = codec.session
        self.conn = Connection(self.runner, sock, codec, read_message, f"the frontend of {self.path}",
                               self._disconnected)
        log.info("vhost-user %s: frontend connected (connection %d)", self.path, self.connections)

    def _disconnected(self) -> None:
        self.conn = None
        self.runner.detach()             # kicks unwatched, device reset: memory unmapped, fds closed
        log.info("vhost-user %s: ready for the next frontend", self.path)

    # --- run ------------------------------------------------------------------------------------
    def _write_stats(self) -> None:
        self.runner.write_stats({"guest": f"vhost-user:{self.path.name}", **self.kind.stats_fields(),
                                 "guest_pid": 0, "connections": self.connections})
        if not self.worker.stopping:
            self.worker.call_later(self.opts.stats_interval, self._write_stats)

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
        if self.conn is not None:
            self.conn.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            unixsock.unlink(self.path)
        self.runner.close()


def serve(pairs: list[tuple[Path, object]], opts) -> int:
    """One backend process per (socket, kind or vsock CID); returns when all have ended or on
    SIGTERM/SIGINT."""
    if opts.pcap:
        PcapWriter(opts.pcap).close()        # the file header; backends append records
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
                die_with_parent(parent)
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
