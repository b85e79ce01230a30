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
    recv_view  as recv, reading with the socket's zero-copy recv_view; {"na": why} without it
    send_zc    as send, to the host's zero-copy sink (zc_sink, `python -m host --run`), which
               greets "ok" or "n/a <why>" first

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


# --- zero-copy receive (issue 15, item 3): the figures "in-device zero-copy" -------------------
# The call shape the vsock socket offers when it has zero-copy receive:
#     v = sock.recv_view(max_bytes)   a view of payload bytes in guest RAM (len(v) bytes; a
#                                      zero-length view at EOF), usable as a buffer (memoryview(v))
#                                      or through its memoryview v.data
#     v.release()                      hands the buffer back to the ring
# A build without it gets "n/a" with the reason, never a fallback that copies.
NO_RECV_VIEW = "this build's vsock sockets have no recv_view (zero-copy receive)"
ZC_GREETING_MAX = 256


def drain_views(s, max_bytes: int) -> int:
    """Read until EOF with recv_view, touching each view through the buffer protocol; bytes read."""
    got = 0
    while True:
        v = s.recv_view(max_bytes)
        n = len(v)
        if n:
            m = getattr(v, "data", None)           # the view's memoryview, or v as a buffer
            (memoryview(v) if m is None else m)[n - 1]     # the bytes are there to read, not copied
        v.release()
        if not n:
            return got
        got += n


def _recv_view(vsock, c: dict) -> dict:
    """recv, with zero-copy receive: {"bytes", "seconds", "t0", "t1"} or {"na": why}."""
    s = vsock.create_connection((c["cid"], c["port"]), timeout=30)
    try:
        if not hasattr(s, "recv_view"):
            return {"na": NO_RECV_VIEW}            # closing before the request: the source sends nothing
        s.settimeout(300)
        p0, t0 = time.perf_counter(), time.time()
        s.sendall(b"%d %d\n" % (c["total"], c["size"]))
        got = drain_views(s, max(c["size"], 1 << 16))
        dt = time.perf_counter() - p0
    finally:
        s.close()
    return {"bytes": got, "seconds": dt, "t0": t0, "t1": t0 + dt}


def _send_zc(vsock, c: dict) -> dict:
    """send to the host's zero-copy sink (zc_sink): read its greeting line first ("ok" or "n/a
    <why>"), then as `send`: {"bytes", "seconds", "t0", "t1", "reply"} or {"na": why}."""
    buf = b"z" * c["size"]
    s = vsock.create_connection((c["cid"], c["port"]), timeout=30)
    try:
        s.settimeout(30)
        line = b""
        while not line.endswith(b"\n") and len(line) < ZC_GREETING_MAX:
            chunk = s.recv(ZC_GREETING_MAX - len(line))
            if not chunk:
                break
            line += chunk
        text = line.decode(errors="replace").strip()
        if text != "ok":
            return {"na": text[4:].strip() if text.startswith("n/a") else f"the zero-copy sink said {text!r}"}
        s.settimeout(300)
        p0, t0 = time.perf_counter(), time.time()
        for _ in range(c["total"] // c["size"]):
            s.sendall(buf)
        s.shutdown(1)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        dt = time.perf_counter() - p0
    finally:
        s.close()
    return {"bytes": c["total"] // c["size"] * c["size"], "seconds": dt, "t0": t0, "t1": t0 + dt,
            "reply": reply.decode(errors="replace").strip()}


OPS = {"send": _send, "recv": _recv, "rr": _rr, "recv_view": _recv_view, "send_zc": _send_zc}


def zc_sink(vsock) -> None:
    """`python -m host --run tools.bench_apps:zc_sink` (port ZC_SINK_PORT, or $VE_BENCH_ZC_PORT):
    a sink that receives with recv_view. Greets each connection with "ok\n", or "n/a <why>\n"
    and closes when the socket has no recv_view; then counts bytes until EOF and answers the
    count as the sink service does. One connection at a time (the bench sends one stream)."""
    srv = vsock.create_server(int(os.environ.get("VE_BENCH_ZC_PORT", ZC_SINK_PORT)))
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return                                  # the device went down: the listener is gone
        try:
            if not hasattr(conn, "recv_view"):
                conn.sendall(b"n/a " + NO_RECV_VIEW.encode() + b"\n")
                continue
            conn.sendall(b"ok\n")
            total = drain_views(conn, 1 << 16)
            conn.sendall(b"%d\n" % total)
        except OSError:
            pass
        finally:
            conn.close()


ZC_SINK_PORT = 5004


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


# --- virtio-net programs (python -m guest ... --net-run tools.bench_apps:FUNC) -----------------
def net_bench(net) -> None:
    """Run the phases of VE_BENCH_PLAN ([kind, size, count] with kind "tx" or "rx"); phase i starts
    when the file VE_BENCH_DIR/go-i appears and reports one JSON object in VE_BENCH_DIR/done-i.
    tx: send `count` broadcast frames of `size` bytes as fast as the ring takes them.
    rx: count frames the driver receives until `count` or 1 s without one; first-to-last time."""
    d = os.environ["VE_BENCH_DIR"]
    plan = json.loads(os.environ["VE_BENCH_PLAN"])
    for i, (kind, size, count) in enumerate(plan):
        go = os.path.join(d, f"go-{i}")
        while not os.path.exists(go):
            time.sleep(0.01)
        k0, i0 = net.drv.stats["kicks"], net.interrupts
        if kind == "tx":
            dst = bytes.fromhex(os.environ.get("VE_BENCH_DST", "ff" * 6))
            frame = dst + net.drv.mac + b"\x88\xb5" + b"b" * (size - 14)
            t0 = time.perf_counter()
            for _ in range(count):
                while len(net.pending_tx) > 256:
                    net.poll()              # reclaim; the ring is full (netif_stop_queue)
                    time.sleep(0)
                net.send_frame(frame)
            while net.pending_tx:
                net.poll()
                time.sleep(0.001)
            res = {"elapsed": time.perf_counter() - t0}
        else:
            # announce ourselves (a broadcast) so a learning switch knows where our MAC lives
            net.send_frame(b"\xff" * 6 + net.drv.mac + b"\x88\xb6" + bytes(46))
            n0 = net.drv.stats["rx_frames"]
            first = last = None
            seen = n0
            idle_since = time.perf_counter()
            while True:
                n = net.drv.stats["rx_frames"]
                now = time.perf_counter()
                if n != seen:
                    if first is None:
                        first = now
                    last, seen, idle_since = now, n, now
                if n - n0 >= count or (first is not None and now - idle_since > 1.0) \
                        or now - idle_since > 20:
                    break
                time.sleep(0.0005)
            res = {"count": seen - n0, "elapsed": (last - first) if first else 0.0}
        res.update(kicks=net.drv.stats["kicks"] - k0, interrupts=net.interrupts - i0)
        with open(os.path.join(d, f"done-{i}.tmp"), "w") as f:
            json.dump(res, f)
        os.rename(os.path.join(d, f"done-{i}.tmp"), os.path.join(d, f"done-{i}"))


def ping_peer(net) -> None:
    """Ping VE_APP_PEER VE_APP_COUNT times, then one UDP echo round trip to it; one JSON line to
    VE_APP_OUT (the demo and the end-to-end tests read it)."""
    peer, count = os.environ["VE_APP_PEER"], int(os.environ.get("VE_APP_COUNT", "3"))
    rtts = net.ping(peer, count=count, timeout=3.0)
    payload = os.urandom(200)
    echoed = net.udp_echo(peer, payload, timeout=3.0)
    with open(os.environ["VE_APP_OUT"], "a") as f:
        f.write(json.dumps({"replies": len(rtts), "count": count, "udp_echo_ok": echoed == payload,
                            "rtt_ms": [round(r * 1000, 3) for r in rtts]}) + "\n")


def flood(net) -> None:
    """Send broadcast frames as fast as the ring takes them for VE_APP_SECONDS; one JSON line
    with the count to VE_APP_OUT."""
    end = time.monotonic() + float(os.environ.get("VE_APP_SECONDS", "3"))
    frame = b"\xff" * 6 + net.drv.mac + b"\x88\xb5" + b"f" * 1000
    n = 0
    while time.monotonic() < end:
        if len(net.pending_tx) > 64:
            net.poll()
            time.sleep(0)
            continue
        net.send_frame(frame)
        n += 1
    with open(os.environ["VE_APP_OUT"], "a") as f:
        f.write(json.dumps({"flooded": n}) + "\n")


def swap_under_traffic(net) -> None:
    """Send VE_APP_N numbered frames on tx; after each third, change the tx backend with
    SET_BACKEND: to VE_APP_SPEC2, then detach ("": frames wait on the ring), then VE_APP_SPEC2
    again. One JSON line to VE_APP_OUT."""
    n = int(os.environ.get("VE_APP_N", "300"))
    spec2 = os.environ["VE_APP_SPEC2"]

    def send(i):
        net.send_frame(b"\xff" * 6 + net.drv.mac + b"\x88\xb5" + i.to_bytes(4, "big") + bytes(60))
        net.poll()

    def drained():
        # frames still on the ring when SET_BACKEND lands go to the new backend (as in vhost-net):
        # "the right peer" is the backend attached when the device took the frame
        for _ in range(400):
            net.poll()
            if net.drv.txq.in_flight() == 0:
                return
            time.sleep(0.005)

    steps = []
    for i in range(n):
        if i == n // 3:
            drained()
            net.set_backend(1, spec2)
            steps.append("swapped")
        if i == 2 * n // 3:
            net.set_backend(1, "")
            steps.append("detached")
        send(i)
        time.sleep(0.0005)
    time.sleep(0.3)
    waiting = net.drv.txq.in_flight()
    net.set_backend(1, spec2)           # re-attach: a fresh socket on the same ports
    steps.append("reattached")
    for _ in range(200):
        net.poll()
        if net.drv.txq.in_flight() == 0:
            break
        time.sleep(0.01)
    with open(os.environ["VE_APP_OUT"], "a") as f:
        f.write(json.dumps({"steps": steps, "waiting_while_detached": waiting,
                            "left": net.drv.txq.in_flight()}) + "\n")


def bad_tx_chain(net) -> None:
    """A hostile driver: put a tx chain with a device-writable buffer on the ring and kick."""
    drv = net.drv
    with net.lock:
        g = drv.alloc.alloc(256)
        drv.mem.write(g, bytes(12) + b"\xff" * 6 + drv.mac + b"\x88\xb5" + bytes(50))
        drv.txq.add_sgs([(g, 76)], [(g + 128, 64)], g)
        drv.kick(drv.txq)
    with open(os.environ["VE_APP_OUT"], "a") as f:
        f.write(json.dumps({"sent_bad_chain": True}) + "\n")
