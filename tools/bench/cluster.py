"""A host and its guests for one bench configuration; what the build supports; CPU and counters.

`Features.detect()` reads `python -m host --help` and `python -m guest --help`, so the bench runs on
builds with and without the in-device endpoint, --poll-us or an rx buffer size flag and reports the
scenarios a build cannot run as n/a with the reason.

`Cluster` starts `python -m host` (with the in-device echo/sink/source services when the build has
them) and N guests, each running the bench agent (tools.bench_apps) and the echo and sink (or
discard) services the bridge scenarios talk to. Every process gets its own session, so a Ctrl-C
at the terminal reaches only the bench, which stops guests first and the host last.
"""
from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.stats import read_all
from tools.launch import ROOT, start, stop_all, wait_for_log

HOST_PORTS = {"echo": 5001, "sink": 5002, "source": 5003}     # in-device host services (CID 2)
GUEST_ECHO, GUEST_SINK = 7, 9                                 # guest services the bridge reaches
EXT_SINK, EXT_SOURCE = 6002, 6003                             # external listeners behind the bridge
HOST_CID = 2
ZC_SINK = 5004                                                # tools.bench_apps:zc_sink (host --run)
ZC_RUN = "tools.bench_apps:zc_sink"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _help(module: str) -> str:
    env = dict(os.environ, COLUMNS="500", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout


@dataclass
class Features:
    host_services: bool = False     # python -m host --service echo=|sink=|source=
    guest_sink: bool = False        # python -m guest --service sink=
    poll_us: bool = False           # --poll-us on host and guest
    rx_buf_flag: str | None = None  # the guest's rx buffer size option, if any
    credit_policy: bool = True
    host_run: bool = False          # python -m host --run MODULE:FUNCTION (the zero-copy sink)
    doorbell: bool = False          # --doorbell eventfd on host and guest
    packed: bool = False            # --packed on host and guest (VIRTIO_F_RING_PACKED)

    @classmethod
    def detect(cls) -> "Features":
        h, g = _help("host"), _help("guest")
        m = re.search(r"(--rx-buf[\w-]*)", g)
        return cls(host_services="--service" in h and "sink" in h,
                   guest_sink="sink" in g,
                   poll_us="--poll-us" in h and "--poll-us" in g,
                   rx_buf_flag=m.group(1) if m else None,
                   credit_policy="--credit-policy" in h and "--credit-policy" in g,
                   host_run="--run" in h,
                   doorbell="--doorbell" in h and "--doorbell" in g,
                   packed="--packed" in h and "--packed" in g)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Config:
    """One cluster configuration: a name shown in the tables and the flags of host and guests."""
    name: str
    host_args: list[str] = field(default_factory=list)
    guest_args: list[str] = field(default_factory=list)
    guests: int = 1
    bare: bool = False              # no services, no agent: a guest and its device with nothing to do


def threads(pid: int) -> int | None:
    """How many threads `pid` runs (entries of /proc/PID/task), None if gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def process_cpu_clock(pid: int) -> int:
    """The clock id of `pid`'s process-wide CPU-time clock, as clock_getcpuclockid(3) makes it
    (the kernel's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)): every thread's time, the exited
    ones too, in nanoseconds."""
    return ((~pid) << 3) | 2


def cpu_seconds(pid: int) -> float | None:
    """CPU time of every thread of `pid` (exited ones included), None if gone: the process's
    CPU-time clock (nanoseconds), else utime + stime from /proc/PID/stat (fields 14 and 15),
    which count whole clock ticks: over the 1.5 s of an idle figure one tick is 0.67 % of a
    core."""
    try:
        return time.clock_gettime(process_cpu_clock(pid))
    except (OSError, OverflowError):
        pass
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = text[text.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


class AgentError(RuntimeError):
    pass


class Agent:
    """The bench's end of one guest's agent FIFOs."""

    def __init__(self, d: Path):
        self.dir = d
        self.seq = 0
        self.wfd = self.rfd = None
        self._buf = b""

    def open(self) -> None:
        self.wfd = os.open(self.dir / "cmd", os.O_WRONLY | os.O_NONBLOCK)
        self.rfd = os.open(self.dir / "done", os.O_RDONLY | os.O_NONBLOCK)

    def submit(self, op: str, **kw) -> int:
        self.seq += 1
        os.write(self.wfd, json.dumps({"seq": self.seq, "op": op, **kw}).encode() + b"\n")
        return self.seq

    def wait(self, seq: int, timeout: float) -> dict:
        end = time.monotonic() + timeout
        path = self.dir / f"res-{seq}.json"
        while not path.exists():
            left = end - time.monotonic()
            if left <= 0:
                raise AgentError(f"guest agent gave no result in {timeout:.0f} s")
            r, _, _ = select.select([self.rfd], [], [], min(left, 1.0))
            if r:
                try:
                    os.read(self.rfd, 4096)
                except BlockingIOError:
                    pass
        res = json.loads(path.read_text())
        path.unlink()
        if "error" in res:
            raise AgentError(f"guest app: {res['error']}")
        return res

    def run(self, op: str, timeout: float = 600, **kw) -> dict:
        return self.wait(self.submit(op, **kw), timeout)

    def close(self) -> None:
        for fd in (self.wfd, self.rfd):
            if fd is not None:
                os.close(fd)
        self.wfd = self.rfd = None


class Cluster:
    def __init__(self, cfg: Config, feats: Features, tmp: Path, guest_mem: str = "32M"):
        self.cfg = cfg
        self.feats = feats
        self.tmp = tmp / cfg.name.replace(" ", "-")
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.run_dir = self.tmp / "run"
        self.guest_mem = guest_mem
        self.procs: list[subprocess.Popen] = []
        self.cids = list(range(3, 3 + cfg.guests))
        self.guest_pids: dict[int, int] = {}
        self.agents: dict[int, Agent] = {}

    def log(self, what: str) -> Path:
        return self.tmp / f"{what}.log"

    def start(self) -> None:
        host = ["-m", "host", "--run-dir", str(self.run_dir), *self.cfg.host_args]
        if self.feats.host_services and not self.cfg.bare:
            host += [a for k, p in HOST_PORTS.items() for a in ("--service", f"{k}={p}")]
        if self.feats.host_run and not self.cfg.bare:
            host += ["--run", ZC_RUN]
        self.procs.append(start(host, self.log("host"), new_session=True))
        self._wait(self.log("host"), "host listening", 30, "host")
        sink = "sink" if self.feats.guest_sink else "discard"
        for cid in self.cids:
            d = self.tmp / f"agent-{cid}"
            d.mkdir(exist_ok=True)
            progs = [] if self.cfg.bare else ["--service", f"echo={GUEST_ECHO}", "--service", f"{sink}={GUEST_SINK}",
                                              "--run", "tools.bench_apps:agent"]
            p = start(["-m", "guest", "--run-dir", str(self.run_dir), "--cid", str(cid), "--mem", self.guest_mem,
                       *progs, *self.cfg.guest_args],
                      self.log(f"guest-{cid}"), new_session=True, VE_BENCH_DIR=str(d))
            self.procs.append(p)
            self.guest_pids[cid] = p.pid
            if not self.cfg.bare:
                self.agents[cid] = Agent(d)
        for cid in self.cids:
            self._wait(self.log(f"guest-{cid}"), "vsock device ready", 60, f"guest {cid}")
            if self.cfg.bare:
                continue
            end = time.monotonic() + 30
            while not (self.agents[cid].dir / "ready").exists():
                if time.monotonic() > end:
                    raise RuntimeError(f"the bench agent in guest {cid} did not start; see {self.log(f'guest-{cid}')}")
                time.sleep(0.05)
            self.agents[cid].open()
        end = time.monotonic() + 10
        while len(self.device_pids()) < len(self.cids) and time.monotonic() < end:
            time.sleep(0.05)

    def _wait(self, log: Path, needle: str, timeout: float, what: str) -> None:
        if not wait_for_log(log, needle, timeout):
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise RuntimeError(f"{what} did not start ({self.cfg.name}): {tail[0] if tail else 'no output'}")

    def stop(self) -> None:
        for a in self.agents.values():
            a.close()
        stop_all(self.procs, 15)
        self.procs.clear()

    # --- what the processes report ------------------------------------------------------------
    def snapshot(self) -> dict:
        """{"device": {cid: stats}, "guest": {cid: stats}, "pids": {cid: device pid}} from the run dir."""
        out = {"device": {}, "guest": {}, "pids": {}, "time": {}}
        for d in read_all(self.run_dir):
            cid = d.get("cid")
            if d.get("role") in ("device", "guest") and cid is not None:
                out[d["role"]][cid] = d.get("stats", {})
                out["time"][(d["role"], cid)] = d.get("time", 0)
                if d["role"] == "device":
                    out["pids"][cid] = d.get("pid")
        return out

    def device_pids(self) -> dict[int, int]:
        return self.snapshot()["pids"]

    def fresh_snapshot(self, cids, after: float, timeout: float = 2.0) -> dict:
        """A snapshot whose device and guest stats for `cids` were all written after `after`."""
        end = time.monotonic() + timeout
        while True:
            s = self.snapshot()
            if all(s["time"].get((r, c), 0) > after for r in ("device", "guest") for c in cids):
                return s
            if time.monotonic() > end:
                return s
            time.sleep(0.05)

    def threads(self, cid: int) -> dict[str, int | None]:
        """Threads of guest `cid` and of its device process (the host daemon's child for it)."""
        dev = self.device_pids().get(cid)
        return {"guest": threads(self.guest_pids[cid]), "device": threads(dev) if dev else None}

    def cpu(self, cid: int) -> dict[str, float | None]:
        dev = self.device_pids().get(cid)
        return {"guest": cpu_seconds(self.guest_pids[cid]),
                "device": cpu_seconds(dev) if dev else None}
