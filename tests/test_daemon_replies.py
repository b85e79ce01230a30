"""Issue 8 item 10: the daemon's error replies (before a device exists) carry the request's seq,
and the refusals a hostile client can repeat are logged once, then counted."""
import socket

import pytest

from shared import control
from shared.control import PROTOCOL_VERSION

from .procs import Cluster

pytestmark = pytest.mark.multiprocess


def ask(path, msg) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(control.encode(msg))
    dec = control.Decoder(kind="reply")
    try:
        while True:
            data = s.recv(65536)
            assert data, "closed without a reply"
            msgs = dec.feed(data)
            if msgs:
                return msgs[0]
    finally:
        s.close()


def hello(seq, **over):
    m = {"op": "HELLO", "seq": seq, "version": PROTOCOL_VERSION, "device": "vsock", "guest": "x",
         "reconnect": False, "params": {"cid": 2}}
    m.update(over)
    return m


def test_error_replies_carry_the_requests_seq_and_refusals_are_rate_limited(shm_guard):
    c = Cluster(shm_guard)
    try:
        host = c.host()
        path = shm_guard / "control.sock"
        r = ask(path, hello(42))                                     # reserved CID
        assert r["ok"] is False and r["error"] == "EINVAL" and r["seq"] == 42
        r = ask(path, hello(77, device="net9"))                      # unknown device
        assert r["error"] == "ENODEV" and r["seq"] == 77
        r = ask(path, {"op": "SET_OWNER", "seq": 5})                 # not HELLO first
        assert r["ok"] is False and r["seq"] == 5
        r = ask(path, hello(9, version="one"))                       # schema error, seq readable
        assert r["ok"] is False and r["seq"] == 9
        # issue 17 item 10: a seq that cannot be read is nil, never a made-up 0
        r = ask(path, hello("nine"))
        assert r["ok"] is False and r["error"] == "EINVAL" and r["seq"] is None
        r = ask(path, {"op": "HELLO", "version": PROTOCOL_VERSION})   # no seq at all
        assert r["ok"] is False and r["seq"] is None
        r = ask(path, hello(2 ** 64 - 1, device="net", params={"backend": "nope", "mac": "x"}))
        assert r["ok"] is False and r["seq"] == 2 ** 64 - 1         # the device process's refusal
        for i in range(50):
            ask(path, hello(100 + i))
        ask(path, {"op": "HELLO", "seq": 1000, "version": PROTOCOL_VERSION, "device": "vsock",
                   "guest": "ok", "reconnect": False, "params": {"cid": 9}}).get("ok")
        assert host.text().count("refused a connection") <= 2, host.text()
    finally:
        c.close()
