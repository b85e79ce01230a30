"""Glue between a VhostNet and its device process's worker (the seed's vhost_poll on the socket):
the backend's fd is watched for POLLIN (handle_rx_net) and, while tx polling is on, for POLLOUT
(handle_tx_net). Backends without an fd (loopback) wake the device through `wakeup`."""
from __future__ import annotations

import selectors

from shared.net.hdr import NET_VQ_RX, NET_VQ_TX


def attach_backend(dev, backend, worker) -> None:
    dev.worker = worker
    dev.set_backend(NET_VQ_RX, backend)
    dev.set_backend(NET_VQ_TX, backend)
    if not hasattr(backend, "fileno"):
        backend.wakeup = dev.backend_readable
        return
    state = {"events": selectors.EVENT_READ}

    def on_event(mask: int) -> None:
        if mask & selectors.EVENT_READ:
            dev.handle_rx()
        if mask & selectors.EVENT_WRITE:
            dev.backend_writable()
        sync()

    def sync() -> None:
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if dev.tx_polling else 0)
        if want != state["events"] and backend.fileno() >= 0:
            state["events"] = want
            worker.modify(backend, want, on_event)

    worker.register(backend, selectors.EVENT_READ, on_event)
    dev.on_tx_poll = lambda: worker.queue_work(sync)     # tx_poll_start/stop changed what we watch

    def close() -> None:
        worker.unregister(backend)
    dev.on_close = close
