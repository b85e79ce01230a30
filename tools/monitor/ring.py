"""The ring picture: decode a split virtqueue from guest RAM bytes, then draw it.

`decode_ring` is pure: it takes a `read(gpa, n) -> bytes` over guest RAM (a read-only mapping in
the monitor, GuestMemory.read in tests), the ring's addresses and size, and the two indices the
RAM does not hold -- the device's last_avail and the driver's last_used -- and returns a
`RingPicture`: one state per descriptor slot and one per ring slot, plus the indices.

Descriptor states (one cell per descriptor slot of the table):

    free     '.'  on no chain the ring refers to
    avail    'A'  on a chain posted in avail.ring[last_avail .. avail.idx) (not taken yet)
    device   'D'  on a chain the device took (last_avail moved past it) and has not used yet
    used     'U'  on a chain in used.ring[last_used .. used.idx) the driver has not reclaimed
    broken   '!'  a chain that leaves the table, loops, or is claimed twice

The chains "in the device" are the (last_avail - used.idx) most recently taken heads, which is
exact for a device that completes in order (vhost-vsock does) and a fair picture otherwise.
Without a device snapshot last_avail is taken as used.idx (nothing shown in the device); without
a driver snapshot last_used is taken as used.idx (nothing shown as unreclaimed).

Everything read is treated as hostile: indices are taken mod 2^16, chain walks are bounded by N,
and an avail.idx more than N ahead is reported, not followed.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from rich.text import Text

from shared.constants import (VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                              VRING_USED_F_NO_NOTIFY)

U16 = 0xFFFF
FREE, AVAIL, DEVICE, USED, BROKEN = ".", "A", "D", "U", "!"
# When a descriptor is on several chains the most alarming state wins.
_RANK = {FREE: 0, AVAIL: 1, DEVICE: 2, USED: 3, BROKEN: 4}
STYLES = {FREE: "dim", AVAIL: "bold cyan", DEVICE: "bold yellow", USED: "bold green",
          BROKEN: "bold white on red"}
NAMES = {FREE: "free", AVAIL: "posted (avail)", DEVICE: "in the device", USED: "used, not reclaimed",
         BROKEN: "broken chain"}


@dataclass
class RingPicture:
    num: int
    avail_idx: int
    used_idx: int
    last_avail: int
    last_used: int
    avail_flags: int
    used_flags: int
    event_idx: bool
    used_event: int | None
    avail_event: int | None
    desc: list[str]                 # state per descriptor slot
    ring: list[str]                 # state per ring slot (avail.ring[i] / used.ring[i] position)
    problems: list[str] = field(default_factory=list)     # what the guest or device got wrong
    notes: list[str] = field(default_factory=list)        # where a snapshot index was replaced

    def counts(self) -> dict[str, int]:
        return {s: self.desc.count(s) for s in (FREE, AVAIL, DEVICE, USED, BROKEN)}


def _walk(descs: bytes, num: int, head: int) -> tuple[list[int], str]:
    """The descriptor indices of the chain at `head`, bounded by num; ("", ok) or a problem."""
    chain: list[int] = []
    i = head
    seen = set()
    while True:
        if i >= num:
            return chain, f"chain at head {head} leaves the table (next {i} >= {num})"
        if i in seen:
            return chain, f"chain at head {head} loops back to {i}"
        seen.add(i)
        chain.append(i)
        _, _, flags, nxt = struct.unpack_from("<QIHH", descs, 16 * i)
        if flags & VRING_DESC_F_INDIRECT or not flags & VRING_DESC_F_NEXT:
            return chain, ""
        i = nxt


def decode_ring(read, num: int, desc: int, avail: int, used: int, *, last_avail: int | None = None,
                last_used: int | None = None, event_idx: bool = False) -> RingPicture:
    """Decode one split ring from guest RAM (see the module docstring)."""
    descs = read(desc, 16 * num)
    av = read(avail, 6 + 2 * num)
    us = read(used, 6 + 8 * num)
    avail_flags, avail_idx = struct.unpack_from("<HH", av, 0)
    used_flags, used_idx = struct.unpack_from("<HH", us, 0)
    avail_ring = struct.unpack_from(f"<{num}H", av, 4)
    used_ring = [struct.unpack_from("<I", us, 4 + 8 * k)[0] for k in range(num)]
    used_event = struct.unpack_from("<H", av, 4 + 2 * num)[0] if event_idx else None
    avail_event = struct.unpack_from("<H", us, 4 + 8 * num)[0] if event_idx else None
    mask = num - 1
    problems: list[str] = []
    notes: list[str] = []
    ahead = (avail_idx - used_idx) & U16
    if ahead > num:
        # ring rule 1 as the device sees it: more buffers posted than the ring holds
        problems.append(f"avail.idx is {ahead} entries ahead of used.idx, more than N={num}")
    # The two indices that are not in RAM come from snapshots up to half a second old; under
    # traffic they can lag the live ring. Use them only where they fit it, else estimate.
    la = used_idx if last_avail is None else last_avail & U16
    span = min(ahead, num)
    if ((la - used_idx) & U16) > span:
        # With EVENT_IDX the device writes avail_event = last_avail each time it re-arms kicks:
        # live, if it lies in the window.
        if event_idx and ((avail_event - used_idx) & U16) <= span:
            notes.append(f"last_avail {la} (snapshot) is behind the live ring; shown as avail_event")
            la = avail_event
        else:
            notes.append(f"last_avail {la} (snapshot) is behind the live ring; shown as used.idx")
            la = used_idx
    elif event_idx and last_avail is not None and 0 < ((avail_event - la) & U16) <= ((avail_idx - la) & U16):
        notes.append(f"last_avail {la} (snapshot) is older than avail_event; shown as avail_event")
        la = avail_event
    lu = used_idx if last_used is None else last_used & U16
    if event_idx and last_used is not None and lu != used_event \
            and 0 < ((used_event - lu) & U16) <= ((used_idx - lu) & U16):
        # With EVENT_IDX the driver writes used_event = last_used after every get_buf while its
        # callbacks are on: a live figure, newer than the snapshot's.
        notes.append(f"last_used {lu} (snapshot) is older than used_event; shown as used_event")
        lu = used_event
    if ((used_idx - lu) & U16) > num - min(ahead, num):
        est = used_event if event_idx and ((used_idx - used_event) & U16) <= num - min(ahead, num) \
            else used_idx
        notes.append(f"last_used {lu} (snapshot) is behind the live ring; shown as "
                     f"{'used_event' if est != used_idx else 'used.idx'}")
        lu = est
    states = [FREE] * num
    ring = [FREE] * num
    owner: dict[int, int] = {}          # descriptor -> head of the chain that claimed it
    owner_state: dict[int, str] = {}    # descriptor -> the state of that chain

    def mark(head: int, state: str) -> None:
        # A used chain may already be reclaimed and its descriptors reused when last_used comes
        # from an older snapshot: what looks wrong about it is a note, not the guest's fault.
        report = problems if state != USED else notes
        if head >= num:
            report.append(f"head {head} out of range (N={num})")
            return
        chain, why = _walk(descs, num, head)
        bad = BROKEN if state != USED else state
        st = bad if why else state
        if why:
            report.append(why if state != USED else f"used {why} (reclaimed since the snapshot?)")
        for d in chain:
            if d in owner and owner[d] != head:
                msg = f"descriptor {d} is on the chains of heads {owner[d]} and {head}"
                (problems if state != USED and owner_state[d] != USED else notes).append(msg)
                st2 = bad if owner_state[d] != USED else st
            else:
                st2 = st
            owner.setdefault(d, head)
            owner_state.setdefault(d, state)
            if _RANK[st2] > _RANK[states[d]]:
                states[d] = st2

    def window(start: int, end: int, name: str) -> int:
        n = (end - start) & U16
        if n > num:
            problems.append(f"{name} spans {n} entries, more than N={num}")
            return 0
        return n

    n_used = window(lu, used_idx, "used.idx - last_used")
    n_dev = window(used_idx, la, "last_avail - used.idx")
    n_av = window(la, avail_idx, "avail.idx - last_avail") if ahead <= num else 0
    for k in range(n_used):
        pos = (lu + k) & mask
        ring[pos] = USED
        mark(used_ring[pos], USED)
    for k in range(n_dev):
        pos = (la - n_dev + k) & mask
        ring[pos] = DEVICE
        mark(avail_ring[pos], DEVICE)
    for k in range(n_av):
        pos = (la + k) & mask
        ring[pos] = AVAIL
        mark(avail_ring[pos], AVAIL)
    return RingPicture(num, avail_idx, used_idx, la, lu, avail_flags, used_flags, event_idx,
                       used_event, avail_event, states, ring, list(dict.fromkeys(problems)),
                       list(dict.fromkeys(notes)))


# --- drawing ---------------------------------------------------------------------------------------
def _group(states: list[str], k: int) -> list[str]:
    """One cell per k slots: the most alarming state of the group."""
    if k == 1:
        return states
    return [max(states[i:i + k], key=_RANK.__getitem__) for i in range(0, len(states), k)]


def _strip(cells: list[str], per_row: int, label: str, marks: dict[int, str] | None = None) -> list[Text]:
    lines = []
    pad = " " * len(label)
    for r in range(0, len(cells), per_row):
        t = Text(label if r == 0 else pad)
        row = "".join(cells[r:r + per_row])
        i = 0
        while i < len(row):                       # one span per run of equal cells (cheap to draw)
            j = i + 1
            while j < len(row) and row[j] == row[i]:
                j += 1
            t.append(row[i:j], STYLES[row[i]])
            i = j
        lines.append(t)
        if marks is not None:
            m = [" "] * min(per_row, len(cells) - r)
            for pos, ch in marks.items():
                if r <= pos < r + per_row:
                    m[pos - r] = ch if m[pos - r] == " " else "*"
            if any(ch != " " for ch in m):
                lines.append(Text(pad + "".join(m), "bold"))
    return lines


def ring_marks(p: RingPicture, k: int) -> dict[int, str]:
    """Marker per ring cell: a avail.idx, l last_avail, u used.idx, r last_used (reclaim),
    e used_event, v avail_event; '*' where several meet."""
    marks: dict[int, str] = {}
    mask = p.num - 1
    items = [("r", p.last_used), ("u", p.used_idx), ("l", p.last_avail), ("a", p.avail_idx)]
    if p.event_idx:
        items += [("e", p.used_event), ("v", p.avail_event)]
    for ch, idx in items:
        pos = (idx & mask) // k
        marks[pos] = ch if marks.get(pos, ch) == ch else "*"
    return marks


def ring_text(p: RingPicture, title: str, width: int = 100) -> Text:
    """A frozen, plain-text-friendly picture of one ring: a header line, the descriptor strip, the
    ring strip with its markers, the suppression state, and any problems found."""
    per_row = 64 if width >= 72 else 32
    k = 1
    while p.num // k > 2 * per_row:
        k *= 2
    c = p.counts()
    head = Text(f"{title}  N={p.num}", "bold")
    head.append(f"  avail.idx {p.avail_idx}  last_avail {p.last_avail}  used.idx {p.used_idx}  "
                f"last_used {p.last_used}")
    lines = [head]
    lines.append(Text(f"  free {c[FREE]}  avail {c[AVAIL]}  in device {c[DEVICE]}  used {c[USED]}"
                      + (f"  broken {c[BROKEN]}" if c[BROKEN] else "")
                      + (f"  (1 cell = {k} slots)" if k > 1 else "")))
    lines += _strip(_group(p.desc, k), per_row, "  desc ")
    lines += _strip(_group(p.ring, k), per_row, "  ring ", ring_marks(p, k))
    if p.event_idx:
        sup = (f"  EVENT_IDX  used_event {p.used_event} (irq once used.idx passes it)  "
               f"avail_event {p.avail_event} (kick once avail.idx does)")
    else:
        sup = (f"  flags: avail {'NO_INTERRUPT' if p.avail_flags & VRING_AVAIL_F_NO_INTERRUPT else '0'}"
               f", used {'NO_NOTIFY' if p.used_flags & VRING_USED_F_NO_NOTIFY else '0'}")
    lines.append(Text(sup))
    for why in p.notes[:3]:
        lines.append(Text(f"  ~ {why}", "dim"))
    for why in p.problems[:4]:
        lines.append(Text(f"  ! {why}", "bold red"))
    if len(p.problems) > 4:
        lines.append(Text(f"  ! ... and {len(p.problems) - 4} more", "bold red"))
    return Text("\n").join(lines)


def ring_legend() -> Text:
    t = Text("cells: ")
    for s in (FREE, AVAIL, DEVICE, USED, BROKEN):
        t.append(s, STYLES[s])
        t.append(f" {NAMES[s]}  ")
    t.append("\nmarks under the ring strip: a avail.idx  l last_avail (device)  u used.idx  "
             "r last_used (driver)  e used_event  v avail_event  * several")
    return t
