"""`python -m tools.bench`: one tool for every figure of the data path (issue 6, item 3; issue 15, item 6).

Every figure sits next to baselines measured by the same tool in the same run: an AF_UNIX
socketpair and a multiprocessing.Pipe between two processes. Scenarios (scenarios.py):

  baselines     socketpair and Pipe streams at 64 B, 4 KiB, 64 KiB and 1 MiB writes; 64 B
                request/response (median, p99, mean); N socketpairs at once
  ceiling       the in-language ceiling (ceiling.py): a bare virtio-shaped vsock stream between two
                processes, one split ring of 256 descriptors, 44-byte headers, every descriptor
                checked, EVENT_IDX, semaphores, no sockets layer, no credit, no extra thread;
                both directions, every size, and a 64 B round trip over a tx and an rx queue
  ring          round trips through one split ring, notification suppression on and off
  in-device     the guest app (tools/bench_apps.py) <-> programs in the host's device process
                (`python -m host --service echo=|sink=|source=`), both directions, every size
  bridge        the guest app <-> an external program through the Unix bridge (Firecracker
                dialect), both directions, every size
  rr            64 B request/response median and p99 by path and mode: the defaults, pure
                semaphores (--poll-us 0) and adaptive polling (--poll-us N)
  pairs         aggregate throughput of 1, 2, 4 and 8 guests on one host at once
  idle          CPU (and threads) of an idle guest and its device process
  zero copy     in-device 64 KiB and 1 MiB streams whose receiving app uses recv_view (a view of
                guest RAM released back to the ring); n/a on a build whose sockets lack it
  threads       threads per process of a guest and its device process serving nothing
  modes         the defaults and the seeds' mode (--credit-policy every-read, 4 KiB rx buffers
                when the guest has a flag for them)

Every vsock figure shows × socketpair and × ceiling (the ceiling figure of the same direction
and write size, or the ceiling's round trip). The targets are issue 15's (report.py: must, aim).
For the vsock figures: kicks, interrupts and thread wake-ups per packet (from the stats files),
CPU seconds per GB in each process (from /proc/PID/stat). A build without a feature gets "n/a"
and the reason. Modules: cluster.py (processes), baselines.py, ring.py, external.py (bridge
programs), ceiling.py (the bare ring), scenarios.py (the plan), model.py (figures), report.py (tables, targets), plot.py.
"""
