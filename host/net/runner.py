"""Glue between a VhostNet and its device process's worker (the seed's vhost_poll on the socket):
each backend's fd is watched for POLLIN (handle_rx_net) and, while tx polling is on, for POLLOUT
(handle_tx_net). Backends without an fd (loopback) wake the device through `wakeup`.

POLLIN of the rx backend is watched only while the device would take a frame (`rx_wanted`): not
while it holds one it has no rx buffers for (`rx_pending`, handle_rx's "no buffers: wait for the
guest's rx kick"), nor while it or its rx ring is not running: the fd stays readable, and a level-
triggered select would spin. The device's `on_rx_wait` hook re-syncs when that changes.

`NetBackends` also opens backends from specs for SET_BACKEND (the device's backend_opener) and
closes what a swap or the device's end leaves unused (the seed's fput). `bind(dev)` points the glue
at another device (vhost-user: one backend, a new device per frontend); with none bound, a
readable backend is drained (no device: the frames have nowhere to go).
"""
from __future__ import annotations

import selectors

from shared.net.hdr import NET_VQ_RX, NET_VQ_TX

from host.net.backends.spec import open_backend

TX_RETRY = 0.0005          # s between tries on a backend whose POLLOUT is blind (segment)
TX_ERROR_RETRY = 0.01      # s between tries after a send error (the frame is kept meanwhile)


class NetBackends:
    def __init__(self, dev, worker, run_dir):
        self.dev = None
        self.worker = worker
        self.run_dir = run_dir
        self.watched: dict[int, int] = {}        # id(backend) -> events (0: not registered)
        self.objs: dict[int, object] = {}        # id(backend) -> backend
        self._retry = None
        self.bind(dev)

    def bind(self, dev) -> None:
        self.dev = dev
        if dev is None:
            return
        dev.worker = self.worker
        dev.backend_opener = self.open
        dev.backend_closer = self.close
        dev.on_tx_poll = lambda: self.worker.queue_work(self.sync)
        dev.on_rx_wait = dev.on_tx_poll

    def open(self, spec: str):
        b = open_backend(spec, run_dir=self.run_dir, mac=self.dev.mac)
        self.watch(b)
        return b

    def attach(self, backend) -> None:
        self.watch(backend)
        self.dev.set_backend(NET_VQ_RX, backend)
        self.dev.set_backend(NET_VQ_TX, backend)

    def watch(self, backend) -> None:
        if not hasattr(backend, "fileno"):
            backend.wakeup = self._wakeup
            return

        def on_event(mask: int) -> None:
            dev = self.dev
            if mask & selectors.EVENT_READ:
                if dev is not None and backend is dev.backends[NET_VQ_RX]:
                    dev.handle_rx()
                else:
                    backend.recv()          # nobody's rx backend: drain, do not spin
            if mask & selectors.EVENT_WRITE and dev is not None:
                dev.backend_writable()
            self.sync()
        backend.on_event = on_event
        self.worker.register(backend, selectors.EVENT_READ, on_event)
        self.watched[id(backend)] = selectors.EVENT_READ
        self.objs[id(backend)] = backend

    def _wakeup(self) -> None:
        if self.dev is not None:
            self.dev.backend_readable()

    def _retry_later(self, delay: float) -> None:
        if self._retry is None:
            def retry() -> None:
                self._retry = None
                if self.dev is not None:
                    self.dev.backend_writable()
            self._retry = self.worker.call_later(delay, retry)

    def sync(self) -> None:
        """Watch each backend for POLLIN unless its frame waits for rx buffers, and the tx backend
        for POLLOUT exactly while tx polling is on. A send error, a backend without an fd
        (loopback) or with a blind POLLOUT (segment) is retried on a timer instead."""
        dev = self.dev
        if dev is not None and dev.tx_polling:
            tx = dev.backends[NET_VQ_TX]
            if dev.tx_poll_error:
                self._retry_later(TX_ERROR_RETRY)
            elif tx is not None and not hasattr(tx, "fileno"):
                self._retry_later(TX_RETRY)
        for key, b in list(self.objs.items()):
            want = selectors.EVENT_READ
            if dev is not None and b is dev.backends[NET_VQ_RX]:
                dev.rx_watch = dev.rx_wanted()
                if not dev.rx_watch:
                    want = 0
            if dev is not None and b is dev.backends[NET_VQ_TX] and dev.tx_polling:
                if getattr(b, "pollout_blind", False) or dev.tx_poll_error:
                    # POLLOUT of an unconnected datagram socket says nothing about the full peer,
                    # nor of a failing one about the error: retry on a timer, do not spin
                    self._retry_later(TX_ERROR_RETRY if dev.tx_poll_error else TX_RETRY)
                else:
                    want |= selectors.EVENT_WRITE
            have = self.watched.get(key)
            if have == want:
                continue
            self.watched[key] = want
            if not want:
                self.worker.unregister(b)
            elif not have:
                self.worker.register(b, want, b.on_event)
            else:
                self.worker.modify(b, want, b.on_event)

    def close(self, backend) -> None:
        if self.watched.pop(id(backend), None):
            self.worker.unregister(backend)
        self.objs.pop(id(backend), None)
        backend.close()
