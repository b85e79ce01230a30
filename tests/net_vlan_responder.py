"""An 802.1Q ICMP echo responder on a tap, for hosts whose kernel has no VLAN support (no 8021q):

    python -m tests.net_vlan_responder IFNAME VID IP MAC SECONDS

Listens on IFNAME (AF_PACKET, every frame the guest's backend writes) for tagged IPv4 ICMP echo
requests to IP on VLAN VID and answers each with a tagged echo reply of the same size, from MAC
(the guest has a static neighbour entry for IP -> MAC, so no ARP is needed). Prints one JSON line
at the end (after SECONDS, or at SIGTERM): frames seen and answered, and the largest tagged frame each way.
"""
from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
TPID = 0x8100


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def answer(frame: bytes, vid: int, ip: bytes, mac: bytes) -> bytes | None:
    if len(frame) < 18 + 20 + 8 or struct.unpack_from("!H", frame, 12)[0] != TPID:
        return None
    tci, etype = struct.unpack_from("!HH", frame, 14)
    if tci & 0x0FFF != vid or etype != 0x0800:
        return None
    iph = frame[18:]
    ihl = (iph[0] & 0x0F) * 4
    if iph[9] != 1 or iph[16:20] != ip or iph[ihl] != 8:     # ICMP echo request to us
        return None
    total = struct.unpack_from("!H", iph, 2)[0]
    icmp = bytearray(iph[ihl:total])
    icmp[0] = 0                                              # echo reply
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", _csum(bytes(icmp)))
    hdr = bytearray(iph[:ihl])
    hdr[12:16], hdr[16:20] = iph[16:20], iph[12:16]
    hdr[8] = 64
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", _csum(bytes(hdr)))
    return frame[6:12] + mac + frame[12:18] + bytes(hdr) + bytes(icmp)


def main(argv: list[str]) -> int:
    ifname, vid, ip, mac, seconds = argv[0], int(argv[1]), socket.inet_aton(argv[2]), \
        bytes.fromhex(argv[3].replace(":", "")), float(argv[4])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.settimeout(0.2)
    seen = answered = 0
    biggest_in = biggest_out = 0
    end = [time.monotonic() + seconds]
    signal.signal(signal.SIGTERM, lambda *_: end.__setitem__(0, 0.0))   # stop, print the summary
    print("READY", flush=True)
    while time.monotonic() < end[0]:
        try:
            frame, addr = s.recvfrom(65536)
        except socket.timeout:
            continue
        if addr[2] == 4:                                     # PACKET_OUTGOING: our own
            continue
        if len(frame) >= 14 and struct.unpack_from("!H", frame, 12)[0] == TPID:
            seen += 1
            biggest_in = max(biggest_in, len(frame))
        rep = answer(frame, vid, ip, mac)
        if rep is not None:
            s.send(rep)
            answered += 1
            biggest_out = max(biggest_out, len(rep))
    print(json.dumps({"tagged_seen": seen, "answered": answered, "largest_tagged_in": biggest_in,
                      "largest_tagged_out": biggest_out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
