"""The source side of a live migration (QEMU's migration_thread): moves the bytes; the decisions
are guest/migration/precopy.py's.

    setup     connect to the destination, hello/ready; per device a pair of dirty-log segments,
              SET_LOG_BASE + VHOST_VRING_F_LOG + VHOST_F_LOG_ALL; the memory object's log on
    rounds    round 1 all RAM, then what both logs gathered during the round before; the device
              log is read from the half of the pair the device no longer writes (SET_LOG_BASE to
              the other half first: the host swaps logs under the device lock)
    pause     the guest's big kernel lock and each net device's lock are taken (no driver runs);
              GET_VRING_BASE stops every ring; the backends are detached (SET_BACKEND "") so the
              destination's host can take them; both logs synced a last time
    complete  last pages, the state (guest/migration/vmstate.py), wait for `resumed`
    fail      before the pause: logging off, the guest never stopped; after it: every device is
              replayed to its host (VirtioDevice.reconnect, as after a host restart) and runs on

`Migration.info` is what query-migrate and the stats file show (round, pages dirtied and sent,
downtime).
"""
from __future__ import annotations

import logging
import socket
import threading
import time

from shared.resources import close_shm, create_shm, unlink_shm

from .pages import PAGE_SIZE, PageMap, log_pages
from .precopy import Precopy
from .stream import VERSION, Stream, StreamError, parse_uri
from . import vmstate

log = logging.getLogger("guest.migration")
BATCH = 256                  # pages per stream message
RESUME_TIMEOUT = 30.0
STEP_TIMEOUT = 30.0
EXIT_GRACE = 0.5             # s the source lingers after completing (query-migrate sees it)


class LogPair:
    """Two dirty-log segments for one device: it writes one while the other is read."""

    def __init__(self, base: str, size: int, owner):
        self.names = [f"{base}-log0", f"{base}-log1"]
        self.size = size
        self.owner = owner
        owner.add(shm=self.names)
        self.shms = [create_shm(n, size) for n in self.names]
        self.cur = 0

    def swap(self, vdev) -> set[int]:
        """Point the device at the other half; read and clear the one it left."""
        old = self.cur
        self.cur ^= 1
        vdev.set_log_base(self.names[self.cur], self.size)
        return log_pages(self.shms[old].buf)

    def read_all(self) -> set[int]:
        """Both halves (the device is stopped)."""
        return log_pages(self.shms[0].buf) | log_pages(self.shms[1].buf)

    def close(self) -> None:
        for shm in self.shms:
            close_shm(shm)
        for n in self.names:
            unlink_shm(n)
        self.owner.remove(shm=self.names)
        self.shms = []


class Migration:
    def __init__(self, vm, uri: str, *, downtime_ms: float = 300.0, max_rounds: int = 30):
        self.vm = vm
        self.path = parse_uri(uri)
        if not downtime_ms > 0 or max_rounds < 1:
            raise ValueError("downtime_ms must be positive and max_rounds at least 1")
        self.downtime_ms = downtime_ms
        self.max_rounds = max_rounds
        if any(getattr(vq, "packed", False) for _, vdev in self.devices() for vq in vdev.vqs):
            # the queue state (guest/migration/vmstate.py) is the split ring's: refuse, as QEMU
            # refuses a device that cannot migrate, and the guest runs on
            raise ValueError("live migration of packed rings is not supported (the guest runs on)")
        self.info: dict = {"status": "setup", "round": 0, "pages_total": 0, "pages_sent": 0,
                           "dirty_guest": 0, "dirty_device": 0, "rounds": [], "downtime_ms": None,
                           "total_ms": None, "error": None}
        self.thread: threading.Thread | None = None
        self.bases: dict = {}        # id(vdev) -> GET_VRING_BASE of each ring, once paused
        self.detached: list = []     # net devices whose backends were handed over
        self._t0 = time.monotonic()

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="migration", daemon=True)
        self.thread.start()

    def devices(self) -> list:
        """(name, VirtioDevice) of every device the guest has."""
        out = []
        if self.vm.vdev is not None:
            out.append(("vsock", self.vm.vdev))
        for d in self.vm.devices:
            out.append(("net", d.vdev))
        return out

    def run(self) -> None:
        logs: list[tuple] = []
        paused: list = []
        stream = None
        mem = self.vm.ram.mem
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(STEP_TIMEOUT)
            try:
                sock.connect(self.path)
            except OSError as e:
                sock.close()
                raise StreamError(f"cannot connect to the destination at {self.path}: {e}") from None
            stream = Stream(sock)
            stream.send("hello", version=VERSION, mem=self.vm.ram.size, table=self._table(),
                        devices=self._device_config())
            stream.expect("ready", STEP_TIMEOUT)
            self._complete(stream, logs, paused, mem)
        except Exception as e:      # noqa: BLE001 - a failed migration leaves the source running
            log.warning("migration failed: %s", e)
            log.debug("migration failure", exc_info=True)
            self.info.update(status="failed", error=str(e))
            self._recover(logs, paused, mem)
        finally:
            if stream is not None:
                stream.close()
            for _, _, lp in logs:
                lp.close()
            if self.info["total_ms"] is None:
                self.info["total_ms"] = round((time.monotonic() - self._t0) * 1000, 1)

    def _table(self) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "shm"} for r in self.vm.ram.table]

    def _device_config(self) -> dict:
        o = self.vm.opts
        return {"vsock": None if self.vm.vdev is None else {"cid": o.cid},
                "net": [dict(d.vdev.params) for d in self.vm.devices]}

    # --- the migration ---------------------------------------------------------------------------
    def _complete(self, stream: Stream, logs: list, paused: list, mem) -> None:
        vm = self.vm
        pm = PageMap(vm.ram.table)
        seg = vm.ram._shm.buf
        self.info["status"] = "active"
        for name, vdev in self.devices():
            lp = LogPair(vdev.resource_base, pm.log_bytes(), vm.owner)
            logs.append((name, vdev, lp))
            vdev.set_log_base(lp.names[0], lp.size)
            vdev.set_logging(True)
        mem.start_dirty_log()
        pc = Precopy(pm.all_pages(), downtime_ms=self.downtime_ms, max_rounds=self.max_rounds)
        self.info["pages_total"] = len(pc.all_pages)
        step = pc.first_round()
        while True:
            self.info["round"] = step.round
            t = time.monotonic()
            self._send(stream, pm, seg, step.round, step.pages)
            pc.round_sent(len(step.pages), time.monotonic() - t)
            guest = mem.sync_dirty_log()
            device: set[int] = set()
            for _, vdev, lp in logs:
                device |= lp.swap(vdev)
            step = pc.next_round(guest, device)
            self._progress(pc)
            if step.final:
                break
        # --- stop and copy ---------------------------------------------------------------------
        t_pause = time.monotonic()
        self._pause(paused)
        self.info["status"] = "device"
        bases = self.bases = {}
        for name, vdev, lp in logs:
            bases[id(vdev)] = [vdev.get_vring_base(i) for i in range(len(vdev.rings))]
        guest = mem.sync_dirty_log()
        device = set()
        for _, _, lp in logs:
            device |= lp.read_all()
        pages = pc.final_pages(step.pages, guest, device)
        self._send(stream, pm, seg, step.round, pages)
        pc.round_sent(len(pages), 0)
        self._progress(pc)
        for name, vdev, lp in logs:
            if name == "net":
                self.detached.append(vdev)
                for i in range(len(vdev.rings)):      # the destination's host takes the backend
                    vdev._req("SET_BACKEND", index=i, backend="")
        stream.send("state", **self._state(bases))
        rep = stream.expect("resumed", RESUME_TIMEOUT)
        downtime = (time.monotonic() - t_pause) * 1000
        self.info.update(status="completed", downtime_ms=round(downtime, 1),
                         dest_resume_ms=rep.get("ms"),
                         total_ms=round((time.monotonic() - self._t0) * 1000, 1))
        mem.stop_dirty_log()
        log.info("migration completed: %d rounds, %d pages sent, downtime %.1f ms",
                 len(pc.rounds), self.info["pages_sent"], downtime)
        self._resume_locks(paused)          # the source has nothing left to run: it exits,
        self.vm.migrated = True             # once monitors had time to read "completed"
        t = threading.Timer(EXIT_GRACE, self.vm.stop_event.set)
        t.daemon = True
        t.start()

    def _send(self, stream: Stream, pm: PageMap, seg, rnd: int, pages: list[int]) -> None:
        for k in range(0, len(pages), BATCH):
            part = pages[k:k + BATCH]
            data = b"".join(seg[o:o + PAGE_SIZE] for o in map(pm.offset, part))
            stream.send("pages", round=rnd, pages=part, data=data)
            self.info["pages_sent"] += len(part)

    def _progress(self, pc: Precopy) -> None:
        self.info.update(round=len(pc.rounds), dirty_guest=pc.guest_total,
                         dirty_device=pc.device_total,
                         rounds=[{"round": r.round, "sent": r.sent, "guest": r.guest_dirty,
                                  "device": r.device_dirty, "ms": round(r.seconds * 1000, 1)}
                                 for r in pc.rounds],
                         bandwidth=round(pc.bandwidth))

    def _state(self, bases: dict) -> dict:
        vm = self.vm
        devices: dict = {"net": [], "vsock": None}
        for d in vm.devices:
            vdev = d.vdev
            devices["net"].append({
                "features": vdev.features, "bases": bases[id(vdev)],
                "vqs": [vmstate.save_vq(vq) for vq in vdev.vqs],
                "stats": dict(d.driver.stats), "mac": d.mac.hex()})
        if vm.vdev is not None:
            devices["vsock"] = {"blocks": vmstate.vsock_blocks(vm.transport), "cid": vm.opts.cid}
        return {"alloc": vmstate.save_alloc(vm.ram.alloc), "devices": devices}

    # --- pause, resume, recover ------------------------------------------------------------------
    def _locks(self) -> list:
        locks = [self.vm.kernel.lock]
        locks += [d.netdev.lock for d in self.vm.devices if d.netdev is not None]
        return locks

    def _pause(self, paused: list) -> None:
        for lk in self._locks():
            lk.acquire()
            paused.append(lk)

    @staticmethod
    def _resume_locks(paused: list) -> None:
        while paused:
            paused.pop().release()

    def _recover(self, logs: list, paused: list, mem) -> None:
        """A failed migration: the source runs on as before."""
        if mem.dirty_logging:
            mem.stop_dirty_log()
        if paused:              # rings may be stopped: run them again from where they stopped
            for name, vdev, _ in logs:
                try:
                    bases = self.bases.get(id(vdev))
                    if bases is None or len(bases) != len(vdev.rings):
                        from shared.ring_layout import used_idx_addr
                        bases = [mem.load16(used_idx_addr(r.used)) for r in vdev.rings]
                    vdev.restart(bases)         # (logging off: the features without LOG_ALL)
                    if vdev in self.detached:
                        for i in range(len(vdev.rings)):
                            vdev._req("SET_BACKEND", index=i, backend=vdev.params["backend"])
                    vdev.set_log_base("", 0)
                except Exception as e:  # noqa: BLE001
                    log.error("after the failed migration, %s did not come back: %s", name, e)
            self._resume_locks(paused)
            for d in self.vm.devices:
                self.vm.kernel.queue_work(d.netdev.poll)     # buffers used meanwhile
            return
        for name, vdev, lp in logs:
            try:
                vdev.set_logging(False)
                vdev.set_log_base("", 0)
            except Exception as e:  # noqa: BLE001
                log.warning("turning %s dirty logging off failed: %s", name, e)
