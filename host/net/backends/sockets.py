"""Socket backends: one Ethernet frame per datagram, non-blocking (the seed's MSG_DONTWAIT).

    UdpPair     QEMU's `-netdev socket,udp=`: a UDP socket on 127.0.0.1:LPORT sending to RPORT
    Segment     a Unix-datagram L2 segment in the host that links several guests as one switch:
                every port binds <run-dir>/net-<name>/<mac>.sock; each port learns which socket a
                source MAC sent from (a learning switch spread over its ports; a port's own
                MAC, its file name, is a static entry), sends known unicast there and floods
                broadcast, multicast and unknown destinations to every other port. No central process: a port that died is forgotten when sending fails.
    PacketSocket  the seed's get_raw_socket: AF_PACKET/SOCK_RAW bound to an interface (ETH_P_ALL),
                frames this host sent on the interface (PACKET_OUTGOING) are skipped.

send(frame) -> False means the socket buffer is full (EAGAIN): the device discards the chain back
and starts tx polling on fileno() for POLLOUT.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import time
from pathlib import Path

from shared.net.hdr import format_mac

PACKET_OUTGOING = 4
SIOCOUTQ = 0x5411           # TIOCOUTQ: a socket's unsent bytes (sk_wmem_alloc for datagrams)
ETH_P_ALL = 0x0003
MAX_FRAME = 65536
SUN_PATH_MAX = 108          # sizeof(sockaddr_un.sun_path), the NUL included
PORTS_TTL = 0.2            # seconds a segment's port list is reused for flooding


class DatagramBackend:
    vnet_hdr = False
    kind = "dgram"

    def __init__(self, sock: socket.socket, name: str):
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.drops = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame) -> bool:
        try:
            self.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOBUFS):   # nobody listening: dropped
                self.drops += 1
                return True
            raise
        return True

    def recv(self):
        while True:
            try:
                return self.sock.recv(MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionRefusedError:      # an ICMP error of an earlier send (UDP)
                continue

    def writable(self) -> bool:
        return bool(select.select([], [self.sock], [], 0)[1])

    def send_queue(self) -> tuple[int, int]:
        """(sk_wmem_alloc, sk_sndbuf): bytes this socket has queued (SIOCOUTQ) and its buffer."""
        wmem = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
        return wmem, self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def readable(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self.sock.close()


class UdpPair(DatagramBackend):
    kind = "udp"

    def __init__(self, lport: int, rport: int, host: str = "127.0.0.1"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((host, lport))
            s.connect((host, rport))
        except OSError as e:
            s.close()
            raise ValueError(f"udp backend: cannot bind {host}:{lport}: {e.strerror or e}") from None
        super().__init__(s, f"udp:{lport}:{rport}")


class PacketSocket(DatagramBackend):
    kind = "packet"

    def __init__(self, ifname: str):
        try:
            socket.if_nametoindex(ifname)
        except OSError:
            raise ValueError(f"packet backend: no interface {ifname!r}") from None
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            s.bind((ifname, 0))
        except OSError as e:
            s.close()
            raise ValueError(f"packet backend: cannot bind {ifname!r}: {e.strerror or e}") from None
        super().__init__(s, f"packet:{ifname}")

    def recv(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return None
            if addr[2] != PACKET_OUTGOING:
                return data


class Segment(DatagramBackend):
    kind = "segment"
    pollout_blind = True        # a full peer does not show in our POLLOUT (unconnected socket)

    def __init__(self, run_dir, segment: str, mac: bytes):
        if not segment or not segment.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"segment backend: bad segment name {segment!r} (letters, digits, - and _)")
        self.dir = Path(run_dir) / f"net-{segment}"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        name = format_mac(mac).replace(":", "") + ".sock"
        self.path = self.dir / name
        # sun_path holds 107 bytes: a port in a deeper run dir is named through a descriptor of the
        # segment's directory (/proc/self/fd/N/<mac>.sock resolves like the full path)
        self._dirfd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY)
        self._base = str(self.dir) if len(os.fsencode(self.path)) < SUN_PATH_MAX else f"/proc/self/fd/{self._dirfd}"
        addr = f"{self._base}/{name}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                probe.connect(addr)
            except OSError:
                self.path.unlink()          # a dead port's socket
            else:
                probe.close()
                s.close()
                os.close(self._dirfd)
                raise ValueError(f"segment backend: MAC {format_mac(mac)} is already on segment {segment!r}")
            probe.close()
        s.bind(addr)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        super().__init__(s, f"segment:{segment}")
        self.fdb: dict[bytes, str] = {}       # MAC -> port socket path (learned)
        self._port_list: list[str] = []
        self._ports_at = -1.0

    def _ports(self) -> list[str]:
        """The other ports (re-listed at most every PORTS_TTL seconds: a flood must not glob)."""
        now = time.monotonic()
        if now - self._ports_at > PORTS_TTL:
            me = self.path.name
            self._port_list = [f"{self._base}/{n}" for n in os.listdir(self.dir)
                               if n.endswith(".sock") and n != me]
            self._ports_at = now
        return self._port_list

    def send(self, frame) -> bool:
        dst = bytes(frame[:6])
        port = None if dst[0] & 1 else self.fdb.get(dst) or self._registered(dst)
        if port is not None:
            try:
                self.sock.sendto(frame, port)
                return True
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self.fdb.pop(dst, None)       # the port went away: flood instead
        for p in self._ports():               # flood (broadcast, multicast, unknown unicast)
            try:
                self.sock.sendto(frame, p)
            except (BlockingIOError, InterruptedError):
                self.drops += 1               # a full port misses a flooded frame, as a switch does
            except OSError:
                pass
        return True

    def _registered(self, mac: bytes) -> str | None:
        """A unicast MAC not learned yet, but whose port is on the segment (every port is named
        by its guest's MAC, a static entry): sent there with backpressure rather than flooded,
        where a full port would miss it."""
        name = mac.hex() + ".sock"
        if not (self.dir / name).exists():
            return None
        port = self.fdb[mac] = f"{self._base}/{name}"
        return port

    def recv(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return None
            if len(data) >= 12 and addr:
                src = data[6:12]
                if not src[0] & 1:
                    # learn where this MAC lives (by port name: the sender may have bound
                    # through its own /proc/self/fd path)
                    self.fdb[src] = f"{self._base}/{addr.rsplit('/', 1)[-1]}"
            return data

    def close(self) -> None:
        super().close()
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        try:
            self.dir.rmdir()                  # the last port out removes the segment
        except OSError:
            pass
