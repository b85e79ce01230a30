"""The migration stream: msgpack maps over one Unix stream socket (docs/PROTOCOL.md "Migration
stream"), each with a type `t`:

    source -> destination                         destination -> source
    hello  {version, mem, table, devices}         ready | error {message}
    pages  {round, pages [page...], data}         (page = gpa >> 12, data = 4096 bytes each)
    state  {alloc, devices}                       resumed {ms} | error {message}

The source sends hello, waits for ready, sends rounds of pages, pauses, sends the last pages and
the state; the destination resumes its devices and answers resumed; only then does the source
exit. Any error, EOF or timeout fails the migration and the source runs on.
"""
from __future__ import annotations

import select
import socket
import time

import msgpack

VERSION = 1
TYPES = {"hello", "ready", "error", "pages", "state", "resumed"}
MAX_MESSAGE = 64 << 20


class StreamError(Exception):
    """The peer broke the stream (EOF, garbage, an error message, a timeout)."""


def parse_uri(uri: str) -> str:
    """`unix:/path` (QEMU's spelling) or a plain path -> the socket path."""
    path = uri[5:] if uri.startswith("unix:") else uri
    if not path or uri.split(":", 1)[0] in ("tcp", "exec", "fd", "rdma"):
        raise ValueError(f"migration URI {uri!r}: only unix:PATH is supported")
    return path


class Stream:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE)
        self.sent_bytes = 0

    def send(self, t: str, **fields) -> None:
        data = msgpack.packb({"t": t, **fields}, use_bin_type=True)
        self.sock.sendall(data)
        self.sent_bytes += len(data)

    def recv(self, timeout: float | None = None, stop=None) -> dict:
        """The next message; StreamError on EOF, a malformed message, an `error` message, or no
        message within `timeout` (None: wait, looking at `stop()` every 0.2 s)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                msg = next(self.unpacker)
            except StopIteration:
                msg = None
            except (ValueError, msgpack.UnpackException) as e:
                raise StreamError(f"malformed migration stream: {e}") from None
            if msg is not None:
                if not isinstance(msg, dict) or msg.get("t") not in TYPES:
                    raise StreamError(f"malformed migration message {str(msg)[:60]}")
                if msg["t"] == "error":
                    raise StreamError(f"peer: {msg.get('message', '?')}")
                return msg
            left = 0.2 if end is None else end - time.monotonic()
            if left <= 0:
                raise StreamError("migration peer timed out")
            r, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if stop is not None and stop():
                raise StreamError("stopped")
            if not r:
                continue
            try:
                data = self.sock.recv(1 << 20)
            except OSError as e:
                raise StreamError(f"migration stream: {e}") from None
            if not data:
                raise StreamError("migration peer closed the stream")
            try:
                self.unpacker.feed(data)
            except msgpack.BufferFull:
                raise StreamError("migration message too large") from None

    def expect(self, t: str, timeout: float | None = None, stop=None) -> dict:
        msg = self.recv(timeout, stop)
        if msg["t"] != t:
            raise StreamError(f"expected {t}, got {msg['t']}")
        return msg

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
