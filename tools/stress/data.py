"""Stream contents, the guest->host stream header and byte-exact checking (pure).

Every stream is identified by a 64-bit id derived from (seed, group, round, index); its bytes are
`random.Random(sid).randbytes(n)`, so both ends can produce (or check) them without exchanging them.
"""
from __future__ import annotations

import hashlib
import random
import struct

G2H_HDR = struct.Struct("<QQ")      # stream id, byte count (sent first by the guest agent)
CHUNK = 64 * 1024


def stream_id(seed: int, group: int, rnd: int, index: int) -> int:
    h = hashlib.blake2b(f"{seed}/{group}/{rnd}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def stream_bytes(sid: int, n: int) -> bytes:
    return random.Random(sid).randbytes(n) if n else b""


class PrefixChecker:
    """Compares what arrives, chunk by chunk, with the expected bytes; counts corrupted bytes."""

    def __init__(self, expected: bytes):
        self.expected = expected
        self.got = 0
        self.corrupt = 0          # bytes that differ from what was sent (or arrived beyond its end)
        self.sha = hashlib.sha256()

    def feed(self, chunk: bytes) -> None:
        want = self.expected[self.got:self.got + len(chunk)]
        if chunk != want:
            extra = len(chunk) - len(want)
            self.corrupt += extra + sum(1 for a, b in zip(chunk, want) if a != b)
        self.sha.update(chunk)
        self.got += len(chunk)

    @property
    def complete(self) -> bool:
        return self.got == len(self.expected)

    def verified(self) -> bool:
        """Whole stream arrived and its SHA-256 equals the sender's."""
        return (self.complete and not self.corrupt
                and self.sha.digest() == hashlib.sha256(self.expected).digest())
