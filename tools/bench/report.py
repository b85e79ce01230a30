"""The bench's report: tables of figures next to their baselines, and issue 15's targets.

Pure code over the results dict (what --json writes): `targets(figs)` evaluates the targets,
`renderables(results, width)` builds rich tables that fit `width` columns without cutting a name
or a number (long names wrap at spaces; below 100 columns the × Pipe column is left out — the
JSON keeps it).
"""
from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from tools.bench.model import find, ratio, value

PATH_ORDER = ["in-device", "bridge"]
DIR_NAME = {"g2h": "guest→host", "h2g": "host→guest"}


def num(v: float | None) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.2g}" if a >= 0.01 else f"{v:.1g}"


def rat(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.2f}" if v >= 0.1 else f"{v:.3f}")


def size_label(n: int | None) -> str:
    if n is None:
        return ""
    for unit, k in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << k and n % (1 << k) == 0:
            return f"{n >> k} {unit}"
    return f"{n} B"


def span(f: dict) -> str:
    return "" if f.get("na") else f"{num(f['min'])}–{num(f['max'])}"


# --- targets (issue 15) ---------------------------------------------------------------------------
# Each row: a figure, what it must reach ("must": met/missed is judged on it) and what it aims at
# ("aim": marked when reached). Ratios are to figures of the same run: the socketpair (×) or the
# bare-ring ceiling of the same direction and write size ("vs ceiling"). The seeds' mode is reported
# in the tables, not targeted.
BASELINE_PATHS = ("socketpair", "pipe", "ceiling")


def _poll_mode(figs: list[dict]) -> str | None:
    for f in figs:
        if f["kind"] == "rr" and str(f.get("mode", "")).startswith("poll "):
            return f["mode"]
    return None


def _ok(v: float, op: str, want: float) -> bool:
    return {"≥": v >= want, "≤": v <= want, "<": v < want}[op]


def _row(label: str, v: float | None, must: tuple[str, float], aim: tuple[str, float] | None, na: str | None,
         unit: str, aim_v: float | None = None, aim_note: str = "") -> dict:
    """One target row. `aim_v` is the figure the aim is judged on when it is not `v` (the
    zero-copy figure, say), with `aim_note` naming it."""
    op, want = must
    row = {"target": label, "value": v, "want": f"{op} {want:g}{unit}",
           "aim": f"{aim[0]} {aim[1]:g}{unit}" if aim else "", "unit": unit, "status": "n/a", "aim_met": None,
           "note": na or ""}
    if v is None:
        return row
    ok = _ok(v, op, want)
    if ok:
        note = ""
    elif op == "≥":
        note = f"{want / v:.3g}× short" if v > 0 else "nothing moved"
    else:
        note = f"{v / want:.3g}× over" if want > 0 else "over"
    row.update(status="met" if ok else "missed", note=note)
    if aim:
        by_alt = aim_v is not None and (aim_v > v if aim[0] == "≥" else aim_v < v)
        row["aim_met"] = _ok(aim_v if by_alt else v, *aim)
        if by_alt:
            row["aim_value"] = aim_v
            if row["aim_met"]:
                row["note"] = (row["note"] + "; " if row["note"] else "") + f"aim met {aim_note}".strip()
    return row


def _ratio_target(figs, label, must, aim, basis="socketpair", alt: dict | None = None, alt_note="", **sel) -> dict:
    f = find(figs, **sel)
    if f is None:
        return _row(label, None, must, aim, "not measured", "×")
    if f.get("na"):
        return _row(label, None, must, aim, f["na"], "×")
    v = ratio(figs, f, basis)
    if v is None:
        b = find(figs, kind=f["kind"], path=basis)
        why = (b or {}).get("na") or f"no {basis} figure to compare with"
        return _row(label, None, must, aim, why, "×")
    g = find(figs, **alt) if alt else None
    return _row(label, v, must, aim, None, "×", ratio(figs, g, basis) if g else None, alt_note)


def targets(figs: list[dict]) -> list[dict]:
    rows = []
    for d in ("g2h", "h2g"):
        for size in (65536, 1 << 20):
            rows.append(_ratio_target(figs, f"in-device {d} {size_label(size)} vs ceiling", ("≥", 0.6), ("≥", 0.8),
                                      "ceiling", kind="stream", path="in-device", dir=d, size=size, mode="defaults"))
    for size, must, aim in ((65536, 0.8, 1.5), (1 << 20, 0.6, 1.0), (64, 0.5, 1.0)):
        for d in ("g2h", "h2g"):
            zc = dict(kind="stream", path="in-device", dir=d, size=size, mode="zero copy") if size == 65536 else None
            rows.append(_ratio_target(figs, f"in-device {d} {size_label(size)}", ("≥", must), ("≥", aim),
                                      alt=zc, alt_note="with zero copy", kind="stream", path="in-device", dir=d,
                                      size=size, mode="defaults"))
    pm = _poll_mode(figs)
    rows.append(_ratio_target(figs, "in-device 64 B rr, semaphores", ("≤", 3.0), ("≤", 2.0), kind="rr",
                              path="in-device", mode="semaphores", metric="median µs"))
    rows.append(_ratio_target(figs, "in-device 64 B rr, adaptive poll", ("≤", 2.0), ("≤", 1.0), kind="rr",
                              path="in-device", mode=pm or "poll", metric="median µs"))
    # issue 15, item 5: --poll-us must never make a round trip slower than semaphores alone
    poll = find(figs, kind="rr", path="in-device", mode=pm or "poll", metric="median µs")
    sem = find(figs, kind="rr", path="in-device", mode="semaphores", metric="median µs")
    if value(poll) is not None and value(sem):
        rows.append(_row("in-device rr, poll over semaphores", value(poll) / value(sem), ("≤", 1.0), None, None, "×"))
    else:
        rows.append(_row("in-device rr, poll over semaphores", None, ("≤", 1.0), None,
                         (poll or {}).get("na") or (sem or {}).get("na") or "not measured", "×"))
    for size, must, aim in ((65536, 0.3, 0.45), (1 << 20, 0.35, 0.6)):
        for d in ("g2h", "h2g"):
            rows.append(_ratio_target(figs, f"bridge {d} {size_label(size)}", ("≥", must), ("≥", aim),
                                      kind="stream", path="bridge", dir=d, size=size, mode="defaults"))
    rows.append(_ratio_target(figs, "bridge 64 B rr (defaults)", ("≤", 4.0), ("≤", 3.0), kind="rr", path="bridge",
                              mode="defaults", metric="median µs"))
    for path in PATH_ORDER:
        bulk = [f for f in figs if f["kind"] == "stream" and f["path"] == path and f.get("mode") == "defaults"
                and f.get("size") in (65536, 1 << 20)]
        pp = [_kicks_irqs(f) for f in bulk if not f.get("na")]
        pp = [x for x in pp if x is not None]
        na = next((f["na"] for f in bulk if f.get("na")), "not measured")
        rows.append(_row(f"{path} kicks+irqs/packet, bulk (worst)", max(pp) if pp else None, ("≤", 0.1),
                         ("≤", 0.05), None if pp else na, ""))
    for p, most in (("guest", 4), ("device", 3)):
        f = find(figs, kind="threads", path=p)
        rows.append(_row(f"threads, idle {'guest' if p == 'guest' else 'device process'}", value(f), ("≤", most),
                         None, (f or {}).get("na") or "not measured", ""))
    idle = find(figs, kind="idle")
    rows.append(_row("idle pair CPU, % of a core", value(idle), ("<", 1), None,
                     (idle or {}).get("na") or "not measured", " %"))
    for path in PATH_ORDER:
        p8, p1 = find(figs, kind="pairs", path=path, pairs=8), find(figs, kind="pairs", path=path, pairs=1)
        if value(p8) is None or not value(p1):
            rows.append(_row(f"{path} 8 pairs vs one", None, ("≥", 90), None,
                             (p8 or {}).get("na") or (p1 or {}).get("na") or "not measured", " %"))
        else:
            rows.append(_row(f"{path} 8 pairs vs one", 100 * value(p8) / value(p1), ("≥", 90), None, None, " %"))
    return rows


def _kicks_irqs(f: dict) -> float | None:
    pp = f.get("per_packet") or {}
    if not pp.get("packets"):
        return None
    return (pp.get("kicks", 0) + pp.get("interrupts", 0)) / pp["packets"]


# --- tables ---------------------------------------------------------------------------------------
def _table(title: str, cols: list[str], width: int) -> Table:
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, width=None,
              expand=False, collapse_padding=True)
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i == 0 else "right", overflow="fold",
                     no_wrap=False, ratio=None)
    return t


def _target_cell(rows_by_label: dict, label: str) -> str:
    """The must target and how it went; "+aim" when the aim is met too."""
    r = rows_by_label.get(label)
    if r is None:
        return ""
    return {"met": "met", "missed": "MISSED", "n/a": "n/a"}[r["status"]] + f" {r['want']}" + \
        ("+aim" if r.get("aim_met") else "")


def _vs(figs, f, path: str) -> str:
    """× `path` for a figure of ours; blank on the baselines' own rows."""
    return "" if f["path"] in BASELINE_PATHS else rat(ratio(figs, f, path))


def _notes(figs: list[dict]) -> list[str]:
    seen = []
    for f in figs:
        if f.get("na") and f["na"] not in seen:
            seen.append(f["na"])
    return [f"n/a: {n}" for n in seen]


def throughput_table(figs, tgt, width) -> Table:
    wide = width >= 100
    t = _table("Throughput, MB/s (median of repeats; × = median / baseline median; × ceiling: the bare "
               "ring, same direction and size)",
               ["scenario", "MB/s", "min–max", "× sockpair", "× ceiling"] + (["× Pipe"] if wide else []) + ["target"],
               width)
    for f in figs:
        if f["kind"] != "stream":
            continue
        if f["path"] in ("socketpair", "pipe"):
            name = f"{'socketpair' if f['path'] == 'socketpair' else 'Pipe'} {size_label(f['size'])}"
        else:
            name = f"{f['path']} {f['dir']} {size_label(f['size'])} ({f['mode']})"
        label = f"{f['path']} {f.get('dir')} {size_label(f['size'])}" if f.get("mode") == "defaults" else ""
        row = [name, num(value(f)), span(f), "" if f["path"] == "socketpair" else rat(ratio(figs, f)),
               _vs(figs, f, "ceiling")]
        if wide:
            row.append(_vs(figs, f, "pipe"))
        row.append(_target_cell(tgt, label))
        t.add_row(*row)
    return t


def rr_table(figs, tgt, width) -> Table:
    t = _table("64 B request/response, µs (× = median / socketpair median; × ceiling: over the bare ring's)",
               ["scenario", "median", "min–max", "p99", "× sockpair", "× ceiling", "target"], width)
    for f in figs:
        if f["kind"] == "rr" and f["metric"] == "median µs":
            p99 = find(figs, kind="rr", path=f["path"], mode=f.get("mode"), metric="p99 µs")
            if f["path"] in ("socketpair", "pipe"):
                name = "socketpair" if f["path"] == "socketpair" else "Pipe"
            elif f["path"] == "ceiling":
                name = f"ceiling, 2 queues ({f['mode']})"
            else:
                name = f"{f['path']} ({f['mode']})"
            label = {("in-device", "semaphores"): "in-device 64 B rr, semaphores",
                     ("bridge", "defaults"): "bridge 64 B rr (defaults)"}.get((f["path"], f.get("mode")))
            if f["path"] == "in-device" and str(f.get("mode", "")).startswith("poll "):
                label = "in-device 64 B rr, adaptive poll"
            t.add_row(name, num(value(f)), span(f), num(value(p99)),
                      "" if f["path"] == "socketpair" else rat(ratio(figs, f)), _vs(figs, f, "ceiling"),
                      _target_cell(tgt, label) if label else "")
        elif f["kind"] == "ring":
            layout = "packed" if str(f.get("mode", "")).startswith("packed") else "split"
            t.add_row(f"{layout} ring, 1 queue, mean ({f['mode']})", num(value(f)), span(f), "", rat(ratio(figs, f)),
                      "", "")
    return t


def pairs_table(figs, tgt, width) -> Table:
    t = _table("N pairs at once (guest→host, 64 KiB writes): aggregate MB/s",
               ["scenario", "MB/s", "min–max", "× N sockpairs", "target"], width)
    for f in figs:
        if f["kind"] == "pairs":
            label = f"{f['path']} 8 pairs vs best single pair" if f["pairs"] == 8 else None
            t.add_row(f"{f['path']}, {f['pairs']} pair{'s' if f['pairs'] > 1 else ''}", num(value(f)), span(f),
                      rat(ratio(figs, f)), _target_cell(tgt, label) if label else "")
    return t


def cost_table(figs, width) -> Table:
    t = _table("Cost: per packet (device's packets both ways) and CPU seconds per GB moved",
               ["scenario", "kicks /pkt", "irqs /pkt", "wakeups /pkt", "CPU s/GB by process"], width)
    for f in figs:
        pp, cpu = f.get("per_packet"), f.get("cpu_s_per_gb")
        if f.get("na") or (not pp and not cpu):
            continue
        parts = [f["path"], DIR_NAME.get(f.get("dir"), ""), size_label(f.get("size")),
                 f"{f['pairs']} pairs" if f["kind"] == "pairs" else "",
                 "64 B rr" if f["kind"] == "rr" else "",
                 f"({f['mode']})" if f["path"] not in ("socketpair", "pipe") else ""]
        if f["kind"] == "rr" and f["metric"] != "median µs":
            continue
        k = i = w = None
        if pp and pp.get("packets"):
            k, i = pp.get("kicks", 0) / pp["packets"], pp.get("interrupts", 0) / pp["packets"]
            w = None if pp.get("wakeups") is None else pp["wakeups"] / pp["packets"]
        cost = " · ".join(f"{name} {num(v)}" for name, v in (cpu or {}).items() if v is not None)
        t.add_row(" ".join(p for p in parts if p), num(k) if pp else "", num(i) if pp else "",
                  num(w) if pp else "", cost)
    return t


def targets_table(rows: list[dict]) -> Table:
    t = _table("Targets (issue 15): ratios to the socketpair (×) or the bare-ring ceiling in this run; "
               "met/missed on must, +aim when the aim is met too",
               ["target", "must", "aim", "got", "status"], 80)
    for r in rows:
        v = r["value"]
        got = "" if v is None else (rat(v) if "×" in r["want"] else
                                    f"{v:.0f}" if float(v).is_integer() else num(v))
        if r.get("aim_value") is not None:
            got += f" ({rat(r['aim_value'])})"
        status = {"met": "[green]met[/]", "missed": "[red]missed[/]", "n/a": "n/a"}[r["status"]]
        if r.get("aim_met"):
            status += "[green]+aim[/]"
        note = r["note"] if r["status"] != "n/a" else ""
        t.add_row(r["target"], r["want"], r.get("aim", ""), got,
                  Text.from_markup(status + (f" ({note})" if note else "")))
    return t


def threads_text(figs: list[dict]) -> Text | None:
    bare = {p: find(figs, kind="threads", path=p, mode="bare") for p in ("guest", "device")}
    ev = {p: find(figs, kind="threads", path=p, mode="bare eventfd") for p in ("guest", "device")}
    idle = find(figs, kind="idle") or {}
    busy = idle.get("threads") or {}
    if not any(bare.values()) and not busy:
        return None
    parts = []
    if any(bare.values()):
        parts.append("idle, nothing served: " + ", ".join(
            f"{p} {value(f):.0f}" if value(f) is not None else f"{p} n/a" for p, f in bare.items() if f))
    if any(ev.values()):
        parts.append("idle, --doorbell eventfd: " + ", ".join(
            f"{p} {value(f):.0f}" if value(f) is not None else f"{p} n/a" for p, f in ev.items() if f))
    if busy:
        parts.append("with the bench's services and agent: " + ", ".join(
            f"{p} {'n/a' if n is None else n}" for p, n in busy.items()))
    return Text("Threads per process — " + "; ".join(parts))


def renderables(results: dict, width: int = 80) -> list:
    figs = results.get("figures", [])
    rows = results.get("targets") or targets(figs)
    tgt = {r["target"]: r for r in rows}
    out = []
    if results.get("interrupted"):
        out.append(Text("interrupted: the figures measured so far", style="bold yellow"))
    out += [throughput_table(figs, tgt, width), rr_table(figs, tgt, width), pairs_table(figs, tgt, width),
            cost_table(figs, width)]
    idle = find(figs, kind="idle")
    if idle is not None:
        procs = idle.get("processes") or {}
        detail = ", ".join(f"{k} {num(v)} %" for k, v in procs.items() if v is not None)
        out.append(Text(f"Idle pair: {num(value(idle))} % of a core" + (f" ({detail})" if detail else "")
                        + (f" — n/a: {idle['na']}" if idle.get("na") else "")))
    th = threads_text(figs)
    if th is not None:
        out.append(th)
    out.append(targets_table(rows))
    notes = _notes(figs)
    modes = results.get("modes") or {}
    out.append(Text("\n".join([f"mode {k}: {v}" for k, v in modes.items()] + notes)))
    return out


def render(console, results: dict) -> None:
    for r in renderables(results, console.width):
        console.print(r)

