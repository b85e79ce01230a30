"""A Python API for host programs talking to guests over the hybrid vsock bridge (bridge.py).

Any process on the host can use it; it needs nothing but the run directory:

    host = VsockHost(run_dir)
    s = host.connect(cid, port)          # Unix connection to <run-dir>/vsock-<cid>.sock, after the
                                         # `CONNECT <port>\\n` / `OK <n>\\n` handshake: a byte stream
                                         # to the guest's listener on <port>
    lst = host.listen(cid, port)         # Unix listener at <run-dir>/vsock-<cid>.sock_<port>:
    conn, _ = lst.accept()               # the guest's connections to CID 2 port <port>
    host.close()                         # closes the listeners and removes their files

The sockets returned are ordinary blocking `socket.socket` objects (sendall, recv, shutdown,
makefile...); closing one closes the vsock stream.
"""
from __future__ import annotations

import errno
import socket
import time
from pathlib import Path

from shared import unixsock

MAX_REPLY_LINE = 64


class VsockHost:
    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self._listeners: dict[Path, socket.socket] = {}

    def bridge_path(self, cid: int) -> Path:
        return self.run_dir / f"vsock-{cid}.sock"

    def listen_path(self, cid: int, port: int) -> Path:
        return self.run_dir / f"vsock-{cid}.sock_{port}"

    # --- host -> guest --------------------------------------------------------------------------
    def connect(self, cid: int, port: int, timeout: float | None = 5.0) -> socket.socket:
        """A stream to the guest's `port`. ConnectionRefusedError if the guest is not there or
        nothing listens on the port; TimeoutError if no answer comes within `timeout`."""
        return self.open(cid, port, timeout)[0]

    def open(self, cid: int, port: int, timeout: float | None = 5.0) -> tuple[socket.socket, int]:
        """Like connect(), also returning the port number of the bridge's `OK` line."""
        _check_port(port)
        path = self.bridge_path(cid)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                s.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise ConnectionRefusedError(
                    errno.ECONNREFUSED,
                    f"no vsock bridge for guest CID {cid} at {path} (is the guest running?)") from None
            s.sendall(b"CONNECT %d\n" % port)
            line = _read_line(s, deadline)
            if line is None:
                raise ConnectionRefusedError(
                    errno.ECONNREFUSED,
                    f"vsock connection to CID {cid} port {port} refused: the bridge closed it "
                    f"without OK (nothing listening on the guest port?)")
            words = line.split()
            if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
                raise ConnectionError(f"vsock bridge {path} answered {line!r}, expected 'OK <port>'")
            s.settimeout(None)
            return s, int(words[1])
        except BaseException:
            s.close()
            raise

    # --- guest -> host --------------------------------------------------------------------------
    def listen(self, cid: int, port: int, backlog: int = 16) -> socket.socket:
        """A Unix listener the bridge connects to when guest `cid` connects to CID 2 `port`."""
        _check_port(port)
        path = self.listen_path(cid, port)
        unixsock.unlink(path)            # a stale socket file of an earlier listener
        s = unixsock.listen(path, backlog)
        s.setblocking(True)              # a host program's listener blocks in accept()
        old_s = self._listeners.pop(path, None)
        if old_s is not None:
            old_s.close()
        self._listeners[path] = s
        return s

    def close(self) -> None:
        """Close every listener made by listen() and remove its socket file."""
        for path, s in list(self._listeners.items()):
            s.close()
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self._listeners.clear()

    def __enter__(self) -> "VsockHost":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_port(port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 0xFFFFFFFF:
        raise ValueError(f"vsock port must be an integer in 0..4294967294, not {port!r}")


def _read_line(s: socket.socket, deadline: float | None) -> bytes | None:
    """Read one `\\n`-terminated line without consuming anything after it; None on EOF."""
    buf = b""
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("vsock bridge did not answer the CONNECT line in time")
            s.settimeout(left)
        try:
            peek = s.recv(MAX_REPLY_LINE, socket.MSG_PEEK)
        except socket.timeout:
            raise TimeoutError("vsock bridge did not answer the CONNECT line in time") from None
        except ConnectionResetError:
            return None
        if not peek:
            return None
        nl = peek.find(b"\n")
        if nl >= 0:
            buf += s.recv(nl + 1)
            return buf[:-1]
        if len(buf) + len(peek) >= MAX_REPLY_LINE:
            raise ConnectionError(f"vsock bridge reply too long: {(buf + peek)[:MAX_REPLY_LINE]!r}")
        buf += s.recv(len(peek))
