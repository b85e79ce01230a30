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

    netagent.py    the program each net guest runs (`--net-run tools.stress.netagent:main`)
    netframes.py   pure: numbered, CRC32-checked frames and their tally (net workloads)

Ctrl-C (__main__._interrupted): Group.interrupt() stops every start, restart and fault signal
(under the group's spawn lock) and every wait, the group threads end, every process is stopped,
then `sweep` removes what is left (processes naming the run dir, dead owners' shm and
semaphores, run-dir files); the table so far is printed marked "interrupted", exit 130.
"""
