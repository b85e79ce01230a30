"""A small IPv4 stack for the guest over Ethernet frames: ARP (answer and resolve), ICMP echo
(answer, and a ping the guest runs), a UDP echo service and UDP send. Pure code: `input(frame)`
returns the frames to send in answer and records what a waiting caller wants (ARP replies, echo
replies, UDP datagrams); a runner (guest/net/netdev.py) does the waiting with timeouts.

RFC 826 (ARP), RFC 791 (IPv4, no options sent, fragments dropped), RFC 792 (ICMP echo),
RFC 768 (UDP, checksum computed on send, checked when non-zero on receive).
"""
from __future__ import annotations

import ipaddress
import struct
from collections import deque

from shared.net.hdr import BROADCAST, ETH_P_ARP, ETH_P_IP

ETH = struct.Struct("!6s6sH")
ARP = struct.Struct("!HHBBH6s4s6s4s")
IPH = struct.Struct("!BBHHHBBH4s4s")
ICMP = struct.Struct("!BBHHH")
UDP = struct.Struct("!HHHH")
ICMP_ECHO_REPLY, ICMP_ECHO = 0, 8
IPPROTO_ICMP, IPPROTO_UDP = 1, 17
UDP_ECHO_PORT = 7


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class Ipv4Stack:
    def __init__(self, mac: bytes, ifc: ipaddress.IPv4Interface, udp_echo: bool = True):
        self.mac = bytes(mac)
        self.ifc = ifc
        self.ip = ifc.ip.packed
        self.arp: dict[bytes, bytes] = {}            # IPv4 (packed) -> MAC
        self.echo_replies: dict[tuple[int, int], bytes] = {}   # (id, seq) -> source IP
        self.udp_in: deque = deque()                 # (src ip, src port, dst port, payload)
        self.udp_echo = udp_echo
        self.ident = 0
        self.stats = {"arp_answered": 0, "echo_answered": 0, "udp_echoed": 0, "dropped": 0}

    # --- frame building ---------------------------------------------------------------------------
    def _eth(self, dst: bytes, proto: int, payload: bytes) -> bytes:
        f = ETH.pack(dst, self.mac, proto) + payload
        return f + bytes(max(0, 60 - len(f)))        # pad to Ethernet's minimum

    def arp_request(self, ip: bytes) -> bytes:
        return self._eth(BROADCAST, ETH_P_ARP, ARP.pack(1, ETH_P_IP, 6, 4, 1, self.mac, self.ip, bytes(6), ip))

    def garp(self) -> bytes:
        """A gratuitous ARP (an ARP request for our own address, RFC 5227 announcement): the
        segment learns where our MAC now lives (netdev_notify_peers after a migration)."""
        return self._eth(BROADCAST, ETH_P_ARP, ARP.pack(1, ETH_P_IP, 6, 4, 1, self.mac, self.ip, bytes(6), self.ip))

    def ip_packet(self, dst_ip: bytes, proto: int, payload: bytes) -> bytes:
        self.ident = (self.ident + 1) & 0xFFFF
        h = IPH.pack(0x45, 0, 20 + len(payload), self.ident, 0x4000, 64, proto, 0, self.ip, dst_ip)
        h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
        return h + payload

    def frame_to(self, dst_mac: bytes, dst_ip: bytes, proto: int, payload: bytes) -> bytes:
        return self._eth(dst_mac, ETH_P_IP, self.ip_packet(dst_ip, proto, payload))

    def echo_request(self, ident: int, seq: int, data: bytes = b"virtio-emu ping") -> bytes:
        m = ICMP.pack(ICMP_ECHO, 0, 0, ident, seq) + data
        return m[:2] + struct.pack("!H", csum(m)) + m[4:]

    def udp(self, src_port: int, dst_ip: bytes, dst_port: int, payload: bytes) -> bytes:
        u = UDP.pack(src_port, dst_port, 8 + len(payload), 0) + payload
        pseudo = self.ip + dst_ip + struct.pack("!BBH", 0, IPPROTO_UDP, len(u))
        c = csum(pseudo + u) or 0xFFFF
        return u[:6] + struct.pack("!H", c) + u[8:]

    # --- input ------------------------------------------------------------------------------------
    def input(self, frame: bytes) -> list[bytes]:
        """One received frame -> the frames to send in answer (never raises on bad input)."""
        try:
            return self._input(frame)
        except (struct.error, ValueError, IndexError):
            self.stats["dropped"] += 1
            return []

    def _input(self, frame: bytes) -> list[bytes]:
        dst, src, proto = ETH.unpack_from(frame)
        if dst != self.mac and dst != BROADCAST:
            return []
        body = frame[14:]
        if proto == ETH_P_ARP:
            htype, ptype, hl, pl, op, sha, spa, _tha, tpa = ARP.unpack_from(body)
            if htype != 1 or ptype != ETH_P_IP or hl != 6 or pl != 4:
                return []
            if spa != bytes(4):
                self.arp[spa] = sha                  # learn (RFC 826 merge)
            if op == 1 and tpa == self.ip:
                self.stats["arp_answered"] += 1
                return [self._eth(sha, ETH_P_ARP, ARP.pack(1, ETH_P_IP, 6, 4, 2, self.mac, self.ip, sha, spa))]
            return []
        if proto != ETH_P_IP:
            return []
        vihl, _tos, tot, _id, frag, _ttl, p, _c, sip, dip = IPH.unpack_from(body)
        ihl = (vihl & 15) * 4
        if vihl >> 4 != 4 or ihl < 20 or tot > len(body) or tot < ihl or csum(body[:ihl]) != 0:
            self.stats["dropped"] += 1
            return []
        if dip != self.ip or frag & 0x3FFF:          # not ours, or a fragment
            return []
        self.arp.setdefault(sip, src)
        data = body[ihl:tot]
        if p == IPPROTO_ICMP and len(data) >= 8 and csum(data) == 0:
            t, _code, _ck, ident, seq = ICMP.unpack_from(data)
            if t == ICMP_ECHO:
                m = bytes([ICMP_ECHO_REPLY]) + data[1:2] + b"\0\0" + data[4:]
                m = m[:2] + struct.pack("!H", csum(m)) + m[4:]
                self.stats["echo_answered"] += 1
                return [self.frame_to(src, sip, IPPROTO_ICMP, m)]
            if t == ICMP_ECHO_REPLY:
                self.echo_replies[(ident, seq)] = sip
            return []
        if p == IPPROTO_UDP and len(data) >= 8:
            sport, dport, ln, ck = UDP.unpack_from(data)
            if ln < 8 or ln > len(data):
                return []
            if ck:
                pseudo = sip + dip + struct.pack("!BBH", 0, IPPROTO_UDP, ln)
                if csum(pseudo + data[:ln]) != 0:
                    self.stats["dropped"] += 1
                    return []
            payload = data[8:ln]
            if dport == UDP_ECHO_PORT and self.udp_echo:
                self.stats["udp_echoed"] += 1
                return [self.frame_to(src, sip, IPPROTO_UDP, self.udp(UDP_ECHO_PORT, sip, sport, payload))]
            self.udp_in.append((sip, sport, dport, payload))
        return []
