"""The host's device registry: what the daemon and a device process need to know per device type.

Each entry is a `DeviceKind`:

    claims(params) -> list[str]       host-wide resources the device takes (a vsock CID, a tap);
                                      ProtocolError when params are bad. The daemon refuses a
                                      second device claiming the same key.
    make(hello, opts, worker) -> dev  build the VhostDevice (in the device process); may register
                                      the device's own file objects with the worker.

A third device type adds one entry here and touches neither the daemon nor the device process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from shared.constants import RESERVED_CIDS
from shared.errors import ProtocolError


@dataclass(frozen=True)
class DeviceKind:
    name: str
    claims: Callable[[dict], list]
    make: Callable


# --- vsock ------------------------------------------------------------------------------------------
def _vsock_claims(params: dict) -> list:
    cid = params.get("cid")
    if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0 or cid > 0xFFFFFFFFFFFFFFFF:
        raise ProtocolError(f"vsock needs params.cid, an unsigned integer, not {cid!r}", "EINVAL")
    if cid in RESERVED_CIDS or cid > 0xFFFFFFFF:
        raise ProtocolError(f"CID {cid} is reserved (0, 1, 2 and -1 are not guest CIDs; "
                            f"the upper 32 bits must be 0)", "EINVAL")
    return [f"cid:{cid}"]


def _vsock_make(hello: dict, opts, worker, proc):
    from host.vsock.device import VhostVsock
    if opts.pcap:
        from shared.vsock.pcap import PcapWriter
        proc.capture = PcapWriter(opts.pcap, append=True)
    return VhostVsock(hello["params"]["cid"], run_dir=opts.run_dir, credit_policy=opts.credit_policy,
                      capture=proc.capture, dialect=opts.dialect, reconnect=bool(hello.get("reconnect")),
                      buf_size=getattr(opts, "buf_size", None),
                      lend=opts.credit_policy != "every-read")    # the seeds copy every payload


# --- net --------------------------------------------------------------------------------------------
def _net_params(params: dict) -> tuple[str, bytes]:
    from host.net.backends.spec import check_spec
    from shared.net.hdr import parse_mac
    spec, mac = params.get("backend"), params.get("mac")
    try:
        check_spec(spec)
        return spec, parse_mac(mac)
    except ValueError as e:
        raise ProtocolError(str(e), "EINVAL") from None


def _net_claims(params: dict) -> list:
    from host.net.backends.spec import claim_key
    spec, mac = _net_params(params)
    key = claim_key(spec)
    return [f"mac:{mac.hex()}"] + ([key] if key else [])


def _net_make(hello: dict, opts, worker, proc):
    from host.net.backends.spec import open_backend
    from host.net.device import VhostNet
    from host.net.runner import NetBackends
    spec, mac = _net_params(hello["params"])
    try:
        backend = open_backend(spec, run_dir=opts.run_dir, mac=mac)
    except (ValueError, OSError) as e:
        raise ProtocolError(str(e), "EINVAL") from None
    dev = VhostNet(mac, name=f"net-{hello['guest']}", backend_name=spec)
    NetBackends(dev, worker, opts.run_dir).attach(backend)
    return dev


DEVICE_KINDS: dict[str, DeviceKind] = {
    "vsock": DeviceKind("vsock", _vsock_claims, _vsock_make),
    "net": DeviceKind("net", _net_claims, _net_make),
}
