"""The monitor's data: raw stats snapshots in, one JSON-ready frame out (pure functions).

`build_frame(raw, prev, dt)` merges what each guest and each host device process wrote
(shared.stats) into rows per guest, per queue, per vsock connection and per net device, with
rates over the `dt` seconds since `prev`. Figures a process does not (yet) publish are None and
are drawn as "–" (e.g. vq_wakeups and vq_poll_time before a device process's first kick).
`History` keeps the last minute of a few rates per guest for the sparklines.

Direction words, everywhere: tx = guest -> host (what the device takes off the tx ring),
rx = host -> guest (what the device writes into rx buffers), as the virtio-vsock queues are named
from the driver's side.
"""
from __future__ import annotations

import time
from collections import deque

U16 = 0xFFFF
QUEUE_NAMES = {"vsock": ["rx", "tx", "event"], "net": ["rx", "tx", "ctrl"]}
STATUS_BITS = [(0x80, "FAILED"), (0x40, "NEEDS_RESET"), (0x04, "DRIVER_OK"), (0x08, "FEATURES_OK"),
               (0x02, "DRIVER"), (0x01, "ACK")]


def status_name(status) -> str:
    if not isinstance(status, int):
        return "?"
    if status == 0:
        return "RESET"
    for mask, name in STATUS_BITS:
        if status & mask:
            return name
    return hex(status)


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _rate(cur, prev, dt: float, wrap: int | None = None):
    """(cur - prev) / dt, or None when either is missing; counters that went back (a reset or
    a new process) give None rather than a negative rate."""
    cur, prev = _num(cur), _num(prev)
    if cur is None or prev is None or dt <= 0:
        return None
    d = (cur - prev) & wrap if wrap else cur - prev
    return d / dt if d >= 0 else None


def _at(lst, i):
    return lst[i] if isinstance(lst, list) and 0 <= i < len(lst) else None


def _delta(cur, prev, wrap: int | None = None):
    cur, prev = _num(cur), _num(prev)
    if cur is None or prev is None:
        return None
    d = (cur - prev) & wrap if wrap else cur - prev
    return d if d >= 0 else None


def split(raw: list[dict]) -> tuple[dict[int, dict], dict[int, dict]]:
    """(guests by CID, devices by CID) from read_all's list."""
    guests: dict[int, dict] = {}
    devices: dict[int, dict] = {}
    for d in raw:
        cid = d.get("cid")
        if not isinstance(cid, int):
            continue
        if d.get("role") == "guest":
            guests[cid] = d
        elif d.get("role") == "device":
            # Several device processes for one CID: keep the newest (a reconnect in progress).
            if cid not in devices or d.get("time", 0) >= devices[cid].get("time", 0):
                devices[cid] = d
    return guests, devices


def _dt(cur: dict, prev: dict, fallback: float) -> float:
    """Seconds between two snapshots of one process: their own time stamps when both have one
    (the writer's clock, so a half-second write period does not skew rates), else `fallback`."""
    a, b = _num(cur.get("time")), _num(prev.get("time"))
    return a - b if a is not None and b is not None else fallback


STALE = 3.0      # seconds without a new snapshot before a process is shown as not answering


def guest_rows(guests: dict, devices: dict, pguests: dict, pdevices: dict, dt: float,
               now: float | None = None) -> list[dict]:
    rows = []
    for cid in sorted(set(guests) | set(devices)):
        g, d = guests.get(cid, {}), devices.get(cid, {})
        gs, ds = g.get("stats") or {}, d.get("stats") or {}
        pd = pdevices.get(cid) or {}
        pds = pd.get("stats") or {}
        if pd.get("pid") != d.get("pid"):
            pds = {}                         # a new device process: its counters restarted
        ddt = _dt(d, pd, dt)
        bridge = ds.get("bridge") or {}
        if not g:
            link = "no guest process"
        elif not g.get("connected"):
            link = "reconnecting"
        elif not d:
            link = "no device process"
        else:
            link = "connected"
        age = None if now is None or _num(d.get("time")) is None else now - d["time"]
        if age is not None and age > STALE:
            link = f"host silent {age:.0f}s"
        rows.append({
            "name": g.get("name") or d.get("guest") or f"cid{cid}", "cid": cid,
            "pid": g.get("pid"), "device_pid": d.get("pid"), "device": d.get("device") or "vsock",
            "link": link, "reconnects": g.get("reconnects"),
            "status": status_name(d.get("status")) if d else None,
            "resets": ds.get("resets"), "errors": ds.get("errors"), "last_error": ds.get("last_error") or "",
            "last_rule": ds.get("last_rule"),
            "tx_bytes": ds.get("tx_bytes"), "rx_bytes": ds.get("rx_bytes"),
            "tx_Bps": _rate(ds.get("tx_bytes"), pds.get("tx_bytes"), ddt),
            "rx_Bps": _rate(ds.get("rx_bytes"), pds.get("rx_bytes"), ddt),
            "kicks_ps": _rate(ds.get("kicks"), pds.get("kicks"), ddt),
            "irqs_ps": _rate(ds.get("interrupts"), pds.get("interrupts"), ddt),
            "bridge_in": bridge.get("connections_in"), "bridge_out": bridge.get("connections_out"),
            "bridge_refused": (None if not bridge else
                               (bridge.get("refused_in") or 0) + (bridge.get("refused_out") or 0)),
            "bridge_to_host": bridge.get("bytes_to_host"), "bridge_to_guest": bridge.get("bytes_to_guest"),
            "mem_in_use": g.get("mem_in_use"), "mem_total": g.get("mem_total"),
            "queued_replies": ds.get("queued_replies"), "guest_rx_bufs": gs.get("rx_buf_nr"),
        })
    return rows


def queue_rows(guests: dict, devices: dict, pguests: dict, pdevices: dict, dt: float) -> list[dict]:
    rows = []
    for cid in sorted(set(guests) | set(devices)):
        g, d = guests.get(cid, {}), devices.get(cid, {})
        ds = d.get("stats") or {}
        pd = pdevices.get(cid) or {}
        pds = (pd.get("stats") or {}) if pd.get("pid") == d.get("pid") else {}
        pg = pguests.get(cid) or {}
        pgv = pg.get("vqs") if pg.get("pid") == g.get("pid") else None
        gdt, dt_ = _dt(g, pg, dt), _dt(d, pd, dt)
        gvqs, dvqs = g.get("vqs") or [], ds.get("vqs") or []
        names = QUEUE_NAMES.get(d.get("device") or ds.get("device") or "vsock", [])
        for i in range(max(len(gvqs), len(dvqs))):
            gq, dq = _at(gvqs, i) or {}, _at(dvqs, i) or {}
            pgq, pdq = _at(pgv, i) or {}, _at(pds.get("vqs"), i) or {}
            event_idx = gq.get("event_idx", dq.get("event_idx"))
            # buffers the device took per kick, and per wake-up of its worker (engine counter)
            taken = _delta(dq.get("last_avail"), pdq.get("last_avail"), U16)
            kicks = _delta(_at(ds.get("vq_kicks"), i), _at(pds.get("vq_kicks"), i))
            wakes = _delta(_at(ds.get("vq_wakeups"), i), _at(pds.get("vq_wakeups"), i))
            per_kick = (taken / kicks) if taken is not None and kicks else None
            batch = (taken / wakes) if taken is not None and wakes else None
            poll = _rate(_at(ds.get("vq_poll_time"), i), _at(pds.get("vq_poll_time"), i), dt_)
            used_flags = gq.get("used_flags")
            avail_flags = gq.get("avail_flags", dq.get("avail_flags"))
            errors = _at(ds.get("vq_errors"), i)
            rows.append({
                "guest": g.get("name") or d.get("guest") or f"cid{cid}", "cid": cid, "q": i,
                "name": names[i] if i < len(names) else f"q{i}",
                "size": gq.get("num", dq.get("num")),
                "avail_idx": gq.get("avail_idx", dq.get("avail_idx")),
                "last_avail": dq.get("last_avail"),
                "used_idx": gq.get("used_idx", dq.get("used_idx")),
                "last_used": gq.get("last_used"),
                "in_flight": gq.get("in_flight"), "free": gq.get("num_free"),
                "event_idx": event_idx,
                "used_event": gq.get("used_event", dq.get("used_event")),
                "avail_event": gq.get("avail_event", dq.get("avail_event")),
                "no_notify": None if used_flags is None else bool(used_flags & 1),
                "no_interrupt": None if avail_flags is None else bool(avail_flags & 1),
                "kicks": gq.get("kicks"),
                "kicks_ps": _rate(_at(ds.get("vq_kicks"), i), _at(pds.get("vq_kicks"), i), dt_),
                "kicks_saved_ps": _rate(gq.get("kicks_suppressed"), pgq.get("kicks_suppressed"), gdt),
                "irqs_ps": _rate(_at(ds.get("vq_interrupts"), i), _at(pds.get("vq_interrupts"), i), dt_),
                "irqs_saved_ps": _rate(_at(ds.get("vq_interrupts_suppressed"), i),
                                       _at(pds.get("vq_interrupts_suppressed"), i), dt_),
                "per_kick": per_kick, "batch": batch, "poll_frac": poll,
                "errors": errors, "broken": bool(gq.get("broken")) or bool(errors),
                "rule": (ds.get("last_rule") if errors else None),
                "why": gq.get("broken_reason") or (ds.get("last_error") if errors else "") or "",
            })
    return rows


def conn_rows(guests: dict, devices: dict) -> list[dict]:
    """One row per vsock connection, pairing the guest's socket with the host's."""
    rows = []
    for cid in sorted(set(guests) | set(devices)):
        g, d = guests.get(cid, {}), devices.get(cid, {})
        name = g.get("name") or d.get("guest") or f"cid{cid}"
        pairs: dict[tuple[str, str], dict] = {}
        for sk in g.get("conns") or []:
            pairs.setdefault((sk.get("local"), sk.get("remote")), {})["g"] = sk
        for sk in (d.get("stats") or {}).get("conns") or []:
            pairs.setdefault((sk.get("remote"), sk.get("local")), {})["h"] = sk
        for (gend, hend), p in sorted(pairs.items(), key=lambda kv: str(kv[0])):
            gs, hs = p.get("g") or {}, p.get("h") or {}
            rows.append({
                "guest": name, "cid": cid, "guest_end": gend, "host_end": hend,
                "state_guest": gs.get("state"), "state_host": hs.get("state"),
                "bytes_tx": gs.get("tx_bytes", hs.get("rx_bytes")),      # guest -> host
                "bytes_rx": hs.get("tx_bytes", gs.get("rx_bytes")),      # host -> guest
                "g_buf_alloc": gs.get("buf_alloc"), "g_fwd_cnt": gs.get("fwd_cnt"),
                "h_buf_alloc": hs.get("buf_alloc"), "h_fwd_cnt": hs.get("fwd_cnt"),
                # what each sender may still send: its view of the peer's free window
                "window_tx": gs.get("peer_free"), "window_rx": hs.get("peer_free"),
                "cu_guest": gs.get("credit_update_tx"), "cu_host": hs.get("credit_update_tx"),
                "cr_guest": gs.get("credit_request_tx"), "cr_host": hs.get("credit_request_tx"),
                "stalled_tx": gs.get("stalled"), "stalled_rx": hs.get("stalled"),
            })
    return rows


NET_KEYS = ("backend", "mac", "tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tx_dropped",
            "rx_dropped", "tx_polling")


def split_net(raw: list[dict]) -> dict[str, dict]:
    """Net device snapshots by guest name (a net device has no CID; a guest may also have vsock)."""
    nets: dict[str, dict] = {}
    for d in raw:
        if d.get("role") == "device" and (d.get("device") or (d.get("stats") or {}).get("device")) == "net":
            name = str(d.get("guest") or d.get("pid"))
            if name not in nets or d.get("time", 0) >= nets[name].get("time", 0):
                nets[name] = d
    return nets


def net_rows(devices: dict, pdevices: dict, dt: float) -> list[dict]:
    rows = []
    for cid, d in sorted(devices.items()):
        ds = d.get("stats") or {}
        if (d.get("device") or ds.get("device")) != "net":
            continue
        pd = pdevices.get(cid) or {}
        pds = (pd.get("stats") or {}) if pd.get("pid") == d.get("pid") else {}
        dt_ = _dt(d, pd, dt)
        row = {"guest": d.get("guest") or f"cid{cid}", "cid": d.get("cid"),
               "status": status_name(d.get("status"))}
        row.update({k: ds.get(k) for k in NET_KEYS})
        row["tx_Bps"] = _rate(ds.get("tx_bytes"), pds.get("tx_bytes"), dt_)
        row["rx_Bps"] = _rate(ds.get("rx_bytes"), pds.get("rx_bytes"), dt_)
        rows.append(row)
    return rows


def migration_rows(raw: list[dict]) -> list[dict]:
    """Guests with a live migration going or done (guest/migration/source.py `info`)."""
    rows = []
    for d in raw:
        m = d.get("migration") if d.get("role") == "guest" else None
        if isinstance(m, dict):
            rounds = m.get("rounds") or []
            rows.append({"guest": d.get("name") or f"pid{d.get('pid')}", "status": m.get("status"),
                         "round": m.get("round"), "pages_sent": m.get("pages_sent"),
                         "pages_total": m.get("pages_total"), "dirty_guest": m.get("dirty_guest"),
                         "dirty_device": m.get("dirty_device"), "downtime_ms": m.get("downtime_ms"),
                         "total_ms": m.get("total_ms"), "error": m.get("error"),
                         "last_round": rounds[-1] if rounds else None})
    return sorted(rows, key=lambda r: str(r["guest"]))


def build_frame(raw: list[dict], prev: list[dict] | None = None, dt: float = 0.0, *,
                run_dir: str = "", now: float | None = None) -> dict:
    guests, devices = split(raw)
    pguests, pdevices = split(prev or [])
    now = time.time() if now is None else now
    return {
        "time": now, "run_dir": str(run_dir), "interval": dt,
        "guests": guest_rows(guests, devices, pguests, pdevices, dt, now),
        "queues": queue_rows(guests, devices, pguests, pdevices, dt),
        "conns": conn_rows(guests, devices),
        "nets": net_rows(split_net(raw), split_net(prev or []), dt),
        "migrations": migration_rows(raw),
    }


def ring_sources(raw: list[dict], cid: int) -> dict | None:
    """What the ring picture of guest `cid` needs: the RAM (shm + table) and per queue the
    addresses, last_avail (device) and last_used (driver). Prefers the guest's own figures; a
    guest that publishes none (a hostile or foreign guest) is drawn from the device's."""
    guests, devices = split(raw)
    g, d = guests.get(cid, {}), devices.get(cid, {})
    ds = d.get("stats") or {}
    ram = g.get("ram") or {}
    shm, table = ram.get("shm"), ram.get("table")
    if not shm and ds.get("mem_table"):
        table = ds["mem_table"]
        shm = table[0].get("shm")
    if not shm or not table:
        return None
    gvqs, dvqs = g.get("vqs") or [], ds.get("vqs") or []
    queues = []
    names = QUEUE_NAMES.get(d.get("device") or "vsock", [])
    for i in range(max(len(gvqs), len(dvqs))):
        gq, dq = _at(gvqs, i) or {}, _at(dvqs, i) or {}
        src = gq if gq.get("num") else dq
        if not src.get("num") or not src.get("desc"):
            continue
        queues.append({"q": i, "name": names[i] if i < len(names) else f"q{i}", "num": src["num"],
                       "desc": src["desc"], "avail": src["avail"], "used": src["used"],
                       "event_idx": bool(src.get("event_idx")),
                       "last_avail": dq.get("last_avail"), "last_used": gq.get("last_used")})
        if src.get("packed"):       # each position with its wrap counter (ring_packed.py)
            def at(q, k, w):
                return (q[k], q[w]) if q.get(k) is not None and q.get(w) is not None else None
            queues[-1].update(packed=True, positions={
                "driver_avail": at(gq, "avail_idx", "avail_wrap"),
                "driver_used": at(gq, "last_used", "used_wrap"),
                "device_avail": at(dq, "last_avail", "avail_wrap"),
                "device_used": at(dq, "last_used", "used_wrap")})
    return {"cid": cid, "name": g.get("name") or d.get("guest") or f"cid{cid}", "shm": shm,
            "table": table, "queues": queues}


class History:
    """The last `span` seconds of a few rates per key, for sparklines."""

    def __init__(self, span: float = 60.0):
        self.span = span
        self.series: dict[str, deque] = {}

    def add(self, key: str, t: float, value) -> None:
        if value is None:
            return
        s = self.series.setdefault(key, deque())
        s.append((t, float(value)))
        while s and s[0][0] < t - self.span:
            s.popleft()

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.series.get(key, ())]

    def add_frame(self, frame: dict) -> None:
        t = frame["time"]
        for g in frame["guests"]:
            for k in ("tx_Bps", "rx_Bps", "kicks_ps", "irqs_ps"):
                self.add(f"{g['cid']}.{k}", t, g.get(k))
