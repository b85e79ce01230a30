"""Programs the net end-to-end tests run in a guest with `--net-run tests.net_apps:NAME`
(the same ones the demo runs)."""
from tools.bench_apps import bad_tx_chain, flood, ping_peer, swap_under_traffic  # noqa: F401
