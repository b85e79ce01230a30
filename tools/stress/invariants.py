"""The invariants of a stress run (pure): from outcomes, faults, samples and leak scans to rows.

Each row is {"invariant", "count", "ok", "detail"}; `ok` False is a violation (non-zero exit).
"""
from __future__ import annotations

from shared.cli import DEFAULT_BUF_SIZE

from .schedule import BREAKING

RESET_SLACK = 2.0           # seconds around a fault window in which a broken stream is explained
RSS_MIN_LIFE = 30.0         # a process must live this long (seconds) for its RSS trend to count
RSS_GROWTH_ABS = 16 << 20   # allowed growth after warm-up: max(16 MiB, 25 % of the warm level)
RSS_GROWTH_REL = 0.25
# rx-stall: most bytes a host program may push to a guest that never reads: the guest socket's
# buffer (buf_alloc, the default --buf-size) and 1 MiB of packets in flight, no more
STALL_BOUND = DEFAULT_BUF_SIZE + (1 << 20)


def explained(o: dict, faults: list[dict]) -> bool:
    """A broken stream is explained by a kill of its guest or its host overlapping it in time."""
    for f in faults:
        if f["group"] != o["group"] or f["kind"] not in BREAKING:
            continue
        if f["target"] != "host" and f["target"] != o["cid"]:
            continue
        if f["t0"] <= o["t1"] + RESET_SLACK and (f["t1"] or f["t0"]) + RESET_SLACK >= o["t0"]:
            return True
    return False


def hostile_overlap(o: dict, faults: list[dict]) -> bool:
    return any(f["group"] == o["group"] and f["kind"] == "hostile"
               and f["t0"] <= o["t1"] and (f["t1"] or f["t0"]) >= o["t0"] for f in faults)


def rss_growth(series: dict[str, list[tuple[float, int]]]) -> list[tuple[str, int, int]]:
    """(process, warm level, final level) of every long-lived process whose RSS grew too much.

    Warm-up is the first third of a process's life; the warm level is the highest sample of the
    next sixth, the final level the highest sample of the last quarter."""
    bad = []
    for key, pts in series.items():
        if len(pts) < 10 or pts[-1][0] - pts[0][0] < RSS_MIN_LIFE:
            continue
        t0, t1 = pts[0][0], pts[-1][0]
        life = t1 - t0
        warm = [v for t, v in pts if t0 + life / 3 <= t <= t0 + life / 2]
        late = [v for t, v in pts if t >= t1 - life / 4]
        if not warm or not late:
            continue
        w, f = max(warm), max(late)
        if f - w > max(RSS_GROWTH_ABS, RSS_GROWTH_REL * w):
            bad.append((key, w, f))
    return bad


def evaluate(run: dict) -> list[dict]:
    """run: outcomes, faults, stalls, rss, leaks{shm, files, procs}, hung, exceptions{host, guest},
    errors, hostile (summaries)."""
    outs, faults = run["outcomes"], run["faults"]
    rows: list[dict] = []

    def row(name: str, count: int, ok: bool, detail: str = "") -> None:
        rows.append({"invariant": name, "count": count, "ok": ok, "detail": detail})

    good = [o for o in outs if o["result"] == "ok"]
    row("transfers verified end to end (SHA-256, every byte)", len(good), bool(good) or not outs,
        f"{sum(o['bytes'] for o in good):,} bytes")
    corrupt = [o for o in outs if o["result"] == "corrupt" or o["corrupt"]]
    row("corrupted bytes delivered", sum(o["corrupt"] for o in outs), not corrupt,
        f"{len(corrupt)} transfer(s) with bad data" if corrupt else "")
    broken = [o for o in outs if o["result"] in ("reset", "hung")]
    expl = [o for o in broken if explained(o, faults)]
    unexpl = [o for o in broken if not explained(o, faults)]
    row("transfers reset by a kill, and reported as such", len(expl), True,
        "every one ended with an error or a short, correct prefix")
    row("transfers broken with no kill to explain them", len(unexpl), not unexpl,
        "; ".join(f"g{o['group']} cid {o['cid']} {o['kind']}: {o['why']}" for o in unexpl[:3]))
    disturbed = {(o["group"], o["cid"]) for o in unexpl if hostile_overlap(o, faults)}
    row("well-behaved guests disturbed by a hostile guest", len(disturbed), not disturbed,
        ", ".join(f"g{g} cid {c}" for g, c in sorted(disturbed)))
    hung = [o for o in outs if o["result"] == "hung"]
    row("hung transfers", len(hung), not hung,
        "; ".join(f"g{o['group']} cid {o['cid']} {o['kind']}: {o['why']}" for o in hung[:3]))
    row("hung processes (no exit on SIGTERM, or stuck)", len(run["hung"]), not run["hung"],
        "; ".join(run["hung"][:3]))
    row("host exceptions (tracebacks in host logs)", len(run["exceptions"]["host"]),
        not run["exceptions"]["host"], "; ".join(run["exceptions"]["host"][:3]))
    row("guest exceptions (tracebacks in guest logs)", len(run["exceptions"]["guest"]),
        not run["exceptions"]["guest"], "; ".join(run["exceptions"]["guest"][:3]))
    # a fault cut short by Ctrl-C never had its recovery tried: not counted as unrecovered
    unrec = [f for f in faults if not f["recovered"] and not f.get("interrupted")]
    row("faults injected", len(faults), True, ", ".join(
        f"{k} {n}" for k, n in sorted(_count(f["kind"] for f in faults).items())))
    row("faults not recovered from (restart/reconnect failed)", len(unrec), not unrec,
        "; ".join(f"g{f['group']} {f['kind']} {f['target']}: {f['detail']}" for f in unrec[:3]))
    stalls = run["stalls"]
    over = [s for s in stalls if s["result"] != "stalled" or s["bytes"] > STALL_BOUND]
    row(f"rx-stall: host sender not held back within {STALL_BOUND >> 20} MiB", len(over), not over,
        f"{len(stalls)} stall(s), most accepted {max((s['bytes'] for s in stalls), default=0):,} bytes")
    hs = [f for f in faults if f["kind"] == "hostile"]
    row("hostile guests run (malformed rings, packets, control messages)", len(hs), True,
        _hostile_detail(hs))
    _net_rows(outs, row)
    leaks = run["leaks"]
    row("leaked shm segments and semaphores", len(leaks["shm"]), not leaks["shm"], ", ".join(leaks["shm"][:4]))
    row("leaked run-dir files", len(leaks["files"]), not leaks["files"], ", ".join(leaks["files"][:4]))
    row("leaked processes", len(leaks["procs"]), not leaks["procs"], ", ".join(map(str, leaks["procs"][:8])))
    bad = rss_growth(run["rss"])
    peak = max((v for pts in run["rss"].values() for _, v in pts), default=0)
    row("processes whose private RSS (RssAnon) grew after warm-up", len(bad), not bad,
        "; ".join(f"{k}: {w >> 20} -> {f >> 20} MiB" for k, w, f in bad[:3])
        or f"{sum(1 for p in run['rss'].values() if len(p) >= 10)} processes sampled, peak {peak >> 20} MiB")
    late, retries = run.get("connect_late_ok", 0), run.get("connect_retries", 0)
    row("bridge connects that got through only on a retry (counted, not a violation)", late, True,
        f"{retries:,} refused tries in all; a guest or host being killed refuses every try, "
        "a busy guest can miss the 2 s connect timeout and take a later one" if retries else "")
    row("orchestrator errors (processes exiting on their own, ...)", len(run["errors"]), not run["errors"],
        "; ".join(run["errors"][:3]))
    return rows


def _net_rows(outs: list[dict], row) -> None:
    """Net frames (loopback, UDP, L2 segment): sent, received, lost, corrupted. Net guests are not
    fault targets and net frames never run in a host-kill round, so loss on loopback and the
    segment is a violation; UDP (datagrams on 127.0.0.1) may lose: counted, not a violation."""
    net = [o for o in outs if o["kind"].startswith("net-")]
    if not net:
        return

    def tot(key: str, backend: str | None = None) -> int:
        return sum(o.get(key, 0) for o in net if backend is None or o.get("backend") == backend)
    per = ", ".join(f"{b} {tot('frames_sent', b):,}/{tot('frames_recv', b):,}"
                    for b in ("loopback", "udp", "l2"))
    row("net frames sent and received (loopback, udp, l2: sent/received)", tot("frames_recv"),
        tot("frames_recv") > 0, per)
    bad = [o for o in net if o.get("frames_corrupt") or o.get("frames_dup") or o.get("frames_stray")]
    row("net frames corrupted, duplicated or stray (CRC32, payload, sequence)",
        tot("frames_corrupt") + tot("frames_dup") + tot("frames_stray"), not bad,
        "; ".join(f"g{o['group']} {o['kind']}: {o['why']}" for o in bad[:3]))
    lost = tot("frames_lost", "loopback") + tot("frames_lost", "l2")
    row("net frames lost on loopback and l2 segment", lost, lost == 0,
        "; ".join(f"g{o['group']} {o['kind']}: {o['why']}" for o in net
                  if o["backend"] != "udp" and o.get("frames_lost"))[:300])
    row("net frames lost on udp (127.0.0.1 datagrams: counted, allowed)", tot("frames_lost", "udp"), True,
        f"{tot('frames_sent', 'udp'):,} sent")


def _count(items) -> dict:
    out: dict = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _hostile_detail(hs: list[dict]) -> str:
    tot: dict = {}
    for f in hs:
        d = f["detail"] if isinstance(f["detail"], dict) else {}
        for k, v in d.items():
            if isinstance(v, int) and not isinstance(v, bool):
                tot[k] = tot.get(k, 0) + v
    return ", ".join(f"{k} {v}" for k, v in sorted(tot.items()))
