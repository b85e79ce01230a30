"""Single keys from the terminal, for switching views while the monitor runs.

rich renders but cannot read keys, and Textual is not installed here (and would replace the
whole rendering model for four keys), so this is a small reader: the terminal in cbreak mode
(no echo, no line buffering; signals still work, so Ctrl-C quits) and one daemon thread that
select()s on stdin and queues each key. The terminal mode is restored on exit. Without a
terminal on stdin (a pipe, a test) there is no reader and the flags alone choose the view.
"""
from __future__ import annotations

import os
import queue
import select
import sys
import threading


class KeyReader:
    def __init__(self, stream=None):
        self.stream = stream or sys.stdin
        self.keys: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._saved = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def available(stream=None) -> bool:
        stream = stream or sys.stdin
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    def __enter__(self) -> "KeyReader":
        import termios
        import tty
        fd = self.stream.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        self._thread = threading.Thread(target=self._run, args=(fd,), name="monitor-keys", daemon=True)
        self._thread.start()
        return self

    def _run(self, fd: int) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                try:
                    data = os.read(fd, 32)
                except OSError:
                    return
                for ch in data.decode(errors="ignore"):
                    self.keys.put(ch)

    def get(self) -> str | None:
        try:
            return self.keys.get_nowait()
        except queue.Empty:
            return None

    def __exit__(self, *exc) -> None:
        import termios
        self._stop.set()
        if self._thread is not None:
            self._thread.join(0.5)
        if self._saved is not None:
            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved)


VIEW_KEYS = {"q": "queues", "r": "ring", "c": "conns", "n": "net"}
QUIT_KEYS = ("x", "\x1b")


def apply_key(key: str, view: str, guest: int | None, cids: list[int]):
    """What a key does (pure): "quit", None for a key that is not ours, else the new (view, guest).

    q r c n switch the view; g moves to the next guest of `cids` (from the first when the current
    one is gone or none is chosen), in every view, the ring view included; a shows all guests again
    (the ring view draws one guest's rings: there a keeps the guest)."""
    if key in QUIT_KEYS:
        return "quit"
    if key in VIEW_KEYS:
        return VIEW_KEYS[key], guest
    if key == "g":
        if not cids:
            return view, guest
        return view, (cids[(cids.index(guest) + 1) % len(cids)] if guest in cids else cids[0])
    if key == "a":
        return view, (guest if view == "ring" else None)
    return None
