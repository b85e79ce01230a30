"""What the vhost-user runner serves: one device kind per socket (vsock or net), device-neutral glue.

The runner (runner.py) owns the socket, the codec and the session; a *kind* owns what is specific
to the device behind them and lives as long as the backend process does:

    label                 how logs and stats name this backend ("CID 3", "net tap:tap0")
    device                "vsock" | "net" (the stats' and the monitor's device type)
    open()                host-wide resources held for the backend's life, opened in the parent
                          before it forks (a bad one is a one-line CLI error): the net backend
    new_device(worker)    a fresh VhostDevice for a frontend that just connected
    sync(dev)             after every message: the net kind attaches its backend to both queues
                          while the device runs (vhost-net's SET_BACKEND at start) and detaches it
                          when the rings stop
    detach(dev)           the frontend is gone, before the session resets the device: detach (the
                          net backend stays open for the next frontend)
    stats_fields()        identity fields for the stats file (cid / backend, mac)
    close()               the backend process ends

A third device kind is one more class here; the runner does not change.
"""
from __future__ import annotations

DEFAULT_MAC = bytes.fromhex("525400ee0000")     # + the socket's position in the last byte


class VsockKind:
    device = "vsock"

    def __init__(self, cid: int, opts):
        self.cid = cid
        self.opts = opts
        self.capture = None
        self.label = f"CID {cid}"

    def open(self) -> None:
        pass

    def new_device(self, worker):
        from host.vsock.device import VhostVsock
        opts = self.opts
        if opts.pcap and self.capture is None:
            from shared.vsock.pcap import PcapWriter
            self.capture = PcapWriter(opts.pcap, append=True)
        # QEMU keeps the event queue (vhost-user-vsock: only rx 0 and tx 1 reach the backend)
        return VhostVsock(self.cid, run_dir=opts.run_dir, credit_policy=opts.credit_policy,
                          capture=self.capture, dialect=opts.dialect, num_queues=2,
                          max_queue_size=opts.max_queue_size, buf_size=getattr(opts, "buf_size", None))

    def sync(self, dev) -> None:
        pass

    def detach(self, dev) -> None:
        pass

    def stats_fields(self) -> dict:
        return {"device": "vsock", "cid": self.cid}

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
            self.capture = None


class NetKind:
    """vhost-net behind vhost-user: QEMU keeps the control queue, the MAC and the link status, so
    the backend sees rx (0) and tx (1) only; the header is the 12-byte virtio_net_hdr_mrg_rxbuf
    (VERSION_1 or MRG_RXBUF). One network backend (host/net/backends) for every frontend in turn."""

    device = "net"

    def __init__(self, spec: str, opts, mac: bytes = DEFAULT_MAC):
        self.spec = spec
        self.opts = opts
        self.mac = bytes(mac)
        self.backend = None
        self.glue = None
        self.label = f"net {spec}"

    def open(self) -> None:
        """Open the network backend (ValueError / OSError: one line for the CLI)."""
        from host.net.backends.spec import open_backend
        self.backend = open_backend(self.spec, run_dir=self.opts.run_dir, mac=self.mac)

    def new_device(self, worker):
        from host.net.device import VhostNet
        from host.net.runner import NetBackends
        # hdr_from_backend: no VMM acks VHOST_NET_F_VIRTIO_NET_HDR over vhost-user (bit 27 is
        # ANY_LAYOUT there), so the device makes QEMU's vhost-kernel choice itself: strip and add
        # the header unless the backend carries it (tap vnet_hdr=on)
        dev = VhostNet(self.mac, name=f"vhost-user-net[{self.spec}]", backend_name=self.spec,
                       max_queue_size=self.opts.max_queue_size, hdr_from_backend=True)
        # dirty logging (LOG_ALL) stays offered: the session offers VHOST_USER_PROTOCOL_F_LOG_SHMFD
        # for it and maps the log SET_LOG_BASE sends
        if self.glue is None:
            self.glue = NetBackends(None, worker, self.opts.run_dir)
            self.glue.watch(self.backend)          # drained while no device holds it
        self.glue.bind(dev)
        return dev

    def sync(self, dev) -> None:
        from shared.net.hdr import NET_VQ_RX, NET_VQ_TX
        want = self.backend if dev.running and not dev.broken else None
        if dev.backends[NET_VQ_RX] is want and dev.backends[NET_VQ_TX] is want:
            return
        dev.set_backend(NET_VQ_RX, want)           # the old one stays open: it is ours
        dev.set_backend(NET_VQ_TX, want)
        self.glue.sync()

    def detach(self, dev) -> None:
        from shared.net.hdr import NET_VQ_RX, NET_VQ_TX
        dev.set_backend(NET_VQ_RX, None)
        dev.set_backend(NET_VQ_TX, None)
        if self.glue is not None:
            self.glue.bind(None)
            self.glue.sync()

    def stats_fields(self) -> dict:
        from shared.net.hdr import format_mac
        return {"device": "net", "backend": self.spec, "mac": format_mac(self.mac)}

    def close(self) -> None:
        b, self.backend = self.backend, None
        if b is None:
            return
        if self.glue is not None:
            self.glue.close(b)
        else:
            b.close()
