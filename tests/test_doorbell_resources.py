"""Doorbells with eventfd semantics, and owner records / reaping of our names."""
import os
import stat
import subprocess
import sys
import threading
import time

import posix_ipc
import pytest

from shared.doorbell import LocalDoorbell, SemDoorbell, open_doorbell
from shared.resources import (OwnerRecord, attach_shm, close_shm, create_shm, ours_in_dev_shm, reap,
                              resource_base, run_tag)


def test_local_doorbell_drains_all_pending():
    d = LocalDoorbell()
    for _ in range(3):
        d.ring()
    assert d.wait(0.1) == 3
    assert d.wait(0.01) == 0


def test_sem_doorbell_eventfd_semantics_and_mode(shm_guard):
    base = resource_base(shm_guard)
    rec = OwnerRecord(shm_guard, "test")
    name = f"/{base}-k0"
    rec.add(sems=[name])
    d = SemDoorbell(name, create=True)
    st = os.stat(f"/dev/shm/sem.{name[1:]}")
    assert stat.S_IMODE(st.st_mode) == 0o600
    other = open_doorbell(d.spec())
    t0 = time.monotonic()
    assert other.wait(0.05) == 0 and time.monotonic() - t0 >= 0.04
    for _ in range(5):
        d.ring()
    assert other.wait(1) == 5
    threading.Timer(0.05, d.ring).start()
    assert other.wait(2) == 1
    other.close()
    d.close()
    rec.release_all()


def test_open_doorbell_rejects_foreign_or_missing():
    for spec in [None, {"kind": "eventfd", "name": "/ve-x"}, {"kind": "posix_sem", "name": "/etc"},
                 {"kind": "posix_sem", "name": "/ve-doesnotexist0000"}]:
        with pytest.raises(ValueError):
            open_doorbell(spec)


def test_attach_does_not_unlink_at_exit(shm_guard):
    base = resource_base(shm_guard)
    rec = OwnerRecord(shm_guard, "test")
    rec.add(shm=[f"{base}-ram"])
    shm = create_shm(f"{base}-ram", 8192)
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from shared.resources import attach_shm, close_shm\n"
            "s = attach_shm(%r); s.buf[0] = 42; close_shm(s)\n") % (os.getcwd(), f"{base}-ram")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert shm.buf[0] == 42
    again = attach_shm(f"{base}-ram")     # still there after the attacher exited
    close_shm(again)
    close_shm(shm)
    rec.release_all()


def test_reap_unlinks_what_a_killed_process_recorded(shm_guard):
    base = resource_base(shm_guard)
    code = ("import sys, os, time; sys.path.insert(0, %r)\n"
            "from shared.resources import OwnerRecord, create_shm\n"
            "from shared.doorbell import SemDoorbell\n"
            "r = OwnerRecord(%r, 'victim'); r.add(shm=[%r], sems=[%r])\n"
            "create_shm(%r, 4096); SemDoorbell(%r, create=True)\n"
            "print('ready', flush=True); time.sleep(60)\n") % (
        os.getcwd(), str(shm_guard), f"{base}-ram", f"/{base}-k0", f"{base}-ram", f"/{base}-k0")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        tag = run_tag(shm_guard)
        assert len([n for n in ours_in_dev_shm() if tag in n]) == 2
        assert reap(shm_guard) == 0          # alive: untouched
        p.kill()
        p.wait(10)
        assert reap(shm_guard) == 1
        assert not [n for n in ours_in_dev_shm() if tag in n]
        with pytest.raises(posix_ipc.ExistentialError):
            posix_ipc.Semaphore(f"/{base}-k0")
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_close_shm_with_live_view_does_not_raise(shm_guard):
    base = resource_base(shm_guard)
    rec = OwnerRecord(shm_guard, "test")
    rec.add(shm=[f"{base}-x"])
    shm = create_shm(f"{base}-x", 4096)
    view = shm.buf[0:16]
    assert close_shm(shm) is False
    view.release()
    rec.release_all()
