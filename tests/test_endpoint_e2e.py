"""The in-device host endpoint across real processes: host services used by a guest program, a
host program using a guest service, and the --service/--run command-line errors."""
import subprocess
import sys

import pytest

from .procs import ROOT, Cluster, _env
from .test_vsock_e2e import wait_lines

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def cluster(shm_guard):
    c = Cluster(shm_guard)
    yield c
    c.close()


def test_guest_uses_host_services_and_host_program_uses_guest_echo(cluster, tmp_path, monkeypatch):
    n = 3 << 20
    gout, hout = tmp_path / "guest.out", tmp_path / "host.out"
    monkeypatch.setenv("VE_APP_OUT", str(gout))
    monkeypatch.setenv("VE_APP_ECHO", "6001")
    monkeypatch.setenv("VE_APP_SINK", "6002")
    monkeypatch.setenv("VE_APP_SOURCE", "6003")
    monkeypatch.setenv("VE_APP_BYTES", str(n))
    monkeypatch.setenv("VE_HOST_APP_OUT", str(hout))
    monkeypatch.setenv("VE_HOST_APP_PORT", "7000")
    monkeypatch.setenv("VE_HOST_APP_BYTES", str(1 << 20))
    host = cluster.host("--service", "echo=6001", "--service", "sink=6002",
                        "--service", "source=6003", "--run", "tests.host_apps:guest_echo_client")
    cluster.guest(3, "--service", "echo=7000", "--run", "tests.guest_apps:host_services")
    (g,) = wait_lines(gout, 1, 120)
    assert "errno" not in g, g
    assert g["echo"]["sent"] == g["echo"]["got"] and g["echo"]["bytes"] == n
    assert g["sink"] == {"sent": n, "reply": f"{n}\n"}
    assert g["source"]["want"] == g["source"]["got"] and g["source"]["bytes"] == n
    (h,) = wait_lines(hout, 1, 120)
    assert "errno" not in h, h
    assert h["guest_cid"] == 3 and h["local_cid"] == 2
    assert h["sent"] == h["got"] and h["bytes"] == 1 << 20
    assert "host service echo listening on vsock port 6001" in host.text()


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


@pytest.mark.parametrize("side", ["host", "guest"])
@pytest.mark.parametrize("spec,needle", [
    ("json", "must look like 'pkg.module:function'"),
    ("no_such_module_xyz:main", "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_function", "module 'json' has no function 'no_such_function'"),
    ("json.decoder:NaN", "is not callable"),
])
def test_bad_run_is_one_line_error_exit_2(tmp_path, side, spec, needle):
    args = ["-m", side, "--run-dir", str(tmp_path / "none"), "--run", spec]
    if side == "guest":
        args += ["--cid", "3"]
    r = run_cli(*args)
    assert r.returncode == 2, r
    assert r.stderr.startswith(f"{side}: --run {spec}: ")
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()           # nothing was started


@pytest.mark.parametrize("side", ["host", "guest"])
@pytest.mark.parametrize("spec,needle", [("sink", "no well-known port"), ("source=x", "not a decimal"),
                                         ("tftp=69", "unknown service")])
def test_bad_service_is_an_error(side, spec, needle):
    args = ["-m", side, "--service", spec] + (["--cid", "3"] if side == "guest" else [])
    r = run_cli(*args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("side", ["host", "guest"])
def test_same_service_port_twice_is_refused(tmp_path, side):
    args = ["-m", side, "--run-dir", str(tmp_path / "none"), "--service", "echo=5",
            "--service", "sink=5"] + (["--cid", "3"] if side == "guest" else [])
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"{side}: --service sink=5: port 5 is already taken by "
                                f"--service echo=5")
