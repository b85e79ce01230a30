"""Issue 8 item 8 across processes: a guest that advertises a 4 GiB buf_alloc and never consumes
rx must not make its device process buffer what a host program pumps into the bridge."""
import pytest

from tests.abuse_rss import measure

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

LIMIT_MIB = 64


def test_hoarding_guest_does_not_grow_the_device_process(run_dir):
    r = measure(run_dir, seconds=4.0)
    assert r["reply"].startswith("OK "), r
    assert "accepted" in r["app"], r
    assert r["device_alive"], r
    # Without the clamp and the bridge's backpressure the device grew ~20 MiB/s here.
    assert r["growth_mib"] < LIMIT_MIB, r
    assert r["pumped_mib"] < LIMIT_MIB, r
