"""Net backend specs, the grammar the guest (--net) and the host (HELLO params, --net-backend)
both check; host/net/backends/spec.py opens them.

    loopback                 reflect every frame back to the guest
    udp:LPORT:RPORT          UDP on 127.0.0.1, bound to LPORT, sending to RPORT
    segment:NAME             the Unix-datagram L2 segment NAME in the host's run directory
    tap:IFNAME[,vnet_hdr=on][,multi_queue=on] an existing tap interface
    packet:IFNAME            AF_PACKET raw socket bound to IFNAME (e.g. a veth end)

Errors are ValueError with one clear line (the CLI prints it and exits non-zero).
"""
from __future__ import annotations


def port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r} in net backend {spec!r}")
    return int(text)


USAGE = {"loopback": (0, "loopback"), "udp": (2, "udp:LPORT:RPORT"), "segment": (1, "segment:NAME"),
         "tap": (1, "tap:IFNAME[,vnet_hdr=on][,multi_queue=on]"), "packet": (1, "packet:IFNAME")}
KINDS = tuple(USAGE)


def check_spec(spec) -> tuple[str, list[str]]:
    """Syntax only (the guest checks before connecting): (kind, args) or ValueError."""
    if not isinstance(spec, str) or not spec:
        raise ValueError("empty net backend spec")
    kind, *args = spec.split(":")
    if kind not in KINDS:
        raise ValueError(f"unknown net backend {kind!r} in {spec!r} (one of {', '.join(KINDS)})")
    if any(not a for a in args):
        raise ValueError(f"malformed net backend spec {spec!r}")
    want, usage = USAGE[kind]
    if len(args) != want:
        raise ValueError(f"net backend {spec!r}: " + ("loopback takes no arguments" if kind == "loopback"
                                                       else f"want {usage}"))
    if kind == "udp":
        port(args[0], spec), port(args[1], spec)
    if kind == "tap":
        for o in args[0].split(",")[1:]:
            if o not in ("vnet_hdr=on", "vnet_hdr=off", "multi_queue=on", "multi_queue=off"):
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
