"""The guest's network device as programs see it: frames in and out with timeouts, and the IPv4
stack's blocking verbs (resolve, ping, udp_echo). The only waiting is here.

`NetDev` wraps a `VirtioNet` driver core. Whoever owns the device's interrupts calls `poll()`
(the NAPI poll: reclaim tx, receive frames, refill rx); received frames go to the IPv4 stack,
which answers ARP, ICMP echo and UDP echo at once, and are also kept for `recv_frame`.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque

from guest.net.ipv4 import IPPROTO_ICMP, IPPROTO_UDP, UDP_ECHO_PORT, Ipv4Stack


POLL_BUDGET = 64      # NAPI weight


class NetDev:
    def __init__(self, driver, ifc: ipaddress.IPv4Interface | None = None, keep_frames: int = 1024):
        self.drv = driver
        self.stack = Ipv4Stack(driver.mac, ifc) if ifc is not None else None
        self.frames: deque = deque(maxlen=keep_frames)
        self.lock = threading.RLock()         # the driver is single-threaded: one caller at a time
        self.cond = threading.Condition(self.lock)
        self.pending_tx: deque = deque()      # frames the ring had no room for (netif_stop_queue)
        self.interrupts = 0                   # counted by whoever delivers the device's interrupts

    def poll(self) -> int:
        """NAPI poll: returns frames received. Answers what the stack answers."""
        total = 0
        while True:
            with self.lock:
                self.drv.free_old_xmit()          # tx completions (virtnet_poll_tx)
                self._flush_tx()
                got = self.drv.receive(POLL_BUDGET)
                for f in got:
                    if self.stack is not None:
                        for out in self.stack.input(f):
                            self._xmit(out)
                    self.frames.append(f)
                if got:
                    self.cond.notify_all()
            total += len(got)
            # budget spent: the ring may hold more used buffers whose interrupt was already
            # delivered; poll again rather than wait for one that will not come (napi reschedule)
            if len(got) < POLL_BUDGET:
                return total

    def _flush_tx(self) -> None:
        while self.pending_tx and self.drv.start_xmit(self.pending_tx[0]):
            self.pending_tx.popleft()

    def _xmit(self, frame) -> None:
        if self.pending_tx or not self.drv.start_xmit(frame):
            self.pending_tx.append(frame)

    # --- frame API ----------------------------------------------------------------------------
    def send_frame(self, frame: bytes) -> None:
        with self.lock:
            self._xmit(bytes(frame))

    def recv_frame(self, timeout: float | None = None):
        """The next received frame, or None after `timeout` seconds."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.frames, timeout):
                return None
            return self.frames.popleft()

    def _wait(self, pred, timeout: float):
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                r = pred()
                if r:
                    return r
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.05))

    # --- IPv4 ---------------------------------------------------------------------------------
    def resolve(self, ip: str, timeout: float = 2.0) -> bytes | None:
        dst = ipaddress.IPv4Address(ip).packed
        st = self.stack
        for _ in range(3):
            with self.lock:
                if dst in st.arp:
                    return st.arp[dst]
                self._xmit(st.arp_request(dst))
            got = self._wait(lambda: st.arp.get(dst), timeout / 3)
            if got:
                return got
        return None

    def ping(self, ip: str, count: int = 3, timeout: float = 2.0, interval: float = 0.05) -> list[float]:
        """ICMP echo: the round-trip times (s) of the replies that came back within `timeout`."""
        dst = ipaddress.IPv4Address(ip).packed
        mac = self.resolve(ip, timeout)
        if mac is None:
            return []
        st = self.stack
        ident = id(self) & 0xFFFF
        rtts = []
        for seq in range(1, count + 1):
            t0 = time.monotonic()
            with self.lock:
                self._xmit(st.frame_to(mac, dst, IPPROTO_ICMP, st.echo_request(ident, seq)))
            if self._wait(lambda: st.echo_replies.pop((ident, seq), None), timeout):
                rtts.append(time.monotonic() - t0)
            if seq < count:
                time.sleep(interval)
        return rtts

    def udp_echo(self, ip: str, payload: bytes, sport: int = 40000, timeout: float = 2.0) -> bytes | None:
        """Send `payload` to ip's UDP echo port; the echoed payload or None."""
        dst = ipaddress.IPv4Address(ip).packed
        mac = self.resolve(ip, timeout)
        if mac is None:
            return None
        st = self.stack
        with self.lock:
            self._xmit(st.frame_to(mac, dst, IPPROTO_UDP, st.udp(sport, dst, UDP_ECHO_PORT, payload)))

        def got():
            for item in list(st.udp_in):
                if item[0] == dst and item[1] == UDP_ECHO_PORT and item[2] == sport:
                    st.udp_in.remove(item)
                    return item
            return None
        r = self._wait(got, timeout)
        return r[3] if r else None
