"""Issue 8 item 10: NEEDS_RESET / ring-error lines a hostile guest causes are rate-limited."""
import logging

from host.device import VhostDevice
from shared.errors import VringError
from shared.ratelimit import RateLimitedLog


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_first_line_then_counts(caplog):
    clock = Clock()
    rl = RateLimitedLog(10.0, clock=clock)
    log = logging.getLogger("t.rl")
    with caplog.at_level(logging.WARNING, "t.rl"):
        assert rl.log(log, "bad ring")
        for _ in range(1000):
            assert not rl.log(log, "bad ring")
        clock.t = 11.0
        assert rl.log(log, "bad ring")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["bad ring", "bad ring (and 1000 more in the last 11 s)"]
    assert rl.total == 1002


class Dev(VhostDevice):
    device_type = "test"
    num_queues = 1


def test_vq_err_storm_logs_one_line(caplog):
    class Vq:
        def __init__(self, index, name):
            self.index, self.name = index, name

        def reset(self):
            pass

    dev = Dev("t", vq_factory=Vq)
    with caplog.at_level(logging.WARNING, "host.device"):
        for _ in range(500):
            dev.vq_err(dev.vqs[0], VringError(1, "avail.idx too far ahead"))
            dev.reset()
    assert len([r for r in caplog.records if r.name == "host.device"]) == 1
    assert dev.stats["errors"] == 500 and dev.stats["resets"] == 500   # counted, not logged
