"""Device-side fuzzing in the style of rust-vmm's virtio-queue and vsock fuzz targets.

Structure-aware generators build a case from a seed (a `random.Random`), one process, guest RAM
on a bytearray (GuestMemory.from_buffer); the host code runs directly on it; an oracle written
from the spec's rules (virtio 1.x 2.7, docs/ring-rules.md) says what must happen:

    rings.py    descriptor tables, avail rings (indices around the 16-bit wrap), indirect tables
                -> VhostVirtqueue.get_vq_desc/add_used: valid chains are consumed with exactly
                their buffers, an invalid one raises VringError and is not consumed
    vsock.py    vsock tx packets and rx/event buffers -> VhostVsock.kick_received: valid packets
                consumed, the first malformed one makes the device NEEDS_RESET without being consumed
    packed.py   packed descriptor rings (any size, any lap, mutated lap bits, ids, indirect tables)
                -> VhostVirtqueuePacked.get_vq_desc/add_used(_n): valid chains consumed with their
                buffers and slots, invalid ones raise and move nothing, used descriptors written
                at the right slots with the right id, length and lap bits
    control.py  control messages (valid sequences, mutated fields, wrong order, garbage bytes)
                -> Decoder + NativeCodec + Session with a real VhostVsock: every request gets a reply,
                never an internal error

Every target: nothing raises out of the host code, nothing hangs (a case must finish in
CASE_DEADLINE seconds). `python -m tools.fuzz --cases N` for long runs; tests/test_fuzz.py runs
them as hypothesis properties with a bounded number of examples.
"""
CASE_DEADLINE = 2.0


class OracleMismatch(AssertionError):
    """The host did something the spec's rules do not allow for this case."""
