"""Programs tools.bench_vsock runs inside a guest (python -m guest --run tools.bench_apps:sender)."""
import json
import os
import time


def sender(vsock) -> None:
    """When the file VE_BENCH_GO appears, for each [write_size, total] in VE_BENCH_PLAN open one
    connection to the host (CID 2) port VE_BENCH_PORT, write `total` bytes in `write_size` writes,
    and close it."""
    port = int(os.environ["VE_BENCH_PORT"])
    plan = json.loads(os.environ["VE_BENCH_PLAN"])
    go = os.environ["VE_BENCH_GO"]
    while not os.path.exists(go):
        time.sleep(0.05)
    for size, total in plan:
        s = vsock.create_connection((2, port), timeout=30)
        s.settimeout(120)
        buf = b"z" * size
        for _ in range(total // size):
            s.sendall(buf)
        s.close()
        time.sleep(0.3)


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

    steps = []
    for i in range(n):
        if i == n // 3:
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
