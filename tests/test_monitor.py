"""The monitor's rendering is pure: render snapshots into a Console with no colour."""
import io

from rich.console import Console

from tools.monitor import render


def text_of(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def test_render_devices_and_guests_with_rates():
    prev = [{"role": "device", "pid": 10, "guest": "g3", "cid": 3, "status": 15,
             "stats": {"kicks": 5, "tx_bytes": 1000, "rx_bytes": 0}}]
    cur = [{"role": "device", "pid": 10, "guest": "g3", "cid": 3, "status": 15,
            "stats": {"kicks": 7, "interrupts": 3, "tx_bytes": 3000, "rx_bytes": 500, "errors": 0}},
           {"role": "device", "pid": 11, "guest": "bad", "cid": 4, "status": 0x4F, "stats": {"errors": 2}},
           {"role": "guest", "pid": 20, "name": "g3", "cid": 3, "connected": True,
            "stats": {"rx_buf_nr": 128, "queued_replies": 0}, "mem_in_use": 2_000_000, "mem_total": 64_000_000}]
    out = text_of(render(cur, prev, 2.0, "/run/x"))
    assert "g3" in out and "DRIVER_OK" in out and "NEEDS_RESET" in out
    assert "1.0KB" in out          # (3000-1000)/2 s
    assert "connected" in out and "128" in out


def test_render_empty():
    out = text_of(render([], None, 0))
    assert "(no devices)" in out and "(no guests)" in out
