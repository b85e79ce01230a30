"""Issue 8 item 9: a guest that shrinks its shared memory after DRIVER_OK gets NEEDS_RESET, and
the device process does not die of SIGBUS."""
import os
import signal
import types

from host.guest_memory import attach_memory as attach_shm_memory
from host.native import shm_region
from host.device import VhostDevice
from shared.constants import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET
from shared.resources import close_shm, create_shm, resource_base, unlink_shm

SIZE = 1 << 20
GPA = 0x4000_0000


def _segment(run_dir):
    name = f"{resource_base(run_dir)}-ram"
    shm = create_shm(name, SIZE)
    mem = attach_shm_memory([shm_region({"shm": name, "mmap_offset": 0, "memory_size": SIZE,
                                         "guest_phys_addr": GPA, "userspace_addr": GPA})])
    return name, shm, mem


def test_mem_ok_notices_a_shrunk_segment(shm_guard):
    name, shm, mem = _segment(shm_guard)
    try:
        assert mem.mem_ok() is None
        os.ftruncate(shm._fd, SIZE // 2)            # the guest (owner) shrinks its RAM
        why = mem.mem_ok()
        assert why and "shrank" in why and name in why
    finally:
        mem.release()
        close_shm(shm)
        unlink_shm(name)


class Reader(VhostDevice):
    """Touches the last page of guest memory on every kick, as a data path would."""
    device_type = "test"
    num_queues = 1

    def handle_kick(self, qidx):
        self.mem.read(GPA + SIZE - 4096, 4096)


def test_shrink_after_driver_ok_is_needs_reset_not_sigbus(shm_guard):
    name, shm, mem = _segment(shm_guard)
    pid = os.fork()
    if pid == 0:                                    # the device process: SIGBUS would end it here
        code = 3
        try:
            dev = Reader("t", vq_factory=lambda i, n: types.SimpleNamespace(index=i, name=n, enabled=True))
            dev.set_mem(mem)
            dev.status = VIRTIO_CONFIG_S_DRIVER_OK
            dev.running = True
            dev.kick_received(0)                    # fine while the memory is whole
            assert not dev.broken
            os.ftruncate(shm._fd, SIZE // 2)
            dev.kick_received(0)
            if dev.broken and dev.status & VIRTIO_CONFIG_S_NEEDS_RESET and "shrank" in dev.stats["last_error"]:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        assert not os.WIFSIGNALED(status), f"device died of signal {os.WTERMSIG(status)} (SIGBUS is {signal.SIGBUS})"
        assert os.WEXITSTATUS(status) == 0
    finally:
        mem.release()
        close_shm(shm)
        unlink_shm(name)
