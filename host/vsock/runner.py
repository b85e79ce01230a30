"""Glue between a VhostVsock and its device process's worker: what the device itself does not do.

    attach(dev, worker, run_dir=..., dialect=...)

While the device runs (its start hooks to its stopping hooks), the hybrid vsock bridge (bridge.py)
listens on `<run-dir>/vsock-<cid>.sock` on the worker, and an engine timer gives the core the
clock for its close timeouts (`dev.tick(now)` every TICK_INTERVAL). The device decides; this acts.
"""
from __future__ import annotations

import logging
import time

from host.vsock.bridge import VsockBridge

log = logging.getLogger(__name__)

TICK_INTERVAL = 0.5                  # s between the core's close-timeout looks
DIALECTS = ("firecracker", "vhost-device-vsock")


def attach(dev, worker, *, run_dir=None, dialect: str = "firecracker") -> None:
    if dialect not in DIALECTS:
        raise ValueError(f"unknown hybrid vsock dialect {dialect!r} (one of {', '.join(DIALECTS)})")
    timer = []

    def tick() -> None:
        timer.clear()
        if dev.running:
            dev.tick(time.monotonic())
            timer.append(worker.call_later(TICK_INTERVAL, tick))

    def started() -> None:
        if run_dir is not None and dev.bridge is None:
            bridge = VsockBridge(dev, worker, run_dir, dev.guest_cid, dialect=dialect)
            try:
                bridge.start()
                dev.bridge = bridge
            except OSError as e:
                log.error("%s: cannot start the vsock bridge: %s", dev.name, e)
        timer.append(worker.call_later(TICK_INTERVAL, tick))

    def stopping() -> None:
        bridge, dev.bridge = dev.bridge, None
        if bridge is not None:
            bridge.stop()            # closes the bridged Unix sockets, releases their core sockets
        while timer:
            timer.pop().cancel()

    dev.start_hooks.append(started)
    dev.stopping_hooks.append(stopping)
