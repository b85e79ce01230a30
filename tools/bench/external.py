"""External host programs that reach a guest through the hybrid vsock Unix bridge (forked children).

They speak the Firecracker dialect with plain sockets, as socat or a VMM's user would: connect to
<run-dir>/vsock-<cid>.sock, write "CONNECT <port>\\n", read "OK <n>\\n"; a guest's connection to
CID 2 port P arrives on a Unix listener at <run-dir>/vsock-<cid>.sock_<P>.

  h2g     CONNECT to the guest's sink (or discard), write `total` bytes, shut down writing,
          read until EOF (the sink's count); timed here
  sink    listen on the bridge's guest->host path, count bytes until EOF, answer the count
  rr      CONNECT to the guest's echo, time `size`-byte round trips for `seconds`

Each child reports its own CPU time (getrusage) with its result. `Child` runs one of them.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from tools.bench.baselines import CTX, quiet, cpu_self, reap


def bridge_connect(run_dir: str, cid: int, port: int, timeout: float = 10) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(os.path.join(run_dir, f"vsock-{cid}.sock"))
    s.sendall(b"CONNECT %d\n" % port)
    line = b""
    while not line.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            raise ConnectionRefusedError(f"the bridge refused CONNECT {port} (nothing listening?)")
        line += c
        if len(line) > 64:
            raise ConnectionError(f"bad bridge reply {line!r}")
    if not line.startswith(b"OK "):
        raise ConnectionError(f"bad bridge reply {line!r}")
    s.settimeout(300)
    return s


def _h2g(run_dir, cid, port, size, total):
    buf = b"y" * size
    s = bridge_connect(run_dir, cid, port)
    t0 = time.perf_counter()
    for _ in range(total // size):
        s.sendall(buf)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while c := s.recv(4096):
        reply += c
    dt = time.perf_counter() - t0
    s.close()
    return {"bytes": total // size * size, "seconds": dt, "reply": reply.decode(errors="replace").strip()}


def _sink(path, ready):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        Path(path).unlink(missing_ok=True)
        srv.bind(path)
        srv.listen(1)
        srv.settimeout(60)
        ready()
        c, _ = srv.accept()
    finally:
        srv.close()
        Path(path).unlink(missing_ok=True)
    c.settimeout(300)
    buf = bytearray(1 << 20)
    got = 0
    while n := c.recv_into(buf):
        got += n
    c.sendall(b"%d\n" % got)
    c.close()
    return {"bytes": got}


def _rr(run_dir, cid, port, size, seconds, warmup=20):
    msg = b"r" * size
    s = bridge_connect(run_dir, cid, port)

    def one() -> None:
        s.sendall(msg)
        got = 0
        while got < size:
            b = s.recv(size - got)
            if not b:
                raise ConnectionError("echo closed early")
            got += len(b)
    lat = []
    for _ in range(warmup):
        one()
    pc = time.perf_counter
    end = pc() + seconds
    while (t := pc()) < end and len(lat) < 200_000:
        one()
        lat.append((pc() - t) * 1e6)
    s.close()
    return {"lat_us": lat}


PROGRAMS = {"h2g": _h2g, "sink": _sink, "rr": _rr}


def _main(name, args, conn):
    quiet()
    c0 = cpu_self()
    try:
        if name == "sink":
            res = _sink(*args, ready=lambda: conn.send({"ready": True}))
        else:
            res = PROGRAMS[name](*args)
        res["cpu"] = cpu_self() - c0
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}"}
    conn.send(res)
    conn.close()


class Child:
    """One external program in a forked process; `result()` waits for what it reports."""

    def __init__(self, name: str, *args):
        self.conn, child = CTX.Pipe()
        self.p = CTX.Process(target=_main, args=(name, args, child), name=f"bench-ext-{name}")
        self.p.start()
        child.close()
        if name == "sink":                   # listening before the guest connects
            r = self._recv(30)
            if not r.get("ready"):
                self.close()
                raise RuntimeError(f"external sink did not start: {r.get('error')}")

    def _recv(self, timeout: float) -> dict:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"external program gave no result in {timeout:.0f} s")
        try:
            return self.conn.recv()
        except EOFError:
            return {"error": "external program died"}

    def result(self, timeout: float = 600) -> dict:
        try:
            r = self._recv(timeout)
        finally:
            self.close()
        if "error" in r:
            raise RuntimeError(f"external program: {r['error']}")
        return r

    def close(self) -> None:
        self.p.join(2)
        if self.p.is_alive():
            self.p.kill()
        reap(self.p)
        self.conn.close()
