"""The frontend's end of a control connection: blocking request -> reply over a Unix socket.

Theory of operation
-------------------
One `ControlClient` per device connection. `request(op, **fields)` stamps the next `seq`, sends
one msgpack map and reads until the matching reply is complete (one `Decoder(kind="reply")` for the
life of the connection, so framing survives partial reads). An error reply raises
`ControlError(code, message)`; the host closes the connection after any error, so the client
marks itself closed too. EOF raises ConnectionError; a reply slower than `timeout` raises
TimeoutError. A lock serialises requests from several threads (the VMM's main thread and its
interrupt threads asking GET_STATUS).
"""
from __future__ import annotations

import logging
import socket
import threading

from shared.control import ControlError, Decoder, encode, error_is_fatal
from shared.errors import ProtocolError

__all__ = ["ControlClient", "ControlError"]
log = logging.getLogger(__name__)


class ControlClient:
    def __init__(self, path, timeout: float = 5.0):
        self.path = str(path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._seq = 0
        self._decoder = Decoder(kind="reply")
        self._pending: list[dict] = []
        self.closed = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise ConnectionError(f"no host control socket at {self.path} (is the host running?)") from None
        except ConnectionRefusedError:
            sock.close()
            raise ConnectionError(f"host control socket {self.path} refused the connection "
                                  "(host not running, or a stale socket file)") from None
        except socket.timeout:
            sock.close()
            raise ConnectionError(f"timed out connecting to the host at {self.path}") from None
        except OSError as e:
            sock.close()
            raise ConnectionError(f"cannot connect to the host at {self.path}: {e}") from None
        self.sock = sock

    def request(self, op: str, fds=(), **fields) -> dict:
        """Send one request and wait for its reply; returns the reply map (ok is True).
        `fds` go with the request's bytes (SCM_RIGHTS: an eventfd doorbell)."""
        with self._lock:
            if self.closed:
                raise ConnectionError(f"control connection to {self.path} is closed")
            self._seq += 1
            seq = self._seq
            try:
                data = encode({"op": op, "seq": seq, **fields})
                if fds:                  # the fds ride on the first bytes; the rest follows
                    data = data[socket.send_fds(self.sock, [data], list(fds)):]
                if data:                 # (nothing left: a peer that already answered and closed
                    self.sock.sendall(data)   # must not turn the reply into EPIPE)
                rep = self._read_reply()
            except (socket.timeout, TimeoutError):
                self._close_locked()
                raise TimeoutError(f"{op}: no reply from the host within {self.timeout} s") from None
            except (BrokenPipeError, ConnectionResetError) as e:
                self._close_locked()
                raise ConnectionError(f"{op}: control connection lost ({e})") from None
            if rep.get("seq") != seq:
                if not rep["ok"]:        # the host rejected the stream before reading our seq
                    self._close_locked()
                    raise ControlError(rep["error"], rep["message"])
                self._close_locked()
                raise ControlError("EPROTO", f"{op}: reply seq {rep.get('seq')} does not match request {seq}")
            if not rep["ok"]:
                if error_is_fatal(rep):  # the host closes the connection after the error
                    self._close_locked()
                raise ControlError(rep["error"], rep["message"])
            return rep

    def _read_reply(self) -> dict:
        while not self._pending:
            data = self.sock.recv(65536)
            if not data:
                self._close_locked()
                raise ConnectionError(f"the host closed the control connection {self.path}")
            try:
                self._pending.extend(self._decoder.feed(data))
            except ProtocolError as e:
                self._pending.extend(getattr(e, "messages", []))
                if not self._pending:
                    self._close_locked()
                    raise ControlError(e.code, f"bad reply from the host: {e}") from None
        return self._pending.pop(0)

    def _close_locked(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def close(self) -> None:
        try:  # wake a thread blocked in recv() so the lock comes free at once
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            self._close_locked()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
