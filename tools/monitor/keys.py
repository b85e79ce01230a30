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
