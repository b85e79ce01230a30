"""The loopback backend: every frame the guest sends comes back to it (a reflector).

A bounded queue stands for the socket's buffers: send returns False when `capacity` frames wait
(the seed's wmem >= sndbuf), writable() once they drained below half (wmem < sndbuf / 2),
send_queue() gives both for handle_tx's three-quarters check.
`paused` stops the reader side, so tests can fill it up the way a stalled peer does.
"""
from __future__ import annotations

from collections import deque


class Loopback:
    vnet_hdr = False

    def __init__(self, capacity: int = 256, name: str = "loopback"):
        self.name = name
        self.capacity = capacity
        self.queue: deque[bytes] = deque()
        self.paused = False
        self.sent = 0
        self.wakeup = None          # set by the runner: the device's backend_readable

    def send(self, frame) -> bool:
        if len(self.queue) >= self.capacity:
            return False
        self.queue.append(bytes(frame))
        self.sent += 1
        if self.wakeup is not None:
            self.wakeup()
        return True

    def recv(self):
        if self.paused or not self.queue:
            return None
        return self.queue.popleft()

    def writable(self) -> bool:
        return len(self.queue) < self.capacity // 2 or not self.queue

    def send_queue(self) -> tuple[int, int]:
        """(wmem, sndbuf) in frames: the device stops tx at three quarters (handle_tx)."""
        return len(self.queue), self.capacity

    def readable(self) -> bool:
        return bool(self.queue) and not self.paused

    def close(self) -> None:
        self.queue.clear()


class Sink(Loopback):
    """A backend that collects what the guest sends and injects what a test gives it."""

    def __init__(self, capacity: int = 1 << 30, name: str = "sink"):
        super().__init__(capacity, name)
        self.inbox: deque[bytes] = deque()     # frames for the guest

    def recv(self):
        return self.inbox.popleft() if self.inbox and not self.paused else None

    def readable(self) -> bool:
        return bool(self.inbox) and not self.paused
