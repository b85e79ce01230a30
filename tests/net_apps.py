"""Programs the net end-to-end tests run in a guest with `--net-run tests.net_apps:NAME`.
Parameters come from VE_APP_* environment variables; one JSON line goes to VE_APP_OUT."""
import json
import os


def _out(result: dict) -> None:
    with open(os.environ["VE_APP_OUT"], "a") as f:
        f.write(json.dumps(result) + "\n")


def ping_peer(net) -> None:
    """Ping VE_APP_PEER VE_APP_COUNT times, then one UDP echo round trip to it."""
    peer, count = os.environ["VE_APP_PEER"], int(os.environ.get("VE_APP_COUNT", "3"))
    rtts = net.ping(peer, count=count, timeout=3.0)
    payload = os.urandom(200)
    echoed = net.udp_echo(peer, payload, timeout=3.0)
    _out({"replies": len(rtts), "count": count, "udp_echo_ok": echoed == payload,
          "rtt_ms": [round(r * 1000, 3) for r in rtts]})
