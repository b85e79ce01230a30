"""Example programs for `--run MODULE:FUNCTION` (README, "Programs in the host, without the
bridge"): run them from the top of the checkout, where `examples` can be imported.

    python -m host  --run-dir /tmp/ve --service echo=6000 --service sink=6001 --service source=6002 \\
                    --run examples.hostapp:main &
    python -m guest --run-dir /tmp/ve --cid 3 --service echo=5000 --run examples.guestapp:main &
"""
