"""The OS baselines every vsock figure is a ratio to: an AF_UNIX socketpair and a
multiprocessing.Pipe between two processes, measured by the same code paths as the vsock figures.

  stream   a forked writer sends `total` bytes in `size`-byte writes after a go byte; the reader
           (this thread) times from the go to EOF; each side's CPU comes from getrusage
  rr       a forked echo; this thread times `size`-byte round trips for `seconds`
  pairs    N socketpairs at once, a forked writer and a forked reader each, started together
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import signal
import socket
import time

CTX = mp.get_context("fork")


def cpu_self(thread: bool = False) -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD if thread else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def quiet() -> None:
    """In a forked child: the bench handles Ctrl-C and ends its children itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def child(fn):
    """A forked child's target: Ctrl-C is the bench's; a peer that went away ends it quietly."""
    def run(*args):
        quiet()
        try:
            fn(*args)
        except (OSError, EOFError):
            pass
    run.__name__ = fn.__name__
    return run


def reap(p) -> None:
    p.join(10)
    if p.is_alive():
        p.kill()
        p.join(5)


# --- writers and echoes (forked children) -------------------------------------------------------
@child
def _sock_writer(sock, size: int, total: int, res) -> None:
    buf = b"x" * size
    sock.recv(1)                             # the go byte
    c0 = cpu_self()
    for _ in range(total // size):
        sock.sendall(buf)
    sock.close()
    res.send(cpu_self() - c0)


@child
def _pipe_writer(conn, size: int, total: int, res) -> None:
    buf = b"x" * size
    conn.recv_bytes()
    c0 = cpu_self()
    for _ in range(total // size):
        conn.send_bytes(buf)
    conn.send_bytes(b"")
    res.send(cpu_self() - c0)


@child
def _sock_echo(sock, other, size: int) -> None:
    other.close()                    # the bench's end, inherited: EOF needs every copy closed
    while m := sock.recv(size):
        sock.sendall(m)


@child
def _pipe_echo(conn, size: int) -> None:
    while m := conn.recv_bytes():
        conn.send_bytes(m)


# --- stream ------------------------------------------------------------------------------------
def stream(kind: str, size: int, total: int) -> dict:
    """One transfer: {"mbps", "bytes", "cpu": {"writer", "reader"}}."""
    total = max(size, total // size * size)
    rres, wres = CTX.Pipe(duplex=False)
    if kind == "socketpair":
        a, b = socket.socketpair()
        child = CTX.Process(target=_sock_writer, args=(b, size, total, wres), name="bench-sp-writer")
    else:
        a, b = CTX.Pipe()
        child = CTX.Process(target=_pipe_writer, args=(b, size, total, wres), name="bench-pipe-writer")
    child.start()
    b.close()
    wres.close()
    got = 0
    try:
        buf = bytearray(max(size, 1 << 20))
        c0, t0 = cpu_self(True), time.perf_counter()
        if kind == "socketpair":
            a.sendall(b"g")
            while n := a.recv_into(buf):
                got += n
        else:
            a.send_bytes(b"g")
            while n := a.recv_bytes_into(buf):
                got += n
        dt, cpu_r = time.perf_counter() - t0, cpu_self(True) - c0
        cpu_w = rres.recv() if rres.poll(30) else None
    finally:
        a.close()
        rres.close()
        reap(child)
    return {"mbps": got / dt / 1e6, "bytes": got, "cpu": {"writer": cpu_w, "reader": cpu_r}}


# --- request/response ----------------------------------------------------------------------------
def rr(kind: str, size: int, seconds: float, warmup: int = 50) -> list[float]:
    """Round-trip latencies in µs of `size`-byte messages for `seconds`."""
    msg = b"r" * size
    if kind == "socketpair":
        a, b = socket.socketpair()
        child = CTX.Process(target=_sock_echo, args=(b, a, size), name="bench-sp-echo")

        def one() -> None:
            a.sendall(msg)
            got = 0
            while got < size:
                got += len(a.recv(size - got))
    else:
        a, b = CTX.Pipe()
        child = CTX.Process(target=_pipe_echo, args=(b, size), name="bench-pipe-echo")

        def one() -> None:
            a.send_bytes(msg)
            a.recv_bytes()
    child.start()
    b.close()
    lat: list[float] = []
    try:
        for _ in range(warmup):
            one()
        pc = time.perf_counter
        end = pc() + seconds
        while (t := pc()) < end and len(lat) < 500_000:
            one()
            lat.append((pc() - t) * 1e6)
    finally:
        if kind == "pipe":
            try:
                a.send_bytes(b"")
            except OSError:
                pass
        a.close()
        reap(child)
    return lat


# --- N pairs at once -----------------------------------------------------------------------------
@child
def _pair_reader(sock, other, start_at: float, res) -> None:
    other.close()                    # the writer's end, inherited: EOF needs every copy closed
    buf = bytearray(1 << 20)
    time.sleep(max(0.0, start_at - time.time()))
    t0, got = time.time(), 0
    while n := sock.recv_into(buf):
        got += n
    res.send((got, t0, time.time()))


@child
def _pair_writer(sock, other, size: int, total: int, start_at: float) -> None:
    other.close()
    buf = b"x" * size
    time.sleep(max(0.0, start_at - time.time()))
    for _ in range(total // size):
        sock.sendall(buf)
    sock.close()


def pairs(n: int, size: int, total: int) -> float:
    """Aggregate MB/s of `n` socketpairs each moving `total` bytes at once."""
    start_at = time.time() + 0.2 + 0.02 * n
    procs, results = [], []
    for _ in range(n):
        a, b = socket.socketpair()
        r, w = CTX.Pipe(duplex=False)
        procs.append(CTX.Process(target=_pair_writer, args=(a, b, size, total, start_at)))
        procs.append(CTX.Process(target=_pair_reader, args=(b, a, start_at, w)))
        procs[-2].start()
        procs[-1].start()
        a.close()
        b.close()
        w.close()
        results.append(r)
    try:
        got = [r.recv() if r.poll(120) else None for r in results]
    finally:
        for p in procs:
            reap(p)
        for r in results:
            r.close()
    if any(g is None for g in got):
        raise RuntimeError("a socketpair reader did not report")
    return sum(g[0] for g in got) / (max(g[2] for g in got) - min(g[1] for g in got)) / 1e6
