"""Property tests: random interleavings of both ring halves against a plain reference model.

Checked after every step: no token lost or duplicated, tokens come back in used order with the
length the device wrote, chains carry what was added, num_free + descriptors in flight == N,
indirect tables are freed; kicks and interrupts are suppressed exactly when the spec says
(reference: "the event index lies in the window just published", enumerated, not the formula),
with and without EVENT_IDX, starting near the 16-bit wrap.
"""
import struct
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from guest.ram import GuestRAM
from guest.virtqueue import VirtQueue
from host.vhost_vq import VhostVirtqueue

U16 = 0xFFFF

op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("pop")),
    st.tuples(st.just("use"), st.integers(1, 4), st.booleans()),
    st.tuples(st.just("get")),
    st.tuples(st.just("kick")),
    st.tuples(st.just("signal")),
    st.tuples(st.just("disable_cb")),
    st.tuples(st.just("enable_cb")),
    st.tuples(st.just("enable_cb_delayed")),
    st.tuples(st.just("disable_notify")),
    st.tuples(st.just("enable_notify")),
    st.tuples(st.just("reset")),
)


def in_window(event, old, new):
    """Reference: was entry `event` among those published in [old, new) (mod 2^16)?"""
    return any((old + j) & U16 == event for j in range((new - old) & U16))


class World:
    def __init__(self, num, event_idx, indirect, start):
        self.ram = GuestRAM("p", 1 << 18, buf=bytearray(1 << 18))
        self.mem = self.ram.mem
        self.num, self.event_idx, self.indirect, self.start = num, event_idx, indirect, start
        self.bufs = self.ram.alloc.alloc(4096)
        self.fresh(start)

    def fresh(self, start):
        mem = self.mem
        if hasattr(self, "vq"):
            self.vq.close()
            VirtQueue.free_rings(self.ram, self.vq.desc, self.vq.avail, self.vq.used)
        d, a, u = VirtQueue.alloc_rings(self.ram, self.num)
        self.baseline = self.ram.alloc.in_use
        self.vq = VirtQueue(mem, 0, self.num, d, a, u, event_idx=self.event_idx,
                            indirect=self.indirect, alloc=self.ram.alloc if self.indirect else None)
        self.h = VhostVirtqueue(0)
        h = self.h
        h.num, h.desc, h.avail, h.used = self.num, d, a, u
        h.event_idx, h.indirect = self.event_idx, self.indirect
        # start both sides at `start`, consistently
        self.vq.avail_idx_shadow = self.vq.last_used_idx = start
        mem.write(a + 2, struct.pack("<H", start))
        mem.write(u + 2, struct.pack("<H", start))
        h.last_avail_idx = h.last_used_idx = start
        # reference model
        self.next_token = getattr(self, "next_token", 0)
        self.inflight = {}            # token -> (n_out, n_in, descs used)
        self.avail_q = deque()        # tokens published, not yet popped by the device
        self.popped = deque()         # (head, token, in_len) popped, not yet used
        self.used_q = deque()         # (token, len) used, not yet returned by get_buf
        self.returned = getattr(self, "returned", set())   # survives resets
        self.added_since_kick = 0
        self.cb_enabled = True
        self.used_event = 0           # what the driver last wrote there (EVENT_IDX)
        self.ref_signalled = None     # used index at the last signal decision (EVENT_IDX)
        self.dev_notify_enabled = True

    def u16(self, gpa):
        return struct.unpack("<H", self.mem.read(gpa, 2))[0]

    # --- the steps ---------------------------------------------------------------------------
    def step(self, o):
        vq, h, mem, num = self.vq, self.h, self.mem, self.num
        kind = o[0]
        if kind == "add":
            n_out, n_in = o[1], o[2]
            if n_out + n_in == 0:
                return
            tok = ("t", self.next_token)
            out = [(self.bufs + 16 * k, 1 + k) for k in range(n_out)]
            inn = [(self.bufs + 512 + 16 * k, 8 + k) for k in range(n_in)]
            free_before = vq.num_free
            ok = vq.add_sgs(out, inn, tok)
            total = n_out + n_in
            if not ok:
                assert vq.num_free == free_before < total
                return
            self.next_token += 1
            descs = free_before - vq.num_free
            assert descs == (1 if (self.indirect and total > 1) else total)
            self.inflight[tok] = (n_out, n_in, descs)
            self.avail_q.append(tok)
            self.added_since_kick += 1
        elif kind == "pop":
            c = h.get_vq_desc(mem)
            if not self.avail_q:
                assert c is None
                return
            tok = self.avail_q.popleft()
            n_out, n_in, _ = self.inflight[tok]
            assert c.out_len == sum(1 + k for k in range(n_out))
            assert c.in_len == sum(8 + k for k in range(n_in))
            self.popped.append((c.head, tok, c.in_len))
        elif kind == "use":
            k = min(o[1], len(self.popped))
            batch = [self.popped.popleft() for _ in range(k)]
            if not batch:
                return
            if o[2]:
                h.add_used_n(mem, [(hd, ln) for hd, _, ln in batch])
            else:
                for hd, _, ln in batch:
                    h.add_used(mem, hd, ln)
            self.used_q.extend((tok, ln) for _, tok, ln in batch)
        elif kind == "get":
            r = vq.get_buf()
            if not self.used_q:
                assert r is None
                return
            assert r == self.used_q.popleft()
            tok = r[0]
            assert tok not in self.returned
            self.returned.add(tok)
            del self.inflight[tok]
            if self.event_idx and self.cb_enabled:
                self.used_event = vq.last_used_idx
        elif kind == "kick":
            new = vq.avail_idx_shadow
            old = (new - self.added_since_kick) & U16
            if self.event_idx:
                want = in_window(self.u16(vq.used + 4 + 8 * num), old, new)
            else:
                want = not (self.u16(vq.used) & 1)
            assert vq.kick_prepare() == want
            self.added_since_kick = 0
        elif kind == "signal":
            new = h.last_used_idx
            if self.event_idx:
                prev = self.ref_signalled
                want = prev is None or in_window(self.u16(vq.avail + 4 + 2 * num), prev, new)
                self.ref_signalled = new
            else:
                want = not (self.u16(vq.avail) & 1)
            assert h.signal(mem) == want
        elif kind == "disable_cb":
            vq.disable_cb()
            self.cb_enabled = False
        elif kind == "enable_cb":
            raced = self.u16(vq.used + 2) != vq.last_used_idx
            assert vq.enable_cb() == (not raced)
            self.cb_enabled = True
            if self.event_idx:
                self.used_event = vq.last_used_idx
        elif kind == "enable_cb_delayed":
            last = vq.last_used_idx
            bufs = ((vq.avail_idx_shadow - last) & U16) * 3 // 4
            pending = (self.u16(vq.used + 2) - last) & U16
            assert vq.enable_cb_delayed() == (pending <= bufs)
            self.cb_enabled = True
            if self.event_idx:
                self.used_event = (last + bufs) & U16
        elif kind == "disable_notify":
            h.disable_notify(mem)
            self.dev_notify_enabled = False
        elif kind == "enable_notify":
            was_disabled = not self.dev_notify_enabled
            raced = self.u16(vq.avail + 2) != h.last_avail_idx
            assert h.enable_notify(mem) == (was_disabled and raced)
            self.dev_notify_enabled = True
            if self.event_idx and was_disabled:
                assert self.u16(vq.used + 4 + 8 * num) == h.last_avail_idx
        elif kind == "reset":
            # device reset: the driver reclaims every buffer it still owns (detach_unused_buf)
            got = []
            while (t := vq.detach_unused_buf()) is not None:
                got.append(t)
            assert sorted(got) == sorted(self.inflight)
            assert len(got) == len(set(got))
            self.returned.update(got)
            assert vq.num_free == num
            assert self.ram.alloc.in_use == self.baseline
            self.fresh(self.start)
            return
        self.check()

    def check(self):
        vq, mem, num = self.vq, self.mem, self.num
        descs = sum(d for _, _, d in self.inflight.values())
        assert vq.num_free + descs == num
        assert vq.in_flight() == len(self.inflight)
        assert not vq.broken
        # flags/event words the driver publishes
        if self.event_idx:
            assert self.u16(vq.avail) == 0
            assert self.u16(vq.avail + 4 + 2 * num) == self.used_event
        else:
            assert self.u16(vq.avail) == (0 if self.cb_enabled else 1)
            assert self.u16(vq.used) == (0 if self.dev_notify_enabled else 1)
        assert self.u16(vq.avail + 2) == vq.avail_idx_shadow
        if not self.inflight:
            assert self.ram.alloc.in_use == self.baseline

    def drain(self):
        """Finish everything: every token added comes back exactly once."""
        while self.avail_q:
            self.step(("pop",))
        self.step(("use", len(self.popped) or 1, True))
        while self.used_q:
            self.step(("get",))
        assert not self.inflight
        assert self.vq.num_free == self.num


@settings(max_examples=120, deadline=None, database=None)
@given(num=st.sampled_from([1, 2, 4, 8]), event_idx=st.booleans(), indirect=st.booleans(),
       start=st.one_of(st.just(0), st.integers(65520, 65535), st.integers(0, 65535)),
       ops=st.lists(op, max_size=80))
def test_random_interleavings(num, event_idx, indirect, start, ops):
    w = World(num, event_idx, indirect, start)
    for o in ops:
        w.step(o)
    w.drain()
    assert w.returned == {("t", k) for k in range(w.next_token)} - set(w.inflight)


@settings(max_examples=40, deadline=None, database=None)
@given(start=st.integers(65400, 65535), num=st.sampled_from([2, 4]), event_idx=st.booleans(),
       rounds=st.integers(100, 300))
def test_wraparound_round_trips(start, num, event_idx, rounds):
    """Many full round trips across 65535 -> 0: indices stay consistent on both sides."""
    w = World(num, event_idx, False, start)
    for _ in range(rounds):
        w.step(("add", 1, 1))
        w.step(("kick",))
        w.step(("pop",))
        w.step(("use", 1, False))
        w.step(("signal",))
        w.step(("get",))
    assert w.vq.last_used_idx == (start + rounds) & U16 == w.u16(w.vq.used + 2)
    assert w.h.last_avail_idx == (start + rounds) & U16


def test_in_window_reference():
    assert in_window(5, 4, 6) and not in_window(6, 4, 6)
    assert in_window(0, 65535, 1) and not in_window(1, 65535, 1)
    assert not in_window(3, 3, 3)
