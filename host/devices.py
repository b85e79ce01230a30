"""The host's device registry: every device kind, declared once, for every transport.

A kind is a class; an instance is what one backend serves for as long as its process lives
(a native guest's device process, or a vhost-user socket across its frontends):

    claims(params) -> [key]    (static) host-wide resources a native HELLO's params take (a vsock
                               CID, a tap, a MAC): ProtocolError when bad. The daemon refuses a
                               second device claiming the same key.
    from_hello(hello, opts)    (class) the instance a native HELLO asks for
    label, device              how logs and stats name it ("CID 3", "net tap:tap0"); "vsock" | "net"
    open()                     resources held for the backend's life (the net backend, the pcap
                               writer); ValueError / OSError: the caller's one-line error
    new_device(hello)          a fresh VhostDevice for a frontend that just connected
    sync(dev)                  after every control message (net over vhost-user: attach the backend
                               to both queues while the device runs, detach when the rings stop)
    detach(dev)                the frontend is gone, before the session resets the device
    stats_fields()             identity fields for the stats file
    close()                    the backend process ends

`transport` is "native" or "vhost-user": over vhost-user QEMU keeps vsock's event queue and
net's control queue, so those devices have two queues, and a net backend outlives its frontends.

A third device kind is one more class and one more DEVICE_KINDS entry; the daemon, the runner and
the session do not change.
"""
from __future__ import annotations

from host.net.backends.spec import open_backend
from shared.net.spec import check_spec, claim_key
from host.net.device import VhostNet
from host.net.runner import NetBackends
from host.vsock import runner as vsock_runner
from host.vsock.device import VhostVsock
from shared.constants import RESERVED_CIDS
from shared.errors import ProtocolError
from shared.net.hdr import NET_VQ_RX, NET_VQ_TX, format_mac, parse_mac
from shared.vsock.pcap import PcapWriter

DEFAULT_MAC = bytes.fromhex("525400ee0000")     # vhost-user-net: + the socket's position


class VsockKind:
    device = "vsock"

    def __init__(self, cid: int, opts, transport: str = "native", worker=None):
        self.cid = cid
        self.opts = opts
        self.transport = transport
        self.worker = worker               # set by the runner before new_device
        self.capture = None
        self.label = f"CID {cid}"

    @staticmethod
    def claims(params: dict) -> list:
        cid = params.get("cid")
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0 or cid > 0xFFFFFFFFFFFFFFFF:
            raise ProtocolError(f"vsock needs params.cid, an unsigned integer, not {cid!r}", "EINVAL")
        if cid in RESERVED_CIDS or cid > 0xFFFFFFFF:
            raise ProtocolError(f"CID {cid} is reserved (0, 1, 2 and -1 are not guest CIDs; "
                                f"the upper 32 bits must be 0)", "EINVAL")
        return [f"cid:{cid}"]

    @classmethod
    def from_hello(cls, hello: dict, opts) -> "VsockKind":
        return cls(hello["params"]["cid"], opts)

    def open(self) -> None:
        if self.opts.pcap and self.capture is None:
            self.capture = PcapWriter(self.opts.pcap, append=True)

    def new_device(self, hello: dict | None = None):
        opts = self.opts
        dev = VhostVsock(self.cid, credit_policy=opts.credit_policy, capture=self.capture,
                         reconnect=bool((hello or {}).get("reconnect")),
                         num_queues=2 if self.transport == "vhost-user" else None,
                         buf_size=getattr(opts, "buf_size", None),
                         lend=opts.credit_policy != "every-read")    # the seeds copy every payload
        dev.offer_packed(getattr(opts, "packed", False))
        vsock_runner.attach(dev, self.worker, run_dir=opts.run_dir, dialect=opts.dialect)
        return dev

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
    """vhost-net. Native: the guest names the backend (HELLO params, SET_BACKEND swaps it) and
    the device owns it. vhost-user: QEMU keeps the control queue, the MAC and the link status, so
    the backend sees rx (0) and tx (1) only; the header is the 12-byte virtio_net_hdr_mrg_rxbuf;
    one network backend serves every frontend in turn, attached while the rings run."""

    device = "net"

    def __init__(self, spec: str, opts, mac: bytes = DEFAULT_MAC, transport: str = "native",
                 worker=None, guest: str = ""):
        self.spec = spec
        self.opts = opts
        self.mac = bytes(mac)
        self.transport = transport
        self.worker = worker               # set by the runner before new_device
        self.guest = guest
        self.backend = None
        self.glue: NetBackends | None = None
        self.label = f"net {spec}"

    @staticmethod
    def _params(params: dict) -> tuple[str, bytes]:
        spec, mac = params.get("backend"), params.get("mac")
        try:
            check_spec(spec)
            return spec, parse_mac(mac)
        except ValueError as e:
            raise ProtocolError(str(e), "EINVAL") from None

    @staticmethod
    def claims(params: dict) -> list:
        spec, mac = NetKind._params(params)
        key = claim_key(spec)
        return [f"mac:{mac.hex()}"] + ([key] if key else [])

    @classmethod
    def from_hello(cls, hello: dict, opts) -> "NetKind":
        spec, mac = cls._params(hello["params"])
        return cls(spec, opts, mac, guest=hello["guest"])

    def open(self) -> None:
        """Open the network backend (ValueError / OSError: one line for the caller)."""
        self.backend = open_backend(self.spec, run_dir=self.opts.run_dir, mac=self.mac)

    def new_device(self, hello: dict | None = None):
        if self.transport == "native":
            dev = VhostNet(self.mac, name=f"net-{self.guest}", backend_name=self.spec)
            dev.offer_packed(getattr(self.opts, "packed", False))
            self.glue = NetBackends(dev, self.worker, self.opts.run_dir)
            self.glue.attach(self.backend)         # the device owns it from here (SET_BACKEND)
            self.backend = None
            return dev
        # hdr_from_backend: no VMM acks VHOST_NET_F_VIRTIO_NET_HDR over vhost-user (bit 27 is
        # ANY_LAYOUT there), so the device makes QEMU's vhost-kernel choice itself: strip and add
        # the header unless the backend carries it (tap vnet_hdr=on). Dirty logging (LOG_ALL)
        # stays offered: the session offers LOG_SHMFD for it.
        dev = VhostNet(self.mac, name=f"vhost-user-net[{self.spec}]", backend_name=self.spec,
                       max_queue_size=self.opts.max_queue_size, hdr_from_backend=True)
        dev.offer_packed(getattr(self.opts, "packed", False))
        if self.glue is None:
            self.glue = NetBackends(None, self.worker, self.opts.run_dir)
            self.glue.watch(self.backend)          # drained while no device holds it
        self.glue.bind(dev)
        return dev

    def sync(self, dev) -> None:
        if self.transport == "native":
            return
        want = self.backend if dev.running and not dev.broken else None
        if dev.backends[NET_VQ_RX] is want and dev.backends[NET_VQ_TX] is want:
            return
        dev.set_backend(NET_VQ_RX, want)           # the old one stays open: it is ours
        dev.set_backend(NET_VQ_TX, want)
        self.glue.sync()

    def detach(self, dev) -> None:
        if self.transport == "native":
            return
        dev.set_backend(NET_VQ_RX, None)
        dev.set_backend(NET_VQ_TX, None)
        if self.glue is not None:
            self.glue.bind(None)
            self.glue.sync()

    def stats_fields(self) -> dict:
        return {"device": "net", "backend": self.spec, "mac": format_mac(self.mac)}

    def close(self) -> None:
        b, self.backend = self.backend, None
        if b is None:
            return
        if self.glue is not None:
            self.glue.close(b)
        else:
            b.close()


DEVICE_KINDS: dict[str, type] = {"vsock": VsockKind, "net": NetKind}
