"""Issue 20 item 8 and item 6: small things a newcomer trips over (labels, empty names, the
README's example module, --net-run checked at start)."""
import subprocess
import sys

import pytest

from .procs import ROOT, _env


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


def test_bench_ring_labels_rows_with_the_depth_the_ring_allows():
    """--depth 1000 on a ring of 8: the rows ran at depth 8 and must say so (not "depth 1000")."""
    r = run_cli("-m", "tools.bench_ring", "--seconds", "0.05", "--ring-size", "8", "--depth", "1000")
    assert r.returncode == 0, r.stderr
    assert "depth 1000," not in r.stdout and "ring, depth 8, suppression on" in r.stdout, r.stdout
    assert "depth 8 used" in r.stdout


@pytest.mark.parametrize("spec,needle", [("no_such_module_xyz:main", "cannot import"),
                                         ("nocolon", "MODULE:FUNCTION"),
                                         ("tests.guest_apps:no_such_fn", "has no")])
def test_bad_net_run_is_one_line_and_exit_2_at_start(tmp_path, spec, needle):
    """Item 6: a bad --net-run module was a traceback in the log while the guest kept running;
    it is checked at start like --run: one line, exit 2, nothing started."""
    run_dir = tmp_path / "run"
    r = run_cli("-m", "guest", "--run-dir", str(run_dir), "--net", "loopback", "--mem", "8M",
                "--net-run", spec, "--connect-timeout", "0")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(f"guest: --net-run {spec}: ") and needle in line[0], line
    assert not run_dir.exists()                          # refused before anything was made


@pytest.mark.parametrize("name", ["", "   ", "a\nb"])
def test_guest_name_must_be_a_name(tmp_path, name):
    """Item 8: `--name ''` was accepted (a guest the monitor shows with no name)."""
    r = run_cli("-m", "guest", "--run-dir", str(tmp_path / "run"), "--cid", "3", "--name", name,
                "--connect-timeout", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert "guest name" in r.stderr.strip().splitlines()[-1]


@pytest.mark.multiprocess
def test_readme_example_programs_run_in_host_and_guest(shm_guard):
    """Item 8: the README's `--run mypkg.hostapp:main` named a module that did not exist. The
    examples ship under examples/ and the README's two commands run them as written."""
    import re

    from .procs import Cluster
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Programs in the host, without the bridge"):]
    cmds = re.search(r"```sh\n(.*?)```", block, re.S).group(1)
    assert "examples.hostapp:main" in cmds and "examples.guestapp:main" in cmds and "mypkg" not in cmds
    c = Cluster(shm_guard)
    try:
        host = c.host("--service", "echo=6000", "--service", "sink=6001", "--service", "source=6002",
                      "--run", "examples.hostapp:main")
        guest = c.guest(3, "--service", "echo=5000", "--run", "examples.guestapp:main")
        assert host.wait_log("hostapp: guest 3 echoed 'hello guest 3, from the host'", 60), host.text()
        for line in ("guestapp: echo answered b'hello'", "guestapp: sink counted 100000 bytes",
                     "guestapp: source sent 50000 bytes"):
            assert guest.wait_log(line, 60), guest.text()
        assert "Traceback" not in host.text() + guest.text()
    finally:
        c.close()
