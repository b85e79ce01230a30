"""Issue 8 items 1 and 4, and what users expect: one line and a non-zero exit for bad input,
nothing of the user's changed, --version everywhere, usage under the console script's name,
a quiet default log level."""
import os
import signal
import stat
import subprocess
import sys

import pytest

from shared.resources import ours_in_dev_shm, run_tag

from .procs import ROOT, Cluster, Proc, _env

pytestmark = pytest.mark.multiprocess


def run_cli(*args, timeout=30, cwd=ROOT):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=cwd)


def one_line_error(r, code=None):
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("mod", ["host", "guest"])
def test_shared_1777_run_dir_is_refused_and_left_alone(tmp_path, mod):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    r = run_cli("-m", mod, "--run-dir", str(d), *(["--cid", "3"] if mod == "guest" else []))
    line = one_line_error(r, 1)
    assert "writable by other users" in line
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o1777 and os.stat(d).st_mode & stat.S_ISVTX
    assert list(d.iterdir()) == []                          # no owners/ left in it


def test_empty_run_dir_is_a_usage_error_and_cwd_untouched(tmp_path):
    os.chmod(tmp_path, 0o755)
    r = run_cli("-m", "host", "--run-dir", "", cwd=tmp_path)
    assert "must not be empty" in one_line_error(r, 2)
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o755 and list(tmp_path.iterdir()) == []


def test_run_dir_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for mod in ("host", "guest"):
        r = run_cli("-m", mod, "--run-dir", str(f), *(["--cid", "3"] if mod == "guest" else []))
        assert "not a directory" in one_line_error(r, 1)


def test_new_run_dir_is_created_0700(run_dir):
    c = Cluster(run_dir / "new")
    try:
        c.host()
        assert stat.S_IMODE(os.stat(run_dir / "new").st_mode) == 0o700
    finally:
        c.close()


@pytest.mark.parametrize("args,needle,code", [
    (["-m", "guest", "--cid", "3", "--connect-timeout", "-1"], "seconds >= 0", 2),
    (["-m", "guest", "--cid", "3", "--connect-timeout", "nan"], "seconds >= 0", 2),
    (["-m", "guest", "--cid", "3", "--run", "nocolon"], "MODULE:FUNCTION", 2),
    (["-m", "guest", "--cid", "3", "--run", "no_such_module_xyz:main"], "cannot import", 2),
    (["-m", "guest", "--cid", "3", "--run", "tests.guest_apps:no_such_fn"], "has no", 2),
    (["-m", "tools.wait_socket", "/nonexistent/x.sock", "--timeout", "0.2"], "not accepting", 1),
])
def test_bad_flags_fail_at_start(args, needle, code):
    assert needle in one_line_error(run_cli(*args), code)


def test_unwritable_pcap_is_one_line(run_dir):
    bad = run_dir / "no-such-dir" / "x.pcap"
    r = run_cli("-m", "host", "--run-dir", str(run_dir), "--pcap", str(bad))
    assert "cannot write the capture" in one_line_error(r, 1)
    assert not (run_dir / "control.sock").exists()
    r = run_cli("-m", "guest", "--run-dir", str(run_dir), "--cid", "3", "--pcap", str(bad),
                "--connect-timeout", "0")
    assert "cannot write the capture" in one_line_error(r, 1)
    assert not [n for n in ours_in_dev_shm() if run_tag(run_dir) in n]


def test_queue_size_above_the_hosts_maximum(shm_guard):
    c = Cluster(shm_guard)
    try:
        c.host("--max-queue-size", "256")
        r = run_cli("-m", "guest", "--run-dir", str(shm_guard), "--cid", "3", "--mem", "16M",
                    "--queue-size", "1024")
        line = one_line_error(r, 1)
        assert "larger than the host's maximum 256" in line and "power of 2" not in line
    finally:
        c.close()


def test_guest_waits_for_a_host_that_starts_later(shm_guard):
    c = Cluster(shm_guard)
    try:
        g = c.guest(3, "--connect-timeout", "60", wait=False)
        assert g.wait_log("", 1)                          # started; no host yet
        assert g.p.poll() is None
        c.host()
        assert g.wait_log("vsock device ready", 60), g.text()
    finally:
        c.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_a_guest_whose_host_is_gone(shm_guard, sig):
    c = Cluster(shm_guard)
    try:
        host = c.host()
        g = c.guest(3)
        host.kill()                                       # SIGKILL to the host's group
        assert g.wait_log("lost the host", 20), g.text()
        g.signal(sig)
        assert g.p.wait(30) == 0
        assert "Traceback" not in g.text(), g.text()
    finally:
        c.close()


ENTRY_POINTS = ["host", "guest", "tools.demo", "tools.wait_socket", "tools.monitor", "tools.monitor.overhead",
                "tools.stress", "tools.stress.hostile", "tools.fuzz", "tools.bench", "tools.bench_ring",
                "tools.bench_net", "tools.bench_vhost_user", "tools.bench_vhost_user_net",
                "tools.linux_guest", "tools.mutants", "tools.migrate"]


def entry_points_in_tree() -> set[str]:
    """Every `python -m X` of the tree: packages with a __main__.py and modules that run as a
    script (`if __name__ == "__main__"`), outside tests/."""
    found = set()
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT)
        if rel.parts[0] in ("tests", "examples") or any(p.startswith(".") for p in rel.parts):
            continue
        if f.name == "__main__.py":
            found.add(".".join(rel.parts[:-1]))
        elif '__name__ == "__main__"' in f.read_text(errors="replace"):
            found.add(".".join(rel.with_suffix("").parts))
    return found


def test_every_entry_point_is_listed_for_version():
    """A new entry point must answer --version too (docs/CLI.md says every one does): add it to
    ENTRY_POINTS (and to docs/CLI.md)."""
    missing = entry_points_in_tree() - set(ENTRY_POINTS)
    assert not missing, f"entry points without a --version test: {sorted(missing)}"


@pytest.mark.parametrize("mod", ENTRY_POINTS)
def test_version(mod):
    """Issue 20 item 3: --version on every entry point, as docs/CLI.md says."""
    r = run_cli("-m", mod, "--version")
    assert r.returncode == 0 and r.stdout.startswith(f"python -m {mod} (virtio-emu) 0."), (r.stdout, r.stderr)


@pytest.mark.parametrize("script,mod", [("virtio-emu-host", "host"), ("virtio-emu-guest", "guest")])
def test_console_script_usage_names_itself(script, mod):
    code = (f"import sys; sys.argv[0] = {script!r}; from {mod}.__main__ import main; main(['--bogus'])")
    r = run_cli("-c", code)
    assert r.returncode == 2 and r.stderr.startswith(f"usage: {script} "), r.stderr


def test_default_log_level_is_quiet(shm_guard):
    env = _env()
    env.pop("VIRTIO_EMU_LOG_LEVEL")
    c = Cluster(shm_guard)
    try:
        c.host()
        g = Proc(["-m", "guest", "--run-dir", str(shm_guard), "--cid", "3", "--mem", "16M"],
                 shm_guard.parent / "quiet-guest.log")
        g.p.kill()
        g.p.wait()
        g.p = subprocess.Popen([sys.executable, "-m", "guest", "--run-dir", str(shm_guard), "--cid", "3",
                                "--mem", "16M"], stdout=g._f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                               start_new_session=True)
        c.procs.append(g)
        import time
        end = time.monotonic() + 30
        while not (shm_guard / "vsock-3.sock").exists() and time.monotonic() < end:
            time.sleep(0.05)
        assert (shm_guard / "vsock-3.sock").exists()
        g.stop()
        assert " INFO " not in g.text(), g.text()
    finally:
        c.close()
