"""Glue between a VhostNet and its device process's worker (the seed's vhost_poll on the socket):
each backend's fd is watched for POLLIN (handle_rx_net) and, while tx polling is on, for POLLOUT
(handle_tx_net). Backends without an fd (loopback) wake the device through `wakeup`.

`NetBackends` also opens backends from specs for SET_BACKEND (the device's backend_opener) and
closes what a swap or the device's end leaves unused (the seed's fput)."""
from __future__ import annotations

import selectors

from shared.net.hdr import NET_VQ_RX, NET_VQ_TX

TX_RETRY = 0.0005          # s between tries on a backend whose POLLOUT is blind (segment)


class NetBackends:
    def __init__(self, dev, worker, run_dir):
        self.dev = dev
        self.worker = worker
        self.run_dir = run_dir
        self.watched: dict[int, int] = {}        # id(backend) -> events
        dev.worker = worker
        dev.backend_opener = self.open
        dev.backend_closer = self.close
        dev.on_tx_poll = lambda: worker.queue_work(self.sync)

    def open(self, spec: str):
        from host.net.backends.spec import open_backend
        b = open_backend(spec, run_dir=self.run_dir, mac=self.dev.mac)
        self.watch(b)
        return b

    def attach(self, backend) -> None:
        self.watch(backend)
        self.dev.set_backend(NET_VQ_RX, backend)
        self.dev.set_backend(NET_VQ_TX, backend)

    def watch(self, backend) -> None:
        if not hasattr(backend, "fileno"):
            backend.wakeup = self.dev.backend_readable
            return
        dev = self.dev

        def on_event(mask: int) -> None:
            if mask & selectors.EVENT_READ:
                if backend is dev.backends[NET_VQ_RX]:
                    dev.handle_rx()
                else:
                    backend.recv()          # nobody's rx backend: drain, do not spin
            if mask & selectors.EVENT_WRITE:
                dev.backend_writable()
            self.sync()
        backend.on_event = on_event
        self.worker.register(backend, selectors.EVENT_READ, on_event)
        self.watched[id(backend)] = selectors.EVENT_READ

    def sync(self) -> None:
        """Watch the tx backend for POLLOUT exactly while tx polling is on."""
        b = self.dev.backends[NET_VQ_TX]
        if b is None or id(b) not in self.watched:
            return
        if getattr(b, "pollout_blind", False):
            # POLLOUT of an unconnected datagram socket says nothing about the full peer: retry on a
            # short timer instead of spinning on an always-writable fd
            if self.dev.tx_polling and not getattr(self, "_retry", None):
                def retry() -> None:
                    self._retry = None
                    self.dev.backend_writable()
                self._retry = self.worker.call_later(TX_RETRY, retry)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.dev.tx_polling else 0)
        if self.watched[id(b)] != want:
            self.watched[id(b)] = want
            self.worker.modify(b, want, b.on_event)

    def close(self, backend) -> None:
        if self.watched.pop(id(backend), None) is not None:
            self.worker.unregister(backend)
        backend.close()
