"""One stress group: a host, its guests (each running the agent), rounds of transfers and faults.

The group's rounds run on one thread of the orchestrator; each round starts its transfers at once
(one thread each), fires the round's fault after its delay, and ends when all are done and the
fault has been recovered from (killed processes restarted and ready again).
"""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

from host.vsock.api import VsockHost

from . import netframes, workloads
from .procs import Proc, children, rss
from .schedule import AGENT_PORT, ECHO_PORT, Config, RoundPlan, round_plan

READY_TIMEOUT = 40.0
JOIN_GRACE = workloads.TIMEOUT * 4
# Guests wait this long for the host's control replies (default 5 s): 8 groups starting at once
# on 2 cores (some 60 processes) kept a HELLO unanswered for longer than 5 s.
GUEST_CONNECT_TIMEOUT = "30"


NET_ROLES = ("loop", "a", "b", "udp")


class GroupError(Exception):
    pass


class Interrupted(GroupError):
    """The run was interrupted (Ctrl-C): the group starts and restarts nothing any more."""


class Group:
    def __init__(self, idx: int, cfg: Config, base: Path):
        self.idx = idx
        self.cfg = cfg
        self.dir = base / f"g{idx}"
        self.dir.mkdir(parents=True)
        self.run_dir = self.dir / "run"
        self.host: Proc | None = None
        self.guests: dict[int, Proc] = {}
        self.hostiles: list[Proc] = []
        self.listeners: dict[int, workloads.G2HListeners] = {}
        self.outcomes: list[dict] = []
        self.faults: list[dict] = []
        self.stalls: list[dict] = []
        self.hung_procs: list[str] = []
        self.errors: list[str] = []        # the orchestrator's own trouble (a violation too)
        self.rounds = 0
        self.lock = threading.Lock()
        self.connect_retries = 0            # bridge CONNECTs refused and tried again (workloads._connect)
        self.connect_late_ok = 0            # ... of which a later try succeeded
        self.busy_until_stop = threading.Event()
        # Set by interrupt() (Ctrl-C) or shutdown(): from then on nothing is started, restarted or
        # signalled (spawn_lock orders it with every start), every wait gives up, and what is
        # recorded afterwards (outcomes of transfers cut by the shutdown) is not counted.
        self.stopping = threading.Event()
        self.spawn_lock = threading.Lock()
        # net guests (not fault targets): "loop" on loopback, "a" and "b" on an L2 segment of
        # this host, "udp" on udp:LPORT:RPORT with the group's UDP socket on RPORT
        self.net: dict[str, Proc] = {}
        self.net_macs: dict[str, bytes] = {}
        self.udp: socket.socket | None = None
        self.udp_lport = 0
        self.udp_tally = netframes.Tally()
        # migrate: the group's second host (started with the first migrate fault) and the guests
        # that ran there or waited for a migration
        self.host2: Proc | None = None
        self.migrants: list[Proc] = []
        self.migrations = 0

    # --- processes -----------------------------------------------------------------------------
    def _proc(self, role: str, args: list[str], env: dict | None = None) -> Proc:
        """Start a process of the group, unless the run is stopping (then Interrupted)."""
        with self.spawn_lock:
            if self.stopping.is_set():
                raise Interrupted(f"group {self.idx}: interrupted")
            return Proc(role, args, self.dir, env=env, cancel=self.stopping)

    def _restart(self, p: Proc) -> None:
        with self.spawn_lock:
            if self.stopping.is_set():
                raise Interrupted(f"group {self.idx}: interrupted")
            p.restart()

    def _signal(self, p: Proc, sig: int, group: bool = False) -> None:
        """A fault's signal, never sent once the run is stopping (a SIGSTOP after the shutdown's
        SIGCONT would leave the process stopped)."""
        with self.spawn_lock:
            if self.stopping.is_set():
                raise Interrupted(f"group {self.idx}: interrupted")
            (p.signal_group if group else p.signal)(sig)

    def interrupt(self) -> None:
        with self.spawn_lock:
            self.stopping.set()

    def _host_args(self) -> list[str]:
        a = ["-m", "host", "--run-dir", str(self.run_dir)]
        if self.cfg.indevice:
            from .schedule import INDEV_ECHO_PORT, INDEV_SINK_PORT
            a += ["--service", f"echo={INDEV_ECHO_PORT}", "--service", f"sink={INDEV_SINK_PORT}"]
        return a

    def _guest_args(self, cid: int, run_dir: Path | None = None, monitor: str = "a") -> list[str]:
        return ["-m", "guest", "--run-dir", str(run_dir or self.run_dir), "--cid", str(cid), "--mem", "16M",
                "--connect-timeout", GUEST_CONNECT_TIMEOUT,
                "--service", f"echo={ECHO_PORT}", "--run", "tools.stress.agent:main",
                "--monitor-socket", str(self._monitor(cid, monitor))]

    def _monitor(self, cid: int, side: str) -> Path:
        return self.dir / f"m{cid}{side}"

    def start(self) -> None:
        self.host = self._proc("host", self._host_args())
        if not self.host.wait_log("host listening", READY_TIMEOUT):
            raise GroupError(f"group {self.idx}: host did not start; see {self.host.log}")
        for cid in self.cfg.cids():
            self.guests[cid] = self._proc(f"guest{cid}", self._guest_args(cid))
        for cid in self.cfg.cids():
            self.listeners[cid] = workloads.G2HListeners(self.run_dir, cid)
            if not self._guest_ready(cid):
                if self.stopping.is_set():
                    raise Interrupted(f"group {self.idx}: interrupted")
                raise GroupError(f"group {self.idx}: guest {cid} did not boot; see {self.guests[cid].log}")
        if self.cfg.net:
            self._start_net()

    # --- net guests ----------------------------------------------------------------------------
    def net_dir(self, role: str) -> Path:
        return self.dir / f"net-{role}"

    def _net_spec(self, role: str) -> str:
        if role == "loop":
            return "loopback"
        if role == "udp":
            return f"udp:{self.udp_lport}:{self.udp.getsockname()[1]}"
        return "segment:s"        # one segment per host run dir; a short name (AF_UNIX paths are short)

    def _start_net(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.2)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as t:
            t.bind(("127.0.0.1", 0))
            self.udp_lport = t.getsockname()[1]
        threading.Thread(target=self._udp_receive, daemon=True, name=f"g{self.idx}-udp-rx").start()
        for role in NET_ROLES:
            self.net_dir(role).mkdir()
            self.net[role] = self._net_proc(role)
        for role in self.net:
            if not self._net_ready(role):
                if self.stopping.is_set():
                    raise Interrupted(f"group {self.idx}: interrupted")
                raise GroupError(f"group {self.idx}: net guest {role} did not boot; see {self.net[role].log}")
        self._announce_net()

    def _announce_net(self) -> bool:
        """Every net guest sends a broadcast, so the segment's ports know each other's MACs (an
        unknown unicast is flooded, and a full port drops a flooded frame)."""
        return all("error" not in workloads.net_cmd(self.net_dir(role), {"op": "announce", "sid": 0}, 10.0)
                   for role in self.net)

    def _net_proc(self, role: str) -> Proc:
        d = self.net_dir(role)
        return self._proc(f"net-{role}", ["-m", "guest", "--run-dir", str(self.run_dir), "--name",
                                    f"stress-g{self.idx}-{role}", "--mem", "8M", "--net", self._net_spec(role),
                                    "--connect-timeout", GUEST_CONNECT_TIMEOUT,
                                    # a fixed MAC: after a host SIGKILL the restarted guest's segment
                                    # port takes over (and removes) its dead port's socket file
                                    "--mac", f"52:54:00:5e:{self.idx & 0xff:02x}:{NET_ROLES.index(role):02x}",
                                    "--net-run", "tools.stress.netagent:main"],
                          env={"VE_STRESS_NET_DIR": str(d)})

    def _net_ready(self, role: str, timeout: float = READY_TIMEOUT) -> bool:
        p, ready = self.net[role], self.net_dir(role) / "ready"
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.stopping.is_set():
            if ready.exists():
                self.net_macs[role] = bytes.fromhex(ready.read_text())
                return True
            if not p.alive():
                return False
            time.sleep(0.05)
        return False

    def _restart_net(self, role: str, announce: bool = True) -> bool:
        p = self.net[role]
        for _ in range(3):
            p.kill_group()
            for f in self.net_dir(role).iterdir():     # no stale commands, answers or ready file
                f.unlink()
            self._restart(p)
            if self._net_ready(role):
                return self._announce_net() if announce else True
        return False

    def _udp_receive(self) -> None:
        while True:
            try:
                data, _ = self.udp.recvfrom(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            self.udp_tally.feed(data)

    def _guest_ready(self, cid: int, timeout: float = READY_TIMEOUT) -> bool:
        """Booted, and both the echo service and the agent answer through the bridge."""
        g = self.guests[cid]
        end = time.monotonic() + timeout
        if not g.wait_log("vsock device ready", timeout):
            return False
        return self._ports_answer(cid, end)

    def _ports_answer(self, cid: int, end: float) -> bool:
        vh = VsockHost(self.run_dir)
        for port in (ECHO_PORT, AGENT_PORT):
            while not self.stopping.is_set():
                try:
                    vh.connect(cid, port, timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > end:
                        return False
                    time.sleep(0.1)
        return not self.stopping.is_set()

    def procs(self) -> list[tuple[str, int]]:
        """(role, pid) of every live process of the group, the host's device processes included."""
        out = []
        if self.host is not None and self.host.alive():
            out.append(("host", self.host.pid))
            out += [("device", c) for c in children(self.host.pid)]
        out += [(f"guest{cid}", g.pid) for cid, g in self.guests.items() if g.alive()]
        out += [("hostile", h.pid) for h in self.hostiles if h.alive()]
        out += [(f"net-{role}", p.pid) for role, p in self.net.items() if p.alive()]
        return out

    def rss_sample(self) -> list[tuple[str, int]]:
        out = []
        for role, pid in self.procs():
            v = rss(pid)
            if v is not None:
                out.append((f"g{self.idx}/{role}/{pid}", v))
        return out

    # --- rounds -------------------------------------------------------------------------------
    def run(self, rounds: int | None, deadline: float | None, stop: threading.Event) -> None:
        rnd = 0
        try:
            while not stop.is_set() and not self.stopping.is_set():
                if rounds is not None and rnd >= rounds:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self.run_round(round_plan(self.cfg, self.idx, rnd))
                if self.stopping.is_set():
                    break                   # a round cut short by the interrupt does not count
                rnd += 1
                self.rounds = rnd
        except Interrupted:
            pass
        except Exception as e:  # reported as a violation, not a traceback
            if self.stopping.is_set():
                return
            import traceback
            self.errors.append(f"group {self.idx}: {type(e).__name__}: {e}")
            (self.dir / "orchestrator-error.txt").write_text(traceback.format_exc())

    def run_round(self, plan: RoundPlan) -> None:
        threads = []
        for t in plan.transfers:
            th = threading.Thread(target=self._transfer, args=(t,), daemon=True,
                                  name=f"g{self.idx}-{t.kind}-{t.cid}")
            th.start()
            threads.append((th, t))
        if plan.fault is not None:
            ft = threading.Thread(target=self._fault, args=(plan,), daemon=True, name=f"g{self.idx}-fault")
            ft.start()
            threads.append((ft, None))
        end = time.monotonic() + JOIN_GRACE
        for th, t in threads:
            while th.is_alive() and time.monotonic() < end and not self.stopping.is_set():
                th.join(min(0.2, max(0.0, end - time.monotonic())))
            if self.stopping.is_set():
                return                      # interrupted: nothing more is judged or restarted
            if th.is_alive() and t is not None:
                # A transfer that outlived every timeout: the process it talks to is stuck.
                self._record(workloads.outcome(t.kind, t.cid, t.sid, t.size, time.time() - JOIN_GRACE,
                                               "hung", why="transfer thread did not finish"))
        self._check_alive()

    def _transfer(self, t) -> None:
        fn = workloads.EXECUTORS[t.kind]
        try:
            o = fn(self, t.kind, t.cid, t.sid, t.size)
        except Exception as e:
            o = workloads.outcome(t.kind, t.cid, t.sid, t.size, time.time(), "reset",
                                  why=f"executor: {type(e).__name__}: {e}")
            if not self.stopping.is_set():
                self.errors.append(f"group {self.idx}: {t.kind} executor raised {type(e).__name__}: {e}")
        o["group"] = self.idx
        self._record(o)

    def _record(self, o: dict) -> None:
        o.setdefault("group", self.idx)
        with self.lock:
            if not self.stopping.is_set():      # cut by the interrupt's shutdown: not a result
                self.outcomes.append(o)

    def _check_alive(self) -> None:
        """A process that died without a fault killing it is a violation (and is restarted)."""
        if self.host is not None and not self.host.alive():
            self.errors.append(f"group {self.idx}: host exited on its own ({self.host.p.returncode}); "
                               f"see {self.host.log}")
            self._restart_host()
        for cid, g in self.guests.items():
            if not g.alive():
                self.errors.append(f"group {self.idx}: guest {cid} exited on its own ({g.p.returncode}); "
                                   f"see {g.log}")
                self._restart_guest(cid)
        for role, p in self.net.items():
            if not p.alive():
                self.errors.append(f"group {self.idx}: net guest {role} exited on its own ({p.p.returncode}); "
                                   f"see {p.log}")
                self._restart_net(role)

    # --- faults -------------------------------------------------------------------------------
    def _fault(self, plan: RoundPlan) -> None:
        f = plan.fault
        if self.stopping.wait(f.delay):
            return
        rec = {"group": self.idx, "round": plan.rnd, "kind": f.kind, "target": f.target,
               "t0": time.time(), "t1": None, "recovered": True, "detail": ""}
        try:
            getattr(self, "_fault_" + f.kind.replace("-", "_"))(f, rec)
        except Interrupted:
            pass
        except Exception as e:
            rec["recovered"] = False
            rec["detail"] = f"{type(e).__name__}: {e}"
        rec["t1"] = time.time()
        if self.stopping.is_set():
            # Cut short by the interrupt: it still explains the resets it caused before it, but
            # its recovery was never tried (invariants do not count it as unrecovered).
            rec["interrupted"] = True
        with self.lock:
            self.faults.append(rec)

    def _fault_guest_kill(self, f, rec) -> None:
        g = self.guests[f.target]
        self._signal(g, signal.SIGKILL)
        g.p.wait(10)
        time.sleep(0.3)
        rec["recovered"] = self._restart_guest(f.target)

    def _restart_guest(self, cid: int) -> bool:
        g = self.guests[cid]
        for _ in range(3):
            self._restart(g)
            if self._guest_ready(cid):
                return True
            g.kill_group()
        return False

    def _fault_host_kill(self, f, rec) -> None:
        before = {cid: g.text().count("reconnected to the host") for cid, g in self.guests.items()}
        # mode "all": the host's group; else the daemon alone (device processes follow: PDEATHSIG)
        self._signal(self.host, signal.SIGKILL, group=f.mode == "all")
        self.host.p.wait(10)
        time.sleep(0.3)
        rec["recovered"] = self._restart_host(before)
        rec["detail"] = f.mode

    def _restart_host(self, before: dict | None = None) -> bool:
        if before is None:
            before = {cid: g.text().count("reconnected to the host") for cid, g in self.guests.items()}
        end = time.monotonic() + READY_TIMEOUT
        while True:
            self._restart(self.host)
            if self.host.wait_log("host listening", READY_TIMEOUT):
                break
            self.host.kill_group()
            if time.monotonic() > end:
                return False
        ok = True
        for cid, g in self.guests.items():
            ok &= g.wait_log("reconnected to the host", READY_TIMEOUT, count=before[cid] + 1)
            ok &= self._ports_answer(cid, time.monotonic() + READY_TIMEOUT)
        for role in self.net:             # their devices died with the host: boot them again
            ok &= self._restart_net(role, announce=False)
        if self.net:
            ok &= self._announce_net()
        return ok

    def _fault_migrate(self, f, rec) -> None:
        """Live-migrate the target to the group's second host and back (tools.migrate); its
        connections are reset (TRANSPORT_RESET), its services listen again, its CID is kept."""
        cid = f.target
        if self.host2 is None:
            run2 = self.dir / "run2"
            self.host2 = self._proc("host2", ["-m", "host", "--run-dir", str(run2)])
            if not self.host2.wait_log("host listening", READY_TIMEOUT):
                rec["recovered"] = False
                rec["detail"] = "the second host did not start"
                return
        there = self._migrate(cid, self.dir / "run2", "b", self.guests[cid])
        if there is None:
            rec["recovered"] = self._guest_ready(cid)
            rec["detail"] = "migration there failed; the source ran on"
            return
        back = self._migrate(cid, self.run_dir, "a", there)
        if back is None:            # stranded on the second host: back by a restart at home
            there.kill_group()
            rec["recovered"] = self._restart_guest(cid)
            rec["detail"] = "migration back failed; restarted at home"
            return
        back.args = self._guest_args(cid)       # a later guest-kill restarts it as it boots
        self.guests[cid] = back
        self.migrations += 2
        rec["recovered"] = self._guest_ready(cid)
        rec["detail"] = "there and back"

    def _migrate(self, cid: int, run_dir: Path, side: str, src: Proc) -> Proc | None:
        """One migration of `src` to a new incoming guest on run_dir's host; the destination's
        Proc once it resumed and the source exited, else None (the destination killed)."""
        from_side = "b" if side == "a" else "a"
        inc = self.dir / f"i{cid}"
        inc.unlink(missing_ok=True)            # left by a destination killed after a failure
        dst = self._proc(f"guest{cid}-in{side}", self._guest_args(cid, run_dir, side)
                         + ["--incoming", f"unix:{inc}"])
        self.migrants.append(dst)
        ok = dst.wait_log("waiting for an incoming migration", READY_TIMEOUT)
        if ok:
            r = self._run_tool(["-m", "tools.migrate", "--monitor", str(self._monitor(cid, from_side)),
                                "--to", f"unix:{inc}"], READY_TIMEOUT)
            ok = r == 0 and dst.wait_log("vsock device ready", READY_TIMEOUT)
        if ok and src.p is not None:
            try:
                ok = src.p.wait(15) == 0
            except Exception:
                ok = False
        if not ok:
            dst.kill_group()
            return None
        return dst

    def _run_tool(self, args: list[str], timeout: float) -> int:
        with self.spawn_lock:
            if self.stopping.is_set():
                raise Interrupted(f"group {self.idx}: interrupted")
            p = Proc("migrate", args, self.dir, cancel=self.stopping)
        try:
            return p.p.wait(timeout)
        except Exception:
            p.kill_group()
            return -1

    def _fault_guest_stop(self, f, rec) -> None:
        g = self.guests[f.target]
        self._signal(g, signal.SIGSTOP)
        self.stopping.wait(f.duration)
        g.signal(signal.SIGCONT)

    def _fault_host_stop(self, f, rec) -> None:
        self._signal(self.host, signal.SIGSTOP, group=True)
        self.stopping.wait(f.duration)
        self.host.signal_group(signal.SIGCONT)

    def _fault_rx_stall(self, f, rec) -> None:
        o = workloads.rx_stall(self, f.target, f.duration * 2)
        o["group"] = self.idx
        with self.lock:
            self.stalls.append(o)
        rec["detail"] = f"{o['result']}: {o['bytes']} bytes accepted"

    def _fault_hostile(self, f, rec) -> None:
        seconds = f.duration * 2
        with self.spawn_lock:       # started and listed at once: shutdown() stops every one
            if self.stopping.is_set():
                raise Interrupted(f"group {self.idx}: interrupted")
            h = Proc(f"hostile{len(self.hostiles)}", ["-m", "tools.stress.hostile", "--run-dir",
                                                     str(self.run_dir), "--cid", str(f.target), "--seed",
                                                     f.mode, "--seconds", f"{seconds:.2f}"], self.dir,
                     cancel=self.stopping)
            self.hostiles.append(h)
        end = time.monotonic() + seconds + 60
        while h.alive() and time.monotonic() < end and not self.stopping.is_set():
            time.sleep(0.1)
        if self.stopping.is_set():
            return
        try:
            h.p.wait(0)
        except Exception:
            self.hung_procs.append(f"group {self.idx}: hostile guest {f.target} did not finish")
            h.kill_group()
            rec["recovered"] = False
            return
        lines = [ln for ln in h.text().splitlines() if ln.startswith("{")]
        summary = json.loads(lines[-1]) if lines else {}
        rec["detail"] = summary
        rec["recovered"] = h.p.returncode == 0 and bool(summary.get("ok"))

    # --- the end ------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 20.0) -> None:
        self.interrupt()                # nothing starts, restarts or is signalled by a fault now
        for cid, g in self.guests.items():
            if not g.stop(timeout):
                self.hung_procs.append(f"group {self.idx}: guest {cid} did not exit on SIGTERM")
        for role, p in self.net.items():
            if not p.stop(timeout):
                self.hung_procs.append(f"group {self.idx}: net guest {role} did not exit on SIGTERM")
        if self.udp is not None:
            self.udp.close()
        for h in self.hostiles:
            if not h.stop(timeout):
                self.hung_procs.append(f"group {self.idx}: hostile guest did not exit")
        for m in self.migrants:
            if m.alive() and not m.stop(timeout):
                self.hung_procs.append(f"group {self.idx}: a migration guest did not exit on SIGTERM")
        if self.host2 is not None and not self.host2.stop(timeout):
            self.hung_procs.append(f"group {self.idx}: second host did not exit on SIGTERM")
        for lst in self.listeners.values():
            lst.close()
        if self.host is not None and not self.host.stop(timeout):
            self.hung_procs.append(f"group {self.idx}: host did not exit on SIGTERM")

    def logs(self) -> list[tuple[str, Path]]:
        out = [("host", p) for p in (self.host.logs if self.host else [])]
        for g in self.guests.values():
            out += [("guest", p) for p in g.logs]
        for p in self.net.values():
            out += [("guest", lg) for lg in p.logs]
        for h in self.hostiles:
            out += [("hostile", p) for p in h.logs]
        for m in self.migrants:
            if m not in self.guests.values():
                out += [("guest", p) for p in m.logs]
        if self.host2 is not None:
            out += [("host", p) for p in self.host2.logs]
        return out
