"""python -m tools.stress.hostile: a guest that breaks the rules on purpose, beside good guests.

It uses the real control protocol (guest/virtio_dev.py) to set up a virtio-vsock device, then, one
scenario at a time, writes malformed rings (avail index jumps, heads out of range, descriptor
loops, bad indirect tables, addresses outside its RAM, device-writable tx buffers), malformed
packets (short headers, lengths beyond the chain or above 64 KiB, a forged source CID), floods
requests without posting rx buffers, and sends malformed control messages on raw connections
(garbage bytes, non-maps, wrong types, wrong order, oversized messages, a CID already in use).

Each ring scenario states what the host must do: mark the device NEEDS_RESET (without consuming
the bad chain) or carry on. After each, the device is reset and set up again. The last line
printed is a JSON summary; exit 0 when every expectation held and every control message was
answered (error reply or close) in time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import msgpack

from shared import control
from shared.constants import (VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                              VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RW,
                              VIRTIO_VSOCK_TYPE_STREAM, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                              VRING_DESC_F_WRITE, VSOCK_VQ_RX, VSOCK_VQ_TX, bit)
from shared.ring_layout import DESC, avail_idx_addr, avail_ring_addr, used_idx_addr
from shared.vsock.packet import HDR
from shared.cli import add_version

RAM = 4 << 20
ANSWER_TIMEOUT = 10.0      # > the daemon's HELLO_TIMEOUT (5 s): a message that announces a
                           # 4 GiB bin is answered by closing at that timeout, not at once


class Hostile:
    def __init__(self, run_dir: Path, cid: int, rng: random.Random):
        from guest.ram import GuestRAM
        from guest.virtio_dev import VirtioDevice
        from shared.resources import OwnerRecord, ensure_run_dir, resource_base
        self.run_dir = ensure_run_dir(run_dir)
        self.cid = cid
        self.rng = rng
        base = resource_base(self.run_dir)
        self.owner = OwnerRecord(self.run_dir, "guest")
        self.owner.add(shm=[f"{base}-ram"])
        self.ram = GuestRAM(f"{base}-ram", RAM)
        self.mem = self.ram.mem
        self.dev = VirtioDevice(self.ram, self.run_dir, self.run_dir / "control.sock", "vsock",
                                f"hostile-{cid}", {"cid": cid}, resource_base=f"{base}-vsock",
                                owner=self.owner, timeout=ANSWER_TIMEOUT)
        self.summary = {"scenarios": 0, "needs_reset": 0, "expected_reset_missing": 0,
                        "unexpected_reset": 0, "consumed_bad_chain": 0, "control_msgs": 0,
                        "control_unanswered": 0}

    # --- device setup -------------------------------------------------------------------------
    def setup(self) -> None:
        wanted = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX)
        if self.rng.random() < 0.5:
            wanted |= bit(VIRTIO_RING_F_INDIRECT_DESC)
        if self.dev.client is None:
            self.dev.connect()
        self.dev.probe(wanted)
        self.dev.find_vqs([None, None, None], [16, 16, 4])
        self.dev.driver_ok()

    def teardown(self) -> None:
        self.dev.reset()
        self.dev.del_vqs()

    def close(self) -> None:
        try:
            if self.dev.rings:
                self.teardown()
        except (control.ControlError, OSError):
            self.dev.del_vqs()
        self.dev.close()
        self.ram.close()
        self.owner.release_all()

    def _ring(self, q: int):
        return self.dev.rings[q]

    def _buf(self, data: bytes) -> int:
        g = self.ram.alloc.alloc(max(len(data), 1))
        self.mem.write(g, data)
        return g

    def _publish(self, q: int, heads: list[int], idx_delta: int | None = None) -> None:
        """Put heads on the avail ring behind the driver's back, publish, kick."""
        r = self._ring(q)
        idx = self.mem.load16(avail_idx_addr(r.avail))
        for i, h in enumerate(heads):
            self.mem.store16(avail_ring_addr(r.avail, (idx + i) % r.num), h & 0xFFFF)
        self.mem.store16(avail_idx_addr(r.avail), (idx + (len(heads) if idx_delta is None else idx_delta)) & 0xFFFF)
        self.dev.notify(r.vq)

    def _desc(self, q: int, i: int, addr: int, ln: int, flags: int, nxt: int = 0) -> None:
        r = self._ring(q)
        self.mem.write(r.desc + 16 * i, DESC.pack(addr, ln, flags, nxt))

    def _hdr(self, *, src=None, dst=2, length=0, op=VIRTIO_VSOCK_OP_RW, dst_port=5000, src_port=None) -> bytes:
        return HDR.pack(self.cid if src is None else src, dst, src_port or self.rng.randrange(1024, 60000),
                        dst_port, length, VIRTIO_VSOCK_TYPE_STREAM, op, 0, 65536, 0)

    # --- ring and packet scenarios: (name, expects NEEDS_RESET) ---------------------------------
    def sc_avail_idx_jump(self):
        self._publish(VSOCK_VQ_TX, [0], idx_delta=self._ring(VSOCK_VQ_TX).num + self.rng.randint(1, 500))
        return True

    def sc_head_out_of_range(self):
        self._publish(VSOCK_VQ_TX, [self._ring(VSOCK_VQ_TX).num + self.rng.randint(0, 60000)])
        return True

    def sc_desc_loop(self):
        g = self._buf(self._hdr())
        self._desc(VSOCK_VQ_TX, 0, g, 44, VRING_DESC_F_NEXT, 1)
        self._desc(VSOCK_VQ_TX, 1, g, 44, VRING_DESC_F_NEXT, 0)
        self._publish(VSOCK_VQ_TX, [0])
        return True

    def sc_next_out_of_range(self):
        g = self._buf(self._hdr())
        self._desc(VSOCK_VQ_TX, 0, g, 44, VRING_DESC_F_NEXT, self._ring(VSOCK_VQ_TX).num + 7)
        self._publish(VSOCK_VQ_TX, [0])
        return True

    def sc_bad_indirect(self):
        table = self._buf(DESC.pack(self._buf(self._hdr()), 44, VRING_DESC_F_INDIRECT, 0) * 2)
        ln = self.rng.choice([15, 0, 16 * 2, 16 * 100000])     # bad length, zero, nested, too big
        self._desc(VSOCK_VQ_TX, 0, table, ln, VRING_DESC_F_INDIRECT)
        self._publish(VSOCK_VQ_TX, [0])
        return True

    def sc_addr_outside_ram(self):
        self._desc(VSOCK_VQ_TX, 0, self.rng.choice([0, 0x10, 0x3FFF_FFF0, 1 << 60]), 64, 0)
        self._publish(VSOCK_VQ_TX, [0])
        return True

    def sc_tx_writable(self):
        g = self._buf(self._hdr() + bytes(64))
        self._desc(VSOCK_VQ_TX, 0, g, 44, VRING_DESC_F_NEXT, 1)
        self._desc(VSOCK_VQ_TX, 1, g + 44, 64, VRING_DESC_F_WRITE)
        self._publish(VSOCK_VQ_TX, [0])
        return True

    def sc_short_header(self):
        self._desc(VSOCK_VQ_TX, 0, self._buf(self._hdr()[:self.rng.randint(0, 43)]), self.rng.randint(0, 43), 0)
        self._publish(VSOCK_VQ_TX, [0])
        return True

    def sc_len_beyond_chain(self):
        n = self.rng.choice([100, 4096, 65536, 70000, 0xFFFFFFFF])
        g = self._buf(self._hdr(length=n) + bytes(10))
        self._desc(VSOCK_VQ_TX, 0, g, 54, 0)
        self._publish(VSOCK_VQ_TX, [0])
        return True

    def sc_forged_src_cid(self):
        vq = self._ring(VSOCK_VQ_TX).vq
        g = self._buf(self._hdr(src=self.rng.choice([3, 4, 2, 0xFFFFFFFF]), op=VIRTIO_VSOCK_OP_REQUEST))
        vq.add_sgs([(g, 44)], [], g)
        self.dev.kick(vq)
        return False                      # dropped and counted, the device carries on

    def sc_rx_readable_buffer(self):
        # an rx buffer the device may not write, then a request that makes the host answer (RST)
        g = self._buf(bytes(4096))
        self._desc(VSOCK_VQ_RX, 0, g, 4096, 0)
        self._publish(VSOCK_VQ_RX, [0])
        vq = self._ring(VSOCK_VQ_TX).vq
        h = self._buf(self._hdr(op=VIRTIO_VSOCK_OP_REQUEST, dst_port=self.rng.randint(40000, 50000)))
        vq.add_sgs([(h, 44)], [], h)
        self.dev.kick(vq)
        return True

    def sc_flood_without_rx(self):
        # requests to a port nobody listens on: RST replies pile up with no rx buffer to take
        # them; the host must stop taking tx (queued_replies), not grow without bound
        vq = self._ring(VSOCK_VQ_TX).vq
        for _ in range(200):
            while vq.get_buf() is not None:
                pass
            h = self._buf(self._hdr(op=VIRTIO_VSOCK_OP_REQUEST, dst_port=self.rng.randint(40000, 50000)))
            if not vq.add_sgs([(h, 44)], [], h):
                self.ram.alloc.free(h)
                time.sleep(0.01)
            self.dev.kick(vq)
        return False

    SCENARIOS = ("avail_idx_jump", "head_out_of_range", "desc_loop", "next_out_of_range", "bad_indirect",
                 "addr_outside_ram", "tx_writable", "short_header", "len_beyond_chain", "forged_src_cid",
                 "rx_readable_buffer", "flood_without_rx")

    def run_scenario(self, name: str) -> None:
        self.setup()
        tx = self._ring(VSOCK_VQ_TX)
        used_before = self.mem.load16(used_idx_addr(tx.used))
        expect = getattr(self, "sc_" + name)()
        end = time.monotonic() + (2.0 if expect else 0.6)
        status = 0
        while time.monotonic() < end:
            status = self.dev.get_status()
            if status & VIRTIO_CONFIG_S_NEEDS_RESET:
                break
            time.sleep(0.05)
        got = bool(status & VIRTIO_CONFIG_S_NEEDS_RESET)
        self.summary["scenarios"] += 1
        self.summary["needs_reset"] += got
        if expect and not got:
            self.summary["expected_reset_missing"] += 1
            print(f"hostile: {name}: the device did not report NEEDS_RESET", flush=True)
        if got and not expect:
            self.summary["unexpected_reset"] += 1
            print(f"hostile: {name}: unexpected NEEDS_RESET", flush=True)
        if expect and name != "rx_readable_buffer" and self.mem.load16(used_idx_addr(tx.used)) != used_before:
            self.summary["consumed_bad_chain"] += 1
            print(f"hostile: {name}: the device consumed the bad chain", flush=True)
        self.teardown()

    # --- control scenarios ----------------------------------------------------------------------
    def control_garbage(self) -> None:
        r = self.rng
        hello = {"op": "HELLO", "seq": 1, "version": control.PROTOCOL_VERSION, "device": "vsock",
                 "guest": "hostile", "reconnect": False, "params": {"cid": self.cid}}
        msgs = [
            os.urandom(r.randint(1, 300)),
            msgpack.packb([1, 2, 3]),
            msgpack.packb({"seq": 1}),
            msgpack.packb({**hello, "version": 99}),
            msgpack.packb({**hello, "device": "bogus"}),
            msgpack.packb({**hello, "params": {"cid": 3}}),          # a CID a good guest has
            msgpack.packb({**hello, "params": {"cid": 1}}),          # reserved
            msgpack.packb({**hello, "params": {"cid": "x"}}),
            msgpack.packb({"op": "SET_MEM_TABLE", "seq": 1, "regions": []}),
            msgpack.packb({**hello, "extra": 1}),
            msgpack.packb({"op": "HELLO", "seq": 1, "guest": b"\xff" * 2_000_000}, use_bin_type=True),
            control.encode(hello) + msgpack.packb({"op": "SET_VRING_ADDR", "seq": 2, "index": 2**40}),
        ]
        for data in msgs:
            self.summary["control_msgs"] += 1
            if not self._answered(data):
                self.summary["control_unanswered"] += 1
                print(f"hostile: control message {data[:40]!r}... got no answer", flush=True)

    def _answered(self, data: bytes) -> bool:
        """Send data; an error reply or the host closing the connection within the timeout."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(ANSWER_TIMEOUT)
        try:
            s.connect(str(self.run_dir / "control.sock"))
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                return True               # closed on us: an answer too
            s.recv(4096)
            return True
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True
        finally:
            s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.stress.hostile", description=__doc__.splitlines()[0])
    add_version(p)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--cid", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    rng = random.Random(args.seed)
    try:
        h = Hostile(args.run_dir, args.cid, rng)
    except (OSError, control.ControlError) as e:
        print(json.dumps({"ok": False, "error": f"setup: {e}"}))
        return 1
    ok = True
    try:
        h.control_garbage()
        end = time.monotonic() + args.seconds
        order = list(Hostile.SCENARIOS)
        rng.shuffle(order)
        i = 0
        while not stop and (i < len(order) or time.monotonic() < end):
            h.run_scenario(order[i % len(order)])
            i += 1
    except (OSError, control.ControlError) as e:
        print(f"hostile: stopped: {type(e).__name__}: {e}", flush=True)
        ok = False
    finally:
        h.close()
    s = h.summary
    s["ok"] = ok and not (s["expected_reset_missing"] or s["unexpected_reset"] or s["consumed_bad_chain"]
                          or s["control_unanswered"])
    print(json.dumps(s), flush=True)
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
