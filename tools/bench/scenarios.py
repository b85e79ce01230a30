"""The bench's plan: every scenario as a step that appends figures (see model.py).

Transfers are sized by time, not bytes, so one plan suits a slow and a fast engine: a calibration
transfer (not recorded) measures the rate, then each repeat moves about `target_s` seconds' worth.
Counters (kicks, interrupts, wake-ups, packets) and CPU time are taken over a whole group
(calibration and repeats) from the stats files and /proc; per packet = over the device's packets
both ways (data, credit updates, control).

Paths: "in-device" = guest app <-> a program inside the host's device process (python -m host
--service); "bridge" = guest <-> an external program through the Unix bridge; both directions
("g2h": the guest app writes, "h2g": the host side writes).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tools.bench import baselines
from tools.bench.cluster import (EXT_SINK, GUEST_ECHO, GUEST_SINK, HOST_CID, HOST_PORTS, ZC_SINK, Cluster,
                                 Config, Features)
from tools.bench.external import Child
from tools.bench.model import figure, percentile

SIZES = [64, 4096, 65536, 1 << 20]
ZC_SIZES = [65536, 1 << 20]          # zero-copy receive: the bulk sizes it is for
CEILING = "bare ring"                # the mode name of the ceiling's figures
ZERO_COPY = "zero copy"              # the in-device figures whose receiver uses recv_view
PACKED = "packed"                   # --packed on host and guest: the same rows as defaults, packed rings
PACKED_SIZES = [64, 65536]
PAIRS = [1, 2, 4, 8]
PAIR_SIZE = 65536
MAX_TOTAL = 2 << 30


@dataclass
class Options:
    quick: bool = False
    repeats: int = 3
    target_s: float = 0.5       # seconds per transfer / round-trip run
    idle_s: float = 3.0
    poll_us: int = 50            # the adaptive-poll window passed as --poll-us
    sizes: list[int] = field(default_factory=lambda: list(SIZES))
    pairs: list[int] = field(default_factory=lambda: list(PAIRS))


@dataclass
class Step:
    label: str
    run: Callable[[], list[dict]]
    templates: list[dict]              # the figures it makes, for an n/a entry when it fails
    cluster: Config | None = None


class NA(Exception):
    """A scenario this build cannot run; the message is the reason."""


def _sized(measure: Callable[[int], tuple[int, float]], size: int, target_s: float) -> int:
    """Bytes per transfer so one takes about target_s: grow a calibration transfer until it
    lasts 50 ms, then scale by the measured rate."""
    total = max(size * 4, 128 << 10)
    while True:
        got, dt = measure(total)
        if dt >= 0.05 or total >= MAX_TOTAL:
            break
        total = min(MAX_TOTAL, total * 16)
    rate = got / max(dt, 1e-6)
    return max(size, min(MAX_TOTAL, int(rate * target_s)) // size * size)


def _per_gb(cpu: dict, nbytes: int) -> dict:
    return {k: (v / (nbytes / 1e9) if v is not None and nbytes else None) for k, v in cpu.items()}


def _counters(s0: dict, s1: dict, cids) -> dict:
    """Per-packet counters between two snapshots, summed over `cids` (device side; wake-ups
    from device and guest when the build reports them)."""
    d = {"kicks": 0, "interrupts": 0, "packets": 0, "wakeups": None}
    for c in cids:
        a, b = s0["device"].get(c, {}), s1["device"].get(c, {})
        delta = lambda k, a=a, b=b: (b.get(k) or 0) - (a.get(k) or 0)   # noqa: E731
        d["kicks"] += delta("kicks")
        d["interrupts"] += delta("interrupts")
        d["packets"] += delta("rx_packets") + delta("tx_packets")
        for role in ("device", "guest"):
            x, y = s0[role].get(c, {}), s1[role].get(c, {})
            if "wakeups" in y:
                d["wakeups"] = (d["wakeups"] or 0) + y["wakeups"] - x.get("wakeups", 0)
    return d


class Plan:
    def __init__(self, opts: Options, feats: Features, tmp: Path):
        self.o = opts
        self.f = feats
        self.tmp = tmp
        self.cluster: Cluster | None = None
        self.failed: dict[str, str] = {}
        self.totals: dict = {}                  # (path, dir, size, mode) -> bytes per repeat
        self.modes: dict[str, str] = {}
        self._configs: dict[str, Config] | None = None

    # --- clusters ------------------------------------------------------------------------------
    def configs(self) -> dict[str, Config]:
        if self._configs is None:
            self._configs = self._make_configs()
        return self._configs

    def _make_configs(self) -> dict[str, Config]:
        guests = max(self.o.pairs) if self.o.pairs else 1
        seeds_g = ["--credit-policy", "every-read"] + ([self.f.rx_buf_flag, "4096"] if self.f.rx_buf_flag else [])
        cfg = {"defaults": Config("defaults", [], [], guests),
               "seeds": Config("seeds", ["--credit-policy", "every-read"], seeds_g)}
        if self.f.poll_us:
            cfg["semaphores"] = Config("semaphores", ["--poll-us", "0"], ["--poll-us", "0"])
            p = ["--poll-us", str(self.o.poll_us)]
            cfg[f"poll {self.o.poll_us} µs"] = Config(f"poll {self.o.poll_us} µs", p, p)
        if self.f.doorbell:
            ev = ["--doorbell", "eventfd", "--poll-us", "0"]
            cfg["eventfd"] = Config("eventfd", ev, ev)
        if getattr(self.f, "packed", False):
            cfg[PACKED] = Config(PACKED, ["--packed"], ["--packed"])
        cfg["bare"] = Config("bare", bare=True)
        if self.f.doorbell:
            cfg["bare eventfd"] = Config("bare eventfd", ["--doorbell", "eventfd"], ["--doorbell", "eventfd"],
                                         bare=True)
        self.modes[CEILING] = ("the ceiling (tools/bench/ceiling.py): two processes, one split ring of 256 "
                               "descriptors per direction, 44-byte headers, EVENT_IDX, semaphores, no sockets layer")
        self.modes[ZERO_COPY] = "defaults; the receiving app uses recv_view (no copy into its buffer)"
        for name, c in cfg.items():
            if c.bare:
                self.modes[name] = "a guest and its device process with no services and no bench agent"
                continue
            self.modes[name] = (" ".join(dict.fromkeys(c.host_args + c.guest_args)) or "no flags") + \
                (f"; {c.guests} guests" if c.guests > 1 else "")
        return cfg

    def use(self, cfg: Config) -> Cluster:
        if cfg.name in self.failed:
            raise RuntimeError(self.failed[cfg.name])
        if self.cluster is not None and self.cluster.cfg is cfg:
            return self.cluster
        self.close()
        c = Cluster(cfg, self.f, self.tmp)
        self.cluster = c
        try:
            c.start()
        except Exception as e:
            self.failed[cfg.name] = f"{cfg.name} cluster did not start: {e}"
            raise RuntimeError(self.failed[cfg.name]) from None
        time.sleep(0.5)
        return c

    def close(self) -> None:
        if self.cluster is not None:
            c, self.cluster = self.cluster, None
            c.stop()

    # --- the steps -----------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        o, cfgs = self.o, self.configs()
        out: list[Step] = []
        for kind in ("socketpair", "pipe"):
            for size in o.sizes:
                out.append(Step(f"{kind} stream, {_sz(size)} writes", lambda k=kind, s=size: self.base_stream(k, s),
                                [dict(kind="stream", path=kind, size=size, metric="MB/s")]))
            out.append(Step(f"{kind} 64 B request/response", lambda k=kind: self.base_rr(k),
                            [dict(kind="rr", path=kind, metric=m) for m in ("median µs", "p99 µs", "mean µs")]))
        for n in o.pairs:
            out.append(Step(f"{n} socketpair{'s' if n > 1 else ''} at once", lambda n=n: self.base_pairs(n),
                            [dict(kind="pairs", path="socketpair", pairs=n, metric="MB/s")]))
        for direction in ("g2h", "h2g"):
            for size in o.sizes:
                out.append(Step(f"ceiling {direction} {_sz(size)} writes",
                                lambda dr=direction, s=size: self.ceiling_stream(dr, s),
                                [dict(kind="stream", path="ceiling", dir=direction, size=size, mode=CEILING,
                                      metric="MB/s")]))
        out.append(Step("ceiling 64 B request/response", self.ceiling_rr,
                        [dict(kind="rr", path="ceiling", mode=CEILING, metric=m) for m in ("median µs", "p99 µs")]))
        for packed in (False, True):
            for sup in (True, False):
                m = f"{'packed, ' if packed else ''}suppression {'on' if sup else 'off'}"
                out.append(Step(f"ring round trips, {m}", lambda s=sup, p=packed: self.ring(s, p),
                                [dict(kind="ring", path="ring", mode=m, metric="mean µs")]))
        d = cfgs["defaults"]
        out.append(Step("idle pair", self.idle, [dict(kind="idle", path="guest+device", metric="% core")], d))
        primary = "in-device" if self.f.host_services else "bridge"
        for mode, cfg in (("defaults", d), ("seeds", cfgs["seeds"])):
            for path in ("in-device", "bridge"):
                if mode == "seeds" and o.quick and path != primary:
                    continue
                for direction in ("g2h", "h2g"):
                    for size in o.sizes:
                        out.append(Step(f"{path} {direction} {_sz(size)} writes ({mode})",
                                        lambda p=path, dr=direction, s=size, m=mode, c=cfg: self.vstream(c, m, p, dr, s),
                                        [dict(kind="stream", path=path, dir=direction, size=size, mode=mode,
                                              metric="MB/s")], cfg))
            if mode == "defaults":
                for direction in ("g2h", "h2g"):
                    for size in (s for s in ZC_SIZES if s in o.sizes):
                        out.append(Step(f"in-device {direction} {_sz(size)} writes ({ZERO_COPY})",
                                        lambda dr=direction, s=size: self.vstream(d, ZERO_COPY, "in-device", dr, s),
                                        [dict(kind="stream", path="in-device", dir=direction, size=size,
                                              mode=ZERO_COPY, metric="MB/s")], d))
                for path in ("in-device", "bridge"):
                    out.append(self._rr_step(path, "defaults", d))
                for path in ("in-device", "bridge"):
                    for n in o.pairs:
                        out.append(Step(f"{n} pair{'s' if n > 1 else ''} at once, {path}",
                                        lambda p=path, n=n: self.vpairs(d, p, n),
                                        [dict(kind="pairs", path=path, pairs=n, dir="g2h", size=PAIR_SIZE,
                                              metric="MB/s")], d))
        # the packed ring next to the split one (defaults above): the same sizes and the rr
        pk = cfgs.get(PACKED)
        for direction in ("g2h", "h2g"):
            for size in (s for s in PACKED_SIZES if s in o.sizes):
                out.append(Step(f"in-device {direction} {_sz(size)} writes ({PACKED})",
                                lambda dr=direction, s=size: self._packed(lambda c: self.vstream(
                                    c, PACKED, "in-device", dr, s)),
                                [dict(kind="stream", path="in-device", dir=direction, size=size,
                                      mode=PACKED, metric="MB/s")], pk))
        out.append(self._rr_step("in-device", PACKED, pk))
        poll_modes = ["semaphores", f"poll {o.poll_us} µs", "eventfd"]
        for mode in poll_modes:
            for path in ("in-device", "bridge"):
                out.append(self._rr_step(path, mode, cfgs.get(mode)))
        for bare in ("bare", "bare eventfd"):
            out.append(Step(f"threads of an idle guest and its device process ({bare})",
                            lambda b=bare: self.threads(b),
                            [dict(kind="threads", path=p, mode=bare, metric="threads") for p in ("guest", "device")],
                            cfgs.get(bare)))
        return out

    def _packed(self, run):
        cfg = self.configs().get(PACKED)
        if cfg is None:
            raise NA("this build has no --packed on host and guest")
        return run(cfg)

    def _rr_step(self, path: str, mode: str, cfg: Config | None) -> Step:
        return Step(f"{path} 64 B request/response ({mode})", lambda: self.vrr(cfg, mode, path),
                    [dict(kind="rr", path=path, mode=mode, metric=m) for m in ("median µs", "p99 µs")], cfg)

    # --- baselines -----------------------------------------------------------------------------
    def base_stream(self, kind: str, size: int) -> list[dict]:
        def measure(total):
            r = baselines.stream(kind, size, total)
            return r["bytes"], r["bytes"] / r["mbps"] / 1e6
        total = _sized(measure, size, self.o.target_s)
        self.totals[(kind, size)] = total
        runs = [baselines.stream(kind, size, total) for _ in range(self.o.repeats)]
        nbytes = sum(r["bytes"] for r in runs)
        cpu = {k: sum(r["cpu"][k] or 0 for r in runs) for k in ("writer", "reader")}
        return [figure("stream", kind, "MB/s", size=size, samples=[r["mbps"] for r in runs],
                       cpu_s_per_gb=_per_gb(cpu, nbytes))]

    def base_rr(self, kind: str) -> list[dict]:
        runs = [baselines.rr(kind, 64, self.o.target_s) for _ in range(self.o.repeats)]
        return self._rr_figs(kind, "defaults", runs) + [
            figure("rr", kind, "mean µs", samples=[sum(r) / len(r) for r in runs])]

    def base_pairs(self, n: int) -> list[dict]:
        if ("socketpair", PAIR_SIZE) in self.totals:
            total = self.totals[("socketpair", PAIR_SIZE)]
        else:
            total = _sized(lambda t: (t, t / baselines.stream("socketpair", PAIR_SIZE, t)["mbps"] / 1e6),
                           PAIR_SIZE, self.o.target_s)
        runs = [baselines.pairs(n, PAIR_SIZE, total) for _ in range(self.o.repeats)]
        return [figure("pairs", "socketpair", "MB/s", pairs=n, dir="g2h", size=PAIR_SIZE, samples=runs)]

    def ring(self, suppress: bool, packed: bool = False) -> list[dict]:
        from tools.bench.ring import bench_ring
        runs = [bench_ring(self.o.target_s, 256, 1, suppress, packed) for _ in range(self.o.repeats)]
        mode = f"{'packed, ' if packed else ''}suppression {'on' if suppress else 'off'}"
        return [figure("ring", "ring", "mean µs", mode=mode,
                       samples=[1e6 / r["rt_s"] for r in runs],
                       per_packet={"kicks": sum(r["kicks"] * r["rt"] for r in runs),
                                   "interrupts": sum(r["irqs"] * r["rt"] for r in runs),
                                   "packets": sum(r["rt"] for r in runs), "wakeups": None})]

    def ceiling_stream(self, direction: str, size: int) -> list[dict]:
        from tools.bench import ceiling

        def measure(total):
            r = ceiling.stream(direction, size, total)
            return r["bytes"], r["seconds"]
        total = _sized(measure, size, self.o.target_s)
        self.totals[("ceiling", direction, size)] = total
        runs = [ceiling.stream(direction, size, total) for _ in range(self.o.repeats)]
        nbytes = sum(r["bytes"] for r in runs)
        cpu = {k: sum(r["cpu"][k] for r in runs) for k in ("guest", "device")}
        pp = {k: sum(r[k] for r in runs) for k in ("kicks", "interrupts", "wakeups", "packets")}
        return [figure("stream", "ceiling", "MB/s", dir=direction, size=size, mode=CEILING,
                       samples=[r["mbps"] for r in runs], per_packet=pp, cpu_s_per_gb=_per_gb(cpu, nbytes))]

    def ceiling_rr(self) -> list[dict]:
        from tools.bench import ceiling
        runs = [ceiling.rr(64, self.o.target_s) for _ in range(self.o.repeats)]
        pp = {k: sum(r[k] for r in runs) for k in ("kicks", "interrupts", "wakeups", "packets")}
        pp["round_trips"] = sum(len(r["lat_us"]) for r in runs)
        return self._rr_figs("ceiling", CEILING, [r["lat_us"] for r in runs], per_packet=pp)

    @staticmethod
    def _rr_figs(path: str, mode: str, runs: list[list[float]], **extra) -> list[dict]:
        runs = [r for r in runs if r]
        return [figure("rr", path, "median µs", mode=mode, samples=[percentile(r, 50) for r in runs], **extra),
                figure("rr", path, "p99 µs", mode=mode, samples=[percentile(r, 99) for r in runs], **extra)]

    # --- vsock ---------------------------------------------------------------------------------
    def _need(self, path: str) -> None:
        if path == "in-device" and not self.f.host_services:
            raise NA("this build's host has no --service (no in-device endpoint)")

    def idle(self) -> list[dict]:
        c = self.use(self.configs()["defaults"])
        cid = c.cids[0]
        time.sleep(1.0)
        c0, t0 = c.cpu(cid), time.monotonic()
        time.sleep(self.o.idle_s)
        c1, dt = c.cpu(cid), time.monotonic() - t0
        per = {k: (100 * (c1[k] - c0[k]) / dt if c0[k] is not None and c1[k] is not None else None) for k in c0}
        return [figure("idle", "guest+device", "% core", samples=[sum(v or 0 for v in per.values())],
                       processes=per, threads=c.threads(cid))]

    def threads(self, mode: str = "bare") -> list[dict]:
        """Threads per process of a guest and its device with nothing to serve (issue 15's target:
        the bench's own clusters run services and an agent, which have threads of their own), with
        semaphore doorbells ("bare") or eventfds ("bare eventfd")."""
        cfg = self.configs().get(mode)
        if cfg is None:
            raise NA("this build has no --doorbell on host and guest")
        c = self.use(cfg)
        cid = c.cids[0]
        time.sleep(1.0)                     # settled: whatever starts lazily has started
        n = c.threads(cid)
        out = []
        for p in ("guest", "device"):
            if n[p] is None:
                out.append(figure("threads", p, "threads", mode=mode, na=f"the {p} process was not found"))
            else:
                out.append(figure("threads", p, "threads", mode=mode, samples=[n[p]]))
        return out

    def _group(self, c: Cluster, cids, body: Callable[[], tuple[int, dict]]):
        """Run body() (returns bytes moved, external CPU) with counters and CPU around it."""
        s0 = c.snapshot()
        cpu0 = {cid: c.cpu(cid) for cid in cids}
        nbytes, ext = body()
        t_end = time.time()
        cpu1 = {cid: c.cpu(cid) for cid in cids}
        s1 = c.fresh_snapshot(cids, t_end)
        cpu = {k: sum((cpu1[i][k] or 0) - (cpu0[i][k] or 0) for i in cids) for k in ("guest", "device")}
        if ext is not None:
            cpu["external"] = ext
        return _counters(s0, s1, cids), _per_gb(cpu, nbytes)

    def _transfer(self, c: Cluster, cid: int, path: str, direction: str, size: int, total: int,
                  mode: str = "defaults") -> tuple[int, float, float]:
        """One transfer: (bytes, seconds, external CPU)."""
        a = c.agents[cid]
        if path == "in-device" and mode == ZERO_COPY:
            if direction == "g2h":
                if not self.f.host_run:
                    raise NA("this build's host has no --run (the zero-copy sink runs in the device process)")
                r = a.run("send_zc", cid=HOST_CID, port=ZC_SINK, size=size, total=total)
            else:
                r = a.run("recv_view", cid=HOST_CID, port=HOST_PORTS["source"], size=size, total=total)
            if r.get("na"):
                raise NA(r["na"])
            if direction == "g2h":
                _check_count(r)
            return r["bytes"], r["seconds"], 0.0
        if path == "in-device":
            if direction == "g2h":
                r = a.run("send", cid=HOST_CID, port=HOST_PORTS["sink"], size=size, total=total)
                _check_count(r)
            else:
                r = a.run("recv", cid=HOST_CID, port=HOST_PORTS["source"], size=size, total=total)
            return r["bytes"], r["seconds"], 0.0
        if direction == "g2h":
            ext = Child("sink", str(c.run_dir / f"vsock-{cid}.sock_{EXT_SINK}"))
            try:
                r = a.run("send", cid=HOST_CID, port=EXT_SINK, size=size, total=total)
            except BaseException:
                ext.close()
                raise
            e = ext.result(60)
            _check_count(r)
            return r["bytes"], r["seconds"], e["cpu"]
        e = Child("h2g", str(c.run_dir), cid, GUEST_SINK, size, total).result()
        if self.f.guest_sink:
            _check_count(e)
        return e["bytes"], e["seconds"], e["cpu"]

    def vstream(self, cfg: Config, mode: str, path: str, direction: str, size: int) -> list[dict]:
        self._need(path)
        c = self.use(cfg)
        cid = c.cids[0]
        samples: list[float] = []
        ext_cpu = [0.0]
        moved = [0]

        def body():
            def measure(total):
                n, dt, xc = self._transfer(c, cid, path, direction, size, total, mode)
                ext_cpu[0] += xc
                moved[0] += n
                return n, dt
            total = _sized(measure, size, self.o.target_s)
            self.totals[(path, direction, size, mode)] = total
            for _ in range(self.o.repeats):
                n, dt = measure(total)
                samples.append(n / dt / 1e6)
            return moved[0], (ext_cpu[0] if path == "bridge" else None)
        pp, cpu = self._group(c, [cid], body)
        return [figure("stream", path, "MB/s", dir=direction, size=size, mode=mode, samples=samples,
                       per_packet=pp, cpu_s_per_gb=cpu)]

    def vrr(self, cfg: Config | None, mode: str, path: str) -> list[dict]:
        if cfg is None:
            raise NA(f"this build has no {mode!r} mode (--poll-us, --doorbell) on host and guest")
        self._need(path)
        c = self.use(cfg)
        cid = c.cids[0]
        runs: list[list[float]] = []

        def body():
            for _ in range(self.o.repeats):
                if path == "in-device":
                    r = c.agents[cid].run("rr", cid=HOST_CID, port=HOST_PORTS["echo"], size=64,
                                          seconds=self.o.target_s)
                else:
                    r = Child("rr", str(c.run_dir), cid, GUEST_ECHO, 64, self.o.target_s).result()
                runs.append(r["lat_us"])
            return 0, None
        pp, _ = self._group(c, [cid], body)
        pp["round_trips"] = sum(len(r) for r in runs)
        return self._rr_figs(path, mode, runs, per_packet=pp)

    def vpairs(self, cfg: Config, path: str, n: int) -> list[dict]:
        self._need(path)
        c = self.use(cfg)
        if len(c.cids) < n:
            raise NA(f"only {len(c.cids)} guests")
        cids = c.cids[:n]
        key = (path, "g2h", PAIR_SIZE, "pairs")
        if key not in self.totals:
            self.totals[key] = _sized(lambda t: self._transfer(c, cids[0], path, "g2h", PAIR_SIZE, t)[:2],
                                      PAIR_SIZE, self.o.target_s)
        total = self.totals[key]
        port = HOST_PORTS["sink"] if path == "in-device" else EXT_SINK
        samples: list[float] = []

        def body():
            moved, ext = 0, 0.0
            for _ in range(self.o.repeats):
                sinks = [Child("sink", str(c.run_dir / f"vsock-{i}.sock_{EXT_SINK}")) for i in cids] \
                    if path == "bridge" else []
                try:
                    start_at = time.time() + 0.3
                    seqs = [(c.agents[i], c.agents[i].submit("send", cid=HOST_CID, port=port, size=PAIR_SIZE,
                                                             total=total, start_at=start_at)) for i in cids]
                    rs = [a.wait(s, 600) for a, s in seqs]
                except BaseException:
                    for s in sinks:
                        s.close()
                    raise
                ext += sum(s.result(60)["cpu"] for s in sinks)
                for r in rs:
                    _check_count(r)
                nbytes = sum(r["bytes"] for r in rs)
                moved += nbytes
                samples.append(nbytes / (max(r["t1"] for r in rs) - min(r["t0"] for r in rs)) / 1e6)
            return moved, (ext if path == "bridge" else None)
        pp, cpu = self._group(c, cids, body)
        return [figure("pairs", path, "MB/s", pairs=n, dir="g2h", size=PAIR_SIZE, samples=samples,
                       per_packet=pp, cpu_s_per_gb=cpu)]


def _check_count(r: dict) -> None:
    """A sink's answer must be the number of bytes sent: a short count is lost data, not a figure."""
    reply = r.get("reply", "")
    if reply and reply.split()[0].isdigit() and int(reply.split()[0]) != r["bytes"]:
        raise RuntimeError(f"the sink counted {reply} bytes, {r['bytes']} were sent")


def _sz(n: int) -> str:
    for unit, k in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << k and n % (1 << k) == 0:
            return f"{n >> k} {unit}"
    return f"{n} B"


def size_label(n: int | None) -> str:
    return "" if n is None else _sz(n)

