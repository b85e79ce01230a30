"""virtio-net driver core (Linux drivers/net/virtio_net.c, the split-ring parts), pure code.

Theory of operation
-------------------
Queue 0 is receive, queue 1 transmit (spec 5.1.2). Every frame carries a virtio_net_hdr of
`hdr_len` bytes (12 with VERSION_1 or MRG_RXBUF, else 10; spec 5.1.6).

    try_fill_recv   post empty device-writable buffers until the ring or the allocator is full
                    (add_recvbuf_small / add_recvbuf_mergeable); the caller kicks when it returns >0.
    receive         take used rx buffers (virtnet_receive): without MRG_RXBUF one buffer is one
                    frame; with it the first buffer's num_buffers says how many buffers the frame
                    spans (receive_mergeable). A length shorter than the header, a num_buffers of 0
                    or beyond what is posted, or a frame outside 14..max_frame bytes is counted as
                    an error and dropped, never trusted. Each buffer taken is refilled.
    start_xmit      reclaim completed tx buffers (free_old_xmit_skbs), then post header + frame as
                    one device-readable buffer; False when the ring is full (netif_stop_queue).

The device only ever sees guest-physical addresses; the allocator is the guest's kmalloc. Nothing
here blocks or touches a doorbell: `kick(vq)` is the caller's (virtqueue_kick's notify half).
"""
from __future__ import annotations

from shared.constants import has
from shared.net.hdr import ETH_MAX_FRAME, ETH_MIN_FRAME, NET_HDR_MRG, VIRTIO_NET_F_MRG_RXBUF, hdr_len

GOOD_PACKET_LEN = ETH_MAX_FRAME + 4      # virtio_net's GOOD_PACKET_LEN (ETH_HLEN + VLAN + MTU)


class VirtioNet:
    def __init__(self, mem, alloc, rxq, txq, features: int, mac: bytes, *, kick=None,
                 rx_buf_size: int | None = None, max_frame: int = GOOD_PACKET_LEN):
        self.mem = mem
        self.alloc = alloc
        self.rxq = rxq
        self.txq = txq
        self.features = features
        self.mac = bytes(mac)
        self.hdr_len = hdr_len(features)
        self.mrg_rxbuf = has(features, VIRTIO_NET_F_MRG_RXBUF)
        # the largest frame sent or accepted: Ethernet + an 802.1Q tag (GOOD_PACKET_LEN), or the
        # MTU + 18 a larger MTU asks for
        self.max_frame = max_frame
        # small buffers hold a whole frame; mergeable ones may be smaller (then frames span several)
        self.rx_buf_size = rx_buf_size or (self.hdr_len + max_frame)
        if not self.mrg_rxbuf and self.rx_buf_size < self.hdr_len + GOOD_PACKET_LEN:
            raise ValueError("without MRG_RXBUF an rx buffer must hold a whole frame")
        if self.rx_buf_size < self.hdr_len + ETH_MIN_FRAME:
            raise ValueError("rx buffers must hold at least a header and a minimal frame")
        self._kick = kick
        self.stats = {"rx_frames": 0, "rx_bytes": 0, "tx_frames": 0, "tx_bytes": 0,
                      "rx_errors": 0, "tx_busy": 0, "rx_refill_fail": 0, "kicks": 0}

    # --- receive -------------------------------------------------------------------------------
    def try_fill_recv(self) -> int:
        """Post rx buffers while there is room; returns how many (the caller kicks when > 0)."""
        n = 0
        vq = self.rxq
        size = self.rx_buf_size
        while vq.num_free:
            g = self.alloc.alloc(size)
            if g is None:
                self.stats["rx_refill_fail"] += 1     # -ENOMEM: retry on the next poll
                break
            if not vq.add_sgs([], [(g, size)], g):
                self.alloc.free(g)
                break
            n += 1
        return n

    def refill_and_kick(self) -> int:
        n = self.try_fill_recv()
        if n:
            self.kick(self.rxq)
        return n

    def _take_rx(self):
        r = self.rxq.get_buf()
        if r is None:
            return None
        g, ln = r
        data = self.mem.read(g, min(ln, self.rx_buf_size)) if ln else b""
        self.alloc.free(g)
        return data, ln

    def receive(self, budget: int = 64) -> list[bytes]:
        """virtnet_receive: up to `budget` frames (headers stripped); refills what it took."""
        frames = []
        hl = self.hdr_len
        while len(frames) < budget:
            got = self._take_rx()
            if got is None:
                break
            data, ln = got
            if ln < hl or ln > self.rx_buf_size:
                self.stats["rx_errors"] += 1      # "rx error: len %u less than header" / overrun
                continue
            if self.mrg_rxbuf:
                num = NET_HDR_MRG.unpack_from(data)[6]
                parts = [data[hl:]]
                bad = num == 0 or num > self.rxq.num
                for _ in range(max(num - 1, 0) if not bad else 0):
                    nxt = self._take_rx()
                    if nxt is None:               # "rx error: %d buffers missing"
                        bad = True
                        break
                    parts.append(nxt[0])
                frame = b"".join(parts)
            else:
                bad = False
                frame = data[hl:]
            if bad or not ETH_MIN_FRAME <= len(frame) <= self.max_frame:
                self.stats["rx_errors"] += 1
                continue
            self.stats["rx_frames"] += 1
            self.stats["rx_bytes"] += len(frame)
            frames.append(frame)
        if self.try_fill_recv():
            self.kick(self.rxq)
        return frames

    # --- transmit ------------------------------------------------------------------------------
    def free_old_xmit(self) -> int:
        """free_old_xmit_skbs: reclaim every completed tx buffer."""
        n = 0
        while (r := self.txq.get_buf()) is not None:
            self.alloc.free(r[0])
            n += 1
        return n

    def start_xmit(self, frame, *, kick: bool = True) -> bool:
        """Queue one Ethernet frame; False when the tx ring (or memory) is full (NETDEV_TX_BUSY)."""
        if not ETH_MIN_FRAME <= len(frame) <= self.max_frame:
            raise ValueError(f"an Ethernet frame is {ETH_MIN_FRAME}..{self.max_frame} bytes, not {len(frame)}")
        self.free_old_xmit()
        n = self.hdr_len + len(frame)
        g = self.alloc.alloc(n)
        if g is None:
            self.stats["tx_busy"] += 1
            return False
        self.mem.write(g, bytes(self.hdr_len) + bytes(frame))   # flags 0, GSO_NONE, num_buffers 0
        if not self.txq.add_sgs([(g, n)], [], g):
            self.alloc.free(g)
            self.stats["tx_busy"] += 1
            return False
        self.stats["tx_frames"] += 1
        self.stats["tx_bytes"] += len(frame)
        if kick:
            self.kick(self.txq)
        return True

    def kick(self, vq) -> bool:
        """virtqueue_kick: notify only when the device asked for it."""
        if vq.kick_prepare():
            self.stats["kicks"] += 1
            if self._kick is not None:
                self._kick(vq)
            return True
        return False
