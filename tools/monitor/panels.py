"""One pure function per panel: a frame (tools.monitor.model) in, a rich renderable out.

Tables never cut a name or a number: `fit_table` measures every cell, and when the columns do
not fit the width it drops the least important columns (saying how many) instead of letting rich
shorten cells to "my-…". Every panel ends with a legend of its columns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .ring import decode_ring, ring_legend, ring_text
from .ring_packed import decode_packed, packed_legend, packed_text

DASH = "–"
SPARKS = "▁▂▃▄▅▆▇█"
VIEWS = ("queues", "ring", "conns", "net")
SHORT_STATE = {"ESTABLISHED": "ESTAB", "SYN_SENT": "SYN_SENT", "CLOSE": "CLOSE", "LISTEN": "LISTEN",
               "CLOSING": "CLOSING"}



def _rule_note(rule, text: str) -> str:
    """" (ring rule N)" (docs/ring-rules.md) unless the message already names it."""
    if rule is None or f"ring rule {rule}" in text:
        return ""
    return f" (ring rule {rule})"

def human(n, unit: str = "") -> str:
    if n is None:
        return DASH
    n = float(n)
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def num(n) -> str:
    return DASH if n is None else str(n)


def sparkline(values: list[float], width: int = 16) -> str:
    """The values as ▁..█ (scaled to their maximum), averaged into at most `width` buckets."""
    if not values:
        return ""
    if len(values) > width:                    # oldest first, each bucket the mean of its values
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:])]
    top = max(values)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(7, int(v / top * 7.999))] for v in values)


@dataclass
class Col:
    header: str
    cell: Callable[[dict], Any]
    justify: str = "right"
    keep: int = 0          # higher = dropped later when the width is short


def _plain(x) -> str:
    return x.plain if isinstance(x, Text) else str(x)


def fit_table(title: str, cols: list[Col], rows: list[dict], width: int, empty: str):
    cells = [[c.cell(r) for c in cols] for r in rows]
    widths = []
    for j, c in enumerate(cols):
        w = max([len(w) for w in c.header.split()] + [max((len(s) for s in _plain(row[j]).split("\n")), default=0)
                                                        for row in cells] + [1])
        widths.append(w)
    keep = list(range(len(cols)))

    def need(idx):
        return sum(widths[j] + 3 for j in idx)      # padding 1+1 and a separator per column

    dropped = 0
    while need(keep) > width and len(keep) > 1:
        # the least important column goes first (later ones first among equals); the first
        # column (the name) stays whatever the width
        cand = min(keep[1:], key=lambda j: (cols[j].keep, -j))
        keep.remove(cand)
        dropped += 1
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False, expand=False)
    if not rows:
        return Group(Text(title, "italic"), Text(f"  {empty}", "dim"))
    for j in keep:
        c = cols[j]
        # Headers wrap at spaces; cells are never shorter than their widest value (min_width),
        # and fold rather than end in "…" should a terminal be narrower than we measured.
        t.add_column(c.header, justify=c.justify, width=widths[j], overflow="fold")
    for row in cells:
        t.add_row(*[row[j] for j in keep])
    head = Text(title, "italic")
    if dropped:
        head.append(f"  ({dropped} column{'s' if dropped > 1 else ''} hidden at width {width}: "
                    "widen the terminal or use --width)", "dim")
    return Group(head, t)


def _status_text(s) -> Text:
    style = {"NEEDS_RESET": "bold red", "FAILED": "bold red", "DRIVER_OK": "green"}.get(s, "yellow")
    return Text(num(s), style=style)


def _link_text(s) -> Text:
    return Text(s, style="green" if s == "connected" else "bold yellow")


def _err_text(n, extra: str = "") -> Text:
    return Text(num(n) + extra, style="bold red" if n else "")


# --- panels ----------------------------------------------------------------------------------------
KEY_HINT = "keys: q/r/c/n view, g next guest, a all guests, x/Esc quit"
KEYS = ("q", "r", "c", "n", "g", "a", "x", "Esc")          # every key the live monitor reads


def header(frame: dict, view: str, guest: int | None, keys: bool) -> Text:
    t = Text("virtio-emu monitor ", "bold")
    t.append(f"{frame.get('run_dir', '')}  {time.strftime('%H:%M:%S UTC', time.gmtime(frame.get('time', 0)))}  ")
    for v in VIEWS:
        t.append(f"[{v}]" if v == view else f" {v} ", "bold reverse" if v == view else "")
    who = f"guest {guest if guest is not None else 'all'}"
    if keys:                                  # a line of their own: the hint is never wrapped
        t.append(f"\n{who}   ")
        t.append(KEY_HINT, "dim")
    else:
        t.append(f"  {who}")
    return t


def guests_panel(frame: dict, width: int, history=None) -> Group:
    hist = history
    traffic = [
        Col("guest", lambda g: g["name"], "left", 9), Col("cid", lambda g: num(g["cid"]), keep=9),
        Col("host link", lambda g: _link_text(g["link"]), "left", 8),
        Col("device status", lambda g: _status_text(g["status"]), "left", 8),
        Col("tx B/s g→h", lambda g: human(g["tx_Bps"], "B"), keep=7),
        Col("rx B/s h→g", lambda g: human(g["rx_Bps"], "B"), keep=7),
        Col("kicks/s", lambda g: human(g["kicks_ps"]), keep=6),
        Col("irqs/s", lambda g: human(g["irqs_ps"]), keep=6),
        Col("errors", lambda g: _err_text(g["errors"]), keep=8),
    ]
    life = [
        Col("guest", lambda g: g["name"], "left", 9),
        Col("re-connects", lambda g: num(g["reconnects"]), keep=8),
        Col("device resets", lambda g: num(g["resets"]), keep=8),
        Col("bridge conns in/out", lambda g: f"{num(g['bridge_in'])}/{num(g['bridge_out'])}", keep=7),
        Col("bridge refused", lambda g: num(g["bridge_refused"]), keep=6),
        Col("bridge bytes →host", lambda g: human(g["bridge_to_host"], "B"), keep=7),
        Col("bridge bytes →guest", lambda g: human(g["bridge_to_guest"], "B"), keep=7),
        Col("queued replies", lambda g: num(g["queued_replies"]), keep=3),
        Col("guest pid", lambda g: num(g["pid"]), keep=1),
        Col("device pid", lambda g: num(g["device_pid"]), keep=1),
    ]
    parts: list = [fit_table("guests and their devices", traffic, frame["guests"], width, "no guests or devices")]
    if frame["guests"]:
        parts.append(fit_table("links, resets, bridge", life, frame["guests"], width, ""))
    errs = [g for g in frame["guests"] if g.get("last_error")]
    for g in errs:
        parts.append(Text(f"  {g['name']}: last error: {g['last_error']}"
                          f"{_rule_note(g.get('last_rule'), g['last_error'])}", "bold red"))
    if hist is not None and frame["guests"]:
        def spark(key: str, unit: str = ""):
            def cell(g):
                vals = hist.values(f"{g['cid']}.{key}")
                t = Text(sparkline(vals, 12) or DASH, "cyan")
                t.append(f" {human(vals[-1] if vals else None, unit)}")
                return t
            return cell
        cols = [Col("guest", lambda g: g["name"], "left", 9),
                Col("tx B/s g→h", spark("tx_Bps", "B"), "left", 8), Col("rx B/s h→g", spark("rx_Bps", "B"), "left", 8),
                Col("kicks/s", spark("kicks_ps"), "left", 7), Col("irqs/s", spark("irqs_ps"), "left", 7)]
        parts.append(fit_table("the last minute", cols, frame["guests"], width, ""))
    return Group(*parts)


GUESTS_LEGEND = ("tx = guest→host (taken off the tx ring), rx = host→guest (written into rx buffers); "
                 "kicks = guest→device notifications, irqs = device→guest interrupts; re-connects = "
                 "times the guest reconnected to a host; device resets = resets of its device; bridge "
                 "conns in/out = host connections into / out of the guest; bridge bytes = bytes the "
                 "bridge passed each way; host silent Ns = no new host snapshot for N seconds.")


def _suppression(q: dict) -> str:
    if q.get("event_idx"):
        return f"ue {num(q.get('used_event'))} ae {num(q.get('avail_event'))}"
    flags = [n for n, on in (("NO_NOTIFY", q.get("no_notify")), ("NO_INTERRUPT", q.get("no_interrupt"))) if on]
    if q.get("no_notify") is None and q.get("no_interrupt") is None:
        return DASH
    return ",".join(flags) or "none"


def queues_panel(frame: dict, width: int, guest: int | None = None) -> Group:
    return Group(*queues_parts(frame, width, guest))


def queues_parts(frame: dict, width: int, guest: int | None = None) -> list:
    """[the indices table (the rows that matter most), the notifications table, broken queues]."""
    rows = [q for q in frame["queues"] if guest is None or q["cid"] == guest]
    ring_cols = [
        Col("guest", lambda q: q["guest"], "left", 9), Col("q", lambda q: q["name"], "left", 9),
        Col("size", lambda q: num(q["size"]), keep=6),
        Col("avail idx", lambda q: num(q["avail_idx"]), keep=9),
        Col("last_avail (dev)", lambda q: num(q["last_avail"]), keep=9),
        Col("used idx", lambda q: num(q["used_idx"]), keep=9),
        Col("last_used (drv)", lambda q: num(q["last_used"]), keep=9),
        Col("in flight", lambda q: num(q["in_flight"]), keep=7),
        Col("free desc", lambda q: num(q["free"]), keep=7),
        Col("suppression", _suppression, "left", 8),
        Col("errs", lambda q: _err_text(q["errors"], " NEEDS_RESET" if q["broken"] else ""), "left", 9),
    ]
    rate_cols = [
        Col("guest", lambda q: q["guest"], "left", 9), Col("q", lambda q: q["name"], "left", 9),
        Col("kicks/s", lambda q: human(q["kicks_ps"]), keep=8),
        Col("kicks saved/s", lambda q: human(q["kicks_saved_ps"]), keep=7),
        Col("irqs/s", lambda q: human(q["irqs_ps"]), keep=8),
        Col("irqs saved/s", lambda q: human(q["irqs_saved_ps"]), keep=7),
        Col("bufs per kick", lambda q: DASH if q["per_kick"] is None else f"{q['per_kick']:.1f}", keep=6),
        Col("bufs per wake", lambda q: DASH if q["batch"] is None else f"{q['batch']:.1f}", keep=6),
        Col("poll time", lambda q: DASH if q["poll_frac"] is None else f"{100 * q['poll_frac']:.0f}%", keep=5),
    ]
    parts = [fit_table("virtqueues: indices", ring_cols, rows, width, "no queues"),
             fit_table("virtqueues: notifications", rate_cols, rows, width, "no queues")]
    for q in rows:
        if q["broken"]:
            why = q["why"] or "broken"
            parts.append(Text(f"  {q['guest']} {q['name']}: {why}{_rule_note(q.get('rule'), why)}",
                              "bold red"))
    return parts


QUEUES_LEGEND = (
    "avail idx = what the driver posted; last_avail = what the device took; used idx = what the "
    "device returned; last_used = what the driver reclaimed (all mod 65536). in flight = buffers "
    "with the device; free desc = descriptors on the driver's free list. suppression: with "
    "EVENT_IDX ue = used_event (interrupt me past it), ae = avail_event (kick me past it); "
    "otherwise the NO_NOTIFY / NO_INTERRUPT flags set. errs = ring errors (NEEDS_RESET: the device stopped). saved/s = notifications suppression "
    "avoided; bufs per kick / per wake = buffers the device took per kick / per worker wake-up; poll time = share of time "
    "polling (– until the engine reports it). Driver and device figures come from two processes' "
    "snapshots, up to half a second apart: read them as a picture, not an invariant.")


def conns_panel(frame: dict, width: int, guest: int | None = None) -> Group:
    return Group(*conns_parts(frame, width, guest))


def conns_parts(frame: dict, width: int, guest: int | None = None) -> list:
    """[the connections table, the credit table]."""
    rows = [c for c in frame["conns"] if guest is None or c["cid"] == guest]

    def stalled(c):
        s = [d for d, on in (("g→h", c["stalled_tx"]), ("h→g", c["stalled_rx"])) if on]
        return Text(",".join(s) or "no", "bold yellow" if s else "")

    def state(c):
        g, h = c["state_guest"], c["state_host"]
        g, h = SHORT_STATE.get(g, num(g)), SHORT_STATE.get(h, num(h))
        return g if g == h else f"{g}/{h}"

    flow = [
        Col("guest", lambda c: c["guest"], "left", 9),
        Col("guest end", lambda c: num(c["guest_end"]), "left", 9),
        Col("host end", lambda c: num(c["host_end"]), "left", 9),
        Col("state", state, "left", 8),
        Col("bytes g→h", lambda c: human(c["bytes_tx"], "B"), keep=8),
        Col("bytes h→g", lambda c: human(c["bytes_rx"], "B"), keep=8),
        Col("window g→h", lambda c: human(c["window_tx"], "B"), keep=7),
        Col("window h→g", lambda c: human(c["window_rx"], "B"), keep=7),
        Col("stalled on credit", stalled, "left", 8),
    ]
    credit = [
        Col("guest end", lambda c: num(c["guest_end"]), "left", 9),
        Col("guest buf_alloc", lambda c: num(c["g_buf_alloc"]), keep=6),
        Col("guest fwd_cnt", lambda c: num(c["g_fwd_cnt"]), keep=5),
        Col("host buf_alloc", lambda c: num(c["h_buf_alloc"]), keep=6),
        Col("host fwd_cnt", lambda c: num(c["h_fwd_cnt"]), keep=5),
        Col("CREDIT_UPDATE g/h", lambda c: f"{num(c['cu_guest'])}/{num(c['cu_host'])}", keep=6),
        Col("CREDIT_REQUEST g/h", lambda c: f"{num(c['cr_guest'])}/{num(c['cr_host'])}", keep=4),
    ]
    parts = [fit_table("vsock connections", flow, rows, width, "no vsock connections")]
    if rows:
        parts.append(fit_table("credit (virtio-vsock flow control)", credit, rows, width, ""))
    return parts


CONNS_LEGEND = (
    "g = guest, h = host; state = the guest's / the host's socket state (one word when equal). buf_alloc / fwd_cnt = each receiver's buffer and bytes it consumed (as it "
    "advertises them); window g→h = credit the guest's sender still has (host's free space), "
    "window h→g = the host sender's; CREDIT_UPDATE / CREDIT_REQUEST g/h = packets sent by the guest / "
    "the host; stalled = that direction's sender has no credit left.")


def net_panel(frame: dict, width: int, guest: int | None = None) -> Group:
    # a net device has no CID: it belongs to the chosen guest when its guest has that guest's name
    names = {g["name"] for g in frame["guests"] if g["cid"] == guest}
    rows = [n for n in frame["nets"] if guest is None or n["cid"] == guest or n["guest"] in names]
    if not rows:
        return Group(Text("no net devices", "dim"))
    cols = [
        Col("guest", lambda n: n["guest"], "left", 9), Col("backend", lambda n: num(n["backend"]), "left", 8),
        Col("mac", lambda n: num(n["mac"]), "left", 8), Col("status", lambda n: _status_text(n["status"]), "left", 6),
        Col("tx frames g→net", lambda n: num(n["tx_packets"]), keep=7),
        Col("tx bytes", lambda n: human(n["tx_bytes"], "B"), keep=4),
        Col("rx frames net→g", lambda n: num(n["rx_packets"]), keep=7),
        Col("rx bytes", lambda n: human(n["rx_bytes"], "B"), keep=4),
        Col("B/s tx/rx", lambda n: f"{human(n['tx_Bps'], 'B')}/{human(n['rx_Bps'], 'B')}", keep=5),
        Col("drops tx/rx", lambda n: f"{num(n['tx_dropped'])}/{num(n['rx_dropped'])}", keep=8),
        Col("tx polling", lambda n: DASH if n["tx_polling"] is None else ("on" if n["tx_polling"] else "off"), "left", 8),
    ]
    return Group(fit_table("net devices", cols, rows, width, "no net devices"))


NET_LEGEND = ("tx = guest→network (taken off the tx ring), rx = network→guest; drops = frames the "
              "backend could not deliver; tx polling = vhost-net busy-polls the tx ring instead of "
              "waiting for kicks.")


def ring_panel(rings: list[dict] | None, name: str, width: int, error: str = "") -> Group:
    """`rings` = [{"title", "picture": RingPicture}] decoded by the caller from guest RAM."""
    legends = [ring_legend()] + ([packed_legend()] if any(getattr(r["picture"], "packed", False)
                                                          for r in rings or []) else [])
    return Group(*ring_parts(rings, name, width, error), *legends)


def ring_parts(rings: list[dict] | None, name: str, width: int, error: str = "") -> list:
    """[the title, then one picture per ring] (the legend apart: it is folded first)."""
    parts: list = [Text(f"rings of {name}, read from its RAM (read-only)", "bold")]
    if error:
        parts.append(Text(f"  {error}", "yellow"))
    for r in rings or []:
        pic = r["picture"]
        parts.append(packed_text(pic, r["title"], width) if getattr(pic, "packed", False)
                     else ring_text(pic, r["title"], width))
    if not rings and not error:
        parts.append(Text("  no rings set up", "dim"))
    return [Group(*parts)]


def decode_all(read, sources: dict) -> list[dict]:
    """Decode every queue of a ring_sources() entry with `read`; raises what `read` raises."""
    out = []
    for q in sources["queues"]:
        if q.get("packed"):
            p = decode_packed(read, q["num"], q["desc"], q["avail"], q["used"],
                              event_idx=q["event_idx"], **q["positions"])
            out.append({"title": f"q{q['q']} {q['name']}", "q": q["q"], "picture": p})
            continue
        p = decode_ring(read, q["num"], q["desc"], q["avail"], q["used"], last_avail=q["last_avail"],
                        last_used=q["last_used"], event_idx=q["event_idx"])
        out.append({"title": f"q{q['q']} {q['name']}", "q": q["q"], "picture": p})
    return out


def legend(view: str, with_guests: bool = True) -> Text:
    text = {"queues": QUEUES_LEGEND, "conns": CONNS_LEGEND, "net": NET_LEGEND, "ring": ""}[view]
    if not with_guests:
        return Text(text, "dim")
    return Text(GUESTS_LEGEND + ("\n" + text if text else ""), "dim")


def guests_summary(frame: dict, guest: int | None = None) -> Text:
    """The guests tables folded into one or two lines (small terminals): how many guests, their
    links and device states (problems named), total rates, errors, net devices."""
    gs = [g for g in frame["guests"] if guest is None or g["cid"] == guest]
    nets = [n for n in frame["nets"] if guest is None or n["cid"] == guest]
    t = Text("guests ", "italic")
    t.append(f"{len(gs)}", "bold")
    bad_link = [g for g in gs if g["link"] != "connected"]
    bad_status = [g for g in gs if g["status"] not in ("DRIVER_OK", None)]
    if gs and not bad_link and not bad_status:
        t.append(" all up", "green")                 # connected, device DRIVER_OK
    for g in bad_link:
        t.append(f"  {g['name']}: {g['link']}", "bold yellow")
    for g in bad_status:
        t.append(f"  {g['name']}: {g['status']}", "bold red" if g["status"] in ("NEEDS_RESET", "FAILED") else "yellow")

    def total(key):
        vals = [g[key] for g in gs if g[key] is not None]
        return sum(vals) if vals else None
    t.append(f"  tx {human(total('tx_Bps'), 'B')}/s rx {human(total('rx_Bps'), 'B')}/s"
             f"  kicks {human(total('kicks_ps'))}/s irqs {human(total('irqs_ps'))}/s  ")
    errs = total("errors")
    t.append(f"errors {num(errs)}", "bold red" if errs else "")
    if nets:
        t.append(f"  nets {len(nets)}")
    t.append("  (tables folded)", "dim")
    return t


def problem_lines(frame: dict, guest: int | None = None) -> list[Text]:
    """The red lines of the full screen (a guest's last error), kept on a small one too."""
    return [Text(f"  {g['name']}: last error: {g['last_error']}"
                 f"{_rule_note(g.get('last_rule'), g['last_error'])}", "bold red")
            for g in frame["guests"] if g.get("last_error") and (guest is None or g["cid"] == guest)]


def migration_lines(frame: dict) -> list[Text]:
    """One line per guest migrating (or just migrated): round, pages sent of all RAM, pages the
    guest and the device dirtied, the last round, the downtime (docs/monitor.md)."""
    out = []
    for m in frame.get("migrations") or []:
        st = m["status"] or "?"
        style = {"failed": "bold red", "completed": "green"}.get(st, "bold yellow")
        t = Text(f"  migration {m['guest']}: ", "bold")
        t.append(st, style)
        t.append(f"  round {num(m['round'])}  sent {num(m['pages_sent'])} pages"
                 f" (RAM {num(m['pages_total'])})  dirtied guest {num(m['dirty_guest'])}"
                 f" / device {num(m['dirty_device'])}")
        lr = m.get("last_round")
        if lr:
            t.append(f"  last round {num(lr.get('sent'))} pages in {lr.get('ms')} ms")
        if m.get("downtime_ms") is not None:
            t.append(f"  downtime {m['downtime_ms']} ms, total {m['total_ms']} ms")
        if m.get("error"):
            t.append(f"  {m['error']}", "red")
        out.append(t)
    return out
