"""Plant mutants one at a time in temporary copies of a tree and run their related tests.

The checkout the tool runs from is never written: each job gets its own copy (the files git
tracks, plus untracked ones it does not ignore; a plain copy outside git), a mutant is written
into that copy, its tests run there (cwd and PYTHONPATH = the copy, no bytecode written, so a
restored file can never be shadowed by a mutant's .pyc), and the original text is put back
before the next mutant. The copies are removed at the end, also on Ctrl-C.

Statuses: killed (a related test failed), timeout (the run passed --timeout: counted as killed,
and shown as such), survived (every related test passed), stale (the original snippet does not
occur exactly once any more: counted against the score until the catalog is updated), error (the
test ids did not collect: counted against), equivalent (explained in the catalog, not run, out of
the denominator), interrupted (Ctrl-C; out of the score).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

KILLED, TIMEOUT, SURVIVED, STALE, ERROR, EQUIVALENT, INTERRUPTED = (
    "killed", "timeout", "survived", "stale", "error", "equivalent", "interrupted")
COUNTS_AS_KILLED = (KILLED, TIMEOUT)
OUT_OF_SCORE = (EQUIVALENT, INTERRUPTED)


class CatalogError(ValueError):
    """The catalog is malformed (one line for the user)."""


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    note: str
    equivalent: str = ""        # why the mutant cannot change behaviour (then it is not run)
    timeout: float | None = None


@dataclass
class Result:
    id: str
    file: str
    status: str
    seconds: float = 0.0
    detail: str = ""            # the first failing test, the timeout, why stale/equivalent
    note: str = ""
    tests: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def load_catalog(path: Path) -> list[Mutant]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CatalogError(f"cannot read the catalog {path}: {e}") from None
    entries = data.get("mutant")
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f"{path}: no [[mutant]] entries")
    out: list[Mutant] = []
    seen: set[str] = set()
    for n, e in enumerate(entries, 1):
        where = f"{path}: mutant #{n}"
        if not isinstance(e, dict):
            raise CatalogError(f"{where} is not a table")
        for key in ("id", "file", "original", "replacement", "note"):
            if not isinstance(e.get(key), str) or (key != "replacement" and not e[key]):
                raise CatalogError(f"{where}: '{key}' must be a non-empty string")
        mid = e["id"]
        if mid in seen:
            raise CatalogError(f"{where}: duplicate id {mid!r}")
        seen.add(mid)
        if e["original"] == e["replacement"]:
            raise CatalogError(f"{where} ({mid}): the replacement equals the original")
        tests = e.get("tests", [])
        equivalent = e.get("equivalent", "")
        if not isinstance(tests, list) or not all(isinstance(t, str) and t for t in tests):
            raise CatalogError(f"{where} ({mid}): 'tests' must be a list of test ids")
        if not tests and not equivalent:
            raise CatalogError(f"{where} ({mid}): no related tests (and not marked equivalent)")
        timeout = e.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise CatalogError(f"{where} ({mid}): 'timeout' must be a positive number of seconds")
        out.append(Mutant(mid, e["file"], e["original"], e["replacement"], tuple(tests),
                          e["note"], str(equivalent), timeout))
    return out


# --- the temporary copies --------------------------------------------------------------------------
def _tree_files(root: Path) -> list[str] | None:
    """Files git would call the tree's (tracked, plus untracked not ignored); None outside git."""
    if not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return [p for p in r.stdout.decode().split("\0") if p]


def copy_tree(root: Path, dest: Path) -> None:
    files = _tree_files(root)
    if files is None:
        shutil.copytree(root, dest, dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc",
                                                      ".pytest_cache", ".mutants-*"))
        return
    for rel in files:
        src = root / rel
        if not src.is_file() and not src.is_symlink():
            continue                    # deleted in the working tree
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)


class Runner:
    """Runs mutants in `jobs` private copies of `root`; thread-safe; `stop()` kills what runs."""

    def __init__(self, root: Path, *, jobs: int = 1, timeout: float = 180.0, python: str | None = None,
                 pytest_args: tuple[str, ...] = ()):
        self.root = Path(root).resolve()
        self.jobs = jobs
        self.timeout = timeout
        self.python = python or sys.executable
        self.pytest_args = pytest_args
        self.base = Path(tempfile.mkdtemp(prefix="ve-mutants-"))
        self._free: list[Path] = []
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._stopping = threading.Event()
        for j in range(jobs):
            ws = self.base / f"w{j}"
            ws.mkdir()
            copy_tree(self.root, ws)
            self._free.append(ws)

    # --- workspace checkout ------------------------------------------------------------------
    def _take(self) -> Path:
        with self._lock:
            return self._free.pop()

    def _give(self, ws: Path) -> None:
        with self._lock:
            self._free.append(ws)

    def occurrences(self, m: Mutant) -> int:
        try:
            return (self.root / m.file).read_text().count(m.original)
        except (OSError, UnicodeDecodeError):
            return -1

    # --- running pytest ----------------------------------------------------------------------
    def _env(self, ws: Path) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ws) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONDONTWRITEBYTECODE"] = "1"     # a restored file is never shadowed by a .pyc
        env.pop("PYTEST_ADDOPTS", None)
        env.pop("PYTEST_XDIST_WORKER", None)
        return env

    def run_tests(self, ws: Path, tests, timeout: float, extra: tuple[str, ...] = ()) -> tuple[str, int | None, str]:
        """(outcome, returncode, output tail); outcome is "passed", "failed", "timeout",
        "collect-error" or "interrupted"."""
        cmd = [self.python, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:cacheprovider",
               *self.pytest_args, *extra, *tests]
        log = tempfile.TemporaryFile(dir=self.base)
        try:
            proc = subprocess.Popen(cmd, cwd=ws, env=self._env(ws), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            log.close()
            return "collect-error", None, f"cannot start pytest: {e}"
        with self._lock:
            self._procs.add(proc)
        timed_out = False
        try:
            if self._stopping.is_set():
                _kill_group(proc)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)
            _kill_group(proc, signal.SIGKILL)   # whatever the tests left in their group
            log.seek(0)
            out = log.read().decode(errors="replace")
            log.close()
        rc = proc.returncode
        if self._stopping.is_set():
            return "interrupted", rc, out
        if timed_out:
            return "timeout", rc, out
        if rc == 0:
            return "passed", rc, out
        if rc == 1:
            return "failed", rc, out
        if rc == 2 and "error" in out.lower() and "Interrupted" in out:
            return "failed", rc, out            # a collection error caused by the mutant itself
        return "collect-error", rc, out

    def baseline(self, tests: list[str], timeout: float) -> tuple[bool, str]:
        """Run the related tests on the unmutated copy: they must pass, or no kill means anything."""
        ws = self._take()
        try:
            outcome, rc, out = self.run_tests(ws, tests, timeout)
        finally:
            self._give(ws)
        return outcome == "passed", _tail(out, 30)

    def run_mutant(self, m: Mutant) -> Result:
        res = Result(m.id, m.file, SURVIVED, note=m.note, tests=list(m.tests))
        if m.equivalent:
            res.status, res.detail = EQUIVALENT, m.equivalent
            return res
        if self._stopping.is_set():
            res.status = INTERRUPTED
            return res
        n = self.occurrences(m)
        if n != 1:
            res.status = STALE
            res.detail = ("file missing" if n < 0 else
                          f"original snippet found {n} times (must be exactly once)")
            return res
        ws = self._take()
        path = ws / m.file
        original = path.read_text()
        t0 = time.monotonic()
        try:
            path.write_text(original.replace(m.original, m.replacement, 1))
            timeout = m.timeout or self.timeout
            outcome, rc, out = self.run_tests(ws, m.tests, timeout)
        finally:
            path.write_text(original)
            self._give(ws)
        res.seconds = round(time.monotonic() - t0, 2)
        if outcome == "failed":
            res.status, res.detail = KILLED, _first_failure(out)
        elif outcome == "timeout":
            res.status, res.detail = TIMEOUT, f"tests ran over {timeout:g} s (killed by the timeout)"
        elif outcome == "passed":
            res.status, res.detail = SURVIVED, _tail(out, 1)
        elif outcome == "interrupted":
            res.status = INTERRUPTED
        else:
            res.status, res.detail = ERROR, f"pytest exit {rc}: {_tail(out, 3)}"
        return res

    def stop(self) -> None:
        """Ctrl-C: stop every test run now (the workers then restore their files)."""
        self._stopping.set()
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            _kill_group(p)

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def _kill_group(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return
    if sig == signal.SIGTERM:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def _first_failure(out: str) -> str:
    m = _FAILED.search(out)
    return m.group(1) if m else _tail(out, 1)


def _tail(out: str, n: int) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def score(results: list[Result]) -> tuple[float, dict]:
    """Percent of counted mutants killed (timeouts count as killed; equivalent and interrupted
    ones are out of the denominator; stale, error and survived ones count against)."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    counted = [r for r in results if r.status not in OUT_OF_SCORE]
    killed = sum(1 for r in counted if r.status in COUNTS_AS_KILLED)
    pct = 100.0 * killed / len(counted) if counted else 0.0
    return pct, counts
