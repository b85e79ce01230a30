import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.resources import ours_in_dev_shm  # noqa: E402,F401


@pytest.fixture
def run_dir(tmp_path):
    """A private run directory (0700) per test."""
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    (d / "owners").mkdir(mode=0o700)
    return d


@pytest.fixture
def shm_guard(run_dir):
    """Asserts the test leaves no segment or semaphore of its run dir behind, and no owner record.

    Names of ours carry the run dir's tag (shared.resources.resource_base), so parallel tests
    (pytest -n auto) only ever check their own.
    """
    from shared.resources import reap, run_tag
    tag = run_tag(run_dir)
    yield run_dir
    reap(run_dir)
    owners = [p.read_text() for p in (run_dir / "owners").glob("*.json")]
    assert not owners, f"owner records left: {owners}"
    leaked = [n for n in ours_in_dev_shm() if tag in n]
    assert not leaked, f"leaked in /dev/shm: {leaked}"


@pytest.fixture(scope="module")
def linux_guest():
    """The Debian cloud kernel and base initramfs (tools/linux_guest.py) for the QEMU tests, or a
    skip that says what is missing."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86; see .ci/run)")
    from tools.linux_guest import GuestUnavailable, ensure_guest
    try:
        return ensure_guest()
    except GuestUnavailable as e:
        pytest.skip(f"no Linux guest kernel/initramfs: {e}")
