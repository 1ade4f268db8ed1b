"""Workloads that hung the daemon when an answer waited for the kernel (issue 12; fuse-facts
row 10): each must now complete, within a deadline, with the right bytes.

1. `test_fio_mixed_engines` (xfstests generic/095): nine fio jobs x 5 processes on the same two
   files: sync/libaio/posixaio/splice/mmap, direct and buffered, reads and writes. fio cannot
   verify mixed writers: the checks are fio's exit 0, no job error, both files of the expected
   size, no invalidation left pending, and (teardown) a clean fsck of the image.
2. `test_aio_dio_vs_fcntl_toggle` (generic/036): two processes loop one libaio 512-byte
   pwrite at offset 512 through a shared fd while a third toggles O_DIRECT on that fd with
   fcntl(F_SETFL) (a small C program built with gcc -laio at test time). Bytes 512..1023 must
   hold the pattern and 0..511 zeros (cold buffered read, O_DIRECT read, after a remount).
3. `test_truncate_mmap_dirty` (generic/029, generic/030, plus a punch/zero-range case):
   xfs_io scripts of mapped writes around truncate down/up (and mremap, fpunch, fzero); every
   file must read back as the xfstests golden output says, before and after a remount.
4. `test_msync_direct_fd_mapping` (generic/263, fsx -Z): MAP_SHARED of an O_DIRECT fd whose
   size (0x7a0a8) is not a multiple of 512; a write into the mapping at 0x69200..0x7a0a7,
   then msync(MS_SYNC) must succeed, and a cold read must give the bytes back.
   `test_fsx_mapped_writes_through_direct_fd` runs tests/fsx.py with its mapped writes made
   through a mapping of an O_DIRECT fd (opened last, so the kernel writes the mapping back
   through that handle) and many truncates to sizes that are not multiples of 512.
5. `test_all_workloads_one_mount`: 1-4 in sequence on one mount (default mode only).

Each of 1-4 also runs with the bug switch that restores the old behaviour:
  - `--bug inval-before-reply` (2, 3): answers of direct writes and truncate wait for the
    kernel's reverse invalidation. Expected: a hang, detected by the deadline, whose report
    shows a daemon thread in D state inside `fuse_reverse_inval_inode` (the main loop idle)
    and that the watchdog breaks cleanly (`assert_rescued_cleanly`, no process of the
    workload's session left).
  - 1 (fio) needs both switches, `inval-before-reply` and `writeback-as-direct`: the old hang
    was kernel writeback WRITEs of job 9's mapping (mmap of an O_DIRECT fd) taking the direct
    path, whose synchronous invalidation then waited for the writeback of those very pages
    (`invalidate_inode_pages2_range -> folio_wait_writeback`). With `inval-before-reply` alone
    the mix completed in every run measured (0 hangs in 5), so that mount proves nothing.
  - `--bug writeback-as-direct` (4): the writeback of the partial last page goes down the
    direct path, fails its alignment check, and msync returns EINVAL (fsx: "mapwrite failed:
    EINVAL").
  fallocate (3, last case) did not hang with `inval-before-reply` in any run: the kernel writes
  the range back before it sends FALLOCATE and holds nothing the invalidation waits for; the
  case checks data only, in the default mode.

Repetitions: REPEAT (1) per test; `--stress` or DIOFS_HANG_REPEAT=N runs each workload N times
(10 with --stress; a bug-mode test then hangs N fresh mounts). The per-test deadline scales.
"""

from __future__ import annotations

import collections
import errno
import json
import mmap
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from harness.io import cold_read, direct_pread, pattern, wait_for
from harness.mount import (
    Mount,
    MountFactory,
    assert_rescued_cleanly,
    process_stats,
    run_in_child,
)
from tests.fsx import WEIGHTS, Fsx, run_with_remounts

REPEAT = 1  # repetitions of each workload per test by default
STRESS_REPEAT = 10  # with --stress (DIOFS_HANG_REPEAT=N overrides both)
DEADLINE_S = 60.0  # a default-mode workload must complete within this (loaded machine)
FIO_DEADLINE_S = 90.0  # fio: 45 processes; about 10 s on an idle 2-core machine

# bug mode: the workload is declared hung past this; the hang itself is shown by the stacks
FIO_HANG_S = 30.0  # measured: hung in 6 of 6 runs (the good run takes about 10 s)
AIO_HANG_S = 15.0  # the workload runs AIO_SECONDS; with the bug it hangs after a few writes
TRUNCATE_HANG_S = 10.0  # xfs_io takes milliseconds; with the bug the first truncate hangs

SETTLE_S = 10.0  # posted kernel invalidations must be done within this after a workload


# --------------------------------------------------------------------------- repetitions


def repetitions(config: pytest.Config) -> int:
    env = os.environ.get("DIOFS_HANG_REPEAT")
    if env:
        return max(1, int(env))
    return STRESS_REPEAT if config.getoption("--stress") else REPEAT


@pytest.fixture
def reps(request: pytest.FixtureRequest) -> int:
    """How many times to run the workload; scales the test's deadline marker (per repetition)
    to match, before mount_factory arms it."""
    n = repetitions(request.config)
    marker = request.node.get_closest_marker("deadline")
    per_rep = float(marker.args[0]) if marker is not None and marker.args else 120.0
    if n > 1:
        request.node.add_marker(pytest.mark.deadline(per_rep * n + 30), append=False)
    return n


@pytest.fixture
def factory(reps: int, request: pytest.FixtureRequest) -> MountFactory:
    """mount_factory, armed with the deadline `reps` set."""
    return request.getfixturevalue("mount_factory")


# --------------------------------------------------------------------------- hang checks


def _threads(part: str) -> list[tuple[str, str]]:
    """(header, stack) of every thread in one process's part of a watchdog report."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"\n(?=  tid )", part)[1:]:
        header, _, stack = block.partition("\n")
        out.append((header, stack))
    return out


def _session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (the workload's argv child leads its own session)."""
    return [pid for pid, fields in process_stats() if int(fields[3]) == sid and fields[0] != "Z"]


def assert_invalidation_hang(m: Mount, result: Any, daemon_pid: int | None,
                             waits: tuple[str, ...] = ()) -> str:
    """The workload hung the way fuse-facts row 10 describes, and the watchdog broke it
    cleanly. Returns the daemon's part of the report (its stacks)."""
    assert result.timed_out, "the workload completed although the bug switch is on"
    report = result.report
    assert daemon_pid is not None and f"pid {daemon_pid}:" in report, report
    start = report.index(f"pid {daemon_pid}:")
    end = report.find(f"pid {result.pid}:", start)
    daemon_part = report[start : end if end > 0 else len(report)]
    threads = _threads(daemon_part)
    stuck = [(h, s) for h, s in threads if "state=D" in h and "fuse_reverse_inval_inode" in s]
    # a daemon thread is stuck in the kernel inside a reverse invalidation ...
    assert stuck, report
    for wait in waits:  # ... on the kernel wait that closes the cycle
        assert any(wait in s for _, s in stuck), (wait, report)
    # ... while the main loop is free: it is the answer that waits, not the loop
    main = [h for h, _ in threads if h.startswith(f"  tid {daemon_pid} ")]
    assert main and "state=D" not in main[0], report
    assert_rescued_cleanly(m, result, daemon_pid)
    # fio workers, the C program's children
    wait_for(lambda: not _session_members(result.pid), "the client's session to end", 15)
    return daemon_part


def settle(m: Mount) -> dict[str, float]:
    """Wait until every posted kernel invalidation is done; returns the stats."""
    return m.wait_stats(
        lambda st: not st.get("kernel.invalidations_pending", 0),
        "the posted kernel invalidations",
        SETTLE_S,
    )


def expect_layout(path: str, size: int, layout: list[tuple[int, int, int]], what: str) -> None:
    """`path` is `size` bytes made of (offset, length, byte) runs (a cold buffered read)."""
    want = bytearray(size)
    for off, n, byte in layout:
        want[off : off + n] = bytes([byte]) * n
    got = cold_read(path, size + 4096, 0)
    if got != want:
        first = next((i for i in range(min(len(got), size)) if got[i] != want[i]),
                     min(len(got), size))
        raise AssertionError(
            f"{what}: {os.path.basename(path)} differs at offset {first} (got {len(got)} "
            f"bytes, want {size}): got {got[first:first + 16].hex()} "
            f"want {bytes(want[first:first + 16]).hex()}"
        )


# --------------------------------------------------------------------------- 1: fio (g/095)

FIO_SIZE = 1 << 20
FIO_LOOPS = 2  # generic/095 runs each job once; two loops take about 10 s here
FIO_JOBS = [  # generic/095's nine jobs
    "ioengine=sync\nrw=randread\ndirect=1\nbs=512",
    "ioengine=libaio\nrw=randwrite\ndirect=1",
    "ioengine=posixaio\nrw=randwrite\ndirect=1\nbs=512",
    "ioengine=splice\nrw=randwrite\ndirect=1",
    "ioengine=sync\nrw=randread\nbs=1k",
    "ioengine=posixaio\nrw=randwrite",
    "ioengine=splice\nrw=randwrite",
    "ioengine=mmap\nrw=randwrite\nbs=1k",
    "ioengine=mmap\nrw=randwrite\ndirect=1\nbs=4096",
]


def fio_argv(m: Mount, workdir: Path, loops: int = FIO_LOOPS) -> tuple[list[str], Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / "g095.fio"
    out = workdir / "g095.json"
    text = (
        "[global]\nbs=8k\niodepth=16\niodepth_batch=8\nrandrepeat=1\n"
        f"size={FIO_SIZE}\nnumjobs=5\nfilename=file1:file2\ndirectory={m.mnt}\n"
        f"loops={loops}\n"
    )
    text += "".join(f"\n[job{i}]\n{body}\n" for i, body in enumerate(FIO_JOBS, 1))
    job.write_text(text)
    argv = ["fio", str(job), "--ignore_error=,EIO", "--output-format=json", f"--output={out}"]
    return argv, out


def check_fio(m: Mount, result: Any, out: Path) -> None:
    assert not result.timed_out, result.report
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    text = out.read_text()
    report = json.loads(text[text.index("{") :])
    jobs = report["jobs"]
    assert len(jobs) == 5 * len(FIO_JOBS), len(jobs)
    assert all(j["error"] == 0 for j in jobs), [(j["jobname"], j["error"]) for j in jobs]
    assert sum(j["write"]["io_bytes"] for j in jobs) > 0
    assert sum(j["read"]["io_bytes"] for j in jobs) > 0
    for name in ("file1", "file2"):
        assert os.stat(m.path(name)).st_size == FIO_SIZE // 2, name
    st = settle(m)
    # direct writes of files the kernel caches: the path the fix changed (each one answered
    # before any invalidation its range needs)
    assert st.get("dio.kernel_invalidations", 0) > 0, st


@pytest.mark.deadline(FIO_DEADLINE_S + 60)
@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
@pytest.mark.parametrize("bug_on", [False, True],
                         ids=["default", "inval-before-reply+writeback-as-direct"])
def test_fio_mixed_engines(factory: MountFactory, reps: int, tmp_path: Path,
                           bug_on: bool) -> None:
    if not bug_on:
        m = factory(size="64M")
        for i in range(reps):
            argv, out = fio_argv(m, tmp_path / f"fio{i}")
            t0 = time.monotonic()
            result = m.run(argv, timeout=FIO_DEADLINE_S)
            check_fio(m, result, out)
            print(f"fio run {i}: {time.monotonic() - t0:.1f} s")
            for name in ("file1", "file2"):
                os.unlink(m.path(name))
        return
    for i in range(reps):
        m = factory(size="64M", bugs=["inval-before-reply", "writeback-as-direct"])
        m.expect_rescue()
        daemon_pid = m.daemon.pid if m.daemon else None
        argv, _ = fio_argv(m, tmp_path / f"fio{i}")
        result = m.run(argv, timeout=FIO_HANG_S)
        part = assert_invalidation_hang(m, result, daemon_pid)
        stuck = collections.Counter(
            (h.split("wchan=")[-1], "fuse_launder_folio" in s)
            for h, s in _threads(part) if "state=D" in h
        )
        print(f"fio hang {i}: daemon threads in D (wchan, laundering): {dict(stuck)}")


# --------------------------------------------------------------------------- 2: aio vs fcntl

AIO_SECONDS = 5.0  # generic/036 loops 10 s
AIO_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <libaio.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* FILE SECONDS FILL: one process toggles O_DIRECT on a shared fd with fcntl(F_SETFL), two
 * loop io_submit + io_getevents of one 512-byte pwrite at offset 512 (buffer of FILL bytes,
 * 4096-aligned), for SECONDS each. Exit 0 if every call succeeded. */
static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int toggle(int fd, double end, long *n)
{
	int flags = fcntl(fd, F_GETFL);
	while (now() < end) {
		if (fcntl(fd, F_SETFL, flags | O_DIRECT) || fcntl(fd, F_SETFL, flags)) {
			perror("fcntl");
			return 1;
		}
		++*n;
	}
	return 0;
}

static int aio_loop(int fd, double end, int fill, long *n)
{
	io_context_t ctx = 0;
	struct iocb cb, *cbs[1] = { &cb };
	struct io_event ev;
	void *buf;
	int err = io_setup(1, &ctx);
	if (err) {
		fprintf(stderr, "io_setup: %s\n", strerror(-err));
		return 1;
	}
	if (posix_memalign(&buf, 4096, 4096)) {
		fprintf(stderr, "posix_memalign failed\n");
		return 1;
	}
	memset(buf, fill, 4096);
	while (now() < end) {
		io_prep_pwrite(&cb, fd, buf, 512, 512);
		err = io_submit(ctx, 1, cbs);
		if (err != 1) {
			fprintf(stderr, "io_submit: %s\n", strerror(-err));
			return 1;
		}
		err = io_getevents(ctx, 1, 1, &ev, NULL);
		if (err != 1) {
			fprintf(stderr, "io_getevents: %s\n", strerror(-err));
			return 1;
		}
		if ((long)ev.res != 512) {
			fprintf(stderr, "aio write returned %ld\n", (long)ev.res);
			return 1;
		}
		++*n;
	}
	io_destroy(ctx);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s FILE SECONDS FILL\n", argv[0]);
		return 2;
	}
	double end = now() + atof(argv[2]);
	int fill = (int)strtol(argv[3], NULL, 0);
	int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0) {
		perror("open");
		return 1;
	}
	pid_t pids[3];
	for (int i = 0; i < 3; i++) {
		pids[i] = fork();
		if (pids[i] < 0) {
			perror("fork");
			return 1;
		}
		if (pids[i] == 0) {
			long n = 0;
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			int rc = i == 0 ? toggle(fd, end, &n) : aio_loop(fd, end, fill, &n);
			printf("%s %ld\n", i == 0 ? "toggles" : "writes", n);
			fflush(stdout);
			_exit(rc);
		}
	}
	int rc = 0;
	for (int i = 0; i < 3; i++) {
		int st;
		if (waitpid(pids[i], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
			rc = 1;
	}
	return rc;
}
"""


@pytest.fixture(scope="session")
def aio_fcntl_prog(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("gcc") is None or not os.path.exists("/usr/include/libaio.h"):
        pytest.skip("gcc or libaio-dev is missing")
    d = tmp_path_factory.mktemp("aio-fcntl")
    src, prog = d / "aio_fcntl_race.c", d / "aio_fcntl_race"
    src.write_text(AIO_C)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(prog), str(src), "-laio"], check=True,
                   capture_output=True, timeout=60)
    return str(prog)


def aio_argv(prog: str, path: str, fill: int, seconds: float = AIO_SECONDS) -> list[str]:
    return [prog, path, str(seconds), str(fill)]


def check_aio_file(path: str, fill: int) -> None:
    expect_layout(path, 1024, [(512, 512, fill)], "aio/fcntl")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert direct_pread(fd, 4096, 0) == bytes(512) + bytes([fill]) * 512
    finally:
        os.close(fd)


def check_aio(m: Mount, result: Any, path: str, fill: int) -> dict[str, int]:
    assert not result.timed_out, result.report
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    counts: dict[str, int] = {}
    for line in result.stdout.splitlines():
        what, n = line.split()
        counts[what] = counts.get(what, 0) + int(n)
    assert counts.get("writes", 0) > 0 and counts.get("toggles", 0) > 0, result.stdout
    settle(m)
    check_aio_file(path, fill)
    return counts


@pytest.mark.deadline(DEADLINE_S + 60)
@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "inval-before-reply"])
def test_aio_dio_vs_fcntl_toggle(factory: MountFactory, reps: int, aio_fcntl_prog: str,
                                 bug_on: bool) -> None:
    if not bug_on:
        m = factory(size="16M")
        path = m.path("aio")
        for i in range(reps):
            fill = 0x41 + i
            result = m.run(aio_argv(aio_fcntl_prog, path, fill), timeout=DEADLINE_S)
            print(f"aio run {i}: {check_aio(m, result, path, fill)}")
        m.remount()
        check_aio_file(path, 0x41 + reps - 1)
        return
    for _ in range(reps):
        m = factory(size="16M", bugs=["inval-before-reply"])
        m.expect_rescue()
        daemon_pid = m.daemon.pid if m.daemon else None
        result = m.run(aio_argv(aio_fcntl_prog, m.path("aio"), 0x41), timeout=AIO_HANG_S)
        # a buffered WRITE holds its folio locked while it waits for our answer
        assert_invalidation_hang(m, result, daemon_pid, waits=("__folio_lock",))


# --------------------------------------------------------------------------- 3: truncate+mmap

X, Y, Z, W = 0x58, 0x59, 0x5A, 0x57
K = 1024
# (name, xfs_io -c commands, final size, expected (offset, length, byte) runs): generic/029's
# and generic/030's three cases each (their golden output), then punch/zero-range around
# mapped writes
TRUNCATE_CASES: list[tuple[str, list[str], int, list[tuple[int, int, int]]]] = [
    ("g029-1", ["truncate 5120", "pwrite -S 0x58 0 5120", "mmap -rw 0 5120",
                "mwrite -S 0x5a 2048 3072", "truncate 2048", "truncate 5120",
                "mwrite -S 0x59 2048 3072", "close"],
     5120, [(0, 2048, X), (2048, 3072, Y)]),
    ("g029-2", ["truncate 5120", "pwrite -S 0x58 0 5120", "mmap -rw 0 5120",
                "mwrite -S 0x5a 2048 3072", "truncate 2048", "mwrite -S 0x57 1024 1024",
                "truncate 5120", "mwrite -S 0x59 2048 3072", "close"],
     5120, [(0, 1024, X), (1024, 1024, W), (2048, 3072, Y)]),
    ("g029-3", ["truncate 5121", "pwrite -S 0x58 0 5121", "mmap -rw 0 5121",
                "mwrite -S 0x5a 2047 3071", "truncate 2047", "mwrite -S 0x57 513 1025",
                "truncate 5121", "mwrite -S 0x59 2047 3071", "close"],
     5121, [(0, 513, X), (513, 1025, W), (1538, 509, X), (2047, 3071, Y)]),
    ("g030-1", ["truncate 5017k", "pwrite -S 0x58 0 5017k", "mmap -rw 0 5017k",
                "truncate 5020k", "mremap -m 5020k", "mwrite -S 0x57 5017k 3k",
                "mremap 5017k", "truncate 5017k", "truncate 5020k", "mremap -m 5020k",
                "mwrite -S 0x59 5017k 3k", "close"],
     5020 * K, [(0, 5017 * K, X), (5017 * K, 3 * K, Y)]),
    ("g030-2", ["truncate 5017k", "pwrite -S 0x58 0 5017k", "mmap -rw 0 5017k",
                "truncate 5020k", "mremap -m 5020k", "mwrite -S 0x57 5017k 3k",
                "mremap 5017k", "truncate 5017k", "mwrite -S 0x5a 5016k 1k", "truncate 5020k",
                "mremap -m 5020k", "mwrite -S 0x59 5017k 3k", "close"],
     5020 * K, [(0, 5016 * K, X), (5016 * K, K, Z), (5017 * K, 3 * K, Y)]),
    ("g030-3", ["truncate 5136912", "pwrite -S 0x58 0 5136912", "mmap -rw 0 5136912",
                "mremap 5136912", "truncate 5136912", "truncate 5139720",
                "mremap -m 5139720", "mwrite -S 0 5136912 2808", "mwrite -S 0 5136912 2808",
                "mwrite -S 0 5136912 2808", "mremap 5136912", "truncate 5136912",
                "truncate 5139720", "mremap -m 5139720", "mwrite -S 0 5136912 2808",
                "mwrite -S 0 5136912 2808", "mwrite -S 0x59 5136912 2808", "truncate 5140480",
                "mremap 5140480", "msync -s 0 5140480", "mremap 5139720", "munmap", "close"],
     5140480, [(0, 5136912, X), (5136912, 2808, Y)]),
    ("fallocate", ["pwrite -S 0x58 0 16384", "mmap -rw 0 16384", "mwrite -S 0x5a 0 16384",
                   "fpunch 2048 4096", "mwrite -S 0x59 8192 1024", "fzero 9216 1024",
                   "mwrite -S 0x57 12288 100", "fzero -k 12000 8000", "close"],
     16384, [(0, 2048, Z), (6144, 2048, Z), (8192, 1024, Y), (10240, 1760, Z)]),
]


def xfs_io_argv(path: str, commands: list[str]) -> list[str]:
    argv = ["xfs_io", "-f", "-t"]
    for c in commands:
        argv += ["-c", c]
    return [*argv, path]


def truncate_image_size(reps: int) -> str:
    """An image for `reps` sets of TRUNCATE_CASES kept side by side (about 15 MiB a set)."""
    return f"{64 + 20 * (reps - 1)}M"


def run_truncate_cases(m: Mount, tag: str = "") -> None:
    for name, commands, size, layout in TRUNCATE_CASES:
        result = m.run(xfs_io_argv(m.path(f"{name}{tag}"), commands), timeout=DEADLINE_S)
        assert not result.timed_out, f"{name}: {result.report}"
        assert result.returncode == 0 and not result.stderr, (name, result.stderr)
        expect_layout(m.path(f"{name}{tag}"), size, layout, f"{name} (pre-remount)")
    settle(m)


def check_truncate_cases_after_remount(m: Mount, tag: str = "") -> None:
    m.remount()
    for name, _, size, layout in TRUNCATE_CASES:
        expect_layout(m.path(f"{name}{tag}"), size, layout, f"{name} (post-remount)")


@pytest.mark.deadline(DEADLINE_S + 60)
@pytest.mark.skipif(shutil.which("xfs_io") is None, reason="xfs_io is not installed")
@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "inval-before-reply"])
def test_truncate_mmap_dirty(factory: MountFactory, reps: int, bug_on: bool) -> None:
    if not bug_on:
        m = factory(size=truncate_image_size(reps))
        for i in range(reps):
            run_truncate_cases(m, f".{i}")
        for i in range(reps):
            check_truncate_cases_after_remount(m, f".{i}")
        return
    _, commands, _, _ = TRUNCATE_CASES[0]  # generic/029's first case
    for _ in range(reps):
        m = factory(size="16M", bugs=["inval-before-reply"])
        m.expect_rescue()
        daemon_pid = m.daemon.pid if m.daemon else None
        result = m.run(xfs_io_argv(m.path("g029"), commands), timeout=TRUNCATE_HANG_S)
        # the invalidation launders the dirty mapped page and waits for a WRITE that the
        # kernel does not send while it holds NOWRITE for the SETATTR we have not answered
        assert_invalidation_hang(m, result, daemon_pid,
                                 waits=("fuse_launder_folio", "folio_wait_writeback"))
        client = result.report[result.report.index(f"pid {result.pid}:") :]
        assert "fuse_do_setattr" in client, result.report


# --------------------------------------------------------------------------- 4: msync, O_DIRECT

MSYNC_SIZE = 0x7A0A8  # not a multiple of 512: the last page's writeback is 0xa8 bytes
MSYNC_LO = 0x69200


def msync_direct_mapping(path: str, seed: int) -> str:
    """ftruncate an O_DIRECT fd to MSYNC_SIZE, write [MSYNC_LO, MSYNC_SIZE) through a MAP_SHARED
    mapping of it, msync(MS_SYNC). Returns "ok" or the msync errno's name."""
    data = pattern(MSYNC_SIZE - MSYNC_LO + 512, seed, MSYNC_LO)[: MSYNC_SIZE - MSYNC_LO]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        os.ftruncate(fd, MSYNC_SIZE)
        with mmap.mmap(fd, MSYNC_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[MSYNC_LO:MSYNC_SIZE] = data
            try:
                m.flush()  # msync(MS_SYNC)
            except OSError as exc:
                return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    finally:
        os.close(fd)
    return "ok"


def check_msync_file(path: str, seed: int) -> None:
    want = bytes(MSYNC_LO) + pattern(MSYNC_SIZE - MSYNC_LO + 512, seed, MSYNC_LO)[
        : MSYNC_SIZE - MSYNC_LO]
    got = cold_read(path, MSYNC_SIZE + 4096, 0)
    assert len(got) == MSYNC_SIZE, len(got)
    if got != want:
        first = next(i for i in range(MSYNC_SIZE) if got[i] != want[i])
        raise AssertionError(f"msync data differs from offset {first:#x}")


def run_msync(m: Mount, seed: int, name: str = "msync") -> str:
    return run_in_child(msync_direct_mapping, m.path(name), seed, timeout=DEADLINE_S,
                        mounts=[m])


@pytest.mark.deadline(DEADLINE_S + 60)
@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "writeback-as-direct"])
def test_msync_direct_fd_mapping(factory: MountFactory, reps: int, bug_on: bool) -> None:
    m = factory(size="16M", bugs=["writeback-as-direct"] if bug_on else [])
    for i in range(reps):
        got = run_msync(m, seed=i + 1)
        if bug_on:
            # the partial last page went down the direct path and failed its alignment check
            assert got == "EINVAL", got
            continue
        assert got == "ok", got
        check_msync_file(m.path("msync"), i + 1)
    if not bug_on:
        m.remount()
        check_msync_file(m.path("msync"), reps)


class DirectMapFsx(Fsx):
    """fsx whose mapped writes go through a mapping of an O_DIRECT fd (fsx -Z, generic/263).
    The fd is opened just before mapping, so it heads the inode's list of writable files and
    the kernel writes the mapping back through its handle."""

    def op_mapwrite(self, f: Any) -> str:
        size = len(f.model)
        if size == 0:
            return "mapwrite (empty, skipped)"
        off, n = self._range(size)
        if self.rng.random() < 0.5:  # end at EOF: the partial last page is written back
            off = max(0, size - n)
        n = min(n, size - off)
        data = self._rand_bytes(n)
        self._note(f, f"mapwrite(O_DIRECT fd) {off:#x}+{n:#x} size {size:#x}")
        fd = os.open(f.path, os.O_RDWR | os.O_DIRECT)
        try:
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[off : off + n] = data
                m.flush()
        finally:
            os.close(fd)
        self._model_write(f, off, data)
        if off + n == size and size % 512:
            self.counts["mapwrite_unaligned_eof"] += 1  # the case generic/263 hit
        return f"mapwrite(O_DIRECT fd) {off:#x}+{n:#x} size {size:#x}"


FSX_OPS = 1500
FSX_WEIGHTS = {**WEIGHTS, "mapwrite": 15, "truncate": 10}


@pytest.mark.deadline(DEADLINE_S + 60)
@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "writeback-as-direct"])
def test_fsx_mapped_writes_through_direct_fd(factory: MountFactory, reps: int,
                                             bug_on: bool) -> None:
    m = factory(size="64M", bugs=["writeback-as-direct"] if bug_on else [])
    for i in range(reps):
        fsx = DirectMapFsx(m.mnt, seed=263 + i, weights=FSX_WEIGHTS, max_size=512 << 10)
        if bug_on:
            with pytest.raises(AssertionError, match="mapwrite failed: EINVAL"):
                run_with_remounts(m, fsx, FSX_OPS, timeout=DEADLINE_S)
            continue
        summary = run_with_remounts(m, fsx, FSX_OPS, timeout=DEADLINE_S)
        print(summary)
        counts = summary["counts"]
        assert isinstance(counts, dict) and counts.get("mapwrite_unaligned_eof", 0) > 0, summary
        assert counts.get("remount", 0) >= 1, summary


# --------------------------------------------------------------------------- 5: all, one mount


@pytest.mark.deadline(FIO_DEADLINE_S + 3 * DEADLINE_S)
@pytest.mark.skipif(shutil.which("fio") is None or shutil.which("xfs_io") is None,
                    reason="fio or xfs_io is not installed")
def test_all_workloads_one_mount(factory: MountFactory, reps: int, tmp_path: Path,
                                 aio_fcntl_prog: str) -> None:
    m = factory(size=truncate_image_size(reps))
    for i in range(reps):
        t0 = time.monotonic()
        argv, out = fio_argv(m, tmp_path / f"fio{i}", loops=1)
        check_fio(m, m.run(argv, timeout=FIO_DEADLINE_S), out)
        t1 = time.monotonic()
        path, fill = m.path("aio"), 0x61 + i
        check_aio(m, m.run(aio_argv(aio_fcntl_prog, path, fill), timeout=DEADLINE_S), path,
                  fill)
        t2 = time.monotonic()
        run_truncate_cases(m, f".{i}")
        t3 = time.monotonic()
        assert run_msync(m, seed=100 + i) == "ok"
        check_msync_file(m.path("msync"), 100 + i)
        print(f"round {i}: fio {t1 - t0:.1f} s, aio {t2 - t1:.1f} s, truncate "
              f"{t3 - t2:.1f} s, msync {time.monotonic() - t3:.1f} s")
        for name in ("file1", "file2"):
            os.unlink(m.path(name))
    st = settle(m)
    assert st.get("hangs.detected", 0) == 0, st
    m.remount()
    check_aio_file(m.path("aio"), 0x61 + reps - 1)
    check_msync_file(m.path("msync"), 100 + reps - 1)
    for i in range(reps):
        for name, _, size, layout in TRUNCATE_CASES:
            expect_layout(m.path(f"{name}.{i}"), size, layout, f"{name} (post-remount)")
