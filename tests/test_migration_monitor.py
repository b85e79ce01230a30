"""The monitor shows a migration in progress (issue 18 item 5)."""
from tests.test_monitor import T0, snapshot, text_of
from tools.monitor import render_view
from tools.monitor.model import build_frame


def migrating(t, status="active"):
    snap = snapshot(t, 100)
    snap[0]["migration"] = {"status": status, "round": 3, "pages_total": 16384, "pages_sent": 16510,
                            "dirty_guest": 9, "dirty_device": 117, "downtime_ms": None if status == "active" else 142.5,
                            "total_ms": None if status == "active" else 1180.2, "error": None,
                            "rounds": [{"round": 1, "sent": 16384, "guest": 0, "device": 0, "ms": 850.0},
                                       {"round": 2, "sent": 126, "guest": 9, "device": 117, "ms": 7.5}]}
    return snap


def test_the_frame_and_screen_show_round_pages_and_downtime():
    f = build_frame(migrating(T0 + 2), migrating(T0), 2.0, now=T0 + 2)
    assert f["migrations"][0]["round"] == 3 and f["migrations"][0]["dirty_device"] == 117
    text = text_of(render_view(f, "queues", 140), 140)
    assert "migration my-first-vm: active  round 3  sent 16510 pages (RAM 16384)" in text, text
    assert "dirtied guest 9 / device 117  last round 126 pages in 7.5 ms" in text
    done = build_frame(migrating(T0 + 2, "completed"), None, 0.0, now=T0 + 2)
    assert "downtime 142.5 ms, total 1180.2 ms" in text_of(render_view(done, "net", 140, height=12), 140)


def test_no_migration_no_line():
    f = build_frame(snapshot(T0 + 2, 200), snapshot(T0, 100), 2.0, now=T0 + 2)
    assert f["migrations"] == [] and "migration" not in text_of(render_view(f, "queues", 140), 140)
