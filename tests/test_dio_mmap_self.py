"""mmap + O_DIRECT self-I/O never deadlocks and moves the right bytes (SPEC 4; fuse-facts 2, 3,
9; seeds 002 and 004).

Self-write: `pwritev(O_DIRECT fd, [MAP_SHARED mapping of the same file], off)`; self-read:
`preadv(O_DIRECT fd, [that mapping], off)`. The kernel splits them into 1 MiB requests and, with
direct_io=False, faults the pages of chunk N+1 (READs carrying the writer's tid) while chunk N
is still outstanding at the daemon (fuse-facts 2). `-o dio_delay=S` makes each direct WRITE hold
the BLOCK state for S seconds, so that this overlap happens in every run.

Default mode (shootdown=unlocked): every size, overlapping or not, one thread or several (on
disjoint regions, fuse-facts 9), with a second process faulting another region of the same
file all the time, completes with correct data.

`-o shootdown=locked` invalidates the kernel's cache while holding BLOCK. The writer's own fault
READs must then not wait for the lock (the per-task fault marker: `locks.faults_disabled_fills`
counts them). With `--bug no-fault-marker` they do, and the self-write deadlocks on the kernel
folio locks (fuse-facts row 3): the test expects the watchdog to find it, report the stuck
tasks and abort the connection, leaving nothing behind. Two more locked-mode tests: a fault
READ of the writer that queued for ADD before its own chunk got BLOCK must leave the queue
once marked (fault_marker rule M6, a fix found by these tests), and a second faulting process
still deadlocks locked mode even with the marker (row 3: why it is not the default).

Expected data with overlap: the destination lies *below* the source (dst = src - n/2), so each
chunk reads source bytes that no earlier chunk has overwritten (the kernel pins chunk N's
pages before it sends chunk N, and sends chunks in ascending order): the result is the original
source. Each file is written before the delay hooks are switched on
(`prepared_mount`), with O_DIRECT, so no cache holds it and every access faults to the daemon.
"""

from __future__ import annotations

import mmap
import os
import threading
import time

import pytest

from diofs import mountinfo
from diofs.cli.stats import read_stats
from harness.io import direct_pread, direct_pwrite, drop_kernel_cache, pattern
from harness.mount import MountFactory, assert_rescued_cleanly, run_in_child
from harness.workloads.mmap_self import (
    FAULT_OFF,
    FILE_NAME,
    FILE_SIZE,
    LOCKED,
    REGION,
    KiB,
    MiB,
    locked_self_write,
    locked_self_write_with_faulter,
    prepared_mount,
    second_process,
    self_read,
    self_write,
    single_thread_run,
)

pytestmark = pytest.mark.deadline(150)

SIZES = [4 * KiB, 1 * MiB, 4 * MiB, 8 * MiB]


# --------------------------------------------------------------------------- the second process


# --------------------------------------------------------------------------- workloads


def thread_worker(
    fd: int, mm: mmap.mmap, base: int, n: int, tid_seed: int, rounds: int, errors: list[str]
) -> None:
    """One thread's rounds on [base, base + 2n): self-write src->dst, then self-read dst->src,
    each from fresh O_DIRECT-written bytes (the kernel has no copy: the transfer faults)."""
    src, dst = base, base + n
    try:
        for r in range(rounds):
            a = pattern(n, tid_seed * 100 + 2 * r, src)
            assert direct_pwrite(fd, a, src) == n
            self_write(fd, mm, src, dst, n)
            if direct_pread(fd, n, dst) != a:
                errors.append(f"thread {tid_seed} round {r}: self-write data wrong")
            if mm[dst : dst + n] != a:
                errors.append(f"thread {tid_seed} round {r}: mapping stale after self-write")
            b = pattern(n, tid_seed * 100 + 2 * r + 1, dst)
            assert direct_pwrite(fd, b, dst) == n
            self_read(fd, mm, dst, src, n)
            if mm[src : src + n] != b:
                errors.append(f"thread {tid_seed} round {r}: self-read data wrong in mapping")
            if direct_pread(fd, n, src) != b:  # dirty mapped pages are written back first
                errors.append(f"thread {tid_seed} round {r}: self-read data wrong in file")
    except OSError as exc:
        errors.append(f"thread {tid_seed}: {exc!r}")


def threads_run(mnt: str, n: int, nthreads: int, rounds: int) -> dict:
    path = os.path.join(mnt, FILE_NAME)
    assert nthreads * 2 * n <= FAULT_OFF
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    mfd = os.open(path, os.O_RDWR)
    errors: list[str] = []
    try:
        drop_kernel_cache(mfd)
        with mmap.mmap(mfd, FILE_SIZE) as mm, second_process(path) as progress:
            ts = [
                threading.Thread(
                    target=thread_worker, args=(fd, mm, i * 2 * n, n, i + 1, rounds, errors)
                )
                for i in range(nthreads)
            ]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            faulter_steps = progress()
    finally:
        os.close(mfd)
        os.close(fd)
    return {"errors": errors, "faulter_steps": faulter_steps}


# --------------------------------------------------------------------------- default mode


@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint", "overlap"])
@pytest.mark.parametrize("kind", ["write", "read"])
@pytest.mark.parametrize("n", SIZES, ids=["4K", "1M", "4M", "8M"])
def test_self_io_with_second_process(
    mount_factory: MountFactory, n: int, kind: str, overlap: bool
) -> None:
    m = prepared_mount(mount_factory, {"dio_delay": 0.05})
    r = run_in_child(single_thread_run, str(m.mnt), kind, n, overlap, True, timeout=60, mounts=[m])
    assert r["in_mapping"] and r["on_image"] and r["rest_ok"], r
    assert r["faulter_steps"] >= 1, r


@pytest.mark.parametrize("n", [1 * MiB, 4 * MiB], ids=["1M", "4M"])
def test_self_io_threads_disjoint_regions(mount_factory: MountFactory, n: int) -> None:
    """fuse-facts 9: 3 threads, each self-writing and self-reading its own region, 3 rounds,
    a second process faulting a fourth region: correct data every time (AUTO_INVAL_DATA off)."""
    m = prepared_mount(mount_factory)
    r = run_in_child(threads_run, str(m.mnt), n, 3, 3, timeout=90, mounts=[m])
    assert r["errors"] == [], r
    assert r["faulter_steps"] >= 1, r


def test_marker_taken_in_default_mode(mount_factory: MountFactory) -> None:
    """With a direct WRITE holding BLOCK, the writer's own fault READs of the next chunk take
    the faults-disabled path (and insert nothing)."""
    m = prepared_mount(mount_factory, {"dio_delay": 0.2})
    r = run_in_child(
        single_thread_run, str(m.mnt), "write", 4 * MiB, False, False, timeout=60, mounts=[m]
    )
    assert r["in_mapping"] and r["on_image"] and r["rest_ok"], r
    assert m.stats().get("locks.faults_disabled_fills", 0) > 0


# --------------------------------------------------------------------------- locked shootdown

HANG_TIMEOUT_S = 8.0  # the good run takes about 1 s


@pytest.mark.parametrize("kind", ["write", "read"])
def test_locked_shootdown_self_io_completes_with_marker(
    mount_factory: MountFactory, kind: str
) -> None:
    m = prepared_mount(mount_factory, LOCKED)
    r = run_in_child(
        single_thread_run, str(m.mnt), kind, 4 * MiB, False, False, timeout=30, mounts=[m]
    )
    assert r["in_mapping"] and r["on_image"] and r["rest_ok"], r
    if kind == "write":
        assert m.stats().get("locks.faults_disabled_fills", 0) > 0


def queued_fault_run(mnt: str) -> dict:
    """The writer's own fault READ queues for ADD behind its own first chunk's BLOCK wait.

    1. the source's first MiB goes into the kernel cache by a buffered write, so chunk 0 is
       sent with no fault READ, and chunk 1's source is not cached anywhere;
    2. another thread's buffered READ (one READ: POSIX_FADV_RANDOM) of a far range holds ADD
       for the mount's fill_delay;
    3. the self-write: chunk 0's WRITE queues for BLOCK behind that fill; the kernel then
       faults chunk 1's source, and that READ (the writer's tid, not yet marked) queues for
       ADD behind the BLOCK waiter (the lock is phase-fair).
    """
    path = os.path.join(mnt, FILE_NAME)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    mfd = os.open(path, os.O_RDWR)
    try:
        drop_kernel_cache(mfd)
        assert os.pwrite(mfd, pattern(1 * MiB, 1), 0) == 1 * MiB  # same bytes, now cached
        s0 = read_stats(mnt)

        def other_reader() -> None:
            rfd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_RANDOM)
                os.pread(rfd, 128 * KiB, FAULT_OFF)
            finally:
                os.close(rfd)

        t = threading.Thread(target=other_reader)
        t.start()
        deadline = time.monotonic() + 10
        while read_stats(mnt).get("cache.misses", 0) == s0.get("cache.misses", 0):
            assert time.monotonic() < deadline, "the other READ never reached the daemon"
            time.sleep(0.002)
        with mmap.mmap(mfd, FILE_SIZE) as mm:
            self_write(fd, mm, 0, REGION, 4 * MiB)
        t.join()
        ok = direct_pread(fd, 4 * MiB, REGION) == pattern(FILE_SIZE, 1)[: 4 * MiB]
    finally:
        os.close(mfd)
        os.close(fd)
    return {"on_image": ok}


def test_locked_shootdown_fault_queued_before_its_mark(mount_factory: MountFactory) -> None:
    """Regression (diofs/locks/fault_marker.py rule M6): once chunk 0's WRITE holds BLOCK and
    marks its tid, the writer's fault READ already queued for ADD must leave the queue for the
    faults-disabled path (`locks.cancelled_waits`). Before the fix it stayed queued, and the
    locked shootdown waited for its folio lock forever (fuse-facts row 3)."""
    m = prepared_mount(mount_factory, {**LOCKED, "fill_delay": 0.5})
    r = run_in_child(queued_fault_run, str(m.mnt), timeout=30, mounts=[m])
    assert r["on_image"], r
    st = m.stats()
    assert st.get("locks.block_waits", 0) >= 1, st  # chunk 0 waited for the other fill
    assert st.get("locks.cancelled_waits", 0) >= 1, st  # the queued fault left the queue
    assert st.get("locks.faults_disabled_fills", 0) > 0, st


def test_locked_shootdown_without_marker_deadlocks(mount_factory: MountFactory) -> None:
    m = prepared_mount(mount_factory, LOCKED, bugs=("no-fault-marker",))
    m.expect_rescue()
    daemon_pid = m.daemon.pid if m.daemon else None
    result = m.run(locked_self_write, str(m.mnt), timeout=HANG_TIMEOUT_S)
    assert result.timed_out, "the self-write completed although the fault marker is off"
    report = result.report
    # the watchdog saw the deadlock of fuse-facts row 3 and broke it
    assert f"pid {result.pid}:" in report
    # fuse-facts row 3: the daemon's invalidation waits for a folio lock that the writer's own
    # fault READ holds, and that READ waits for the BLOCK state the invalidation's chunk holds
    assert "invalidate_inode_pages2_range" in report
    assert "filemap_fault" in report
    assert "state=D" in report
    assert_rescued_cleanly(m, result, daemon_pid)


def test_locked_shootdown_second_process_deadlocks_even_with_marker(
    mount_factory: MountFactory,
) -> None:
    """Why shootdown=locked is not the default (fuse-facts row 3): another process's fault
    READ waits for ADD while the writer holds BLOCK and waits for that READ's folio lock.
    The marker only knows the writer's own tid. The watchdog breaks the hang."""
    m = prepared_mount(mount_factory, LOCKED)
    m.expect_rescue()
    result = m.run(locked_self_write_with_faulter, str(m.mnt), timeout=HANG_TIMEOUT_S)
    assert result.timed_out, "locked shootdown survived a second faulting process"
    assert "invalidate_inode_pages2_range" in result.report
    assert f"abort conn {m.conn_id}: done" in result.report
    assert not mountinfo.is_mounted(m.mnt)
