import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.resources import ours_in_dev_shm  # noqa: E402


@pytest.fixture
def run_dir(tmp_path):
    """A private run directory (0700) per test."""
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    (d / "owners").mkdir(mode=0o700)
    return d


@pytest.fixture
def shm_guard(run_dir):
    """Asserts that the test leaves no segment or semaphore of its own behind.

    Other tests run in parallel (pytest -n auto), so only names recorded under this test's run dir
    (owner records) and names created while it ran that are still there are checked: the test
    fixture reaps with its own run dir and then compares.
    """
    before = set(ours_in_dev_shm())
    yield run_dir
    from shared.resources import reap
    reap(run_dir)
    owners = list((run_dir / "owners").glob("*.json"))
    assert not owners, f"owner records left: {[p.read_text() for p in owners]}"
    after = set(ours_in_dev_shm())
    leaked = sorted(n for n in after - before if _mine(n, run_dir))
    assert not leaked, f"leaked in /dev/shm: {leaked}"


def _mine(name: str, run_dir: Path) -> bool:
    tokens = (run_dir / "tokens")
    if not tokens.exists():
        return False
    return any(t in name for t in tokens.read_text().split())
