"""The program every well-behaved stress guest runs: `python -m guest ... --run tools.stress.agent:main`.

A command server on vsock port AGENT_PORT: the host side (workloads.py) connects through the
bridge, sends one line, and reads one JSON line back. Commands:

    SEND <sid> <size> <port>     connect to the host (CID 2) port, send the G2H header and the
                                 stream's bytes, SHUT_WR, read the 32-byte SHA-256 of what the host
                                 received and compare it with ours
    STORM <n> <port>             n connect/close cycles to the host port (every other one sends a byte)
    INDEV <kind> <sid> <size> <port>   a stream to an in-device host service (echo: check the echo
                                 byte for byte; sink: check the decimal byte count it answers)

It also listens on HOLD_PORT, accepting connections and never reading them (the rx-stall fault).
"""
from __future__ import annotations

import hashlib
import json
import threading

from .data import CHUNK, G2H_HDR, PrefixChecker, stream_bytes
from .schedule import AGENT_PORT, HOLD_PORT

TIMEOUT = 30.0
HELD_MAX = 8


def _recv_exact(s, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b:
            break
        buf += b
    return buf


def _send_stream(s, data: bytes) -> None:
    mv = memoryview(data)
    for off in range(0, len(data), CHUNK):
        s.sendall(mv[off:off + CHUNK])


def _send_then_shut(s, data: bytes) -> None:
    """The sending half of an in-device stream, on a thread of its own: a reset (a host kill)
    ends it quietly; the receiving half reports the stream as reset."""
    try:
        _send_stream(s, data)
        s.shutdown(1)
    except OSError:
        pass


def cmd_send(vsock, sid: int, size: int, port: int) -> dict:
    data = stream_bytes(sid, size)
    s = vsock.create_connection((2, port), timeout=TIMEOUT)
    try:
        s.sendall(G2H_HDR.pack(sid, size))
        _send_stream(s, data)
        s.shutdown(1)
        digest = _recv_exact(s, 32)
    finally:
        s.close()
    if len(digest) < 32:
        return {"result": "reset", "why": "no digest from the host"}
    return {"result": "ok" if digest == hashlib.sha256(data).digest() else "corrupt"}


def cmd_storm(vsock, n: int, port: int) -> dict:
    ok = err = 0
    last = ""
    for i in range(n):
        try:
            s = vsock.create_connection((2, port), timeout=TIMEOUT)
            if i % 2:
                s.sendall(b"x")
            s.close()
            ok += 1
        except OSError as e:
            err += 1
            last = f"{type(e).__name__}: {e}"
    return {"result": "ok" if not err else "reset", "ok": ok, "errors": err, "why": last}


def cmd_indev(vsock, kind: str, sid: int, size: int, port: int) -> dict:
    data = stream_bytes(sid, size)
    s = vsock.create_connection((2, port), timeout=TIMEOUT)
    try:
        sender = threading.Thread(target=_send_then_shut, args=(s, data), daemon=True)
        sender.start()
        if kind == "echo":
            chk = PrefixChecker(data)
            while True:
                b = s.recv(CHUNK)
                if not b:
                    break
                chk.feed(b)
            sender.join(TIMEOUT)
            if chk.corrupt:
                return {"result": "corrupt", "corrupt": chk.corrupt, "bytes": chk.got}
            return {"result": "ok" if chk.verified() else "reset", "bytes": chk.got}
        line = b""
        while b"\n" not in line and len(line) < 24:      # "<decimal count>\n", then EOF or not
            b = s.recv(24)
            if not b:
                break
            line += b
        line = line.split(b"\n")[0]
        sender.join(TIMEOUT)
        if not line.isdigit():
            return {"result": "reset", "why": f"sink answered {line!r}"}
        return {"result": "ok" if int(line) == size else "corrupt", "bytes": int(line)}
    finally:
        s.close()


def _serve(vsock, conn) -> None:
    try:
        conn.settimeout(TIMEOUT * 3)
        line = b""
        while not line.endswith(b"\n") and len(line) < 200:
            b = conn.recv(1)
            if not b:
                return
            line += b
        words = line.decode().split()
        try:
            if words[0] == "SEND":
                res = cmd_send(vsock, int(words[1]), int(words[2]), int(words[3]))
            elif words[0] == "STORM":
                res = cmd_storm(vsock, int(words[1]), int(words[2]))
            elif words[0] == "INDEV":
                res = cmd_indev(vsock, words[1], int(words[2]), int(words[3]), int(words[4]))
            else:
                res = {"result": "error", "why": f"unknown command {words[0]!r}"}
        except OSError as e:
            res = {"result": "reset", "why": f"{type(e).__name__}: {e}"}
        conn.sendall(json.dumps(res).encode() + b"\n")
    except (OSError, IndexError, ValueError):
        pass
    finally:
        conn.close()


def _hold(vsock) -> None:
    """Accept and never read: the peer's credit runs out and its sends must stall, not pile up."""
    srv = vsock.create_server(HOLD_PORT)
    held: list = []
    while True:
        conn, _ = srv.accept()
        held.append(conn)
        if len(held) > HELD_MAX:
            held.pop(0).close()


def main(vsock) -> None:
    threading.Thread(target=_hold, args=(vsock,), daemon=True, name="stress-hold").start()
    srv = vsock.create_server(AGENT_PORT)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve, args=(vsock, conn), daemon=True, name="stress-cmd").start()
