"""tools.stress's migrate fault (issue 18 item 5): planned apart from the other faults, breaking
for its target (a migrated vsock guest resets its connections), run for real in a short stress."""
import json
import subprocess
import sys

import pytest

from tools.stress.invariants import BREAKING
from tools.stress.schedule import FAULTS, Config, round_plan
from tests.procs import ROOT, _env


def test_migrate_is_planned_without_changing_the_other_faults():
    old = tuple(k for k in FAULTS if k != "migrate")
    seen = 0
    for rnd in range(80):
        a = round_plan(Config(seed=7, faults=FAULTS), 1, rnd)
        b = round_plan(Config(seed=7, faults=old), 1, rnd)
        if a.fault is not None and a.fault.kind == "migrate":
            seen += 1
            assert b.fault is None and a.fault.target in Config().cids()
            # victims both ways to the target, then the round as it was
            assert [(t.kind, t.cid) for t in a.transfers[-2 - len([t for t in b.transfers if t.kind.startswith("net")]):]][:2] \
                == [("h2g", a.fault.target), ("g2h", a.fault.target)]
        else:
            assert a.as_dict() == b.as_dict()
    assert seen >= 5 and "migrate" in BREAKING


@pytest.mark.multiprocess
def test_short_stress_run_with_migrations_keeps_every_invariant(tmp_path):
    import shutil
    import tempfile
    from pathlib import Path
    short = Path(tempfile.mkdtemp(prefix="ves-", dir="/tmp"))     # AF_UNIX paths are short
    out = tmp_path / "s.json"
    try:
        r = subprocess.run([sys.executable, "-m", "tools.stress", "--pairs", "1", "--guests-per-host", "2",
                            "--rounds", "4", "--faults", "migrate", "--fault-rate", "1.0", "--seed", "5",
                            "--plain", "--json", str(out), "--dir", str(short / "s")],
                           capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    migrations = [f for f in doc["fault_log"] if f["kind"] == "migrate"]
    assert migrations and all(f["recovered"] and f["detail"] == "there and back" for f in migrations), migrations
    assert doc["ok"] and all(row["ok"] for row in doc["invariants"])
