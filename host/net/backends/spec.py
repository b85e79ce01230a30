"""Backend specs opened into backends: one registry, one line per kind. The grammar (loopback,
udp:LPORT:RPORT, segment:NAME, tap:IFNAME[,...], packet:IFNAME) and its errors are
shared/net/spec.py's; a spec that does not parse is ValueError with one clear line.
"""
from __future__ import annotations

from shared.net.spec import check_spec, port


def _loopback(args, spec, ctx):
    if args:
        raise ValueError(f"net backend {spec!r}: loopback takes no arguments")
    from host.net.backends.loopback import Loopback
    return Loopback()


def _udp(args, spec, ctx):
    if len(args) != 2:
        raise ValueError(f"net backend {spec!r}: want udp:LPORT:RPORT")
    from host.net.backends.sockets import UdpPair
    return UdpPair(port(args[0], spec), port(args[1], spec))


def _segment(args, spec, ctx):
    if len(args) != 1:
        raise ValueError(f"net backend {spec!r}: want segment:NAME")
    from host.net.backends.sockets import Segment
    return Segment(ctx["run_dir"], args[0], ctx["mac"])


def _tap(args, spec, ctx):
    if len(args) != 1:
        raise ValueError(f"net backend {spec!r}: want tap:IFNAME[,vnet_hdr=on][,multi_queue=on]")
    name, *opts = args[0].split(",")
    vnet = mq = False
    for o in opts:
        if o not in ("vnet_hdr=on", "vnet_hdr=off", "multi_queue=on", "multi_queue=off"):
            raise ValueError(f"net backend {spec!r}: unknown tap option {o!r}")
        if o.startswith("vnet_hdr"):
            vnet = o == "vnet_hdr=on"
        else:
            mq = o == "multi_queue=on"
    from host.net.backends.tap import Tap
    return Tap(name, vnet_hdr=vnet, multi_queue=mq)


def _packet(args, spec, ctx):
    if len(args) != 1:
        raise ValueError(f"net backend {spec!r}: want packet:IFNAME")
    from host.net.backends.sockets import PacketSocket
    return PacketSocket(args[0])


BACKENDS = {"loopback": _loopback, "udp": _udp, "segment": _segment, "tap": _tap, "packet": _packet}


def open_backend(spec: str, *, run_dir=None, mac: bytes = b""):
    kind, args = check_spec(spec)
    return BACKENDS[kind](args, spec, {"run_dir": run_dir, "mac": mac})
