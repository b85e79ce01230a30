"""The monitor's panels are pure: a snapshot in, text out (rich Console on a StringIO, no colour)."""
import io
import json

import pytest

from rich.console import Console

from tools.monitor import main, render, render_view
from tools.monitor.model import History, build_frame
from tools.monitor.panels import fit_table, Col, sparkline

T0 = 1_800_000_000.0


def text_of(renderable, width=100) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def vq(i, num, avail, used, last_used, free, inflight, kicks_saved, ue, ae):
    return {"index": i, "num": num, "desc": 0x4000_0000 + 0x1000 * i, "avail": 0x4000_0800 + 0x1000 * i,
            "used": 0x4000_0c00 + 0x1000 * i, "event_idx": True, "avail_idx": avail, "used_idx": used,
            "last_used": last_used, "num_free": free, "in_flight": inflight, "avail_flags": 0,
            "used_flags": 0, "kicks_suppressed": kicks_saved, "used_event": ue, "avail_event": ae,
            "broken": False, "broken_reason": ""}


def dvq(i, num, last_avail):
    return {"index": i, "num": num, "last_avail": last_avail, "last_used": last_avail, "event_idx": True}


def conn(local, remote, tx, rx, fwd, peer_free, cu, stalled=False):
    return {"local": local, "remote": remote, "state": "ESTABLISHED", "tx_bytes": tx, "rx_bytes": rx,
            "buf_alloc": 262144, "fwd_cnt": fwd, "peer_free": peer_free, "credit_update_tx": cu,
            "credit_request_tx": 0, "stalled": stalled}


def snapshot(t, k):
    """Guest my-first-vm (CID 3) and its device at time t, k = how far traffic has gone."""
    guest = {"role": "guest", "pid": 100, "time": t, "name": "my-first-vm", "cid": 3, "connected": True,
             "reconnects": 1, "stats": {"rx_buf_nr": 64},
             "vqs": [vq(0, 128, 64 + 10 * k, 10 * k, 10 * k, 0, 64, 5 * k, 10 * k, 7 * k),
                     vq(1, 128, 20 * k, 20 * k, 20 * k, 128, 0, 3 * k, 20 * k, 20 * k),
                     vq(2, 8, 8, 0, 0, 0, 8, 0, 0, 0)],
             "conns": [conn("3:5000", "2:1073741824", 4096 * k, 8192 * k, 8192 * k, 262144, 2 * k)],
             "mem_in_use": 2_000_000, "mem_total": 16_000_000}
    device = {"role": "device", "pid": 200, "time": t, "guest": "my-first-vm", "device": "vsock", "cid": 3,
              "status": 15, "stats": {
                  "kicks": 30 * k, "interrupts": 40 * k, "errors": 0, "resets": 2, "tx_bytes": 4096 * k,
                  "rx_bytes": 8192 * k, "vq_kicks": [k, 29 * k, 0], "vq_interrupts": [30 * k, 10 * k, 0],
                  "vq_interrupts_suppressed": [4 * k, 19 * k, 0], "vq_errors": [0, 0, 0],
                  "vqs": [dvq(0, 128, 10 * k), dvq(1, 128, 20 * k), dvq(2, 8, 0)],
                  "queued_replies": 0,
                  "bridge": {"connections_in": 1, "connections_out": 0, "refused_in": 0, "refused_out": 0,
                             "bytes_to_host": 4096 * k, "bytes_to_guest": 8192 * k},
                  "conns": [conn("2:1073741824", "3:5000", 8192 * k, 4096 * k, 4096 * k, 0, 3 * k,
                                 stalled=True)]}}
    return [guest, device]


def frame():
    return build_frame(snapshot(T0 + 2, 200), snapshot(T0, 100), 2.0, run_dir="/run/x", now=T0 + 2)


def net_snapshot(t, k):
    return [{"role": "device", "pid": 300, "time": t, "guest": "net-vm", "device": "net", "cid": 5,
             "status": 15, "stats": {"backend": "tap:vetap0", "mac": "52:54:00:12:34:56",
                                     "tx_packets": 10 * k, "tx_bytes": 15000 * k, "rx_packets": 8 * k,
                                     "rx_bytes": 12000 * k, "tx_dropped": 0, "rx_dropped": 3,
                                     "tx_polling": True}}]


def ring_rows():
    from tests.test_monitor_ring import state_event_idx, state_mixed
    return [{"title": "q0 rx", "q": 0, "picture": state_mixed()},
            {"title": "q1 tx", "q": 1, "picture": state_event_idx()}]


def views():
    """(name, renderable) of every view, as the frozen texts below were made."""
    f = frame()
    net = build_frame(net_snapshot(T0 + 2, 200), net_snapshot(T0, 100), 2.0, run_dir="/run/x", now=T0 + 2)
    return [("queues", render_view(f, "queues", 100)),
            ("ring", render_view(f, "ring", 100, guest=3, rings=ring_rows())),
            ("conns", render_view(f, "conns", 100)),
            ("net", render_view(net, "net", 100))]


# --- frozen frames at 100 columns (also in docs/monitor.md) ------------------------------------
EXPECTED = {
    "queues": """\
virtio-emu monitor /run/x  08:00:02 UTC  [queues] ring  conns  net   guest all
guests and their devices
                                 device       tx B/s    rx B/s                             
 guest         cid   host link   status          g→h       h→g   kicks/s   irqs/s   errors 
───────────────────────────────────────────────────────────────────────────────────────────
 my-first-vm     3   connected   DRIVER_OK   204.8KB   409.6KB      1.5K     2.0K        0 
links, resets, bridge  (1 column hidden at width 100: widen the terminal or use --width)
                                      bridge              bridge   bridge                   
                             device    conns    bridge     bytes    bytes    queued   guest 
 guest         re-connects   resets   in/out   refused     →host   →guest   replies     pid 
────────────────────────────────────────────────────────────────────────────────────────────
 my-first-vm             1        2      1/0         0   819.2KB    1.6MB         0     100 
virtqueues: indices  (2 columns hidden at width 100: widen the terminal or use --width)
                       avail   last_avail   used   last_used       in                          
 guest         q         idx        (dev)    idx       (drv)   flight   suppression       errs 
───────────────────────────────────────────────────────────────────────────────────────────────
 my-first-vm   rx       2064         2000   2000        2000       64   ue 2000 ae 1400   0    
 my-first-vm   tx       4000         4000   4000        4000        0   ue 4000 ae 4000   0    
 my-first-vm   event       8            0      0           0        8   ue 0 ae 0         0    
virtqueues: notifications
                                                              bufs   bufs        
                                   kicks               irqs    per    per   poll 
 guest         q       kicks/s   saved/s   irqs/s   saved/s   kick   wake   time 
─────────────────────────────────────────────────────────────────────────────────
 my-first-vm   rx           50       250     1.5K       200   10.0      –      – 
 my-first-vm   tx         1.4K       150      500       950    0.7      –      – 
 my-first-vm   event         0         0        0         0      –      –      – 
tx = guest→host (taken off the tx ring), rx = host→guest (written into rx buffers); kicks = 
guest→device notifications, irqs = device→guest interrupts; re-connects = times the guest 
reconnected to a host; device resets = resets of its device; bridge conns in/out = host connections 
into / out of the guest; bridge bytes = bytes the bridge passed each way; host silent Ns = no new 
host snapshot for N seconds.
avail idx = what the driver posted; last_avail = what the device took; used idx = what the device 
returned; last_used = what the driver reclaimed (all mod 65536). in flight = buffers with the 
device; free desc = descriptors on the driver's free list. suppression: with EVENT_IDX ue = 
used_event (interrupt me past it), ae = avail_event (kick me past it); otherwise the NO_NOTIFY / 
NO_INTERRUPT flags set. errs = ring errors (NEEDS_RESET: the device stopped). saved/s = 
notifications suppression avoided; bufs per kick / per wake = buffers the device took per kick / per
worker wake-up; poll time = share of time polling (– until the engine reports it). Driver and device
figures come from two processes' snapshots, up to half a second apart: read them as a picture, not 
an invariant.
""",
    "ring": """\
virtio-emu monitor /run/x  08:00:02 UTC   queues [ring] conns  net   guest 3
guests and their devices
                                 device       tx B/s    rx B/s                             
 guest         cid   host link   status          g→h       h→g   kicks/s   irqs/s   errors 
───────────────────────────────────────────────────────────────────────────────────────────
 my-first-vm     3   connected   DRIVER_OK   204.8KB   409.6KB      1.5K     2.0K        0 
links, resets, bridge  (1 column hidden at width 100: widen the terminal or use --width)
                                      bridge              bridge   bridge                   
                             device    conns    bridge     bytes    bytes    queued   guest 
 guest         re-connects   resets   in/out   refused     →host   →guest   replies     pid 
────────────────────────────────────────────────────────────────────────────────────────────
 my-first-vm             1        2      1/0         0   819.2KB    1.6MB         0     100 
rings of my-first-vm, read from its RAM (read-only)
q0 rx  N=16  avail.idx 8  last_avail 5  used.idx 3  last_used 1
  free 7  avail 5  in device 2  used 2
  desc .UUDDAAAAA......
  ring .UUDDAAA........
        r u l  a       
  flags: avail 0, used 0
q1 tx  N=16  avail.idx 8  last_avail 4  used.idx 0  last_used 0
  free 8  avail 4  in device 4  used 0
  desc DDDDAAAA........
  ring DDDDAAAA........
       *   * e a       
  EVENT_IDX  used_event 6 (irq once used.idx passes it)  avail_event 4 (kick once avail.idx does)
cells: . free  A posted (avail)  D in the device  U used, not reclaimed  ! broken chain  
marks under the ring strip: a avail.idx  l last_avail (device)  u used.idx  r last_used (driver)  e 
used_event  v avail_event  * several
tx = guest→host (taken off the tx ring), rx = host→guest (written into rx buffers); kicks = 
guest→device notifications, irqs = device→guest interrupts; re-connects = times the guest 
reconnected to a host; device resets = resets of its device; bridge conns in/out = host connections 
into / out of the guest; bridge bytes = bytes the bridge passed each way; host silent Ns = no new 
host snapshot for N seconds.
""",
    "conns": """\
virtio-emu monitor /run/x  08:00:02 UTC   queues  ring [conns] net   guest all
guests and their devices
                                 device       tx B/s    rx B/s                             
 guest         cid   host link   status          g→h       h→g   kicks/s   irqs/s   errors 
───────────────────────────────────────────────────────────────────────────────────────────
 my-first-vm     3   connected   DRIVER_OK   204.8KB   409.6KB      1.5K     2.0K        0 
links, resets, bridge  (1 column hidden at width 100: widen the terminal or use --width)
                                      bridge              bridge   bridge                   
                             device    conns    bridge     bytes    bytes    queued   guest 
 guest         re-connects   resets   in/out   refused     →host   →guest   replies     pid 
────────────────────────────────────────────────────────────────────────────────────────────
 my-first-vm             1        2      1/0         0   819.2KB    1.6MB         0     100 
vsock connections
                                                                                    stalled 
               guest                             bytes   bytes    window   window   on      
 guest         end      host end       state       g→h     h→g       g→h      h→g   credit  
────────────────────────────────────────────────────────────────────────────────────────────
 my-first-vm   3:5000   2:1073741824   ESTAB   819.2KB   1.6MB   262.1KB       0B   h→g     
credit (virtio-vsock flow control)
 guest        guest     guest        host      host   CREDIT_UPDATE   CREDIT_REQUEST 
 end      buf_alloc   fwd_cnt   buf_alloc   fwd_cnt             g/h              g/h 
─────────────────────────────────────────────────────────────────────────────────────
 3:5000      262144   1638400      262144    819200         400/600              0/0 
tx = guest→host (taken off the tx ring), rx = host→guest (written into rx buffers); kicks = 
guest→device notifications, irqs = device→guest interrupts; re-connects = times the guest 
reconnected to a host; device resets = resets of its device; bridge conns in/out = host connections 
into / out of the guest; bridge bytes = bytes the bridge passed each way; host silent Ns = no new 
host snapshot for N seconds.
g = guest, h = host; state = the guest's / the host's socket state (one word when equal). buf_alloc 
/ fwd_cnt = each receiver's buffer and bytes it consumed (as it advertises them); window g→h = 
credit the guest's sender still has (host's free space), window h→g = the host sender's; 
CREDIT_UPDATE / CREDIT_REQUEST g/h = packets sent by the guest / the host; stalled = that 
direction's sender has no credit left.
""",
    "net": """\
virtio-emu monitor /run/x  08:00:02 UTC   queues  ring  conns [net]  guest all
guests and their devices
                                   device       tx B/s    rx B/s                             
 guest    cid   host link          status          g→h       h→g   kicks/s   irqs/s   errors 
─────────────────────────────────────────────────────────────────────────────────────────────
 net-vm     5   no guest process   DRIVER_OK   750.0KB   600.0KB         –        –        – 
links, resets, bridge
                                 bridge             bridge   bridge                            
                        device    conns    bridge    bytes    bytes    queued   guest   device 
 guest    re-connects   resets   in/out   refused    →host   →guest   replies     pid      pid 
───────────────────────────────────────────────────────────────────────────────────────────────
 net-vm             –        –      –/–         –        –        –         –       –      300 
net devices  (3 columns hidden at width 100: widen the terminal or use --width)
                                                           tx       rx                   
                                                       frames   frames   drops   tx      
 guest    backend      mac                 status       g→net    net→g   tx/rx   polling 
─────────────────────────────────────────────────────────────────────────────────────────
 net-vm   tap:vetap0   52:54:00:12:34:56   DRIVER_OK     2000     1600     0/3   on      
tx = guest→host (taken off the tx ring), rx = host→guest (written into rx buffers); kicks = 
guest→device notifications, irqs = device→guest interrupts; re-connects = times the guest 
reconnected to a host; device resets = resets of its device; bridge conns in/out = host connections 
into / out of the guest; bridge bytes = bytes the bridge passed each way; host silent Ns = no new 
host snapshot for N seconds.
tx = guest→network (taken off the tx ring), rx = network→guest; drops = frames the backend could not
deliver; tx polling = vhost-net busy-polls the tx ring instead of waiting for kicks.
""",
}


def test_every_view_renders_exactly_at_100_columns():
    for name, r in views():
        got = text_of(r)
        assert got == EXPECTED[name], f"{name}:\n{got}"


# --- names and numbers are never cut (issue 8 item 3) ---------------------------------------------
def test_narrow_terminals_drop_columns_never_cut_names_or_numbers():
    f = frame()
    for width in (100, 80, 60, 40):
        for view in ("queues", "conns"):
            out = text_of(render_view(f, view, width), width)
            assert "…" not in out, (width, view)
            assert "my-first-vm" in out and ("DRIVER_OK" in out or width < 60)
            if width < 100:
                assert "hidden at width" in out
    # the columns that stay are whole: every figure of the first table is there, digit for digit
    out = text_of(render_view(f, "queues", 80), 80)
    assert "204.8KB" in out and "409.6KB" in out


def test_cli_once_to_a_file_keeps_names_whole(run_dir, capsys):
    from shared.stats import stats_dir
    d = stats_dir(run_dir)
    import os
    for rec in snapshot(T0, 1):
        rec = dict(rec, pid=os.getpid())     # a live pid, so read_all keeps it
        (d / f"{rec['role']}-x.json").write_text(json.dumps(rec))
    assert main(["--run-dir", str(run_dir), "--once", "--interval", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "my-first-vm" in out and "…" not in out and "ue 10 ae 7" in out


def test_cli_once_json_has_the_same_figures(run_dir, capsys):
    from shared.stats import stats_dir
    import os
    d = stats_dir(run_dir)
    for rec in snapshot(T0, 1):
        (d / f"{rec['role']}-x.json").write_text(json.dumps(dict(rec, pid=os.getpid())))
    assert main(["--run-dir", str(run_dir), "--once", "--json", "--interval", "0.01"]) == 0
    data = json.loads(capsys.readouterr().out)
    # issue 20 item 8: the document says what it is and which version of its layout
    assert (data["schema"], data["version"]) == ("virtio-emu/monitor-frame", 1) and data["virtio_emu"]
    assert list(data)[:3] == ["schema", "version", "virtio_emu"]
    q = {r["name"]: r for r in data["queues"]}
    assert q["rx"]["avail_idx"] == 74 and q["rx"]["last_avail"] == 10 and q["rx"]["used_event"] == 10
    assert data["guests"][0]["reconnects"] == 1 and data["guests"][0]["resets"] == 2
    assert data["conns"][0]["stalled_rx"] is True and data["nets"] == []
    # the RAM named by the snapshot does not exist: the ring entry says so instead of failing
    assert data["rings"][0]["error"]


def test_cli_bad_arguments_one_line(run_dir, capsys):
    assert main(["--run-dir", str(run_dir / "nope"), "--once"]) == 1
    assert main(["--run-dir", str(run_dir), "--json"]) == 2
    assert main(["--run-dir", str(run_dir), "--interval", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("monitor: ") for line in err)


# --- the model ---------------------------------------------------------------------------------------
def test_rates_use_the_writers_clock_and_restart_with_a_new_process():
    f = frame()
    g = f["guests"][0]
    assert g["tx_Bps"] == 4096 * 100 / 2 and g["kicks_ps"] == 30 * 100 / 2
    q = {r["name"]: r for r in f["queues"]}
    assert q["tx"]["kicks_saved_ps"] == 3 * 100 / 2 and q["tx"]["irqs_saved_ps"] == 19 * 100 / 2
    assert q["rx"]["per_kick"] == 10.0 and q["rx"]["batch"] is None and q["rx"]["poll_frac"] is None
    prev = snapshot(T0, 100)
    prev[1] = dict(prev[1], pid=999)                   # another device process: no rate
    f2 = build_frame(snapshot(T0 + 2, 200), prev, 2.0, now=T0 + 2)
    assert f2["guests"][0]["tx_Bps"] is None


def test_engine_counters_are_used_when_present():
    cur, prev = snapshot(T0 + 2, 200), snapshot(T0, 100)
    for snap, k in ((cur, 200), (prev, 100)):
        snap[1]["stats"]["vq_wakeups"] = [k // 2, k, 0]
        snap[1]["stats"]["vq_poll_time"] = [0.0, 0.25 * k / 100, 0.0]
    q = {r["name"]: r for r in build_frame(cur, prev, 2.0, now=T0 + 2)["queues"]}
    assert q["rx"]["batch"] == 1000 / 50 and q["tx"]["poll_frac"] == 0.125


def test_a_silent_host_is_shown():
    f = build_frame(snapshot(T0, 1), None, 0.0, now=T0 + 10)
    assert f["guests"][0]["link"] == "host silent 10s"


def test_history_and_sparkline():
    h = History(span=60)
    for t in range(100):
        h.add("k", float(t), t % 10)
    assert len(h.values("k")) == 61
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([]) == "" and sparkline([0, 0]) == "▁▁"
    assert len(sparkline(list(range(100)), 16)) == 16


def test_render_for_the_demo_still_takes_raw_snapshots():
    out = text_of(render(snapshot(T0 + 2, 200), snapshot(T0, 100), 2.0, "/run/x", width=100))
    assert "my-first-vm" in out and "virtqueues: indices" in out


def test_fit_table_drops_least_important_first():
    cols = [Col("name", lambda r: r["n"], "left", 9), Col("a", lambda r: "1" * 30, keep=1),
            Col("b", lambda r: "2" * 30, keep=5)]
    out = text_of(fit_table("t", cols, [{"n": "a-long-guest-name"}], 60, ""), 60)
    assert "a-long-guest-name" in out and "2" * 30 in out and "1" * 30 not in out
    assert "1 column hidden at width 60" in out


def test_live_loop_runs_and_stops(run_dir, capsys):
    from shared.stats import stats_dir
    import os
    d = stats_dir(run_dir)
    for rec in snapshot(T0, 1):
        (d / f"{rec['role']}-x.json").write_text(json.dumps(dict(rec, pid=os.getpid())))
    assert main(["--run-dir", str(run_dir), "--duration", "0.8", "--no-keys", "--width", "100",
                 "--view", "conns"]) == 0
    out = capsys.readouterr().out
    assert "my-first-vm" in out and "vsock connections" in out


@pytest.mark.multiprocess
def test_keys_switch_views_in_a_terminal(run_dir):
    """In a pseudo-terminal the live monitor reads keys: c shows the connections, x quits."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    from shared.stats import stats_dir
    from tests.procs import ROOT, _env
    d = stats_dir(run_dir)
    for rec in snapshot(T0, 1):
        (d / f"{rec['role']}-x.json").write_text(json.dumps(dict(rec, pid=os.getpid())))
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "tools.monitor", "--run-dir", str(run_dir), "--width", "100",
                          "--duration", "20"], stdin=slave, stdout=slave, stderr=slave, env=_env(), cwd=ROOT)
    os.close(slave)
    out = b""

    def read_until(needle: bytes, timeout: float) -> bool:
        nonlocal out
        end = time.monotonic() + timeout
        while needle not in out and time.monotonic() < end:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
        return needle in out
    try:
        assert read_until(b"virtqueues: indices", 15), out[-2000:]
        os.write(master, b"c")
        assert read_until(b"vsock connections", 5), out[-2000:]
        os.write(master, b"x")
        p.wait(5)
        assert p.returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)


def test_overhead_tool_refuses_bad_arguments(capsys):
    from tools.monitor.overhead import main as overhead_main
    assert overhead_main(["--rounds", "0"]) == 2
    assert overhead_main(["--bytes", "10", "--write", "100"]) == 2
    assert capsys.readouterr().err.count("overhead: ") == 2


def test_cached_parts_render_the_same_text():
    from tools.monitor import SegmentMemo
    f = dict(frame(), stamp=(1,))
    memo = SegmentMemo(Console(file=io.StringIO(), width=100, color_system=None))
    plain = text_of(render_view(f, "ring", 100, guest=3, rings=ring_rows()))
    for _ in range(2):                 # the second time from the cache
        assert text_of(render_view(f, "ring", 100, guest=3, rings=ring_rows(), memo=memo)) == plain
    assert len(memo.cache) == 2


def test_socket_snapshot_counts_credit_packets_and_stalls():
    """shared/vsock/proto.py's per-socket counters, on two cores joined by the test link."""
    from tests.test_vsock_proto import Link, connected_pair
    link = Link()
    _, cli, srv = connected_pair(link)
    link.host.set_buffer_size(srv, 1000)
    link.h2g()                                       # CREDIT_UPDATE host -> guest
    assert link.guest.send(cli, b"a" * 1500) == 1000
    assert link.guest.send(cli, b"b") == 0           # no credit: a stall
    link.g2h()
    g = cli.snapshot()
    assert g["stalled"] and g["peer_free"] == 0 and g["credit_stalls"] == 1
    assert g["credit_update_rx"] == 1 and g["tx_bytes"] == 1000
    link.host.recv(srv, 400)                         # every-read: another CREDIT_UPDATE
    link.h2g()
    h, g = srv.snapshot(), cli.snapshot()
    assert h["credit_update_tx"] == 2 and g["credit_update_rx"] == 2 and h["fwd_cnt"] == 400
    assert not g["stalled"] and g["peer_free"] == 400
    assert g["local"] == "3:1024" and h["remote"] == "3:1024" and h["state"] == "ESTABLISHED"


def test_live_history_draws_a_sparkline_table_that_fits():
    from tools.monitor.panels import guests_panel
    h = History()
    for i, d in enumerate((50, 100, 150, 200)):      # kicks/s 750, 1500, 2250, 3000
        f = build_frame(snapshot(T0 + 2 * i + 2, 1000 + d), snapshot(T0 + 2 * i, 1000), 2.0, now=T0 + 2 * i + 2)
        h.add_frame(f)
    out = text_of(guests_panel(f, 100, h))
    assert "the last minute" in out and "▂▄▆█ 3.0K" in out


# --- issue 20 item 5: the monitor at 80x24 ----------------------------------------------------------
def two_guests(t, k):
    """my-first-vm (CID 3) and second-vm (CID 4), each with its device."""
    out = snapshot(t, k)
    for rec in snapshot(t, k):
        rec = json.loads(json.dumps(rec))
        rec["cid"] = 4
        rec["pid"] += 1
        if rec["role"] == "guest":
            rec["name"] = "second-vm"
        else:
            rec["guest"] = "second-vm"
        out.append(rec)
    return out


def screen_lines(renderable, width=80) -> list[str]:
    return text_of(renderable, width).rstrip("\n").split("\n")


@pytest.mark.parametrize("view", ["queues", "conns", "ring", "net"])
def test_small_terminal_shows_the_views_rows_and_folds_the_summaries(view):
    f = build_frame(two_guests(T0 + 2, 200), two_guests(T0, 100), 2.0, run_dir="/run/x", now=T0 + 2)
    rings = ring_rows() if view == "ring" else None
    lines = screen_lines(render_view(f, view, 80, guest=3 if view == "ring" else None, rings=rings,
                                     keys=True, height=24))
    text = "\n".join(lines)
    assert len(lines) <= 24, text
    assert "links, resets, bridge" not in text and "the last minute" not in text   # folded ...
    assert f"guests {1 if view == 'ring' else 2} all up" in text                   # ... into one line
    if view == "queues":
        rows = [ln for ln in lines if ln.startswith((" my-first-vm ", " second-vm "))]
        assert len(rows) == 6, text               # every queue of both guests: rx, tx, event
    elif view == "conns":
        assert sum(ln.startswith(" my-first-vm") or ln.startswith(" second-vm") for ln in lines) == 2, text
    elif view == "ring":
        assert "rings of my-first-vm" in text and "  desc " in text and "q0 rx" in text, text
    else:
        assert "no net devices" in text
    # a big terminal still shows the whole screen
    full = "\n".join(screen_lines(render_view(f, view, 120, guest=3 if view == "ring" else None,
                                              rings=rings, keys=True, height=200), 120))
    assert "links, resets, bridge" in full and "guests 2 all up" not in full


def test_rows_that_do_not_fit_say_how_many_lines_are_below():
    snap, prev = [], []
    for i in range(12):                        # 36 queues: more rows than 24 lines hold
        for s, t, k in ((snap, T0 + 2, 200), (prev, T0, 100)):
            for rec in snapshot(t, k):
                rec = json.loads(json.dumps(rec))
                rec["cid"], rec["pid"] = 10 + i, rec["pid"] + 10 + i
                s.append(rec)
    f = build_frame(snap, prev, 2.0, run_dir="/run/x", now=T0 + 2)
    lines = screen_lines(render_view(f, "queues", 80, keys=True, height=24))
    assert len(lines) == 24 and "more lines below" in lines[-1], "\n".join(lines)
    assert sum(" rx " in ln for ln in lines) >= 4


def test_key_hint_lists_every_key_and_g_cycles_every_guest():
    from tools.monitor.keys import apply_key
    from tools.monitor.panels import KEY_HINT, KEYS
    hint = KEY_HINT.replace("/", " ").replace(",", " ").split()
    assert all(k in hint for k in KEYS), (KEYS, KEY_HINT)
    cids = [3, 4, 5]
    view, guest = apply_key("r", "queues", None, cids)
    seen = []
    for _ in range(4):
        view, guest = apply_key("g", view, guest, cids)
        seen.append(guest)
    assert view == "ring" and seen == [3, 4, 5, 3]
    assert apply_key("a", "queues", 4, cids) == ("queues", None)
    assert apply_key("x", "ring", 4, cids) == "quit" and apply_key("?", "ring", 4, cids) is None


@pytest.mark.multiprocess
def test_live_monitor_in_an_80x24_terminal(run_dir):
    """As a person sees it: a pseudo-terminal of 80x24, two guests. The queue rows are on the
    screen, the hint lists a, and r then g g shows the rings of each guest in turn."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios
    import time

    from shared.stats import stats_dir
    from tests.procs import ROOT, _env
    d = stats_dir(run_dir)
    for i, rec in enumerate(two_guests(T0, 1)):
        (d / f"{rec['role']}-{i}.json").write_text(json.dumps(dict(rec, pid=os.getpid())))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = _env()
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    p = subprocess.Popen([sys.executable, "-m", "tools.monitor", "--run-dir", str(run_dir), "--duration", "30"],
                         stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    out = b""

    def read_until(needle: bytes, timeout: float) -> bool:
        nonlocal out
        start = len(out)
        end = time.monotonic() + timeout
        while needle not in out[start:] and time.monotonic() < end:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
        return needle in out[start:]
    try:
        assert read_until(b"virtqueues: indices", 15), out[-3000:]
        read_until(b"a all guests", 3)
        import re
        rows = re.findall(rb" (my-first-vm|second-vm) +(rx|tx|event) ", out)
        assert {(g, q) for g, q in rows} == {(g, q) for g in (b"my-first-vm", b"second-vm")
                                             for q in (b"rx", b"tx", b"event")}, out[-3000:]
        assert b"a all guests" in out, out[-3000:]
        os.write(master, b"r")
        assert read_until(b"rings of my-first-vm", 5), out[-3000:]
        os.write(master, b"g")
        assert read_until(b"rings of second-vm", 5), out[-3000:]
        os.write(master, b"g")
        assert read_until(b"rings of my-first-vm", 5), out[-3000:]
        os.write(master, b"x")
        p.wait(5)
        assert p.returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
