"""The measuring program `python -m tools.bench` runs inside a guest (`--run tools.bench_apps:agent`).

It is the "guest app" of every vsock figure. It takes commands from the bench through a FIFO so
that it costs no CPU while idle (an idle-pair figure must not measure our own polling), runs each
with the guest's vsock socket API and writes the result as JSON into the run dir:

    $VE_BENCH_DIR/cmd      FIFO the bench writes one JSON command per line into
    $VE_BENCH_DIR/done     FIFO this agent writes "<seq>\\n" into when res-<seq>.json is complete
    $VE_BENCH_DIR/ready    created once the agent listens

Commands ({"seq": n, "op": ..., ...}); `start_at` (time.time()) lets several guests start together:

    send  connect to (cid, port), write `total` bytes in `size`-byte writes, shut down writing and
          read the peer's reply until EOF (a sink's byte count): {"bytes", "t0", "t1", "reply"}
    recv  connect to a source at (cid, port), ask for "<total> <size>\\n", read until EOF
    rr    connect to an echo at (cid, port), then `size`-byte round trips for `seconds`:
          {"lat_us": [...]} (after a short warm-up)

The times t0/t1 are time.time() (comparable across guests); durations use perf_counter.
"""
import json
import os
import time

WARMUP = 20


def _send(vsock, c: dict) -> dict:
    buf = b"z" * c["size"]
    s = vsock.create_connection((c["cid"], c["port"]), timeout=30)
    try:
        s.settimeout(300)
        p0, t0 = time.perf_counter(), time.time()
        for _ in range(c["total"] // c["size"]):
            s.sendall(buf)
        s.shutdown(1)                              # SHUT_WR: the sink sees EOF and answers
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        dt = time.perf_counter() - p0
    finally:
        s.close()
    return {"bytes": c["total"] // c["size"] * c["size"], "seconds": dt, "t0": t0, "t1": t0 + dt,
            "reply": reply.decode(errors="replace").strip()}


def _recv(vsock, c: dict) -> dict:
    s = vsock.create_connection((c["cid"], c["port"]), timeout=30)
    buf = bytearray(max(c["size"], 1 << 16))
    got = 0
    try:
        s.settimeout(300)
        p0, t0 = time.perf_counter(), time.time()
        s.sendall(b"%d %d\n" % (c["total"], c["size"]))
        while n := s.recv_into(buf):
            got += n
        dt = time.perf_counter() - p0
    finally:
        s.close()
    return {"bytes": got, "seconds": dt, "t0": t0, "t1": t0 + dt}


def _rr(vsock, c: dict) -> dict:
    size = c["size"]
    msg = b"r" * size
    s = vsock.create_connection((c["cid"], c["port"]), timeout=30)
    lat = []
    try:
        s.settimeout(30)

        def one() -> None:
            s.sendall(msg)
            got = 0
            while got < size:
                b = s.recv(size - got)
                if not b:
                    raise ConnectionError("echo closed early")
                got += len(b)
        for _ in range(WARMUP):
            one()
        pc = time.perf_counter
        end = pc() + c["seconds"]
        while (t := pc()) < end and len(lat) < c.get("max", 200_000):
            one()
            lat.append(round((pc() - t) * 1e6, 2))
    finally:
        s.close()
    return {"lat_us": lat}


OPS = {"send": _send, "recv": _recv, "rr": _rr}


def agent(vsock) -> None:
    """Serve the bench's commands until the guest shuts down (this runs in a daemon thread)."""
    d = os.environ["VE_BENCH_DIR"]
    cmd_path, done_path = os.path.join(d, "cmd"), os.path.join(d, "done")
    for p in (cmd_path, done_path):
        if not os.path.exists(p):
            os.mkfifo(p, 0o600)
    # O_RDWR on a FIFO never blocks and never sees EOF when the other side closes (Linux).
    rfd, wfd = os.open(cmd_path, os.O_RDWR), os.open(done_path, os.O_RDWR)
    open(os.path.join(d, "ready"), "w").close()
    pending = b""
    while True:
        chunk = os.read(rfd, 65536)
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            c = json.loads(line)
            if "start_at" in c:
                time.sleep(max(0.0, c["start_at"] - time.time()))
            try:
                res = OPS[c["op"]](vsock, c)
            except Exception as e:  # the bench reports it as the figure's error, never hangs
                res = {"error": f"{type(e).__name__}: {e}"}
            tmp = os.path.join(d, f".res-{c['seq']}")
            with open(tmp, "w") as f:
                json.dump(res, f)
            os.replace(tmp, os.path.join(d, f"res-{c['seq']}.json"))
            os.write(wfd, b"%d\n" % c["seq"])
