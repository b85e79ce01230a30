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

from guest.net.ipv4 import csum

ETH_P_ALL = 0x0003
TPID = 0x8100
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10
AUXDATA = struct.Struct("=IIIHHHH")       # struct tpacket_auxdata


def _retag(frame: bytes, anc) -> bytes:
    """The receive path moves an 802.1Q tag into skb metadata (skb_vlan_untag) whether or not
    the kernel has VLANs: put it back from PACKET_AUXDATA, as it was on the wire."""
    for level, kind, data in anc:
        if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= AUXDATA.size:
            status, _l, _s, _m, _n, tci, tpid = AUXDATA.unpack_from(data)
            if status & TP_STATUS_VLAN_VALID:
                return frame[:12] + struct.pack("!HH", tpid or TPID, tci) + frame[12:]
    return frame


def answer(frame: bytes, vid: int, ip: bytes, mac: bytes) -> bytes | None:
    if len(frame) < 18 + 28 or struct.unpack_from("!H", frame, 12)[0] != TPID:
        return None
    tci, etype = struct.unpack_from("!HH", frame, 14)
    if tci & 0x0FFF != vid:
        return None
    if etype == 0x0806:                                      # ARP: who has IP? -> MAC
        arp = frame[18:46]
        if struct.unpack_from("!H", arp, 6)[0] != 1 or arp[24:28] != ip:
            return None
        rep = arp[:6] + struct.pack("!H", 2) + mac + ip + arp[8:14]
        return frame[6:12] + mac + frame[12:18] + rep + bytes(max(0, 46 - len(rep)))
    if etype != 0x0800 or len(frame) < 18 + 20 + 8:
        return None
    iph = frame[18:]
    ihl = (iph[0] & 0x0F) * 4
    if iph[9] != 1 or iph[16:20] != ip or iph[ihl] != 8:     # ICMP echo request to us
        return None
    total = struct.unpack_from("!H", iph, 2)[0]
    icmp = bytearray(iph[ihl:total])
    icmp[0] = 0                                              # echo reply
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", csum(bytes(icmp)))
    hdr = bytearray(iph[:ihl])
    hdr[12:16], hdr[16:20] = iph[16:20], iph[12:16]
    hdr[8] = 64
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", csum(bytes(hdr)))
    return frame[6:12] + mac + frame[12:18] + bytes(hdr) + bytes(icmp)


def main(argv: list[str]) -> int:
    ifname, vid, ip, mac, seconds = argv[0], int(argv[1]), socket.inet_aton(argv[2]), \
        bytes.fromhex(argv[3].replace(":", "")), float(argv[4])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    s.bind((ifname, 0))
    s.settimeout(0.2)
    seen = answered = 0
    biggest_in = biggest_out = 0
    end = [time.monotonic() + seconds]
    signal.signal(signal.SIGTERM, lambda *_: end.__setitem__(0, 0.0))   # stop, print the summary
    print("READY", flush=True)
    while time.monotonic() < end[0]:
        try:
            frame, anc, _flags, addr = s.recvmsg(65536, socket.CMSG_SPACE(AUXDATA.size))
        except socket.timeout:
            continue
        if addr[2] == 4:                                     # PACKET_OUTGOING: our own
            continue
        frame = _retag(frame, anc)
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
