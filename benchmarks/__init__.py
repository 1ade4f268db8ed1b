"""diofs benchmark harness: diofs side by side with its peers, in one run (issue 7).

Modules:
  jobs      the job table (one :class:`Job` per workload), fio argv building, fio JSON parsing
  peers     building and mounting the peers (local disk, C passthrough, Python passthrough, diofs)
  report    machine facts, results.json, results.md (tables + ratios), PNG charts
  runner    the interleaved run loop
  cli       the `scripts/bench` command line (imports runner and daemon_profile; they never
            import it, so there is no import cycle)
  daemon_profile  `--profile JOB`: one job on diofs with the daemon under py-spy or cProfile
  metaload  the metadata workload (create+stat+unlink), run as a child process
  treecopy  the tree-copy jobs: cp -a, tar -x, git commit, rm -rf of a source tree (issue 17)

Invariants: everything the harness starts (daemons, fio, cp/tar/git, py-spy) is started by pid
in its own session and ended by that pid or its own process group; every mount it makes is
unmounted before it exits, by abort + lazy unmount if a plain unmount does not finish by its
deadline.
Hung mounts are rescued by harness/watchdog.py, the same watchdog the tests use.
Nothing here is imported by diofs/ or tests/ other than tests/test_bench_smoke.py.
"""
