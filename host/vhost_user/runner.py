"""The vhost-user transport: a listening socket, one frontend at a time, one DeviceRunner.

`VhostUserBackend(socket_path, kind, opts).run()` serves one device kind (host/devices.py,
transport "vhost-user") on `socket_path` (QEMU's `-chardev socket,path=...` connects to it). It
accepts one frontend at a time (a second one is refused while the first is connected) and hands
the connection to the DeviceRunner (host/runner.py) with the vhost-user codec; kicks are eventfds
on the engine's selector, no threads. On EOF or a malformed message the connection is closed, the
device reset and a new one made for the next frontend. `serve(pairs, opts)` runs one backend per
(socket, kind) in a process of its own (host/runner.py Children, as the daemon does for native
guests) and stops them on SIGTERM/SIGINT.
"""
from __future__ import annotations

import logging
import signal
import socket
import time
from pathlib import Path

from shared import unixsock
from shared.vsock.pcap import PcapWriter

from host.runner import MAX_FDS, Children, Connection, DeviceRunner, checked_recv, exit_status
from host.session import close_fds

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
        close_fds(fds)
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
        self.kind = kind
        self.opts = opts
        self.runner = DeviceRunner(self.kind, opts, f"vhost-user-{self.kind.device}-{self.path.name}")
        self.worker = self.runner.worker
        self.listener: socket.socket | None = None
        self.conn: Connection | None = None
        self.connections = 0

    @property
    def device(self):
        return self.runner.device

    def bind(self) -> None:
        """Claim and listen on the socket, then open what the kind holds for its whole life."""
        unixsock.claim(self.path, f"host: {self.path} is already served by another backend")
        self.listener = unixsock.listen(self.path, 4)
        try:
            self.kind.open()
        except (ValueError, OSError) as e:
            self.close()
            raise SystemExit(f"host: {self.path}: {getattr(e, 'strerror', None) or e}") from None
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
    def run(self) -> int:
        if self.listener is None:
            self.bind()
        self.worker.register(self.listener, _R, self._on_accept)
        return self.runner.run(lambda: {"guest": f"vhost-user:{self.path.name}", **self.kind.stats_fields(),
                                        "guest_pid": 0, "connections": self.connections}, self.close)

    def close(self) -> None:
        """The connection and the listener (the runner releases the device and the kind)."""
        if self.conn is not None:
            self.conn.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            unixsock.unlink(self.path)


def serve(pairs: list[tuple[Path, object]], opts) -> int:
    """One backend process per (socket, kind); returns when all have ended or on SIGTERM/SIGINT."""
    if opts.pcap:
        PcapWriter(opts.pcap).close()        # the file header; backends append records
    backends: list[VhostUserBackend] = []
    for path, kind in pairs:
        b = VhostUserBackend(path, kind, opts)
        try:
            b.bind()
        except (OSError, SystemExit) as e:
            for other in backends:
                other.close()
                other.kind.close()
            if isinstance(e, SystemExit):
                raise
            raise SystemExit(f"host: cannot listen on {path}: {e.strerror}") from None
        backends.append(b)
    children = Children(lambda pid, b, status: log.warning(
        "vhost-user backend for %s ended (%s)", b.path, exit_status(status)))
    for b in backends:
        pid = children.fork(b.run, close=[o.listener for o in backends if o is not b],
                            on_term=b.worker.stop)
        children[pid] = b
        b.listener.close()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while children and not stop:
        if not children.reap():
            time.sleep(0.1)
    children.stop()
    for b in backends:
        b.path.unlink(missing_ok=True)
        b.kind.close()
    return 0
