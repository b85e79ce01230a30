"""python -m tools.stress: many host/guest groups, seeded workloads and faults, checked invariants.

Modules (cores decide, loops act):

    schedule.py    pure: the seeded plan of every round (transfers, faults) from (seed, group, round)
    data.py        pure: stream contents from a stream id, the g2h header, prefix verification
    agent.py       the program each guest runs (`--run tools.stress.agent:main`): a command server
    hostile.py     `python -m tools.stress.hostile`: a guest that breaks the rules on purpose
    procs.py       starting, signalling, restarting and sampling (RSS) the processes of a group
    workloads.py   host-side transfers over the Unix bridge (and commands to the agent)
    group.py       one group: a host, its guests, rounds of transfers with the round's fault
    invariants.py  pure: outcomes, faults, RSS samples, leaks -> the invariant table
    display.py     the rich live view and the summary table
    __main__.py    the CLI

Net workloads (vhost-net) are not here yet: the vhost-net device has not landed. The extension
point is `schedule.WORKLOADS` (add "net-*" kinds) plus an executor in workloads.EXECUTORS.
"""
