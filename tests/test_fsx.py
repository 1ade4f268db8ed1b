"""The randomized buffered exerciser (tests/fsx.py) on real mounts: no mismatch with the model.

Each case runs 1200 random operations (buffered, cold, mmap and O_DIRECT reads and writes,
O_DIRECT from / into a mapping of the same file, truncates up and down, punch / zero range,
fsync, reopen, rename-over, unlink + recreate, remounts) on two files and checks every read and
st_size against an in-memory model. Cases vary the cache: default; a 1 MiB cache with a 0.2 s
writeback age (eviction and background writeback all the time); a 2 MiB cache with 4 KiB
direct-I/O alignment; a 0.5 s writeback age; -o shootdown=locked (the kernel's cache
invalidated under BLOCK: the self-I/O ops then rely on the fault marker).
`test_fsx_catches_no_shootdown` checks the checker: with `--bug no-shootdown` the daemon keeps
stale cached pages after a direct write, and the exerciser must report a mismatch.

Concurrent cases: 4 processes on one file, each owning an unaligned byte region, rounds of
ops with a remount between rounds. `test_fsx_concurrent_fill_race` widens the fill window
(`fill_delay`) and leans on sequential cold reads (daemon readahead into the neighbour's
region) against direct writes and punches: clean by default, stale pages with
`--bug no-pagecache-lock`.

`test_dio_read_into_mapping_deadlock` is the two-thread reduction of a deadlock the concurrent
mode found: an O_DIRECT read into a MAP_SHARED mapping of the same file racing an O_DIRECT
write of that page. It completes by default (direct READ replies go out from a worker thread
while the kernel may cache pages of the mount) and hangs the single-threaded daemon with
`--bug reply-in-loop`; the watchdog then breaks the hang and nothing stays behind.

Every segment / round runs in a forked child with a deadline (`run_in_child`); remounts happen
in the test process, which owns the daemon. `--stress` adds long runs (tens of thousands of
operations per seed).
"""

from __future__ import annotations

import re

import pytest

from harness.mount import Mount, MountFactory, assert_rescued_cleanly, run_in_child
from harness.workloads.mapping import (
    prepare_read_into_mapping,
    read_into_mapping_vs_direct_write,
)
from tests.fsx import (
    Fsx,
    RegionWorker,
    check_regions,
    run_round,
    run_with_remounts,
    setup_concurrent,
)

CASES = [
    pytest.param(1, {}, 512, id="default"),
    pytest.param(2, {"cache_size": "1M", "writeback_age": 0.2}, 512, id="tiny-cache-fast-wb"),
    pytest.param(3, {"cache_size": "2M"}, 4096, id="small-cache-dio4k"),
    pytest.param(4, {"writeback_age": 0.5}, 512, id="wb-half-second"),
    # one process only: in locked mode another process faulting the file deadlocks by design
    pytest.param(5, {"shootdown": "locked", "cache_size": "1M"}, 512, id="locked-shootdown"),
]


def _run(mount_factory: MountFactory, seed: int, opts: dict, align: int, ops: int,
         segment: tuple[int, int] = (200, 500), timeout: float = 40.0,
         **kw: object) -> dict[str, object]:
    m = mount_factory(size="64M", opts=opts)
    fsx = Fsx(m.mnt, seed=seed, dio_align=align, **kw)  # type: ignore[arg-type]
    summary = run_with_remounts(m, fsx, ops, segment=segment, timeout=timeout)
    print(summary)
    return summary


@pytest.mark.deadline(60)
@pytest.mark.parametrize(("seed", "opts", "align"), CASES)
def test_fsx_no_mismatch(mount_factory: MountFactory, seed: int, opts: dict,
                         align: int) -> None:
    summary = _run(mount_factory, seed, opts, align, 1200)
    assert summary["ops"] == 1200
    counts = summary["counts"]
    assert isinstance(counts, dict)
    assert counts.get("remount", 0) >= 1 and counts.get("mapwrite", 0) > 0


@pytest.mark.deadline(60)
def test_fsx_catches_no_shootdown(mount_factory: MountFactory) -> None:
    m = mount_factory(size="64M", bugs=["no-shootdown"])
    with pytest.raises(AssertionError, match="first differing offset"):
        run_with_remounts(m, Fsx(m.mnt, seed=1), 2000)


def _conc_setup(mnt: str, seed: int, workers: int,
                ops: dict[str, float] | None = None) -> list[RegionWorker]:
    return setup_concurrent(mnt, seed=seed, workers=workers, ops=ops)


def _conc_round(ws: list[RegionWorker], nops: int, check_first: bool) -> list[RegionWorker]:
    if check_first:
        check_regions(ws)
    return run_round(ws, nops)


def _concurrent(m: Mount, seed: int, workers: int, nops: int, rounds: int,
                timeout: float = 40.0, ops: dict[str, float] | None = None) -> int:
    """Rounds of concurrent workers, each round in a child with a deadline; remounts between
    rounds (from this process, which owns the daemon); returns the number of ops."""
    ws = run_in_child(_conc_setup, str(m.mnt), seed, workers, ops, timeout=timeout,
                      mounts=[m])
    for rnd in range(rounds):
        ws = run_in_child(_conc_round, ws, nops, rnd > 0, timeout=timeout, mounts=[m])
        m.remount()
    run_in_child(check_regions, ws, timeout=timeout, mounts=[m])
    return sum(w.n for w in ws)


CONC_CASES = [
    pytest.param(11, {}, id="default"),
    pytest.param(12, {"cache_size": "1M", "writeback_age": 0.05}, id="tiny-cache-fast-wb"),
]


@pytest.mark.deadline(60)
@pytest.mark.parametrize(("seed", "opts"), CONC_CASES)
def test_fsx_concurrent_regions_no_mismatch(mount_factory: MountFactory, seed: int,
                                            opts: dict) -> None:
    """4 processes on one file, each owning an unaligned region (neighbours share pages and
    blocks), 2 rounds of 300 ops each with a remount after each round."""
    m = mount_factory(size="64M", opts=opts)
    assert _concurrent(m, seed, workers=4, nops=300, rounds=2) == 4 * 300 * 2


@pytest.mark.deadline(90)
@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "no-pagecache-lock"])
def test_fsx_concurrent_fill_race(mount_factory: MountFactory, bug_on: bool) -> None:
    """Neighbours' readahead fills (pages no kernel folio lock covers) race direct writes and
    punches, widened by fill_delay: no mismatch with the pagecache-add lock; without it
    (--bug no-pagecache-lock) stale pages are caught. This also checks the checker."""
    m = mount_factory(size="64M", opts={"fill_delay": 0.01},
                      bugs=["no-pagecache-lock"] if bug_on else [])
    ops = {"seqread": 6, "coldread": 2, "diowrite": 6, "zero": 2, "punch": 2, "write": 2}
    if bug_on:
        with pytest.raises(AssertionError, match="first differing offset"):
            _concurrent(m, 4, workers=4, nops=200, rounds=2, ops=ops)
    else:
        assert _concurrent(m, 4, workers=4, nops=200, rounds=2, ops=ops) == 4 * 200 * 2


READ_INTO_MAPPING_S = 2.0  # the workload's length with the protection on
HANG_TIMEOUT_S = 6.0  # the good run takes READ_INTO_MAPPING_S; with the bug it hangs in < 1 s


@pytest.mark.deadline(60)
@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "reply-in-loop"])
def test_dio_read_into_mapping_deadlock(mount_factory: MountFactory, bug_on: bool) -> None:
    """Found by the concurrent exerciser (dioread_into_map vs a neighbour's direct write).
    The kernel completes an async direct READ (FUSE_ASYNC_DIO, direct_io=False) inside the
    daemon's write(2) of the reply: fuse_aio_complete_req -> fuse_release_user_pages ->
    folio_mark_dirty_lock, which sleeps on the folio lock of the mapped destination page.
    Meanwhile an invalidation of that page holds its folio lock in fuse_launder_folio,
    waiting (folio_wait_writeback) for the WRITE it just sent. Seen in the hang reports: in
    most runs the client's direct write (generic_file_direct_write ->
    invalidate_inode_pages2_range), in about 1 run in 10 the daemon's own
    invalidation after the previous direct write (dio.py step 10, then the invalidator thread:
    fuse_reverse_inval_inode -> invalidate_inode_pages2_range). Fixed by sending direct READ
    replies from a worker thread while the kernel may cache pages of the mount (diofs/dio.py,
    `dio.thread_replies`): the main loop stays free to answer the laundering WRITE.
    `--bug reply-in-loop` replies from the main loop again: the daemon's only thread then
    never reads that WRITE and the run hangs (measured: in under 1 s, every run); the
    watchdog reports the stuck tasks, aborts the connection, and nothing stays behind."""
    m = mount_factory(size="16M", bugs=["reply-in-loop"] if bug_on else [])
    path = prepare_read_into_mapping(m)
    if not bug_on:
        n = run_in_child(read_into_mapping_vs_direct_write, path, READ_INTO_MAPPING_S,
                         timeout=HANG_TIMEOUT_S, mounts=[m])
        assert n[0] > 0 and n[1] > 0, n  # both threads made progress
        st = m.stats()
        # every direct READ of the reader went out from a worker thread (the mapping's fault
        # READ marked the inode in KernelCache before the first one was sent)
        assert st.get("dio.thread_replies", 0) >= n[0], (n, st)
        return
    m.expect_rescue()
    daemon_pid = m.daemon.pid if m.daemon else None
    result = m.run(read_into_mapping_vs_direct_write, path, READ_INTO_MAPPING_S,
                   timeout=HANG_TIMEOUT_S)
    assert result.timed_out, "the workload completed although direct READs reply in the loop"
    report = result.report
    # the watchdog's report: the daemon's stacks, then the client's (rescue(): daemons first)
    assert f"pid {daemon_pid}:" in report and f"pid {result.pid}:" in report
    daemon_part = report[report.index(f"pid {daemon_pid}:") : report.index(f"pid {result.pid}:")]
    client_part = report[report.index(f"pid {result.pid}:") :]
    # the daemon's only loop thread sleeps on the mapped page's folio lock inside the write(2)
    # of a direct READ's reply ...
    assert re.search(rf"tid {daemon_pid} '[^']*' state=D", daemon_part), report
    assert "folio_mark_dirty_lock" in daemon_part, report
    assert "fuse_aio_complete_req" in daemon_part, report
    # ... held by an invalidation that launders that page and waits for the WRITE nobody
    # reads: the client's direct write (generic_file_direct_write) or the daemon's own
    # invalidator thread (diofs/kernel_cache.py), whichever got there first
    assert "fuse_launder_folio" in report, report
    assert "invalidate_inode_pages2_range" in report, report
    assert "state=D" in client_part, report
    assert_rescued_cleanly(m, result, daemon_pid)


@pytest.mark.stress
@pytest.mark.deadline(1800)
@pytest.mark.parametrize(("seed", "opts", "align"), CASES)
@pytest.mark.parametrize("round_", range(3))
def test_fsx_stress(mount_factory: MountFactory, seed: int, opts: dict, align: int,
                    round_: int) -> None:
    _run(mount_factory, 100 * (round_ + 1) + seed, opts, align, 20000,
         segment=(1000, 4000), timeout=600, max_size=4 << 20, nfiles=3)


@pytest.mark.stress
@pytest.mark.deadline(1800)
@pytest.mark.parametrize(("seed", "opts"), CONC_CASES)
@pytest.mark.parametrize("round_", range(3))
def test_fsx_concurrent_stress(mount_factory: MountFactory, seed: int, opts: dict,
                               round_: int) -> None:
    m = mount_factory(size="64M", opts=opts)
    _concurrent(m, 100 * (round_ + 1) + seed, workers=6, nops=3000, rounds=4, timeout=600)
