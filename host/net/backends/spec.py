"""Backend specs: the text after --net, parsed into a backend (one registry, one line per kind).

    loopback                 reflect every frame back to the guest
    udp:LPORT:RPORT          UDP on 127.0.0.1, bound to LPORT, sending to RPORT
    segment:NAME             the Unix-datagram L2 segment NAME in the host's run directory
    tap:IFNAME[,vnet_hdr=on] an existing tap interface
    packet:IFNAME            AF_PACKET raw socket bound to IFNAME (e.g. a veth end)

Errors are ValueError with one clear line (the CLI prints it and exits non-zero).
"""
from __future__ import annotations


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r} in net backend {spec!r}")
    return int(text)


def _loopback(args, spec, ctx):
    if args:
        raise ValueError(f"net backend {spec!r}: loopback takes no arguments")
    from host.net.backends.loopback import Loopback
    return Loopback()


def _udp(args, spec, ctx):
    if len(args) != 2:
        raise ValueError(f"net backend {spec!r}: want udp:LPORT:RPORT")
    from host.net.backends.sockets import UdpPair
    return UdpPair(_port(args[0], spec), _port(args[1], spec))


def _segment(args, spec, ctx):
    if len(args) != 1:
        raise ValueError(f"net backend {spec!r}: want segment:NAME")
    from host.net.backends.sockets import Segment
    return Segment(ctx["run_dir"], args[0], ctx["mac"])


def _tap(args, spec, ctx):
    if len(args) != 1:
        raise ValueError(f"net backend {spec!r}: want tap:IFNAME[,vnet_hdr=on]")
    name, *opts = args[0].split(",")
    vnet = False
    for o in opts:
        if o not in ("vnet_hdr=on", "vnet_hdr=off"):
            raise ValueError(f"net backend {spec!r}: unknown tap option {o!r}")
        vnet = o == "vnet_hdr=on"
    from host.net.backends.tap import Tap
    return Tap(name, vnet_hdr=vnet)


def _packet(args, spec, ctx):
    if len(args) != 1:
        raise ValueError(f"net backend {spec!r}: want packet:IFNAME")
    from host.net.backends.sockets import PacketSocket
    return PacketSocket(args[0])


USAGE = {"loopback": (0, "loopback"), "udp": (2, "udp:LPORT:RPORT"), "segment": (1, "segment:NAME"),
         "tap": (1, "tap:IFNAME[,vnet_hdr=on]"), "packet": (1, "packet:IFNAME")}
BACKENDS = {"loopback": _loopback, "udp": _udp, "segment": _segment, "tap": _tap, "packet": _packet}


def check_spec(spec) -> tuple[str, list[str]]:
    """Syntax only (the guest checks before connecting): (kind, args) or ValueError."""
    if not isinstance(spec, str) or not spec:
        raise ValueError("empty net backend spec")
    kind, *args = spec.split(":")
    if kind not in BACKENDS:
        raise ValueError(f"unknown net backend {kind!r} in {spec!r} (one of {', '.join(BACKENDS)})")
    if any(not a for a in args):
        raise ValueError(f"malformed net backend spec {spec!r}")
    want, usage = USAGE[kind]
    if len(args) != want:
        raise ValueError(f"net backend {spec!r}: " + ("loopback takes no arguments" if kind == "loopback"
                                                       else f"want {usage}"))
    if kind == "udp":
        _port(args[0], spec), _port(args[1], spec)
    if kind == "tap":
        for o in args[0].split(",")[1:]:
            if o not in ("vnet_hdr=on", "vnet_hdr=off"):
                raise ValueError(f"net backend {spec!r}: unknown tap option {o!r}")
    if kind == "segment" and not args[0].replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"segment backend: bad segment name {args[0]!r} (letters, digits, - and _)")
    return kind, args


def claim_key(spec: str) -> str | None:
    """What two guests may not share (the daemon refuses the second): a tap or a UDP port."""
    kind, args = check_spec(spec)
    if kind == "tap":
        return "tap:" + args[0].split(",")[0]
    if kind == "udp":
        return "udp:" + args[0]
    return None


def open_backend(spec: str, *, run_dir=None, mac: bytes = b""):
    kind, args = check_spec(spec)
    return BACKENDS[kind](args, spec, {"run_dir": run_dir, "mac": mac})
