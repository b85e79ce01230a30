"""The seeded plan (pure): what every round of every group does, and which fault hits it.

`round_plan(cfg, group, rnd)` depends only on (cfg.seed, group, rnd) and the configuration, so the
same `--seed` reproduces the same transfers (kinds, sizes, stream ids, concurrency) and the same
faults (kind, target, delay into the round, duration) whatever the timing of the run.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from .data import stream_id

# Fault kinds (--faults picks among them)
FAULTS = ("guest-kill", "host-kill", "guest-stop", "host-stop", "rx-stall", "hostile", "migrate")
# Faults that may legitimately break the streams of their target (kills reset connections; a
# migrated vsock guest resets its connections, as Linux does on TRANSPORT_RESET)
BREAKING = ("guest-kill", "host-kill", "migrate")
# migrate: the target guest moves to the group's second host and back (live migration), planned
# from a generator of its own in rounds without another fault, so older seeds keep their plans

# Workload kinds, each with an executor in workloads.EXECUTORS. The net kinds send numbered,
# checksummed frames (netframes) through a vhost-net backend between the group's net guests
# (not fault targets); their Transfer.cid is the direction (NET_DIRS), size the frame count.
NET_WORKLOADS = ("net-loopback", "net-udp", "net-l2")
WORKLOADS = ("h2g", "g2h", "fanout", "storm-h2g", "storm-g2h", "indev-echo", "indev-sink") + NET_WORKLOADS
# net-loopback: guest to itself. net-l2: 0 = guest A -> guest B on the segment, 1 = B -> A.
# net-udp: 0 = guest -> host UDP socket, 1 = host UDP socket -> guest.
NET_DIRS = (0, 1)
NET_MAX_FRAMES = 200

ECHO_PORT = 7           # guest echo service (host -> guest streams through the bridge)
AGENT_PORT = 100        # the guest agent's command port
HOLD_PORT = 41          # the agent's listener that accepts and never reads (rx-stall)
G2H_PORT = 5000         # host listener (bridge vsock-<cid>.sock_5000) verifying guest streams
STORM_PORT = 5001       # host listener that accepts and closes (connect/close storms)
INDEV_ECHO_PORT = 6000  # in-device host services (python -m host --service ...), when supported
INDEV_SINK_PORT = 6001


@dataclass(frozen=True)
class Config:
    seed: int = 1
    pairs: int = 2
    guests_per_host: int = 2
    faults: tuple = FAULTS
    max_size: int = 256 * 1024
    max_streams: int = 3
    fault_rate: float = 0.5
    indevice: bool = False        # the host supports --service (in-device endpoint)
    net: bool = True              # net workloads (the net guests of group.NET_ROLES)

    def cids(self) -> list[int]:
        return list(range(3, 3 + self.guests_per_host))


@dataclass
class Transfer:
    kind: str
    cid: int
    sid: int
    size: int = 0          # bytes (streams) or connections (storms, fanout)


@dataclass
class Fault:
    kind: str
    target: object         # cid (guest faults), "host", or the hostile guest's cid
    delay: float           # seconds into the round
    duration: float        # stop faults: stopped this long; rx-stall / hostile: how long they run
    mode: str = ""         # host-kill: "daemon" or "all"; hostile: its seed


@dataclass
class RoundPlan:
    group: int
    rnd: int
    transfers: list[Transfer] = field(default_factory=list)
    fault: Fault | None = None

    def as_dict(self) -> dict:
        return {"group": self.group, "round": self.rnd,
                "transfers": [t.__dict__ for t in self.transfers],
                "fault": None if self.fault is None else self.fault.__dict__}


def _size(r: random.Random, max_size: int) -> int:
    if r.random() < 0.05:
        return 0
    return min(max_size, int(2 ** r.uniform(0, math.log2(max(2, max_size)))))


def round_plan(cfg: Config, group: int, rnd: int) -> RoundPlan:
    r = random.Random(f"stress/{cfg.seed}/{group}/{rnd}")
    plan = RoundPlan(group, rnd)
    idx = 0

    def add(kind: str, cid: int, size: int) -> None:
        nonlocal idx
        plan.transfers.append(Transfer(kind, cid, stream_id(cfg.seed, group, rnd, idx), size))
        idx += 1

    for cid in cfg.cids():
        for _ in range(r.randint(1, cfg.max_streams)):
            add("h2g", cid, _size(r, cfg.max_size))
        for _ in range(r.randint(0, cfg.max_streams)):
            add("g2h", cid, _size(r, cfg.max_size))
        if r.random() < 0.2:
            add("fanout", cid, r.randint(8, 24))       # many concurrent small streams
        if r.random() < 0.25:
            add("storm-h2g", cid, r.randint(10, 40))
        if r.random() < 0.25:
            add("storm-g2h", cid, r.randint(10, 40))
        if cfg.indevice:
            add("indev-echo", cid, _size(r, cfg.max_size))
            add("indev-sink", cid, _size(r, cfg.max_size))
    classic = sorted(k for k in cfg.faults if k != "migrate")
    if classic and r.random() < cfg.fault_rate:
        kind = r.choice(classic)
        cids = cfg.cids()
        target: object = "host" if kind.startswith("host") else r.choice(cids)
        mode = ""
        if kind == "host-kill":
            mode = r.choice(("daemon", "all"))
        elif kind == "hostile":
            target = 200 + rnd % 50                     # a CID of its own
            mode = str(r.getrandbits(32))
        plan.fault = Fault(kind, target, round(r.uniform(0.02, 0.3), 3), round(r.uniform(0.3, 2.0), 3), mode)
        if kind in ("guest-kill", "host-kill", "guest-stop", "host-stop"):
            # Victims: long streams both ways to the target, so the fault lands mid-transfer.
            victim = target if isinstance(target, int) else r.choice(cids)
            big = max(8 * cfg.max_size, 2 << 20)
            add("h2g", victim, big)
            add("g2h", victim, big)
    if plan.fault is None and "migrate" in cfg.faults:
        rm = random.Random(f"stress/{cfg.seed}/{group}/{rnd}/migrate")
        if rm.random() < cfg.fault_rate / 2:
            target = rm.choice(cfg.cids())
            plan.fault = Fault("migrate", target, round(rm.uniform(0.05, 0.3), 3), 0.0)
            big = max(8 * cfg.max_size, 2 << 20)
            add("h2g", target, big)             # victims: the fault lands mid-transfer
            add("g2h", target, big)
    if cfg.net and not (plan.fault is not None and plan.fault.kind == "host-kill"):
        # Their own generator, so the vsock plan and faults of a seed stay what they were. Not in
        # a host-kill round: the kill takes the net devices (restarted with the host) with it.
        rn = random.Random(f"stress/{cfg.seed}/{group}/{rnd}/net")
        add("net-loopback", 0, rn.randint(1, NET_MAX_FRAMES))
        for d in NET_DIRS:
            if rn.random() < 0.7:
                add("net-l2", d, rn.randint(1, NET_MAX_FRAMES))
            if rn.random() < 0.7:
                add("net-udp", d, rn.randint(1, NET_MAX_FRAMES))
    return plan


def parse_faults(text: str) -> tuple:
    """--faults: "all", "none", or a comma list of FAULTS."""
    text = text.strip()
    if text == "all":
        return FAULTS
    if text in ("none", ""):
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in FAULTS]
    if bad:
        raise ValueError(f"unknown fault(s) {', '.join(bad)}; choose from {', '.join(FAULTS)}, all, none")
    return names
