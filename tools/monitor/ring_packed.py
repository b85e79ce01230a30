"""The ring picture of a packed virtqueue: decode it from guest RAM bytes, then draw it.

`decode_packed` is pure, like `ring.decode_ring`: a `read(gpa, n) -> bytes` over guest RAM, the
ring's addresses and size, and the positions RAM does not hold, each a slot with its wrap counter:

    driver  next avail (where its next buffer goes), last used (the next used descriptor it reads)
    device  last avail (the next chain it pops), last used (where its next used descriptor goes)

Each slot's AVAIL/USED bits are read and judged against the wrap counter the side that looks at
that slot next will hold (a side at slot p with counter w sees slots >= p in lap w and slots < p
in lap !w, spec 2.8.1):

    avail   'A'  AVAIL = lap, USED = !lap for the device's lap: posted, not taken yet
    device  'D'  taken (the device passed it) and not used yet: slots between the device's used
                 position and its avail position (exact for a device that completes in order)
    used    'U'  AVAIL = USED = lap for the driver's lap: used, not reclaimed by the driver yet
    free    '.'  anything else (stale bits of an earlier lap)

A second strip shows the raw bits per slot: '-' neither, 'a' AVAIL only, 'u' USED only, 'b' both.
The event suppression structures are decoded too: the driver's (ENABLE, DISABLE, or DESC with the
slot and lap at which it wants an interrupt) and the device's (the same for kicks). Everything
read is treated as hostile: positions outside the ring and reserved flag values are reported.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from rich.text import Text

from shared.ring_layout import DESC_F_AVAIL, DESC_F_USED

from .ring import AVAIL, DEVICE, FREE, STYLES, USED, _group, _strip

EVENT_NAMES = {0: "ENABLE", 1: "DISABLE", 2: "DESC"}
BITS = {0: "-", DESC_F_AVAIL: "a", DESC_F_USED: "u", DESC_F_AVAIL | DESC_F_USED: "b"}
BIT_STYLES = {"-": "dim", "a": "cyan", "u": "magenta", "b": "green"}


@dataclass
class PackedPicture:
    num: int
    driver_avail: tuple[int, int]       # (slot, wrap) the driver's next buffer starts at
    driver_used: tuple[int, int]        # the driver's next used read
    device_avail: tuple[int, int]       # the device's next pop
    device_used: tuple[int, int]        # the device's next used write
    driver_event: tuple[int, int]       # (off_wrap, flags) in the driver area
    device_event: tuple[int, int]       # (off_wrap, flags) in the device area
    event_idx: bool
    desc: list[str]                     # state per slot
    bits: list[str]                     # raw AVAIL/USED bits per slot
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    packed: bool = True

    def counts(self) -> dict[str, int]:
        return {s: self.desc.count(s) for s in (FREE, AVAIL, DEVICE, USED)}


def _pos(v, num: int, name: str, problems: list, notes: list, fallback):
    if v is None:
        notes.append(f"{name} unknown (no snapshot); shown at {fallback[0]}/w{fallback[1]}")
        return fallback
    slot, wrap = int(v[0]), int(v[1]) & 1
    if not 0 <= slot < num:
        problems.append(f"{name} {slot} outside the ring (N={num})")
        return fallback
    return slot, wrap


def decode_packed(read, num: int, desc: int, driver: int, device: int, *, driver_avail=None,
                  driver_used=None, device_avail=None, device_used=None,
                  event_idx: bool = False) -> PackedPicture:
    """Decode one packed ring from guest RAM (see the module docstring)."""
    raw = read(desc, 16 * num)
    flags = [struct.unpack_from("<H", raw, 16 * i + 14)[0] for i in range(num)]
    drv = struct.unpack("<HH", read(driver, 4))
    dev = struct.unpack("<HH", read(device, 4))
    problems: list[str] = []
    notes: list[str] = []
    du = _pos(driver_used, num, "driver last_used", problems, notes, (0, 1))
    dva = _pos(device_avail, num, "device last_avail", problems, notes, du)
    da = _pos(driver_avail, num, "driver next_avail", problems, notes, dva)
    dvu = _pos(device_used, num, "device last_used", problems, notes, du)
    for name, (off_wrap, fl) in (("driver", drv), ("device", dev)):
        if fl not in EVENT_NAMES:
            problems.append(f"{name} event flags {fl} are reserved (0 ENABLE, 1 DISABLE, 2 DESC)")
        elif fl == 2 and not event_idx:
            problems.append(f"{name} event flags DESC without EVENT_IDX")
        if fl == 2 and (off_wrap & 0x7FFF) >= num:
            problems.append(f"{name} event offset {off_wrap & 0x7FFF} outside the ring (N={num})")

    def lap(i: int, pos: tuple[int, int]) -> int:
        return pos[1] if i >= pos[0] else pos[1] ^ 1

    def in_window(i: int, start: int, end: int) -> bool:      # [start, end) around the ring
        return (start <= i < end) if start <= end else (i >= start or i < end)

    states, bits = [], []
    taken = dvu != dva            # the device holds chains between its used and avail positions
    for i, f in enumerate(flags):
        a, u = bool(f & DESC_F_AVAIL), bool(f & DESC_F_USED)
        bits.append(BITS[f & (DESC_F_AVAIL | DESC_F_USED)])
        w = lap(i, du)
        if a == u == bool(w):
            states.append(USED)
            continue
        w = lap(i, dva)
        if a == bool(w) and u != bool(w):
            states.append(AVAIL)
        elif taken and in_window(i, dvu[0], dva[0]) and a == bool(w ^ 1) and u != bool(w ^ 1):
            states.append(DEVICE)
        else:
            states.append(FREE)
    return PackedPicture(num, da, du, dva, dvu, drv, dev, event_idx, states, bits,
                         list(dict.fromkeys(problems)), list(dict.fromkeys(notes)))


def _event(name: str, ev: tuple[int, int], what: str) -> str:
    off_wrap, fl = ev
    if fl == 2:
        return f"{name} DESC off {off_wrap & 0x7FFF} lap {off_wrap >> 15} ({what} at that slot)"
    return f"{name} {EVENT_NAMES.get(fl, f'reserved {fl}')}"


def packed_marks(p: PackedPicture, k: int) -> dict[int, str]:
    """a driver next avail, l device last_avail, u device last_used, r driver last_used,
    e driver event offset, v device event offset; '*' where several meet."""
    marks: dict[int, str] = {}
    items = [("r", p.driver_used[0]), ("u", p.device_used[0]), ("l", p.device_avail[0]),
             ("a", p.driver_avail[0])]
    if p.driver_event[1] == 2:
        items.append(("e", p.driver_event[0] & 0x7FFF))
    if p.device_event[1] == 2:
        items.append(("v", p.device_event[0] & 0x7FFF))
    for ch, idx in items:
        if 0 <= idx < p.num:
            pos = idx // k
            marks[pos] = ch if marks.get(pos, ch) == ch else "*"
    return marks


def _bits_strip(cells: list[str], per_row: int, label: str) -> list[Text]:
    pad = " " * len(label)
    out = []
    for r in range(0, len(cells), per_row):
        t = Text(label if r == 0 else pad)
        for c in cells[r:r + per_row]:
            t.append(c, BIT_STYLES[c])
        out.append(t)
    return out


def packed_text(p: PackedPicture, title: str, width: int = 100) -> Text:
    per_row = 64 if width >= 72 else 32
    k = 1
    while p.num // k > 2 * per_row:
        k *= 2
    c = p.counts()
    w = lambda pos: f"{pos[0]}/w{pos[1]}"       # noqa: E731 - slot/wrap
    head = Text(f"{title}  packed  N={p.num}", "bold")
    head.append(f"  driver: avail {w(p.driver_avail)} used {w(p.driver_used)}  "
                f"device: avail {w(p.device_avail)} used {w(p.device_used)}")
    lines = [head, Text(f"  free {c[FREE]}  avail {c[AVAIL]}  in device {c[DEVICE]}  used {c[USED]}"
                        + (f"  (1 cell = {k} slots)" if k > 1 else ""))]
    lines += _strip(_group(p.desc, k), per_row, "  desc ", packed_marks(p, k))
    if k == 1:
        lines += _bits_strip(p.bits, per_row, "  bits ")
    lines.append(Text("  " + _event("driver event", p.driver_event, "irq once the device uses")
                      + "  " + _event("device event", p.device_event, "kick once the driver posts")))
    for why in p.notes[:3]:
        lines.append(Text(f"  ~ {why}", "dim"))
    for why in p.problems[:4]:
        lines.append(Text(f"  ! {why}", "bold red"))
    return Text("\n").join(lines)


def packed_legend() -> Text:
    t = Text("packed rings: ")
    for s, name in ((FREE, "free"), (AVAIL, "posted"), (DEVICE, "in the device"), (USED, "used, not reclaimed")):
        t.append(s, STYLES[s])
        t.append(f" {name}  ")
    t.append("\nbits: - none  a AVAIL  u USED  b both; marks: a driver next avail  l device last_avail  "
             "u device used position  r driver last_used  e/v driver/device event offset (DESC)")
    return t
