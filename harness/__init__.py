"""The test harness: real mounts, the watchdog, shared workloads and I/O helpers.

Used by tests/ (through the fixtures in tests/conftest.py), the demos (scripts/demo*) and the
benchmarks; not part of the shipped `diofs` package (pyproject's packages are `diofs*` only).
Import it from a checkout: pytest puts the repository root on sys.path (tests/ is a package),
and scripts/ and benchmarks/ insert it themselves.

Modules:
  mount      Mount (one daemon we started on one image), MountFactory, run_in_child, CLI runners
  watchdog   deadlines and the rescue: kernel stacks, SIGUSR1, fusectl abort, lazy unmount
  io         one helper each: aligned buffers, direct pread/pwrite, patterns, files, wait_for
  workloads/ workloads that tests and demos both run (one module per area)

Imports: tests, scripts and benchmarks import from here, never from each other (no
`from tests.test_x import ...` outside tests/). What the daemon needs of mount state is
diofs/mountinfo.py, which the harness imports, never the other way round.
"""
