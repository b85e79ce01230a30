"""Programs the end-to-end tests run inside the host's device processes with
`python -m host --run tests.host_apps:NAME` (the in-device host endpoint, CID 2).

Each reads its parameters from VE_HOST_APP_* environment variables and appends one JSON result
line to the file named by VE_HOST_APP_OUT."""
import errno
import hashlib
import json
import os
import threading
import time


def _out(result: dict) -> None:
    with open(os.environ["VE_HOST_APP_OUT"], "a") as f:
        f.write(json.dumps(result) + "\n")


def guest_echo_client(vsock) -> None:
    """Connect to the guest's echo service on VE_HOST_APP_PORT (retrying while the guest is still
    starting it), send VE_HOST_APP_BYTES random bytes, report both SHA-256 digests."""
    port, n = int(os.environ["VE_HOST_APP_PORT"]), int(os.environ["VE_HOST_APP_BYTES"])
    res = {"guest_cid": vsock.guest_cid, "local_cid": vsock.local_cid}
    try:
        if not vsock.wait_up(30):
            raise OSError(errno.ENODEV, "the device never came up")
        end = time.monotonic() + 30
        while True:
            try:
                s = vsock.create_connection((vsock.guest_cid, port), timeout=10)
                break
            except ConnectionRefusedError:      # the guest starts its services after probing
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        s.settimeout(60)
        data = os.urandom(n)
        t = threading.Thread(target=s.sendall, args=(data,))
        t.start()
        h, got = hashlib.sha256(), 0
        while got < n:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
        t.join()
        s.close()
        res.update(sent=hashlib.sha256(data).hexdigest(), got=h.hexdigest(), bytes=got)
    except OSError as e:
        res.update(errno=e.errno, error=str(e))
    _out(res)
