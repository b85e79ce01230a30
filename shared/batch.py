"""Deferring a notification to the end of a batch (one kick, one interrupt per batch).

Linux's drivers and vhost add many buffers and then decide once whether to notify
(virtqueue_kick_prepare after a burst; vhost_add_used_n then vhost_signal). Our producers emit
packets one at a time from many places (a socket's send loop, replies made while handling a
batch of received packets, the bridge), so the decision is deferred instead:

    with dev.batch:              # any number of nested batches
        ... produce packets; each calls dev.batch.defer(dev.flush_rx) ...
    # the outermost exit runs flush_rx once

Outside a batch, `defer(fn)` runs fn at once, so a producer nobody wrapped still notifies.
Not thread-safe by itself: use it under the lock that guards the producer.
"""
from __future__ import annotations

from typing import Callable


class Batch:
    __slots__ = ("depth", "pending")

    def __init__(self) -> None:
        self.depth = 0
        self.pending: list[Callable[[], object]] = []

    def __enter__(self) -> "Batch":
        self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if not self.depth and self.pending:
            fns, self.pending = self.pending, []
            for fn in fns:
                fn()

    def defer(self, fn: Callable[[], object]) -> None:
        if not self.depth:
            fn()
        elif fn not in self.pending:
            self.pending.append(fn)
