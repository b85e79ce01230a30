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
