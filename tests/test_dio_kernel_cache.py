"""The kernel-cache hint and the direct-write fast path on a real mount.

`KernelCache` (diofs/kernel_cache.py) knows the inodes whose bytes the kernel may cache:
an inode is added when a buffered READ or WRITE of it arrives, and removed when an O_DIRECT
open makes the kernel drop the file's whole page cache (diofs/ops.py `_file_info`: no
keep_cache for O_DIRECT opens). Three things depend on it:
  - a direct write posts its range to the kernel invalidator only for a marked inode
    (diofs/dio.py step 10, `dio.kernel_invalidations`), and answers without waiting;
  - direct READ replies go out from a worker thread while any inode of the mount is marked
    (`dio.thread_replies`; tests/test_fsx.py::test_dio_read_into_mapping_deadlock says why);
  - and, separately, a block-aligned overwrite of written blocks inside i_size takes the fast
    path (`dio.fast_writes`) only while the daemon caches no page of its range.

Every file here is created and laid out through O_DIRECT fds, so that neither the kernel nor
the daemon caches any of it until a test reads or writes it buffered on purpose. The counters
are read with `Mount.stats()` (the stats file's own open and READs touch no hint).
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess

import pytest

from harness.io import direct_pread, direct_pwrite, pattern
from harness.mount import (
    Mount,
    MountFactory,
    assert_rescued_cleanly,
    run_in_child,
    wait_kernel_invalidations,
)
from harness.workloads.kernel_cache import (
    PAGE,
    direct_open_close,
    direct_reads_into_mapping_vs_direct_opens,
    direct_reads_into_own_mapping,
)

pytestmark = pytest.mark.deadline(60)

NBLOCKS = 16
SIZE = NBLOCKS * PAGE
NWRITES = 24


def bread(path: str, n: int = SIZE, off: int = 0) -> bytes:
    """pread through a fresh buffered fd."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def block(seed: int, idx: int) -> bytes:
    """Block `idx` of version `seed` (harness.io.pattern: names its offset and the seed)."""
    return pattern(PAGE, seed, idx * PAGE)


def make_direct_file(m: Mount, name: str, seed: int = 1) -> tuple[str, bytearray]:
    """A file of NBLOCKS written blocks, created and written through an O_DIRECT fd only;
    returns its path and its expected content."""
    path = m.path(name)
    model = bytearray(b"".join(block(seed, i) for i in range(NBLOCKS)))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        assert direct_pwrite(fd, bytes(model), 0) == len(model)
    finally:
        os.close(fd)
    return path, model


def overwrite_blocks(fd: int, model: bytearray, seed: int, blocks: list[int]) -> None:
    """Direct overwrites of whole blocks, one pwrite each; keeps `model` up to date."""
    for idx in blocks:
        data = block(seed, idx)
        assert direct_pwrite(fd, data, idx * PAGE) == len(data)
        model[idx * PAGE : (idx + 1) * PAGE] = data


class Counters:
    """Differences of the mount's counters since the last `delta()` (or since creation)."""

    def __init__(self, m: Mount) -> None:
        self.m = m
        self.last = m.stats()

    def delta(self, *keys: str) -> dict[str, float]:
        now = self.m.stats()
        out = {k: now.get(k, 0) - self.last.get(k, 0) for k in keys}
        self.last = now
        return out


def spread(n: int, step: int = 7) -> list[int]:
    """n block indices visiting the file in a scattered order."""
    return [(i * step) % NBLOCKS for i in range(n)]


@pytest.mark.file_image  # counts fast-path writes: NBD has none (inline_io_bytes 0)
def test_direct_only_file_fast_writes_without_kernel_invalidation(mounted: Mount) -> None:
    """A file only ever opened O_DIRECT: its overwrites take the fast path, one each, and none
    invalidates the kernel's cache (the inode was never marked); the bytes are right through
    O_DIRECT and through a buffered read."""
    path, model = make_direct_file(mounted, "f")
    c = Counters(mounted)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        overwrite_blocks(fd, model, 2, spread(NWRITES))
        d = c.delta("dio.fast_writes", "dio.kernel_invalidations", "dio.bytes_written")
        assert d == {
            "dio.fast_writes": NWRITES,
            "dio.kernel_invalidations": 0,
            "dio.bytes_written": NWRITES * PAGE,
        }
        assert direct_pread(fd, SIZE, 0) == model
    finally:
        os.close(fd)
    assert bread(path) == model


def test_buffered_read_marks_inode_and_direct_open_clears_it(mounted: Mount) -> None:
    """Direct writes invalidate the kernel range only after a buffered READ of the file
    arrived, and the buffered fd then sees their bytes; a new O_DIRECT open (the kernel drops
    the file's cache) clears the mark, and the buffered fd still sees the right bytes."""
    path, model = make_direct_file(mounted, "f")
    dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    bfd = os.open(path, os.O_RDONLY)
    c = Counters(mounted)
    keys = ("dio.kernel_invalidations", "dio.bytes_written")
    try:
        overwrite_blocks(dfd, model, 2, [0, 5, 9])
        assert c.delta(*keys) == {"dio.kernel_invalidations": 0, "dio.bytes_written": 3 * PAGE}

        assert os.pread(bfd, SIZE, 0) == model  # the kernel caches the file now: marked
        c.delta(*keys)
        overwrite_blocks(dfd, model, 3, spread(8, 5))
        assert c.delta(*keys) == {"dio.kernel_invalidations": 8, "dio.bytes_written": 8 * PAGE}
        assert os.pread(bfd, SIZE, 0) == model  # coherent: no stale kernel page

        direct_open_close(path)  # the kernel drops every page of the file: unmarked
        overwrite_blocks(dfd, model, 4, spread(8, 3))
        assert c.delta(*keys) == {"dio.kernel_invalidations": 0, "dio.bytes_written": 8 * PAGE}
        assert os.pread(bfd, SIZE, 0) == model  # refilled from the daemon: the new bytes
        assert direct_pread(dfd, SIZE, 0) == model
    finally:
        os.close(bfd)
        os.close(dfd)


def test_direct_open_drops_kernel_cache(mounted: Mount) -> None:
    """A buffered re-read is served by the kernel's cache (no READ reaches the daemon) until
    an O_DIRECT open of the file: the next buffered read reaches the daemon again."""
    path, model = make_direct_file(mounted, "f")
    c = Counters(mounted)
    served = "cache.bytes_served"  # bytes the daemon served to buffered READs
    assert bread(path) == model
    assert c.delta(served)[served] >= SIZE  # cold: every page came from the daemon
    assert bread(path) == model
    assert c.delta(served)[served] == 0  # cached by the kernel (keep_cache on buffered opens)
    direct_open_close(path)
    assert bread(path) == model
    assert c.delta(served)[served] >= SIZE  # the O_DIRECT open dropped the kernel's pages


@pytest.mark.file_image  # counts fast-path writes: NBD has none (inline_io_bytes 0)
def test_no_fast_path_over_pages_the_daemon_caches(mount_factory: MountFactory) -> None:
    """A direct overwrite of a range the daemon caches a page of (dirty, from a buffered write
    that writeback leaves alone for a minute; or clean, after fsync) takes the locked path: it
    must write the dirty page back and shoot the page down, or a later writeback or fill brings
    the buffered bytes back over the direct ones. The check is per range: an overwrite of a
    block with nothing cached takes the fast path even while other pages of the inode are
    cached, and so does a second overwrite of a block once the first one shot it down."""
    m = mount_factory(opts={"writeback_age": 60})
    path, model = make_direct_file(m, "f")
    dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    bfd = os.open(path, os.O_RDWR)
    c = Counters(m)

    def fast(idx: int) -> int:
        """Overwrite block `idx` directly; 1 if that took the fast path, else 0."""
        c.delta("dio.fast_writes")
        overwrite_blocks(dfd, model, 10 + idx, [idx])
        return int(c.delta("dio.fast_writes")["dio.fast_writes"])

    try:
        assert fast(1) == 1  # nothing of the inode cached
        data = b"".join(block(3, i) for i in range(4, 8))
        assert os.pwrite(bfd, data, 4 * PAGE) == len(data)  # pages 4-7 dirty in the daemon
        model[4 * PAGE : 8 * PAGE] = data
        assert [fast(5), fast(6)] == [0, 0]  # over dirty pages: written back, shot down
        assert fast(5) == 1  # page 5 is gone from the daemon cache now
        assert fast(12) == 1  # nothing cached in this range (pages 4 and 7 still are)
        # a direct read writes the range's dirty pages back first: a stale dirty page 5 or 6
        # would land on the image over the direct bytes
        assert direct_pread(dfd, SIZE, 0) == model
        os.fsync(bfd)  # pages 4 and 7: clean (the direct read wrote them back), still cached
        assert fast(7) == 0  # over a clean cached page: shot down
        assert fast(7) == 1
        assert direct_pread(dfd, SIZE, 0) == model
        assert os.pread(bfd, SIZE, 0) == model
        os.fsync(bfd)
    finally:
        os.close(bfd)
        os.close(dfd)
    m.remount()
    assert bread(path) == model


def test_thread_replies_only_while_kernel_may_cache(mounted: Mount) -> None:
    """Direct READ replies go out from the main loop while no inode of the mount is marked,
    from a worker thread (counted) once a buffered READ of any file arrived, and from the
    loop again once an O_DIRECT open unmarked that file."""
    a, model_a = make_direct_file(mounted, "a", seed=1)
    b, model_b = make_direct_file(mounted, "b", seed=2)
    keys = ("dio.thread_replies", "dio.bytes_read")
    fd = os.open(a, os.O_RDONLY | os.O_DIRECT)
    c = Counters(mounted)

    def direct_reads(n: int = 8) -> None:
        for idx in spread(n):
            assert direct_pread(fd, PAGE, idx * PAGE) == model_a[idx * PAGE : (idx + 1) * PAGE]

    try:
        direct_reads()
        assert c.delta(*keys) == {"dio.thread_replies": 0, "dio.bytes_read": 8 * PAGE}
        assert bread(b) == model_b  # another file of the mount: now the kernel may cache it
        c.delta(*keys)
        direct_reads()
        assert c.delta(*keys) == {"dio.thread_replies": 8, "dio.bytes_read": 8 * PAGE}
        direct_open_close(b)  # its pages dropped: no inode of the mount is marked
        direct_reads()
        assert c.delta(*keys) == {"dio.thread_replies": 0, "dio.bytes_read": 8 * PAGE}
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_what_a_reader_sees_after_sync_and_async_direct_writes(
    mount_factory: MountFactory,
) -> None:
    """SPEC 3 as diofs keeps it (docs/concurrency.md race 18). A synchronous direct write:
    an existing mapping and a buffered fd see its bytes as soon as it returns (the kernel
    drops its own pages after it, in the writer's context). Asynchronous direct writes
    (fio libaio QD16) while a buffered reader keeps reading the file (so the kernel caches
    pages during the writes, after fio's O_DIRECT open dropped them): each write posts its
    range to the invalidator and is answered at once; once the invalidator is idle, the
    mapping and the buffered fd see every byte. dio_delay keeps writes in the daemon, so that
    later ones wait in the kernel behind the 12 background slots, after the kernel dropped
    their range. Stale pages are rare here (0 in 3 runs with the invalidator disabled); the
    test that catches a missing invalidation is tests/test_holes_extend.py -k "fio and native"
    (2/2 fail with it disabled)."""
    mounted = mount_factory(opts={"dio_delay": 0.01})
    path, model = make_direct_file(mounted, "f")
    bfd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(bfd, SIZE)
    dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    c = Counters(mounted)
    keys = ("dio.kernel_invalidations", "kernel.invalidations_posted")
    try:
        assert os.pread(bfd, SIZE, 0) == model and mm[:] == model  # kernel caches: marked
        overwrite_blocks(dfd, model, 5, [1, 2, 3])
        assert mm[:] == model and os.pread(bfd, SIZE, 0) == model  # no waiting
        # no buffered answer of the file while they were in flight: nothing for the invalidator
        assert c.delta(*keys) == {"dio.kernel_invalidations": 3, "kernel.invalidations_posted": 0}

        big = 64 * SIZE  # fio's writes run once over it: a stale page keeps the old bytes
        os.ftruncate(dfd, big)
        mm.close()
        mm = mmap.mmap(bfd, big)
        model += bytes(big - SIZE)
        assert mm[:] == model and os.pread(bfd, big, 0) == model
        argv = ["fio", "--name=aio", f"--filename={path}", "--ioengine=libaio", "--direct=1",
                "--rw=randwrite", "--bs=4k", "--iodepth=64", f"--size={big}",
                "--buffer_pattern=0x5a", "--output-format=terse"]
        fio = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        reads = 0
        while fio.poll() is None:  # every read reaches the daemon: the inode stays marked
            os.posix_fadvise(bfd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.pread(bfd, big, 0)
            reads += 1
        assert fio.returncode == 0, fio.stderr.read() if fio.stderr else ""
        wait_kernel_invalidations(mounted.mnt)
        want = b"\x5a" * big
        assert mm[:] == want, "the existing mapping"
        assert os.pread(bfd, big, 0) == want, "the buffered fd"
        assert direct_pread(dfd, big, 0) == want
        posted = c.delta(*keys)["dio.kernel_invalidations"]
        assert reads > 1 and posted > 0, (reads, posted)
    finally:
        mm.close()
        os.close(dfd)
        os.close(bfd)


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "inval-always"])
def test_direct_read_into_own_mapping_keeps_its_bytes(
    mount_factory: MountFactory, bug_on: bool
) -> None:
    """The soak's lost direct reads (docs/concurrency.md race 19), in one process. The kernel
    drops the range of a synchronous direct write itself, before and after it; the read's
    fault then refills page 0 and pins it, and the read's bytes land in it. An invalidation
    of page 0 by the daemon at that moment takes the pinned page out of the page cache and
    the bytes are lost. diofs queues a range for its invalidator only where a buffered answer
    could have left older bytes in the kernel (kernel_cache.py): here none, so 0 of 1500 lost.
    `--bug inval-always` queues every direct write's range (the first design): measured 25-30%
    of the reads lost."""
    m = mount_factory(size="16M", bugs=["inval-always"] if bug_on else [])
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(os.urandom(3 * PAGE))
    assert bread(path, 3 * PAGE)  # the kernel caches the file: direct writes are watched
    lost = run_in_child(direct_reads_into_own_mapping, path, 1500, timeout=50, mounts=[m])
    if bug_on:
        assert lost > 0, "no read lost although every direct write is invalidated after it"
    else:
        assert lost == 0, f"{lost} of 1500 direct reads into the mapping lost"
        assert m.stats().get("kernel.invalidations_posted", 0) == 0


OPEN_RACE_ROUNDS = 1500
OPEN_RACE_TIMEOUT_S = 20.0  # the good run takes about 2 s; with the bug it hangs at once


# the bug case's hang stacks differ on backend=nbd (reads await the NBD thread): docs/nbd.md
# "Known problems"
@pytest.mark.parametrize("bug_on", [False, pytest.param(True, marks=pytest.mark.file_image)],
                         ids=["default", "open-drop-at-answer"])
def test_direct_open_while_reading_into_mapping(mount_factory: MountFactory, bug_on: bool) -> None:
    """An O_DIRECT open answered without keep_cache makes the kernel drop the whole file
    after our answer (fuse_open -> invalidate_inode_pages2), laundering the mapped page a
    direct read's completion dirtied: it holds that folio's lock while it waits for the
    launder WRITE. If the open's answer already cleared the inode's may-cache mark, the next
    direct READ of the mapping is answered from the loop, whose write(2) of the reply sleeps
    on that folio lock (folio_mark_dirty_lock): the loop never reads the WRITE, and the mount
    hangs (measured: before the first of 3000 rounds completed; in the first soak, 2 hours
    until the fusectl abort). diofs keeps the mark until a request with the new fh proves
    the open returned (kernel_cache.py "Which inodes"). (Most reads' bytes are lost here: the
    drop takes the pinned page out of the cache, docs/concurrency.md race 19; not asserted.)"""
    m = mount_factory(size="16M", bugs=["open-drop-at-answer"] if bug_on else [])
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(os.urandom(3 * PAGE))
    if not bug_on:
        reads, opens = run_in_child(direct_reads_into_mapping_vs_direct_opens, path,
                                    OPEN_RACE_ROUNDS, timeout=OPEN_RACE_TIMEOUT_S, mounts=[m])
        assert reads == OPEN_RACE_ROUNDS and opens > 0, (reads, opens)
        assert m.stats().get("dio.thread_replies", 0) > 0
        return
    m.expect_rescue()
    daemon_pid = m.daemon.pid if m.daemon else None
    result = m.run(direct_reads_into_mapping_vs_direct_opens, path, OPEN_RACE_ROUNDS,
                   timeout=OPEN_RACE_TIMEOUT_S)
    assert result.timed_out, "no hang although the O_DIRECT open's answer clears the mark"
    report = result.report
    assert "folio_mark_dirty_lock" in report and "fuse_launder_folio" in report, report
    assert "fuse_open" in report, report  # the opener's drop holds the folio lock
    assert_rescued_cleanly(m, result, daemon_pid)


def test_direct_open_while_reading_into_a_mapping_of_a_direct_open(
    mount_factory: MountFactory,
) -> None:
    """The race above with the mapping made through an O_DIRECT open. The kernel's fault
    READs through it carry O_DIRECT in their flags, so diofs took them for direct reads: it
    never marked the inode as cached, and the direct READs into the mapping were answered
    from the loop (natively or by `read_inline`), which hung against the opener's drop in
    every run. Only direct I/O names a lock owner in its READs; binding patch
    0015-page-cache-read-flags publishes the others without O_DIRECT (fuse-facts-more row
    33), so the faults mark the inode and the replies go out from a thread."""
    m = mount_factory(size="16M")
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(os.urandom(3 * PAGE))
    reads, opens = run_in_child(direct_reads_into_mapping_vs_direct_opens, path,
                                OPEN_RACE_ROUNDS, os.O_DIRECT, timeout=OPEN_RACE_TIMEOUT_S,
                                mounts=[m])
    assert reads == OPEN_RACE_ROUNDS and opens > 0, (reads, opens)
    st = m.stats()
    assert st.get("dio.thread_replies", 0) > 0, st
