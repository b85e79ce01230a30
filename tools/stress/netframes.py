"""Net stress frames (pure): numbered, checksummed Ethernet frames and the receiver's tally.

A frame of stream `sid`, number `seq`: dst(6) src(6) ethertype 0x88b5 | "VEST" sid(8) seq(4)
payload-length(2) CRC32(payload)(4) | payload. Sizes and payloads derive from (sid, seq), so the
receiver checks every frame twice: its CRC32, and its payload against the one it must carry.
"""
from __future__ import annotations

import random
import struct
import threading
import zlib

ETHERTYPE = b"\x88\xb5"
MAGIC = b"VEST"
HDR = struct.Struct(">4sQIHI")
HLEN = 14 + HDR.size
MIN_FRAME, MAX_FRAME = 60, 1514


def frame_size(sid: int, seq: int) -> int:
    return random.Random(sid * 1_000_003 + seq).randint(MIN_FRAME, MAX_FRAME)


def payload(sid: int, seq: int) -> bytes:
    n = frame_size(sid, seq) - HLEN
    return random.Random((sid << 20) ^ seq).randbytes(n)


def build(dst: bytes, src: bytes, sid: int, seq: int) -> bytes:
    p = payload(sid, seq)
    return dst + src + ETHERTYPE + HDR.pack(MAGIC, sid, seq, len(p), zlib.crc32(p)) + p


def parse(frame) -> tuple[int | None, int, bool]:
    """(sid, seq, intact) of a stress frame; sid None for a frame that is not one (other traffic).
    A frame of our ethertype whose header or payload is damaged has intact False."""
    frame = bytes(frame)
    if len(frame) < 14 or frame[12:14] != ETHERTYPE:
        return None, 0, True
    if len(frame) < HLEN:
        return -1, 0, False
    magic, sid, seq, plen, crc = HDR.unpack_from(frame, 14)
    p = frame[HLEN:]
    if magic != MAGIC or plen != len(p) or zlib.crc32(p) != crc:
        return (sid if magic == MAGIC else -1), seq, False
    return sid, seq, p == payload(sid, seq)


class Tally:
    """What one receiver got, per stream: distinct sequence numbers, duplicates, corrupted frames."""

    def __init__(self):
        self.streams: dict[int, dict] = {}
        self.cv = threading.Condition()
        self.other = 0

    def feed(self, frame) -> None:
        sid, seq, ok = parse(frame)
        with self.cv:
            if sid is None:
                self.other += 1
                return
            st = self.streams.setdefault(sid, {"seqs": set(), "dup": 0, "corrupt": 0, "corrupt_bytes": 0,
                                               "bytes": 0})
            if not ok:
                st["corrupt"] += 1
                st["corrupt_bytes"] += len(frame)
            elif seq in st["seqs"]:
                st["dup"] += 1
            else:
                st["seqs"].add(seq)
                st["bytes"] += len(frame)
            self.cv.notify_all()

    def collect(self, sid: int, n: int, timeout: float, idle: float = 2.0, clock=None) -> dict:
        """Wait until stream sid has its n frames (or `idle` s passed without one once some came,
        or `timeout`); then its counts, forgotten here. Frames of corrupted headers (sid -1) are
        charged to whoever collects first."""
        import time
        clock = clock or time.monotonic
        end = clock() + timeout
        last, seen = clock(), -1
        with self.cv:
            while True:
                st = self.streams.get(sid)
                got = len(st["seqs"]) if st else 0
                if got >= n:
                    break
                now = clock()
                if got != seen:
                    seen, last = got, now
                if now >= end or (got and now - last >= idle):
                    break
                self.cv.wait(0.05)
            st = self.streams.pop(sid, None) or {"seqs": set(), "dup": 0, "corrupt": 0, "corrupt_bytes": 0,
                                                  "bytes": 0}
            bad = self.streams.pop(-1, None)
        if bad:
            st["corrupt"] += bad["corrupt"]
            st["corrupt_bytes"] += bad["corrupt_bytes"]
        seqs = st["seqs"]
        return {"got": len(seqs), "lost": sum(1 for i in range(n) if i not in seqs),
                "stray": sum(1 for i in seqs if i >= n), "dup": st["dup"], "corrupt": st["corrupt"],
                "corrupt_bytes": st["corrupt_bytes"], "bytes": st["bytes"]}


def verdict(n: int, res: dict, loss_ok: bool) -> str:
    """A net transfer's result: corrupt (a damaged, duplicated or stray frame), lossy (frames
    missing where none may be lost), ok."""
    if res.get("corrupt") or res.get("dup") or res.get("stray"):
        return "corrupt"
    if res.get("lost") and not loss_ok:
        return "lossy"
    return "ok"
