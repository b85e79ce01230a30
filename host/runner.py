"""One device process, whatever the transport: the engine, the device, its kicks and its stats.

    runner = DeviceRunner(kind, opts, name)      # kind: host/devices.py (VsockKind, NetKind, ...)
    dev = runner.new_device(hello)               # then runner.session = the codec's Session
    Connection(runner, sock, codec, reader, ...) # the control socket on the engine
    runner.run(stats_fields, close)              # until SIGTERM or the connection ends

The VhostWorker (shared/engine.py) runs control messages, queued work, timers and the device's own
file objects (the vsock bridge, a net backend) on this process's main thread. Kicks (`Kicks`) are
waited on the engine's way for their doorbell: a selectable doorbell (one with `fileno()`, an
eventfd) is registered on the engine's selector, so a device process with eventfd doorbells runs
on one thread; a POSIX semaphore cannot be select()ed, so it gets a DoorbellThread that runs the
device's handler itself (vhost_poll; with --poll-us it polls the ring before it sleeps). All hold
the one device lock, so device state never sees two threads at once.

The transports feed it: `run_device` below (one native guest's connection, forked by the daemon
with the HELLO it read) and host/vhost_user/runner.py (a vhost-user socket, one frontend at a time).
Lifetime: EOF, an error reply that ends the session, or SIGTERM ends the connection; kick waiters
are stopped *before* the device releases its doorbells and memory. `Children` forks and stops
those processes.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from functools import partial
from typing import Callable

from shared.control import Decoder, encode
from shared.doorbell import selectable
from shared.errors import ProtocolError
from shared.signals import die_with_parent
from shared.stats import remove_stats, write_stats

from host.devices import DEVICE_KINDS
from host.native import native_session
from host.session import Result, Session, close_fds
from host.vsock.endpoint import HostEndpoint
from host.worker import VhostWorker

log = logging.getLogger("host.device")

_R, _W = 1, 2


class Kicks:
    """The kick doorbells of the started rings and who waits on each (see the module docstring).
    Queues whose driver gave them one doorbell between them (the guest's kick_alias: vsock's rx
    and event queues) share one waiter, which looks at each of them."""

    def __init__(self, worker: VhostWorker):
        self.worker = worker
        self.device = None
        self.waiters: dict[tuple, tuple[object, object]] = {}   # queues -> (DoorbellThread or None, doorbell)
        self._done: dict[int, tuple[int, int]] = {}   # counters of stopped threads, per queue

    def sync(self, session: Session) -> None:
        """Match the waiters to the kick doorbells of the started rings (after every message).

        Runs with the device lock held: stopping a thread only flags it (it exits within the
        engine's wait timeout), and a doorbell closed under a waiter is closed when it leaves."""
        dev = self.device
        groups: dict[object, list[int]] = {}
        for i in range(dev.num_queues):
            db = dev.kicks[i] if dev.running and session.ring_started(i) else None
            if db is not None:
                groups.setdefault(getattr(db, "name", None) or id(db), []).append(i)
        want = {tuple(qs): dev.kicks[qs[0]] for qs in groups.values()}
        for qs in [qs for qs, (_, db) in self.waiters.items() if want.get(qs) is not db]:
            self._stop(qs)
        for qs, db in want.items():
            if qs in self.waiters:
                continue
            if selectable(db):
                self.worker.register(db, _R, partial(self._readable, qs, db))
                self.waiters[qs] = (None, db)
                continue
            t = self.worker.add_doorbell(db, partial(self.kick, qs), poll=dev.poll_ops(qs[0]),
                                         name="kick-q" + "+".join(map(str, qs)))
            self.waiters[qs] = (t, db)
            for i in qs:
                dev.kick_threads[i] = t      # run to completion: program threads serve the ring

    def _readable(self, qs: tuple, db, mask: int) -> None:
        if self.waiters.get(qs, (None, None))[1] is db:
            db.read()                        # drain the eventfd, then look at the rings
            self.kick(qs)

    def kick(self, queues: tuple) -> None:
        for i in queues:
            self.device.kick_received(i)

    def _stop(self, qs: tuple) -> None:
        t, db = self.waiters.pop(qs)
        if t is None:
            self.worker.unregister(db)
            return
        self.worker.remove_doorbell(t)
        for i in qs:
            if self.device.kick_threads.get(i) is t:
                del self.device.kick_threads[i]
            w, p = self._done.get(i, (0, 0))
            self._done[i] = (w + t.wakeups, p + t.polled_ns)

    def queue_stats(self) -> dict:
        """Per queue, for monitors: kick wake-ups of its doorbell thread, seconds spent polling."""
        n = self.device.num_queues if self.device else 0
        wake, poll = [0] * n, [0.0] * n
        for i in range(n):
            w, p = self._done.get(i, (0, 0))
            for t in (t for qs, (t, _) in self.waiters.items() if i in qs and t is not None):
                w, p = w + t.wakeups, p + t.polled_ns
            wake[i], poll[i] = w, p / 1e9
        return {"vq_wakeups": wake, "vq_poll_time": poll}

    def stop_all(self) -> None:
        threads = [t for t, _ in self.waiters.values() if t is not None]
        for qs in list(self.waiters):
            self._stop(qs)
        for t in threads:
            t.join()


class DeviceRunner:
    def __init__(self, kind, opts, name: str):
        self.kind = kind
        self.opts = opts
        self.worker = VhostWorker(name=name, poll_us=getattr(opts, "poll_us", 0))
        kind.worker = self.worker
        self.session: Session | None = None
        self.device = None
        self.kicks = Kicks(self.worker)
        self.endpoint = None               # in-device services and --run programs

    def new_device(self, hello: dict | None = None):
        """A fresh device from the kind, wired to this process's engine."""
        dev = self.kind.new_device(hello)
        dev.max_queue_size = self.opts.max_queue_size
        dev.worker = self.worker
        dev.lock = self.worker.lock          # one big lock: engine work, kicks, control, programs
        self.device = dev
        self.kicks.device = dev
        if (self.opts.services or self.opts.run) and hasattr(dev, "start_hooks"):
            self.endpoint = HostEndpoint(dev, self.opts.services, self.opts.run)
        return dev

    def after_control(self, started=()) -> None:
        if self.device is None or self.session is None:
            return
        self.kicks.sync(self.session)
        self.kind.sync(self.device)          # e.g. the vhost-user net backend attached at the start
        for q in started:                    # buffers posted before the ring started
            self.worker.queue_work(partial(self._poll, q))

    def _poll(self, q: int) -> None:
        if self.device is not None and self.session is not None and self.session.ring_started(q):
            self.device.kick_received(q)

    def detach(self) -> None:
        """The frontend is gone: stop the waiters, detach, reset and release the device."""
        if self.endpoint is not None:
            self.endpoint.close()            # no services re-listen while the device goes down
            self.endpoint = None
        self.kicks.stop_all()                # before the device closes the doorbells they wait on
        if self.device is not None:
            with self.device.lock:
                self.kind.detach(self.device)
        if self.session is not None:
            try:
                self.session.close()         # device.close(): stop, reset, release memory
            except Exception:
                log.exception("releasing the device failed")
        self.session = None
        self.device = None

    def write_stats(self, fields: Callable[[], dict]) -> None:
        """The stats file now (identity `fields()`, the device's and the engine's counters), and
        again every --stats-interval."""
        dev = self.device
        try:
            write_stats(self.opts.run_dir, "device", {
                **fields(), "status": dev.status if dev else 0, "pid": os.getpid(),
                "stats": dict(dev.get_stats() if dev else {}, **self.worker.stats,
                              **self.kicks.queue_stats())})
        except OSError as e:
            log.debug("cannot write stats: %s", e)
        if not self.worker.stopping:
            self.worker.call_later(self.opts.stats_interval, partial(self.write_stats, fields))

    def run(self, fields: Callable[[], dict], close: Callable[[], None]) -> int:
        """Run the engine until stopped; then `close()` (the transport's), detach and release."""
        self.write_stats(fields)
        try:
            self.worker.run()
        finally:
            close()
            self.close()
        return 0

    def close(self) -> None:
        self.detach()
        self.kind.close()
        remove_stats(self.opts.run_dir, "device")


# --- a control connection, whatever its codec ---------------------------------------------------------
MAX_FDS = 8                    # fds one message may carry (vhost-user: the memory table's regions)
# --doorbell -> the native doorbell kinds a device process accepts
DOORBELL_KINDS = {"any": None, "sem": ("posix_sem",), "eventfd": ("eventfd",)}


def recv_stream(sock: socket.socket):
    """A native connection's reader: whatever bytes (and SCM_RIGHTS fds) are there; None at EOF."""
    data, fds, flags, _ = socket.recv_fds(sock, 65536, MAX_FDS)
    return checked_recv(data, fds, flags)


def checked_recv(data: bytes, fds: list, flags: int):
    """recvmsg's (data, fds, flags) -> (data, fds); None at EOF; OSError when fds were cut."""
    if flags & socket.MSG_CTRUNC or not data:
        close_fds(fds)
        if data:
            raise OSError("too many fds in one message (control data truncated)")
        return None
    return data, fds


class Connection:
    """One control connection on the engine's selector: `reader(sock)` gives bytes and fds, the
    codec turns them into requests for the session and its results into replies, written back
    without blocking; the runner hears of every message (after_control). `on_close` runs once
    when the connection ends (EOF, an error that ends the session, a socket error)."""

    def __init__(self, runner: DeviceRunner, sock: socket.socket, codec, reader, name: str, on_close):
        self.runner = runner
        self.sock = sock
        self.codec = codec
        self.reader = reader
        self.name = name
        self.on_close = on_close
        self.closed = False
        self._out = bytearray()
        sock.setblocking(False)
        runner.worker.register(sock, _R, self._on_event)

    def deliver(self, out: Result) -> None:
        """A Result of the codec: send its replies, tell the runner, close if it says so."""
        self._out += b"".join(out.replies)
        self._flush()
        self.runner.after_control(out.started)
        if out.close and not self.closed:
            log.warning("%s: closing the connection: %s", self.name,
                        self.codec.session.error or "session closed")
            self.close()

    def _on_event(self, mask: int) -> None:
        if mask & _W:
            self._flush()
        for _ in range(64):                      # a burst of messages, then let others run
            if self.closed or not mask & _R:
                return
            try:
                got = self.reader(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.info("%s: connection error: %s", self.name, e)
                self.close()
                return
            if got is None:
                log.info("%s closed its control connection", self.name)
                self.close()
                return
            self.deliver(self.codec.feed(*got))

    def _flush(self) -> None:
        while self._out and not self.closed:
            try:
                n = self.sock.send(self._out)
            except BlockingIOError:
                self.runner.worker.modify(self.sock, _R | _W, self._on_event)
                return
            except OSError:
                self._out.clear()
                self.close()
                return
            del self._out[:n]
        if not self.closed:
            self.runner.worker.modify(self.sock, _R, self._on_event)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.runner.worker.unregister(self.sock)
        if self._out:                            # the last reply (an error) still goes out
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(1.0)
                self.sock.sendall(self._out)
            except OSError:
                pass
        self.sock.close()
        self.codec.close_fds()
        self.on_close()


# --- a native guest's device process -----------------------------------------------------------------
def run_device(conn: socket.socket, hello: dict, peer_pid: int, opts, decoder: Decoder | None = None,
               rest=()) -> int:
    """One native guest's device process (the daemon forked us with the accepted socket, the
    HELLO it read and what followed it)."""
    guest = hello["guest"]
    kind = DEVICE_KINDS[hello["device"]].from_hello(hello, opts)
    runner = DeviceRunner(kind, opts, f"{hello['device']}-{guest}")

    def make_device(hello: dict):
        try:
            kind.open()
        except (ValueError, OSError) as e:
            raise ProtocolError(getattr(e, "strerror", None) or str(e), "EINVAL") from None
        return runner.new_device(hello)

    # the daemon's decoder: bytes it read after HELLO stay in order
    codec = native_session(make_device, decoder=decoder, name=f"control[{guest}]",
                           doorbells=DOORBELL_KINDS[getattr(opts, "doorbell", "any")])
    runner.session = codec.session
    signal.signal(signal.SIGTERM, lambda *_: runner.worker.stop())
    connection = Connection(runner, conn, codec, recv_stream, f"guest {guest!r} (pid {peer_pid})",
                            runner.worker.stop)
    for msg in [hello] + list(rest):
        rep, close = codec.handle(msg)
        connection.deliver(Result(replies=[encode(rep)], close=close, started=codec.started))
        if close:
            break
    fields = {"guest": guest, "device": hello["device"], "cid": hello.get("params", {}).get("cid"),
              "guest_pid": peer_pid}
    return runner.run(lambda: fields, connection.close)


class Children(dict):
    """Processes forked to run one device (or backend) each, pid -> what the caller keeps of it:
    the daemon's device processes and the vhost-user backends. On the way out each gets SIGTERM,
    then SIGKILL after `grace` seconds."""

    def __init__(self, on_exit: Callable[[int, object, int], None]):
        super().__init__()
        self.on_exit = on_exit               # (pid, what was kept, wait status) of a reaped child
        self.parent = os.getpid()

    def fork(self, run: Callable[[], int], close=(), on_term: Callable[[], None] | None = None) -> int:
        """A child that closes `close` (the parent's listeners), dies with its parent, ignores
        SIGINT (the parent stops it), runs `run` and exits with its code. Returns the pid."""
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            for f in close:
                f.close()
            die_with_parent(self.parent)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, (lambda *_: on_term()) if on_term else signal.SIG_DFL)
            code = run()
        except BaseException:                # never let the child run the parent's loop
            log.exception("device process failed")
        finally:
            logging.shutdown()
            os._exit(code)

    def reap(self) -> int:
        """Reap the children that ended (on_exit for each); how many."""
        n = 0
        while self:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self:
                n += 1
                self.on_exit(pid, self.pop(pid), status)
        return n

    def stop(self, grace: float = 3.0) -> None:
        for pid in list(self):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while self and time.monotonic() < end:
            if not self.reap():
                time.sleep(0.02)
        for pid in list(self):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pop(pid)


def exit_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"
