"""Programs the end-to-end tests run inside a guest with `python -m guest --run tests.guest_apps:NAME`.

Each reads its parameters from VE_APP_* environment variables and writes one JSON result line to
the file named by VE_APP_OUT, so the test (a different process) can check what happened inside.
"""
import errno
import hashlib
import json
import os
import threading


def _out(result: dict) -> None:
    path = os.environ["VE_APP_OUT"]
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")


def sha_client(vsock) -> None:
    """Connect to the host (CID 2) port VE_APP_PORT, send VE_APP_BYTES random bytes, read the echo,
    report both SHA-256 digests."""
    port, n = int(os.environ["VE_APP_PORT"]), int(os.environ["VE_APP_BYTES"])
    conns = int(os.environ.get("VE_APP_CONNS", "1"))

    def one(i: int) -> None:
        data = os.urandom(n)
        try:
            s = vsock.create_connection((2, port), timeout=30)
            t = threading.Thread(target=s.sendall, args=(data,))
            t.start()
            h, got = hashlib.sha256(), 0
            while got < n:
                chunk = s.recv(65536)
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
            t.join()
            s.close()
            _out({"i": i, "sent": hashlib.sha256(data).hexdigest(), "got": h.hexdigest(), "bytes": got})
        except OSError as e:
            _out({"i": i, "errno": e.errno, "error": str(e)})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def refused_client(vsock) -> None:
    """Connect to a host port nobody listens on: expect ECONNREFUSED; then retry (vsock_test 31)."""
    port = int(os.environ["VE_APP_PORT"])
    results = []
    for _ in range(2):
        s = vsock.socket()
        try:
            s.settimeout(10)
            s.connect((2, port))
            results.append(0)
        except OSError as e:
            results.append(e.errno)
        finally:
            s.close()
    _out({"errnos": results, "ECONNREFUSED": errno.ECONNREFUSED})


def hold_conn(vsock) -> None:
    """Connect to the host, report "connected", then block in recv until the connection breaks."""
    port = int(os.environ["VE_APP_PORT"])
    s = vsock.create_connection((2, port), timeout=30)
    s.settimeout(None)
    _out({"state": "connected"})
    try:
        while s.recv(4096):
            pass
        _out({"state": "eof"})
    except OSError as e:
        _out({"state": "error", "errno": e.errno})
    finally:
        s.close()


def host_services(vsock) -> None:
    """Use the host's in-device services (CID 2): echo on VE_APP_ECHO, sink on VE_APP_SINK, source
    on VE_APP_SOURCE, each with VE_APP_BYTES bytes; report SHA-256 digests and counts."""
    from shared.vsock.services import source_pattern
    from shared.vsock.socket import SHUT_WR
    n = int(os.environ["VE_APP_BYTES"])
    res = {}
    try:
        data = os.urandom(n)
        s = vsock.create_connection((2, int(os.environ["VE_APP_ECHO"])), timeout=30)
        t = threading.Thread(target=s.sendall, args=(data,))
        t.start()
        h, got, buf = hashlib.sha256(), 0, bytearray(1 << 16)
        while got < n:
            k = s.recv_into(buf)
            if not k:
                break
            h.update(memoryview(buf)[:k])
            got += k
        t.join()
        s.close()
        res["echo"] = {"sent": hashlib.sha256(data).hexdigest(), "got": h.hexdigest(), "bytes": got}

        s = vsock.create_connection((2, int(os.environ["VE_APP_SINK"])), timeout=30)
        s.sendall(data)
        s.shutdown(SHUT_WR)
        reply = b""
        while chunk := s.recv(100):
            reply += chunk
        s.close()
        res["sink"] = {"sent": n, "reply": reply.decode("ascii", "replace")}

        s = vsock.create_connection((2, int(os.environ["VE_APP_SOURCE"])), timeout=30)
        s.sendall(b"%d %d\n" % (n, 4096))
        h, got = hashlib.sha256(), 0
        while chunk := s.recv(1 << 16):
            h.update(chunk)
            got += len(chunk)
        s.close()
        res["source"] = {"want": hashlib.sha256(source_pattern(n)).hexdigest(), "got": h.hexdigest(),
                         "bytes": got}
    except OSError as e:
        res["errno"], res["error"] = e.errno, str(e)
    _out(res)


def hoarder(vsock) -> None:
    """A hostile guest (issue 8 item 8): listen on VE_APP_PORT advertising the socket buffer the
    guest was started with (run it with --buf-size 4294967295), accept one connection, report
    "accepted", then stop consuming rx for good: no rx completion is taken and no rx buffer is
    posted again, so everything the host sends it stays with the host."""
    port = int(os.environ["VE_APP_PORT"])
    srv = vsock.create_server(port)
    conn, _ = srv.accept()
    vsock.transport.rx_run = False          # rx_work returns at once from now on
    _out({"state": "accepted", "buf_alloc": conn.get_buffer_size()})
    threading.Event().wait()                # hold everything until the guest is stopped
