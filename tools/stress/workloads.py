"""Host-side transfers of a stress group, over the Unix bridge (Firecracker dialect) and through
commands to the guest agent. Each executor returns one outcome dict:

    {kind, cid, sid, size, result, bytes, corrupt, t0, t1, why}

result: "ok" (every byte arrived and the SHA-256 matches), "reset" (the stream broke and said so:
an error or a short stream, every byte that did arrive was right), "corrupt" (some delivered byte
differs from what was sent), "hung" (no progress for TIMEOUT seconds), "stalled" (rx-stall: the
sender was held back, as it must be).
"""
from __future__ import annotations

import json
import random
import socket
import threading
import time
from pathlib import Path

from host.vsock.api import VsockHost

from .data import CHUNK, G2H_HDR, PrefixChecker, stream_bytes
from .schedule import AGENT_PORT, ECHO_PORT, G2H_PORT, HOLD_PORT, INDEV_ECHO_PORT, INDEV_SINK_PORT, STORM_PORT

TIMEOUT = 30.0
STALL_CAP = 16 << 20        # rx-stall: how much the host offers a guest that never reads
STALL_FILL_TIME = 30.0      # rx-stall: s it may take to fill the guest's window (a loaded machine)


def outcome(kind: str, cid: int, sid: int, size: int, t0: float, result: str, **kw) -> dict:
    d = {"kind": kind, "cid": cid, "sid": sid, "size": size, "result": result, "bytes": 0,
         "corrupt": 0, "t0": t0, "t1": time.time(), "why": ""}
    d.update(kw)
    return d


def _classify(e: BaseException) -> str:
    return "hung" if isinstance(e, (socket.timeout, TimeoutError)) else "reset"


class G2HListeners:
    """Host programs behind the bridge for one guest: G2H_PORT checks guest streams byte for byte
    and answers the SHA-256 of what it received; STORM_PORT accepts and closes."""

    def __init__(self, run_dir: Path, cid: int):
        self.vh = VsockHost(run_dir)
        self.records: dict[int, dict] = {}
        self.cv = threading.Condition()
        self.stop = threading.Event()
        self.threads = []
        for port, fn in ((G2H_PORT, self._verify), (STORM_PORT, self._close)):
            lst = self.vh.listen(cid, port, backlog=64)
            lst.settimeout(0.2)
            t = threading.Thread(target=self._accept, args=(lst, fn), daemon=True, name=f"listen-{cid}-{port}")
            t.start()
            self.threads.append(t)

    def _accept(self, lst, fn) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = lst.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            threading.Thread(target=fn, args=(conn,), daemon=True).start()

    @staticmethod
    def _close(conn) -> None:
        conn.close()

    def _verify(self, conn) -> None:
        conn.settimeout(TIMEOUT)
        rec = {"got": 0, "corrupt": 0, "verified": False, "why": ""}
        sid = None
        try:
            hdr = b""
            while len(hdr) < G2H_HDR.size:
                b = conn.recv(G2H_HDR.size - len(hdr))
                if not b:
                    raise ConnectionError("EOF before the stream header")
                hdr += b
            sid, size = G2H_HDR.unpack(hdr)
            chk = PrefixChecker(stream_bytes(sid, size))
            while True:
                b = conn.recv(CHUNK)
                if not b:
                    break
                chk.feed(b)
            rec.update(got=chk.got, corrupt=chk.corrupt, verified=chk.verified())
            conn.sendall(chk.sha.digest())
        except OSError as e:
            rec["why"] = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        if sid is not None:
            with self.cv:
                self.records[sid] = rec
                self.cv.notify_all()

    def wait_record(self, sid: int, timeout: float) -> dict | None:
        with self.cv:
            self.cv.wait_for(lambda: sid in self.records, timeout)
            return self.records.pop(sid, None)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(2)
        self.vh.close()


CONNECT_TRIES = 3           # bridge CONNECTs per stream before it counts as refused


def _connect(ctx, cid: int, port: int):
    """A bridge connection to a guest port. The bridge answers a CONNECT the guest has not
    accepted within its 2 s connect timeout (af_vsock's) by closing, as it does for an RST; on a
    machine loaded far past its cores (8 groups on 2 cores: load 30) a busy guest can miss it.
    Such a refusal is tried again, up to CONNECT_TRIES, and every retry is counted in the summary;
    a port that really has no listener is refused every time and the stream reports it."""
    for attempt in range(CONNECT_TRIES):
        try:
            s = VsockHost(ctx.run_dir).connect(cid, port, timeout=TIMEOUT)
            break
        except ConnectionRefusedError:
            if attempt == CONNECT_TRIES - 1:
                raise
            with ctx.lock:
                ctx.connect_retries += 1
            time.sleep(0.2)
    if attempt:
        with ctx.lock:
            ctx.connect_late_ok += 1
    s.settimeout(TIMEOUT)
    return s


def h2g(ctx, kind: str, cid: int, sid: int, size: int) -> dict:
    """A stream to the guest's echo service through the bridge; every byte of the echo checked."""
    t0 = time.time()
    data = stream_bytes(sid, size)
    chk = PrefixChecker(data)
    try:
        s = _connect(ctx, cid, ECHO_PORT)
    except OSError as e:
        return outcome(kind, cid, sid, size, t0, _classify(e), why=f"connect: {e}")
    err: list = []

    def send() -> None:
        try:
            mv = memoryview(data)
            for off in range(0, size, CHUNK):
                s.sendall(mv[off:off + CHUNK])
        except OSError as e:
            err.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    why = ""
    try:
        while chk.got < size:
            b = s.recv(CHUNK)
            if not b:
                why = f"EOF after {chk.got} of {size} bytes"
                break
            chk.feed(b)
    except OSError as e:
        why = f"{type(e).__name__}: {e}"
        err.append(e)
    finally:
        s.close()
        sender.join(TIMEOUT)
    if chk.corrupt:
        result = "corrupt"
    elif chk.verified():
        result = "ok"
    else:
        result = "hung" if any(isinstance(e, (socket.timeout, TimeoutError)) for e in err) else "reset"
    return outcome(kind, cid, sid, size, t0, result, bytes=chk.got, corrupt=chk.corrupt, why=why)


def fanout(ctx, kind: str, cid: int, sid: int, n: int) -> dict:
    """n concurrent small h2g streams at once."""
    t0 = time.time()
    r = random.Random(sid)
    results: list = [None] * n
    subs = [(r.getrandbits(64), r.randint(1, 8192)) for _ in range(n)]

    def one(i: int) -> None:
        results[i] = h2g(ctx, kind, cid, *subs[i])

    ts = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(TIMEOUT * 3)
    res = [x for x in results if x is not None]
    worst = "hung" if len(res) < n else next(
        (w for w in ("corrupt", "hung", "reset") if any(x["result"] == w for x in res)), "ok")
    return outcome(kind, cid, sid, n, t0, worst, bytes=sum(x["bytes"] for x in res),
                   corrupt=sum(x["corrupt"] for x in res),
                   why="; ".join(x["why"] for x in res if x["why"])[:300])


def storm_h2g(ctx, kind: str, cid: int, sid: int, n: int) -> dict:
    """n connect/close cycles to the guest's echo port; every other one echoes one byte first."""
    t0 = time.time()
    errors, last = 0, ""
    for i in range(n):
        try:
            s = _connect(ctx, cid, ECHO_PORT)
            if i % 2:
                s.sendall(b"z")
                if s.recv(1) != b"z":
                    raise ConnectionError("echo of one byte failed")
            s.close()
        except OSError as e:
            errors += 1
            last = f"{type(e).__name__}: {e}"
    return outcome(kind, cid, sid, n, t0, "ok" if not errors else "reset", why=last, errors=errors)


def agent_cmd(ctx, cid: int, line: str) -> dict:
    """One command to the guest agent; its JSON answer (or a reset outcome's fields)."""
    try:
        s = _connect(ctx, cid, AGENT_PORT)
    except OSError as e:
        return {"result": _classify(e), "why": f"agent connect: {e}"}
    try:
        s.settimeout(TIMEOUT * 3)
        s.sendall(line.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            b = s.recv(4096)
            if not b:
                return {"result": "reset", "why": "agent connection closed"}
            buf += b
        return json.loads(buf)
    except OSError as e:
        return {"result": _classify(e), "why": f"agent: {type(e).__name__}: {e}"}
    except ValueError:
        return {"result": "corrupt", "why": f"agent answered {buf[:80]!r}"}
    finally:
        s.close()


def g2h(ctx, kind: str, cid: int, sid: int, size: int) -> dict:
    """The guest agent sends a stream to a host program behind the bridge, which checks it."""
    t0 = time.time()
    ans = agent_cmd(ctx, cid, f"SEND {sid} {size} {G2H_PORT}")
    rec = ctx.listeners[cid].wait_record(sid, 5.0 if ans.get("result") == "ok" else 1.0)
    got = rec["got"] if rec else 0
    corrupt = rec["corrupt"] if rec else 0
    if corrupt or ans.get("result") == "corrupt":
        result = "corrupt"
    elif ans.get("result") == "ok" and rec and rec["verified"]:
        result = "ok"
    elif ans.get("result") == "ok":
        result = "corrupt"       # the guest saw our digest match, yet the host did not verify
    else:
        result = ans.get("result", "reset")
    why = ans.get("why", "") + (f"; host: {rec['why']}" if rec and rec["why"] else "")
    return outcome(kind, cid, sid, size, t0, result, bytes=got, corrupt=corrupt, why=why)


def storm_g2h(ctx, kind: str, cid: int, sid: int, n: int) -> dict:
    t0 = time.time()
    ans = agent_cmd(ctx, cid, f"STORM {n} {STORM_PORT}")
    return outcome(kind, cid, sid, n, t0, ans.get("result", "reset"), why=ans.get("why", ""),
                   errors=ans.get("errors", 0))


def indev(ctx, kind: str, cid: int, sid: int, size: int) -> dict:
    """A guest stream to an in-device host service (echo checked byte for byte; sink's count)."""
    t0 = time.time()
    which, port = ("echo", INDEV_ECHO_PORT) if kind == "indev-echo" else ("sink", INDEV_SINK_PORT)
    ans = agent_cmd(ctx, cid, f"INDEV {which} {sid} {size} {port}")
    return outcome(kind, cid, sid, size, t0, ans.get("result", "reset"), bytes=ans.get("bytes", 0),
                   corrupt=ans.get("corrupt", 0), why=ans.get("why", ""))


def rx_stall(ctx, cid: int, seconds: float) -> dict:
    """Offer data to a guest listener that never reads: the send must stall (credit), within a
    bounded number of bytes; nothing may pile up in the host."""
    t0 = time.time()
    try:
        s = _connect(ctx, cid, HOLD_PORT)
    except OSError as e:
        return outcome("rx-stall", cid, 0, 0, t0, _classify(e), why=f"connect: {e}")
    s.settimeout(0.5)
    sent, blocked = 0, False
    chunk = b"\xa5" * CHUNK
    # Send until the credit holds us back, then go on trying for `seconds` (it must stay shut).
    # Filling the window (the guest's buf_alloc) may take longer than `seconds` on a loaded
    # machine, so the limit there is STALL_FILL_TIME: "never held back" means the cap was
    # reached, or that much time passed with every send taken.
    now = time.monotonic()
    end, fill_end = now + seconds, now + seconds + STALL_FILL_TIME
    try:
        while sent < STALL_CAP:
            now = time.monotonic()
            if now >= fill_end or (blocked and now >= end):
                break
            try:
                sent += s.send(chunk)
            except (socket.timeout, TimeoutError):
                blocked = True
    except OSError as e:
        return outcome("rx-stall", cid, 0, sent, t0, "reset", bytes=sent, why=str(e))
    finally:
        s.close()
    return outcome("rx-stall", cid, 0, sent, t0, "stalled" if blocked else "ok", bytes=sent,
                   why="" if blocked else f"{sent} bytes accepted by a guest that never reads")


# --- net frames (vhost-net backends; the net guests run tools.stress.netagent) ---------------------
NET_TIMEOUT = 20.0
LOSSY_IDLE = 2.0            # s without a frame after which a UDP receiver stops counting


def net_cmd(d: Path, cmd: dict, timeout: float) -> dict:
    """Hand one command to a net guest's agent; its answer, or {"error"} after `timeout`."""
    rid = f"{cmd['op']}-{cmd['sid']:x}-{threading.get_ident():x}"
    tmp = d / f".cmd-{rid}"
    tmp.write_text(json.dumps(cmd))
    tmp.rename(d / f"cmd-{rid}.json")
    res = d / f"res-{rid}.json"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if res.exists():
            try:
                return json.loads(res.read_text())
            finally:
                res.unlink()
        time.sleep(0.02)
    return {"error": f"no answer to {cmd['op']} in {timeout:g} s"}


def _udp_send(ctx, sid: int, n: int) -> dict:
    from . import netframes
    dst = ctx.net_macs["udp"]
    for seq in range(n):
        ctx.udp.sendto(netframes.build(dst, b"\x02\x00\x00\x00\x00\x01", sid, seq),
                       ("127.0.0.1", ctx.udp_lport))
        if seq % 4 == 3:
            time.sleep(0.001)            # paced: a datagram socket drops what overflows it
    return {"sent": n}


def net(ctx, kind: str, direction: int, sid: int, n: int) -> dict:
    """n numbered, checksummed frames through one backend; the receiver counts every frame:
    received, lost, duplicated, corrupted (CRC32 or payload). Outcome result: ok, lossy, corrupt,
    hung (a guest did not answer); loss is allowed on UDP only (datagrams, reported)."""
    from . import netframes
    t0 = time.time()
    box: dict = {}
    if kind == "net-loopback":
        sender, receiver, dst = "loop", "loop", "self"
    elif kind == "net-l2":
        sender, receiver = ("a", "b") if direction == 0 else ("b", "a")
        dst = ctx.net_macs[receiver].hex()
    else:
        sender, receiver = ("udp", None) if direction == 0 else (None, "udp")
        dst = "ff" * 6

    def collect() -> None:
        if receiver is None:
            box["rx"] = ctx.udp_tally.collect(sid, n, NET_TIMEOUT, idle=LOSSY_IDLE)
        else:
            # A lossless backend's receiver waits for every frame (up to NET_TIMEOUT): frames held
            # up by a SIGSTOPped host (up to 2 s, longer under load) are late, not lost. UDP may
            # lose, so its receiver stops after LOSSY_IDLE without a frame.
            idle = LOSSY_IDLE if kind == "net-udp" else NET_TIMEOUT
            box["rx"] = net_cmd(ctx.net_dir(receiver), {"op": "collect", "sid": sid, "n": n, "idle": idle,
                                                        "timeout": NET_TIMEOUT}, NET_TIMEOUT + 10)

    th = threading.Thread(target=collect, daemon=True)
    th.start()
    if sender is None:
        tx = _udp_send(ctx, sid, n)
    else:
        tx = net_cmd(ctx.net_dir(sender), {"op": "send", "sid": sid, "n": n, "dst": dst}, NET_TIMEOUT)
    th.join(NET_TIMEOUT + 15)
    rx = box.get("rx") or {"error": "the receiver did not answer"}
    fields = {"backend": kind[4:], "frames_sent": tx.get("sent", 0), "frames_recv": rx.get("got", 0),
              "frames_lost": rx.get("lost", n), "frames_dup": rx.get("dup", 0),
              "frames_stray": rx.get("stray", 0), "frames_corrupt": rx.get("corrupt", 0)}
    if "error" in tx or "error" in rx:
        why = "; ".join(x["error"] for x in (tx, rx) if "error" in x)
        return outcome(kind, direction, sid, n, t0, "hung", why=why, **fields)
    result = netframes.verdict(n, rx, loss_ok=(kind == "net-udp"))
    why = "" if result == "ok" else ", ".join(f"{k} {v}" for k, v in fields.items() if k != "backend" and v)
    return outcome(kind, direction, sid, n, t0, result, bytes=rx.get("bytes", 0),
                   corrupt=rx.get("corrupt_bytes", 0), why=why, **fields)


EXECUTORS = {"h2g": h2g, "g2h": g2h, "fanout": fanout, "storm-h2g": storm_h2g,
             "storm-g2h": storm_g2h, "indev-echo": indev, "indev-sink": indev,
             "net-loopback": net, "net-udp": net, "net-l2": net}
