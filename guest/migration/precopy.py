"""The pre-copy decision (QEMU migration/ram.c + migration.c), pure: which pages go in each round
and when to stop and copy.

    pc = Precopy(all_pages, downtime_ms=300, max_rounds=30)
    pages = pc.first_round()                     # round 1: every page of guest RAM
    ... send them; pc.round_sent(len(pages), seconds)
    step = pc.next_round(guest_dirty, device_dirty)   # the two logs synced since the last round
    step.final False: send step.pages, round_sent(...), next_round(...) again
    step.final True : pause the guest, stop the rings, sync both logs once more and send
                      pc.final_pages(guest_dirty, device_dirty) with the device state

Stopping rule (migration_iteration_run / migration_completion): the pages still to send, at the
bandwidth the last rounds achieved, fit in the downtime budget; or the round limit is reached
(QEMU has no round limit; ours makes a guest that dirties faster than the link converge anyway,
with a longer downtime, counted). Pages dirtied again before they were sent are sent once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PAGE_SIZE = 4096


@dataclass
class Step:
    round: int                  # the round these pages form (1 = all RAM)
    pages: list[int]            # page numbers (gpa >> 12), ascending
    final: bool                 # stop and copy: pause first, then send these and what the last sync adds
    expected_ms: float          # the downtime sending them would take at the measured bandwidth


@dataclass
class RoundStat:
    round: int
    sent: int = 0               # pages sent in the round
    guest_dirty: int = 0        # pages the guest's memory object logged before the round
    device_dirty: int = 0       # pages the vhost dirty log held before the round
    seconds: float = 0.0


@dataclass
class Precopy:
    all_pages: list[int]
    downtime_ms: float = 300.0
    max_rounds: int = 30
    page_size: int = PAGE_SIZE
    rounds: list[RoundStat] = field(default_factory=list)
    bandwidth: float = 0.0      # bytes per second, of the last round that took measurable time
    guest_total: int = 0        # pages logged by the guest over the whole migration
    device_total: int = 0       # pages logged by the device
    done: bool = False

    def __post_init__(self) -> None:
        if self.downtime_ms <= 0:
            raise ValueError("the downtime budget must be positive")
        if self.max_rounds < 1:
            raise ValueError("at least one round")

    def first_round(self) -> Step:
        self.rounds.append(RoundStat(1))
        return Step(1, sorted(self.all_pages), False, self.expected_ms(len(self.all_pages)))

    def round_sent(self, pages: int, seconds: float) -> None:
        """The runner sent the current round's `pages` in `seconds`: the bandwidth estimate."""
        r = self.rounds[-1]
        r.sent, r.seconds = pages, seconds
        if pages and seconds > 0:
            self.bandwidth = pages * self.page_size / seconds

    def expected_ms(self, pages: int) -> float:
        if not pages:
            return 0.0
        if self.bandwidth <= 0:
            return float("inf")          # nothing measured yet: no stop before round 1 ends
        return pages * self.page_size / self.bandwidth * 1000.0

    def _count(self, guest_dirty, device_dirty) -> list[int]:
        self.guest_total += len(guest_dirty)
        self.device_total += len(device_dirty)
        return sorted(set(guest_dirty) | set(device_dirty))

    def next_round(self, guest_dirty, device_dirty) -> Step:
        """After a round: the dirty pages both logs reported since it began -> the next step."""
        if self.done:
            raise RuntimeError("the migration already stopped and copied")
        pages = self._count(guest_dirty, device_dirty)
        n = len(self.rounds) + 1
        self.rounds.append(RoundStat(n, guest_dirty=len(guest_dirty), device_dirty=len(device_dirty)))
        ms = self.expected_ms(len(pages))
        final = ms <= self.downtime_ms or n >= self.max_rounds
        self.done = final
        return Step(n, pages, final, ms)

    def final_pages(self, pending: list[int], guest_dirty, device_dirty) -> list[int]:
        """Stop and copy: what the final step held plus what the logs gained until the pause."""
        extra = self._count(guest_dirty, device_dirty)
        r = self.rounds[-1]
        r.guest_dirty += len(guest_dirty)
        r.device_dirty += len(device_dirty)
        return sorted(set(pending) | set(extra))

    def summary(self) -> dict:
        return {"rounds": len(self.rounds), "bandwidth": self.bandwidth,
                "guest_dirty": self.guest_total, "device_dirty": self.device_total,
                "per_round": [vars(r).copy() for r in self.rounds]}
