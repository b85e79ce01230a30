"""Fuzz target: the control plane (shared/control.py Decoder + host/native.py codec + host/session.py) with a real
VhostVsock behind it, fed the legal setup sequence with structure-aware mutations (dropped,
repeated, swapped messages; fields of the wrong type or out of range; extra or missing fields;
unknown ops) and byte-level damage (random splits, garbage inserted).

Oracle (docs/PROTOCOL.md): feeding bytes never raises; every reply is a REPLY map; an error reply
carries a code and closes the session, which then stays closed; no reply is an internal error
(EIO: an exception inside the host); the unmutated sequence succeeds step by step.
"""
from __future__ import annotations

import random

import msgpack

from shared import control
from shared.constants import RESERVED_CIDS
from shared.doorbell import LocalDoorbell
from shared.errors import ProtocolError

from . import OracleMismatch

RAM = 1 << 20
WEIRD = [None, True, -1, 1 << 64, 2**32, "x" * 300, b"\x00" * 8, [], {}, 1.5, {"kind": "posix_sem"}]


def legal_sequence(ram, rings, cid: int) -> list[dict]:
    seq = [{"op": "HELLO", "version": control.PROTOCOL_VERSION, "device": "vsock", "guest": "fuzz",
            "reconnect": False, "params": {"cid": cid}},
           {"op": "SET_OWNER"}, {"op": "SET_STATUS", "status": 0}, {"op": "SET_STATUS", "status": 1},
           {"op": "SET_STATUS", "status": 3}, {"op": "GET_FEATURES"},
           {"op": "SET_FEATURES", "features": 1 << 32}, {"op": "SET_STATUS", "status": 11},
           {"op": "GET_STATUS"}, {"op": "SET_MEM_TABLE", "regions": ram.table}]
    for i, (d, a, u, num) in enumerate(rings):
        seq += [{"op": "SET_VRING_NUM", "index": i, "num": num},
                {"op": "SET_VRING_ADDR", "index": i, "flags": 0, "desc_user_addr": ram.gpa_to_uva(d),
                 "avail_user_addr": ram.gpa_to_uva(a), "used_user_addr": ram.gpa_to_uva(u), "log_guest_addr": 0},
                {"op": "SET_VRING_BASE", "index": i, "num": 0}]
        seq += [{"op": f"SET_VRING_{k.upper()}", "index": i, "doorbell": {"kind": "posix_sem", "name": f"/fz-q{i}{k[0]}"}}
                for k in ("kick", "call", "err")]
        seq.append({"op": "SET_VRING_ENABLE", "index": i, "enable": True})
    seq += [{"op": "SET_STATUS", "status": 15}, {"op": "GET_CONFIG", "offset": 0, "size": 8},
            {"op": "GET_STATS"}, {"op": "GET_VRING_BASE", "index": 1}, {"op": "SET_STATUS", "status": 0}]
    return seq


def mutate(rng: random.Random, msgs: list[dict]) -> list:
    out: list = []
    for m in msgs:
        m = dict(m)
        r = rng.random()
        if r < 0.04:
            continue                                        # dropped
        if r < 0.07:
            out.append(dict(m))                             # repeated
        if rng.random() < 0.06 and len(m) > 1:
            k = rng.choice([k for k in m if k != "op"])
            m[k] = rng.choice(WEIRD + [rng.randrange(1 << 70) - (1 << 69)])
        if rng.random() < 0.02:
            m[rng.choice(["x", "seq2", "index"])] = rng.randrange(100)
        if rng.random() < 0.02 and len(m) > 1:
            del m[rng.choice([k for k in m if k != "op"])]
        if rng.random() < 0.02:
            m["op"] = rng.choice(["NOPE", "", "REPLY", "HELLO", "RESET_OWNER", "GET_QUEUE_NUM"])
        if rng.random() < 0.01:
            m = rng.choice([[1, 2], 7, "HELLO", None])
        out.append(m)
        if rng.random() < 0.03 and len(out) > 1:
            out[-1], out[-2] = out[-2], out[-1]             # swapped
    return out


def run_case(rng: random.Random) -> dict:
    from guest.ram import GuestRAM
    from guest.virtqueue import VirtQueue
    from host.native import NativeCodec
    from host.session import Session
    from host.vsock.device import VhostVsock
    from shared.memory import GuestMemory, MemoryRegion

    buf = bytearray(RAM)
    ram = GuestRAM("fz", RAM, buf=buf)
    rings = []
    for num in (8, 8, 4):
        rings.append((*VirtQueue.alloc_rings(ram, num), num))
    bells = {f"/fz-q{i}{k}": LocalDoorbell() for i in range(3) for k in "kce"}

    def attach(regions):
        return GuestMemory([MemoryRegion(r.guest_phys_addr, r.memory_size,
                                         memoryview(buf)[r.mmap_offset:r.mmap_offset + r.memory_size],
                                         r.userspace_addr) for r in regions])

    def open_bell(spec):
        try:
            return bells[spec["name"]]
        except KeyError:
            raise ValueError(f"no doorbell {spec['name']!r}") from None

    def factory(hello):
        # what the daemon checks before a device process sees HELLO (host/daemon.py _check_hello)
        cid = hello["params"].get("cid")
        if (not isinstance(cid, int) or isinstance(cid, bool) or cid in RESERVED_CIDS
                or not 0 < cid <= 0xFFFFFFFF or hello["version"] != control.PROTOCOL_VERSION):
            raise ProtocolError(f"refused HELLO {hello['params']!r}", "EINVAL")
        return VhostVsock(cid)

    sess = NativeCodec(Session(device_factory=factory, attach_memory=attach, open_doorbell=open_bell,
                               name="fuzz"))
    legal = legal_sequence(ram, rings, rng.choice([3, 3, 3, 7, 0xFFFFFFFE]))
    pristine = rng.random() < 0.1
    msgs = legal if pristine else mutate(rng, legal)
    wire = b""
    for i, m in enumerate(msgs, 1):
        if isinstance(m, dict) and (pristine or rng.random() < 0.97):
            m = {**m, "seq": i} if "seq" not in m else m
        try:
            wire += msgpack.packb(m, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            wire += msgpack.packb(str(m))
    if not pristine and rng.random() < 0.2:
        at = rng.randrange(len(wire) + 1)
        wire = wire[:at] + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 20))) + wire[at:]
    stats = {"messages": len(msgs), "replies": 0, "errors": 0}
    closed = False
    dec = control.Decoder(kind=None)
    try:
        pos = 0
        while pos < len(wire):
            n = rng.choice([1, 7, 64, 1 << 20])
            chunk, pos = wire[pos:pos + n], pos + n
            try:
                res = sess.feed(chunk)
                out, close = res.replies, res.close
            except Exception as e:
                raise OracleMismatch(f"NativeCodec.feed raised {type(e).__name__}: {e}") from None
            for raw in out:
                for rep in dec.feed(raw):
                    stats["replies"] += 1
                    if rep.get("op") != "REPLY" or not isinstance(rep.get("ok"), bool):
                        raise OracleMismatch(f"not a reply: {rep}")
                    if not rep["ok"]:
                        stats["errors"] += 1
                        if rep.get("error") == "EIO":
                            raise OracleMismatch(f"internal error in the host: {rep}")
                        if pristine:
                            raise OracleMismatch(f"the legal sequence was refused: {rep}")
            if closed and out:
                if any(r.get("ok") for raw in out for r in control.Decoder(kind=None).feed(raw)):
                    raise OracleMismatch("a closed session answered ok")
            closed |= close
            if close:
                break
            if sess.device is not None and sess.device.running:
                for q in range(3):
                    sess.device.kick_received(q)
        if pristine and stats["replies"] != len(msgs):
            raise OracleMismatch(f"{stats['replies']} replies to {len(msgs)} legal messages")
    finally:
        sess.close()
        ram.close()
    return stats
