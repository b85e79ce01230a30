"""`python -m host --vhost-user`: the backend process over real Unix sockets, fds by SCM_RIGHTS."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys

import pytest

from host.__main__ import build_parser, vhost_user_pairs
from host.vhost_user import codec
from tests.procs import ROOT, Proc


def frontend(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def call(s: socket.socket, op: str, payload: bytes = b"", fds=(), need_reply=False) -> None:
    socket.send_fds(s, [codec.encode_request(op, payload, need_reply)], list(fds))


def reply(s: socket.socket) -> tuple[str, bytes]:
    head = b""
    while len(head) < 12:
        b = s.recv(12 - len(head))
        assert b, "connection closed"
        head += b
    size = struct.unpack_from("<III", head)[2]
    body = b""
    while len(body) < size:
        body += s.recv(size - len(body))
    op, flags, payload = codec.parse_reply(head + body)
    return op, payload


@pytest.mark.multiprocess
def test_two_guests_malformed_messages_and_reconnects(tmp_path):
    run = tmp_path / "run"
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    host = Proc(["-m", "host", "--vhost-user", str(a), "--cid", "3", "--vhost-user", f"{b},cid=4",
                 "--run-dir", str(run)], tmp_path / "host.log")
    try:
        assert host.wait_log(f"listening on {b}", 20) and host.wait_log(f"listening on {a}", 5), host.text()
        for path, cid in ((a, 3), (b, 4)):
            s = frontend(path)
            call(s, "GET_PROTOCOL_FEATURES")
            assert reply(s)[0] == "GET_PROTOCOL_FEATURES"
            call(s, "SET_PROTOCOL_FEATURES", struct.pack("<Q", 1 << 3 | 1 << 9))
            call(s, "SET_VRING_CALL", struct.pack("<Q", 0), [os.eventfd(0)])   # an fd, by SCM_RIGHTS
            call(s, "GET_CONFIG", struct.pack("<III", 0, 8, 0) + bytes(8))
            op, payload = reply(s)
            assert op == "GET_CONFIG" and payload[12:] == struct.pack("<Q", cid)
            # a second frontend while one is connected is refused
            s2 = frontend(path)
            assert s2.recv(1) == b""
            s2.close()
            # malformed: unknown request -> closed; the backend lives on
            s.sendall(struct.pack("<III", 77, 1, 0))
            assert s.recv(1) == b""
            s.close()
        assert host.wait_log("unknown request 77", 10), host.text()
        # a wrong version with an fd: closed, fd not leaked into a request
        s = frontend(a)
        fd = os.eventfd(0)
        socket.send_fds(s, [struct.pack("<III", 13, 2, 8) + bytes(8)], [fd])
        os.close(fd)
        assert s.recv(1) == b""
        s.close()
        # and the next frontend is served
        s = frontend(a)
        call(s, "GET_FEATURES")
        op, payload = reply(s)
        assert op == "GET_FEATURES" and struct.unpack("<Q", payload)[0] & (1 << 30)
        s.close()
        assert host.p.poll() is None
        assert "Traceback" not in host.text()
    finally:
        assert host.stop() == 0
    assert not a.exists() and not b.exists()


def parse(*argv):
    p = build_parser()
    a = p.parse_args(list(argv))
    return vhost_user_pairs(p, a.vhost_user, a.cid)


def test_cli_pairs(tmp_path):
    assert parse("--vhost-user", "/x.sock", "--cid", "3") == [(__import__("pathlib").Path("/x.sock"), 3)]
    pairs = parse("--vhost-user", "/a", "--vhost-user", "/b,cid=9", "--cid", "5")
    assert [c for _, c in pairs] == [5, 9]


@pytest.mark.parametrize("argv,needle", [
    (["--vhost-user", "/a"], "no CID"),
    (["--vhost-user", "/a", "--cid", "2"], "reserved"),
    (["--vhost-user", "/a,cid=3", "--vhost-user", "/b,cid=3"], "given twice"),
    (["--vhost-user", "/a,port=3"], "SOCKET,cid=N"),
    (["--cid", "3"], "no --vhost-user"),
])
def test_cli_errors_are_one_line(argv, needle):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "host", *argv], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=30)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr
