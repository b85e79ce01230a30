"""The program of a stress net guest (`python -m guest --net SPEC --net-run tools.stress.netagent:main`).

Commands come as files VE_STRESS_NET_DIR/cmd-<id>.json; each runs on a thread of its own and its
answer is written (atomically) to res-<id>.json:

    {"op": "send", "sid", "n", "dst": "self" | MAC hex}   send frames 0..n-1 of stream sid
    {"op": "collect", "sid", "n", "timeout", "idle"}      wait for stream sid's frames (until n came,
                                                          timeout, or idle s without one); the tally
    {"op": "announce", "sid"}                             one broadcast (switches learn our MAC)

A thread receives every frame all the time (the tally in netframes), so nothing waits on a ring.
`ready` (the guest's MAC in hex) appears once it runs.
"""
from __future__ import annotations

import json
import os
import threading
import time

from . import netframes

TX_WINDOW = 64


def _send(net, sid: int, n: int, dst: bytes) -> dict:
    mac = net.drv.mac
    for seq in range(n):
        while len(net.pending_tx) > TX_WINDOW:
            net.poll()
            time.sleep(0.001)
        net.send_frame(netframes.build(dst, mac, sid, seq))
    end = time.monotonic() + 20
    while net.pending_tx and time.monotonic() < end:
        net.poll()
        time.sleep(0.001)
    return {"sent": n, "left": len(net.pending_tx)}


def announce(net) -> None:
    """A broadcast (not a stress frame) so a learning switch knows where this MAC lives: unicast
    to an unknown MAC is flooded, and a flooded frame a full port cannot take is dropped."""
    net.send_frame(b"\xff" * 6 + net.drv.mac + b"\x88\xb6" + bytes(46))


def _run(net, tally, d: str, name: str) -> None:
    path = os.path.join(d, name)
    try:
        with open(path) as f:
            c = json.load(f)
        os.unlink(path)
        if c["op"] == "send":
            dst = net.drv.mac if c["dst"] == "self" else bytes.fromhex(c["dst"])
            res = _send(net, c["sid"], c["n"], dst)
        elif c["op"] == "announce":
            announce(net)
            res = {"announced": True}
        else:
            announce(net)
            res = tally.collect(c["sid"], c["n"], c.get("timeout", 15.0), idle=c.get("idle", 2.0))
    except Exception as e:  # answered, never a hang
        res = {"error": f"{type(e).__name__}: {e}"}
    rid = name[len("cmd-"):-len(".json")]
    tmp = os.path.join(d, f".res-{rid}")
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, os.path.join(d, f"res-{rid}.json"))


def main(net) -> None:
    d = os.environ["VE_STRESS_NET_DIR"]
    tally = netframes.Tally()

    def receive() -> None:
        while True:
            f = net.recv_frame(0.5)
            if f is not None:
                tally.feed(f)

    threading.Thread(target=receive, daemon=True, name="stress-net-rx").start()
    announce(net)
    with open(os.path.join(d, ".ready"), "w") as f:
        f.write(net.drv.mac.hex())
    os.replace(os.path.join(d, ".ready"), os.path.join(d, "ready"))
    started: set = set()
    while True:
        for name in sorted(os.listdir(d)):
            if name.startswith("cmd-") and name.endswith(".json") and name not in started:
                started.add(name)
                threading.Thread(target=_run, args=(net, tally, d, name), daemon=True).start()
        time.sleep(0.02)
