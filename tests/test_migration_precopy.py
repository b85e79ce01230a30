"""The pre-copy decision (guest/migration/precopy.py), in one process."""
import pytest

from guest.migration.precopy import Precopy


def test_first_round_sends_all_ram_and_never_stops_before_a_bandwidth_is_known():
    pc = Precopy(list(range(100, 0, -1)))
    s = pc.first_round()
    assert s.round == 1 and s.pages == list(range(1, 101)) and not s.final
    assert pc.expected_ms(1) == float("inf")


def test_stops_when_the_dirty_set_fits_the_downtime_budget():
    pc = Precopy(list(range(10000)), downtime_ms=300)
    pc.first_round()
    pc.round_sent(10000, 1.0)                 # 10000 pages/s: 300 ms = 3000 pages
    s = pc.next_round(set(range(5000)), set(range(4000, 6000)))
    assert s.round == 2 and not s.final and len(s.pages) == 6000      # a page dirty in both: once
    pc.round_sent(6000, 0.6)
    s = pc.next_round({1, 2}, {3})
    assert s.final and s.pages == [1, 2, 3] and s.expected_ms == pytest.approx(0.3)
    assert pc.final_pages(s.pages, {7}, {3, 9}) == [1, 2, 3, 7, 9]
    assert pc.guest_total == 5000 + 2 + 1 and pc.device_total == 2000 + 1 + 2
    with pytest.raises(RuntimeError):
        pc.next_round(set(), set())


def test_round_limit_stops_a_guest_that_dirties_faster_than_the_link():
    pc = Precopy(list(range(1000)), downtime_ms=1, max_rounds=3)
    pc.first_round()
    pc.round_sent(1000, 1.0)
    assert not pc.next_round(set(range(900)), set()).final
    pc.round_sent(900, 0.9)
    s = pc.next_round(set(range(900)), set())
    assert s.final and s.round == 3 and s.expected_ms > 1


def test_bad_budget_refused():
    with pytest.raises(ValueError):
        Precopy([1], downtime_ms=0)


def test_a_guest_on_packed_rings_is_refused_and_runs_on():
    """The migrated queue state is the split ring's (guest/migration/vmstate.py): a guest whose
    device uses packed rings is refused before anything starts (the monitor answers the error)."""
    from types import SimpleNamespace

    from guest.migration.source import Migration
    split, packed = SimpleNamespace(packed=False), SimpleNamespace(packed=True)
    vm = SimpleNamespace(vdev=SimpleNamespace(vqs=[split, split]),
                         devices=[SimpleNamespace(vdev=SimpleNamespace(vqs=[split, packed]))])
    with pytest.raises(ValueError, match="packed rings"):
        Migration(vm, "unix:/tmp/nowhere")
    vm.devices[0].vdev.vqs = [split, split]
    assert Migration(vm, "unix:/tmp/nowhere").info["status"] == "setup"
