"""Waiting on the condition itself instead of sleeping and hoping."""
from __future__ import annotations

import time

from shared.stats import read_all


def wait_until(pred, timeout: float = 5.0, what: str = "the condition", interval: float = 0.005):
    """pred()'s first true value within `timeout` seconds; AssertionError naming `what` if none."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(interval)


def fresh_snapshots(run_dir, role: str = "device", timeout: float = 10.0) -> list[dict]:
    """The `role` stats snapshots of a run dir once every one of them was written after this call:
    what those processes had counted by now (instead of sleeping one stats interval)."""
    t0 = time.time()

    def fresh():
        snaps = [d for d in read_all(run_dir) if d.get("role") == role]
        return snaps if snaps and all(d["time"] > t0 for d in snaps) else None
    return wait_until(fresh, timeout, f"fresh {role} stats snapshot", 0.02)
