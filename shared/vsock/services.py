"""Built-in vsock services (inetd's small servers, and two for measuring) and user functions,
written once for the guest (GuestVsock) and the host's device processes (HostVsock).

Theory of operation
-------------------
Each service is a listener thread on a port of a vsock family (shared/vsock/socket.py) that
accepts connections and starts one thread per connection (inetd's "nowait" mode). Services read
in RECV_SIZE (64 KiB) chunks, into one buffer per connection (recv_into):

    echo     RFC 862  send back every byte received, until the peer closes
    discard  RFC 863  read and throw away everything, until the peer closes
    chargen  RFC 864  send the rotating 72-character printable-ASCII line pattern until the
                      peer closes (what the peer sends is thrown away)
    sink              read and throw away everything until EOF, then send the decimal count of
                      bytes received and "\n", and close
    source            read one line "<n> <write_size>\n" (decimal, n >= 0, write_size >= 1),
                      then send the first n bytes of `source_pattern` (chargen's cycle,
                      repeated) in writes of write_size bytes, and close. A malformed line
                      (or EOF before the newline, or no newline within 64 bytes): close
                      without sending anything.

A service is named by a spec `name=port` ("echo=1234"; a bare name uses the RFC's port:
echo 7, discard 9, chargen 19; sink and source need a port), parsed by `parse_service`.
`Service.stop()` closes the listener and every open connection, which wakes their threads
(EBADF) and ends them.

`run_user_function("pkg.module:function", vsock)` imports `pkg.module`, looks up `function`
and runs `function(vsock)` in a daemon thread. A failure to import, look up or run is logged
and kept on the thread (`.error`), never raised into the caller.
"""
from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass

from shared.constants import VMADDR_CID_ANY, VMADDR_PORT_ANY

log = logging.getLogger(__name__)

RECV_SIZE = 64 * 1024      # services read in large chunks
CHARGEN_LINE = 72          # RFC 864: 72 characters per line, then CR LF
_PRINTABLE = bytes(range(32, 127))    # the 95 printable ASCII characters
SOURCE_LINE_MAX = 64       # the source request line "<n> <write_size>\n", bounded
SOURCE_MAX_BYTES = 1 << 48
SOURCE_MAX_WRITE = 16 << 20


def chargen_line(i: int) -> bytes:
    """Line i of the RFC 864 pattern: 72 printable characters starting at offset i mod 95."""
    k = i % len(_PRINTABLE)
    doubled = _PRINTABLE + _PRINTABLE
    return doubled[k:k + CHARGEN_LINE] + b"\r\n"


def chargen_pattern(lines: int, start: int = 0) -> bytes:
    """`lines` consecutive lines of the pattern, from line `start`."""
    return b"".join(chargen_line(start + i) for i in range(lines))


# One full cycle of the pattern (95 lines); chargen sends it over and over.
CHARGEN_CYCLE = chargen_pattern(len(_PRINTABLE))


def source_pattern(n: int, offset: int = 0) -> bytes:
    """Bytes offset..offset+n of the `source` service's stream: CHARGEN_CYCLE repeated."""
    c = len(CHARGEN_CYCLE)
    k = offset % c
    reps = (k + n) // c + 1
    return (CHARGEN_CYCLE * reps)[k:k + n]


def parse_source_request(line: bytes) -> tuple[int, int] | None:
    """"<n> <write_size>" (no newline) -> (n, write_size), or None when malformed."""
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        return None
    if len(words) != 2 or not all(w.isascii() and w.isdigit() for w in words):
        return None
    n, ws = int(words[0]), int(words[1])
    if n > SOURCE_MAX_BYTES or not 1 <= ws <= SOURCE_MAX_WRITE:
        return None
    return n, ws


# --- per-connection handlers (one thread each) ---------------------------------------------
def _echo(conn, stop: threading.Event) -> None:
    buf = bytearray(RECV_SIZE)
    mv = memoryview(buf)
    while not stop.is_set():
        n = conn.recv_into(buf)
        if not n:
            return
        conn.sendall(mv[:n])


def _discard(conn, stop: threading.Event) -> None:
    buf = bytearray(RECV_SIZE)
    while not stop.is_set():
        if not conn.recv_into(buf):
            return


def _sink(conn, stop: threading.Event) -> None:
    buf = bytearray(RECV_SIZE)
    total = 0
    while not stop.is_set():
        n = conn.recv_into(buf)
        if not n:
            conn.sendall(b"%d\n" % total)
            return
        total += n


def _source(conn, stop: threading.Event) -> None:
    line = b""
    while b"\n" not in line:
        if len(line) >= SOURCE_LINE_MAX or stop.is_set():
            return
        chunk = conn.recv(SOURCE_LINE_MAX - len(line))
        if not chunk:
            return                          # EOF before the request: nothing to send
        line += chunk
    req = parse_source_request(line[:line.index(b"\n")])
    if req is None:
        log.debug("source: malformed request %r", line[:SOURCE_LINE_MAX])
        return                              # malformed: close without sending
    n, ws = req
    # One buffer holding every write's bytes at any phase of the cycle: write i is
    # pattern[off % cycle : off % cycle + size], a view, never a copy.
    c = len(CHARGEN_CYCLE)
    mv = memoryview(source_pattern(min(n, ws) + c))
    off = 0
    while off < n and not stop.is_set():
        size = min(ws, n - off)
        k = off % c
        conn.sendall(mv[k:k + size])
        off += size


def _drain(conn) -> None:
    """Read and throw away whatever the peer sent, without waiting."""
    conn.setblocking(False)
    try:
        while conn.recv(RECV_SIZE):
            pass
    except BlockingIOError:
        pass
    finally:
        conn.setblocking(True)


def _chargen(conn, stop: threading.Event) -> None:
    # The pattern restarts cleanly every 95 lines, so the cycle can be sent as is.
    # RFC 864: "any data received is thrown away" (so the peer's credit keeps flowing).
    while not stop.is_set():
        _drain(conn)
        conn.sendall(CHARGEN_CYCLE)


HANDLERS = {"echo": _echo, "discard": _discard, "chargen": _chargen, "sink": _sink,
            "source": _source}
DEFAULT_PORTS = {"echo": 7, "discard": 9, "chargen": 19}


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    port: int


def parse_service(spec: str) -> ServiceSpec:
    """Parse "name=port" (or a bare "name" for the RFC port). ValueError says what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty service spec {spec!r}: expected NAME=PORT, NAME one of "
                         f"{', '.join(HANDLERS)}")
    name, sep, port_s = spec.strip().partition("=")
    name = name.strip().lower()
    if name not in HANDLERS:
        raise ValueError(f"unknown service {name!r} in {spec!r}: expected one of "
                         f"{', '.join(HANDLERS)}")
    if not sep:
        if name not in DEFAULT_PORTS:
            raise ValueError(f"service {name!r} has no well-known port: give one, {name}=PORT")
        return ServiceSpec(name, DEFAULT_PORTS[name])
    port_s = port_s.strip()
    if not port_s:
        raise ValueError(f"service spec {spec!r} has no port after '='")
    if not (port_s.isascii() and port_s.isdigit()):
        raise ValueError(f"service port {port_s!r} in {spec!r} is not a decimal number")
    port = int(port_s, 10)
    if not 0 <= port < VMADDR_PORT_ANY:
        raise ValueError(f"service port {port} in {spec!r} is out of range 0..{VMADDR_PORT_ANY - 1}")
    return ServiceSpec(name, port)


class Service:
    """One listening service: a listener thread and a thread per connection."""

    def __init__(self, vsock, spec: ServiceSpec | str, *, backlog: int = 128):  # SOMAXCONN of the era
        if isinstance(spec, str):
            spec = parse_service(spec)
        self.spec = spec
        self.name = spec.name
        self.vsock = vsock
        self._handler = HANDLERS[spec.name]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set = set()
        self._threads: list[threading.Thread] = []
        self.connections = 0          # accepted so far
        self.errors = 0               # connections that ended with an error
        self.listener = vsock.create_server(spec.port, backlog)
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"vsock-{self.name}-{self.port}")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError as e:
                if not self._stop.is_set():
                    log.warning("%s:%d accept failed: %s", self.name, self.port, e)
                return
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
                self.connections += 1
                t = threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                                     name=f"vsock-{self.name}-{peer[0]}:{peer[1]}")
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
                t.start()       # under the lock: stop() never sees (and joins) a thread not started

    def _serve(self, conn, peer) -> None:
        try:
            self._handler(conn, self._stop)
        except OSError as e:
            # the peer went away (EPIPE, ECONNRESET) or stop() closed the socket (EBADF)
            if not self._stop.is_set():
                self.errors += 1
                log.debug("%s connection from %s ended: %s", self.name, peer, e)
        except Exception:
            self.errors += 1
            log.exception("%s connection from %s failed", self.name, peer)
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            c.close()
        self._thread.join(timeout)
        for t in threads:
            t.join(timeout)

    def __repr__(self) -> str:
        return f"<Service {self.name} port {self.port} connections {self.connections}>"


def start_service(vsock, spec: ServiceSpec | str) -> Service:
    """Start one service from a spec ("echo=1234")."""
    return Service(vsock, spec)


def start_services(vsock, specs) -> list[Service]:
    """Start every spec; on a failure the ones already started are stopped again."""
    parsed = [s if isinstance(s, ServiceSpec) else parse_service(s) for s in specs]
    started: list[Service] = []
    try:
        for spec in parsed:
            started.append(Service(vsock, spec))
    except BaseException:
        for s in started:
            s.stop()
        raise
    return started


class UserTask(threading.Thread):
    """A user function running with the GuestVsock; `error` holds what it raised, if anything."""

    def __init__(self, target_spec: str, vsock):
        super().__init__(daemon=True, name=f"user-{target_spec}")
        self.target_spec = target_spec
        self.vsock = vsock
        self.result = None
        self.error: BaseException | None = None

    def stop(self, timeout: float = 0.0) -> None:
        """A user function cannot be interrupted; wait up to `timeout` for it (it is a daemon)."""
        self.join(timeout)

    def run(self) -> None:
        try:
            fn = resolve_function(self.target_spec)
            self.result = fn(self.vsock)
        except BaseException as e:  # noqa: BLE001 - a user's failure is logged, not propagated
            self.error = e
            log.exception("user function %s failed", self.target_spec)


def resolve_function(target_spec: str):
    """Import "pkg.module:function" and return the callable (ImportError, AttributeError,
    TypeError or ValueError says what is wrong)."""
    mod_name, sep, fn_name = str(target_spec).partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"user function {target_spec!r} must look like 'pkg.module:function' (MODULE:FUNCTION)")
    module = importlib.import_module(mod_name)
    obj = module
    for part in fn_name.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target_spec!r} is not callable")
    return obj


def check_function(target_spec: str) -> str | None:
    """Validate a --run spec before starting: None if "pkg.module:function" imports and names
    a callable, else a one-line reason."""
    try:
        resolve_function(target_spec)
    except ValueError as e:
        return str(e)
    except ImportError as e:
        return f"cannot import module {str(target_spec).partition(':')[0]!r}: {e}"
    except AttributeError:
        mod, _, fn = str(target_spec).partition(":")
        return f"module {mod!r} has no function {fn!r}"
    except TypeError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - importing user code may raise anything
        return f"importing {target_spec!r} failed: {type(e).__name__}: {e}"
    return None


def run_user_function(target_spec: str, vsock) -> UserTask:
    """Run `function(vsock)` from "pkg.module:function" in a daemon thread; errors are logged."""
    t = UserTask(target_spec, vsock)
    t.start()
    return t


__all__ = ["ServiceSpec", "Service", "parse_service", "start_service", "start_services",
           "run_user_function", "resolve_function", "check_function", "UserTask", "chargen_line",
           "chargen_pattern", "CHARGEN_CYCLE", "source_pattern", "parse_source_request", "HANDLERS",
           "RECV_SIZE", "VMADDR_CID_ANY"]
