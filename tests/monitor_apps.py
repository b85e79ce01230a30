"""A hostile program for the monitor's end-to-end test, run inside a guest with
`python -m guest --run tests.monitor_apps:break_tx_ring`: it posts a descriptor chain that loops
(a -> b -> a) on the tx queue and kicks, as a buggy or hostile driver would."""
import struct

from shared.constants import VRING_DESC_F_NEXT


def break_tx_ring(vsock) -> None:
    t = vsock.transport
    with t.kernel.lock:
        vq = t.vqs[1]
        a = vq.free_head
        b = vq._next[a]
        for i, nxt in ((a, b), (b, a)):
            vq.mem.write(vq.desc + 16 * i, struct.pack("<QIHH", vq.desc, 16, VRING_DESC_F_NEXT, nxt))
        shadow = vq.avail_idx_shadow
        vq._av[2 + (shadow & (vq.num - 1))] = a
        vq.avail_idx_shadow = (shadow + 1) & 0xFFFF
        vq._av[1] = vq.avail_idx_shadow
        t.vdev.notify(vq)
