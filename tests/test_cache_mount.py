"""The daemon page cache on a real mount (SPEC 2 and 9, issue 4 "Must show").

The kernel's page cache sits above the daemon's (files are opened with keep_cache, and with
writeback caching off a buffered write() also leaves its full pages cached in the kernel). To
make a read reach the daemon, the tests drop the kernel's clean pages of the file with
posix_fadvise(POSIX_FADV_DONTNEED) on a fresh fd first (`cold_read`); measured: the first
re-read of a freshly written 1 MiB file made no READ at all (counters unchanged), the same read
after DONTNEED counted 256 daemon cache hits. No O_DIRECT is needed for that.

What each test shows (stats are the daemon's JSON counters, `m.stats()`):
  - read-after-write: data written (dirty, not yet written back) reads back through the daemon
    cache: writeback.pages stays 0, cache.hits rise;
  - cached re-read: a second cold read is all cache.hits, no new cache.misses / cache.fills; and,
    as a proof independent of the counters, the file's blocks are overwritten inside the image
    file underneath the daemon and the re-read still returns the cached bytes;
  - a fill never replaces a newer page: a page written and written back (fsync) while a
    daemon readahead fill of it waited (fill_delay) keeps the new bytes (a bug found by the
    exerciser, fixed in PageCache);
  - eviction: cache_size=2M, a 16 MiB working set read sequentially and randomly: every byte
    correct, cache.evictions > 0, cache.used_bytes stays near the limit;
  - durability: dirty data is in the image after unmount (read off-line, no daemon); with the
    crash backend, six fsync'ed versions of a file: at every cut after fsync k (modes "drop"
    and "random") each sector holds version k or k+1, after the last fsync exactly the last
    version, and at the end of the log an un-fsync'ed file written back by unmount;
  - readahead: cache.readahead_pages rises on a sequential read and stays put on random 4 KiB
    reads of another file (kernel readahead off with POSIX_FADV_RANDOM: each READ is one page;
    the kernel's own readahead of the sequential file reaches 1-2 MiB past the reader, so the
    random reads use a different file);
  - truncate / punch / zero range: the gap reads zeros through buffered reads, MAP_SHARED and
    O_DIRECT, with the data dirty in the cache or written back, and after a remount; a page
    truncated away while dirty (or under background writeback) never comes back;
  - background writeback: with writeback_age=0.5 dirty pages reach the image without fsync;
  - memory pressure: cache_size=2M and 8 MiB written: writeback.pages rises before any fsync,
    dirty pages stay under the limit, the data reads back correct.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from diofs.backend import crash
from diofs.cli.stats import read_stats
from harness.io import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    cold_read,
    direct_pread,
    fallocate,
    map_read,
    wait_for,
    write_file,
)
from harness.mount import MountFactory, run_in_child
from tests.test_crash_namespace import load_offline

pytestmark = pytest.mark.deadline(90)

PAGE = 4096
KiB, MiB = 1 << 10, 1 << 20
QUIET = {"writeback_age": 3600, "commit_interval": 3600}  # nothing moves unless we ask


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


# ------------------------------------------------------------------------------- read paths


def test_read_after_write_served_from_cache(mount_factory: MountFactory) -> None:
    m = mount_factory(opts=QUIET)
    path = m.path("f")
    rng = random.Random(1)
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(60):  # unaligned, overlapping, some past EOF (holes)
            off = rng.randrange(0, 1 * MiB)
            data = rng.randbytes(rng.choice([1, 100, 4095, 4096, 5000, 70000]))
            os.pwrite(fd, data, off)
            end = off + len(data)
            if end > len(model):
                model.extend(bytes(end - len(model)))
            model[off:end] = data
    finally:
        os.close(fd)
    before = m.stats()
    got = cold_read(path, len(model) + PAGE, 0)
    after = m.stats()
    assert got == model
    assert delta(before, after, "writeback.pages") == 0, "data must come from dirty cache pages"
    assert after.get("cache.dirty_pages", 0) > 0
    # every dirty page is served by a hit (holes never written are misses, filled as zeros)
    assert delta(before, after, "cache.hits") >= after["cache.dirty_pages"]
    assert delta(before, after, "cache.bytes_served") >= len(model)


def _find_in_image(image: Path, needle: bytes) -> list[int]:
    data = image.read_bytes()
    found, pos = [], data.find(needle)
    while pos >= 0:
        found.append(pos)
        pos = data.find(needle, pos + 1)
    return found


def test_cached_reread_makes_no_image_reads(mount_factory: MountFactory) -> None:
    m = mount_factory(size="16M", opts=QUIET)
    path = m.path("f")
    data = random.Random(2).randbytes(1 * MiB)
    write_file(path, data, fsync=True)
    m.remount()  # cold daemon cache
    s0 = m.stats()
    assert cold_read(path, len(data), 0) == data
    s1 = m.stats()
    assert delta(s0, s1, "cache.misses") > 0 and delta(s0, s1, "cache.fills") >= 256
    assert cold_read(path, len(data), 0) == data
    s2 = m.stats()
    assert delta(s1, s2, "cache.hits") >= 256
    assert delta(s1, s2, "cache.misses") == 0
    assert delta(s1, s2, "cache.fills") == 0
    print(f"cold: misses {delta(s0, s1, 'cache.misses')} fills {delta(s0, s1, 'cache.fills')}"
          f"; re-read: hits {delta(s1, s2, 'cache.hits')}")
    # Independent of the counters: scribble over the file's blocks inside the image file (the
    # daemon reads the image through the host page cache, so it would see this), re-read.
    first, last = data[:PAGE], data[-PAGE:]
    hits = _find_in_image(m.image, first) + _find_in_image(m.image, last)
    assert len(hits) == 2, hits
    with open(m.image, "r+b") as img:
        for pos in hits:
            img.seek(pos)
            img.write(b"X" * PAGE)
        img.flush()
        try:
            assert cold_read(path, len(data), 0) == data, "re-read went to the image"
        finally:
            for pos, orig in zip(hits, (first, last), strict=True):
                img.seek(pos)
                img.write(orig)


def test_eviction_small_cache_large_working_set(mount_factory: MountFactory) -> None:
    m = mount_factory(size="64M", opts={"cache_size": "2M"})
    path = m.path("big")
    data = random.Random(3).randbytes(16 * MiB)
    write_file(path, data, chunk=1 * MiB, fsync=True)
    s0 = m.stats()
    for rnd in range(2):  # sequential, twice
        for off in range(0, len(data), MiB):
            assert cold_read(path, MiB, off) == data[off : off + MiB], (rnd, off)
    rng = random.Random(4)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(300):  # random, through the daemon each time
            off, n = rng.randrange(len(data) - 64 * KiB), rng.choice([1, 4096, 5000, 65536])
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, n, off) == data[off : off + n], off
    finally:
        os.close(fd)
    s1 = m.stats()
    print(f"evictions {delta(s0, s1, 'cache.evictions')} used_bytes {s1['cache.used_bytes']}")
    assert delta(s0, s1, "cache.evictions") > 3 * 16 * MiB // PAGE // 2
    # the limit holds up to the most recent insert (a readahead run) and the hot pages
    assert s1["cache.used_bytes"] <= 2 * MiB + 512 * KiB, s1["cache.used_bytes"]


def _fill_races_write_and_fsync(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # the kernel READs exactly 128 KiB
        s0 = read_stats(os.path.dirname(path))
        reader = threading.Thread(target=os.pread, args=(fd, 128 * KiB, 0))
        reader.start()  # the daemon fills pages 0..63 (32 of them its own readahead)
        wait_for(  # ... and sleeps (fill_delay) between its image read and its insert
            lambda: read_stats(os.path.dirname(path)).get("cache.fill_delays", 0)
            > s0.get("cache.fill_delays", 0),
            "the fill to reach its delay",
        )
        wfd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(wfd, b"B" * PAGE, 40 * PAGE)  # no kernel folio lock on page 40
            os.fsync(wfd)  # written back: page 40 is clean again, and newer than the fill
        finally:
            os.close(wfd)
        reader.join()
    finally:
        os.close(fd)
    return cold_read(path, PAGE, 40 * PAGE)


def test_fill_never_replaces_a_newer_page(mount_factory: MountFactory) -> None:
    """Found by tests/fsx.py (concurrent mode): a fill holds pagecache ADD, which buffered
    writes share, so a page can be written and written back while a fill of it awaits; the
    fill's insert then replaced that clean, newer page with the old image bytes (readers saw
    the old data, and a later partial write would have written it back). Fixed in
    PageCache: fills never replace a cached page."""
    m = mount_factory(size="16M", opts={"fill_delay": 0.5, **QUIET})
    path = m.path("f")
    write_file(path, b"A" * MiB, fsync=True)
    m.remount()
    got = run_in_child(_fill_races_write_and_fsync, path, timeout=30, mounts=[m])
    assert got == b"B" * PAGE


# ------------------------------------------------------------------------------- durability


def test_dirty_data_durable_after_unmount(mount_factory: MountFactory) -> None:
    m = mount_factory(size="32M", opts=QUIET)
    data = random.Random(5).randbytes(3 * MiB + 123)
    ino = write_file(m.path("f"), data)
    s = m.stats()
    assert s.get("writeback.pages", 0) == 0 and s["cache.dirty_pages"] >= 3 * MiB // PAGE
    m.unmount()
    off = load_offline(str(m.image))  # no daemon: straight from the image
    assert not off.problems, off.problems
    assert off.read(ino) == data
    m.start()
    assert cold_read(m.path("f"), len(data) + 1, 0) == data


def test_fsynced_data_present_at_every_later_cut(mount_factory: MountFactory,
                                                 tmp_path: Path) -> None:
    """File A goes through versions v0..v5 (overwrites, some extending, unaligned), each
    fsync'ed; then file B is written without fsync and the filesystem unmounted. At every cut
    after the fsync of v_k and before that of v_k+1, in modes "drop" and "random" (unflushed
    writes lost, torn at 512-byte sectors, reordered), every sector of A is v_k's or v_k+1's,
    and from the last fsync on A is exactly v5. At the end of the log B is there too."""
    log = str(tmp_path / "crash.log")
    m = mount_factory(size="16M", opts={"backend": "crash", "crash_log": log, **QUIET})
    rng = random.Random(6)
    versions = [rng.randbytes(256 * KiB)]
    acks = []
    fd = os.open(m.path("a"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for off in range(0, len(versions[0]), 48 * KiB):
            os.pwrite(fd, versions[0][off : off + 48 * KiB], off)
        os.fsync(fd)
        acks.append(os.stat(log).st_size)
        for _ in range(5):
            v = bytearray(versions[-1])
            off = rng.randrange(0, len(v))
            data = rng.randbytes(rng.randrange(1, 96 * KiB))
            os.pwrite(fd, data, off)
            v[off : off + len(data)] = data  # may extend the file
            versions.append(bytes(v))
            os.fsync(fd)
            acks.append(os.stat(log).st_size)
        a_ino = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    b_data = rng.randbytes(512 * KiB)
    b_ino = write_file(m.path("b"), b_data)  # dirty, written back by unmount only
    assert m.stats().get("writeback.pages", 0) > 0  # the fsyncs wrote A back
    m.unmount()
    cl = crash.load_log(log)
    ack_cuts = [cl.records_before(pos) for pos in acks]
    end = cl.n_points - 1
    cuts = list(range(ack_cuts[0], end + 1))
    if len(cuts) > 60:
        cuts = sorted({*ack_cuts, end, *random.Random(7).sample(cuts, 60)})
    out = str(tmp_path / "cut.img")
    checked = 0
    for cut in cuts:
        k = max(i for i, c in enumerate(ack_cuts) if c <= cut)  # last fsync done by `cut`
        old = versions[k]
        new = versions[k + 1] if k + 1 < len(versions) else old
        for mode in ("drop", "random"):
            crash.materialize(cl, out, cut, rng=random.Random(cut), mode=mode)
            off = load_offline(out)
            assert not off.problems, (cut, mode, off.problems)
            a = off.read(a_ino)
            assert a is not None and len(a) in (len(old), len(new)), (cut, mode)
            for sec in range(0, len(a), 512):
                got = a[sec : sec + 512]
                assert got in (old[sec : sec + 512], new[sec : sec + 512]), (
                    f"cut {cut} ({mode}), after fsync #{k}: sector {sec} is neither v{k} nor "
                    f"v{k + 1}")
            checked += 1
    crash.materialize(cl, out, end, mode="drop")
    off = load_offline(out)
    assert off.read(a_ino) == versions[-1]
    assert off.read(b_ino) == b_data, "unmount did not make the dirty file durable"
    print(f"log: {cl.n_points} points, fsync acks at {ack_cuts}; {checked} cut images checked")


# ------------------------------------------------------------------------------- readahead


def test_readahead_sequential_not_random(mount_factory: MountFactory) -> None:
    m = mount_factory(size="32M", opts=QUIET)
    seq_path, rnd_path = m.path("seq"), m.path("rnd")
    rng = random.Random(8)
    seq_data, rnd_data = rng.randbytes(4 * MiB), rng.randbytes(4 * MiB)
    write_file(seq_path, seq_data, chunk=1 * MiB, fsync=True)
    write_file(rnd_path, rnd_data, chunk=1 * MiB, fsync=True)
    m.remount()  # cold daemon cache
    s0 = m.stats()
    fd = os.open(seq_path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for off in range(0, len(seq_data), 64 * KiB):
            assert os.pread(fd, 64 * KiB, off) == seq_data[off : off + 64 * KiB]
    finally:
        os.close(fd)
    s1 = m.stats()
    seq_ra = delta(s0, s1, "cache.readahead_pages")
    assert seq_ra > 0
    # random 4 KiB reads of the other file, never adjacent, never page 0 (a first read at
    # page 0 counts as sequential); kernel readahead off, so each READ is exactly one page
    pages = rng.sample(range(1, len(rnd_data) // PAGE, 3), 100)
    fd = os.open(rnd_path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for i in pages:
            assert os.pread(fd, PAGE, i * PAGE) == rnd_data[i * PAGE : (i + 1) * PAGE]
    finally:
        os.close(fd)
    s2 = m.stats()
    print(f"sequential 4 MiB: readahead_pages {seq_ra} fills {delta(s0, s1, 'cache.fills')} "
          f"misses {delta(s0, s1, 'cache.misses')}; random: readahead_pages "
          f"{delta(s1, s2, 'cache.readahead_pages')} misses {delta(s1, s2, 'cache.misses')}")
    assert delta(s1, s2, "cache.misses") == 100
    assert delta(s1, s2, "cache.fills") == 100
    assert delta(s1, s2, "cache.readahead_pages") == 0


# ------------------------------------------------------------------------------- truncate / punch


def _three_ways(path: str, size: int) -> dict[str, bytes]:
    return {
        "buffered": cold_read(path, size + PAGE, 0),
        "mmap": map_read(path, size),
        "direct": direct_pread(path, size + PAGE, 0),
    }


@pytest.mark.parametrize("state", ["dirty", "clean"])
def test_truncate_down_up_reads_zeros(mount_factory: MountFactory, state: str) -> None:
    m = mount_factory(size="16M", opts=QUIET)
    path = m.path("f")
    data = random.Random(10).randbytes(64 * KiB)
    write_file(path, data, fsync=state == "clean")
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 10000)
        os.ftruncate(fd, 64 * KiB)
    finally:
        os.close(fd)
    want = data[:10000] + bytes(64 * KiB - 10000)
    for how, got in _three_ways(path, 64 * KiB).items():
        assert got == want, how
    m.remount()
    for how, got in _three_ways(path, 64 * KiB).items():
        assert got == want, f"{how} after remount"


@pytest.mark.parametrize("state", ["dirty", "clean"])
@pytest.mark.parametrize("op", ["punch", "zero"])
def test_punch_and_zero_range_read_zeros(mount_factory: MountFactory, op: str,
                                         state: str) -> None:
    m = mount_factory(size="16M", opts=QUIET)
    path = m.path("f")
    data = random.Random(11).randbytes(64 * KiB)
    write_file(path, data, fsync=state == "clean")
    cold_read(path, len(data), 0)  # every page in the daemon cache
    start, end = 5000, 40000
    mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if op == "punch" else FALLOC_FL_ZERO_RANGE)
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, mode, start, end - start)
    finally:
        os.close(fd)
    want = data[:start] + bytes(end - start) + data[end:]
    for how, got in _three_ways(path, len(data)).items():
        assert got == want, how
    m.remount()
    for how, got in _three_ways(path, len(data)).items():
        assert got == want, f"{how} after remount"


def test_truncated_dirty_page_never_comes_back(mount_factory: MountFactory) -> None:
    """Dirty pages truncated away, some while background writeback (writeback_age=0.05) may
    be writing them: after extending again, a later writeback, fsync and remount, only zeros."""
    m = mount_factory(size="16M", opts={"writeback_age": 0.05, "commit_interval": 3600})
    path = m.path("f")
    rng = random.Random(12)
    size = 256 * KiB
    for i in range(15):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, rng.randbytes(size), 0)
            time.sleep(rng.random() * 0.1)  # sometimes mid-writeback
            cut = rng.choice([0, 1, 4095, 4096, 10000])
            os.ftruncate(fd, cut)
            os.ftruncate(fd, size)
            keep = os.pread(fd, cut, 0)
            # background writeback (not the fsync below) writes whatever is still dirty
            m.wait_stats(lambda s: s.get("cache.dirty_pages", 0) == 0, "background writeback")
            os.fsync(fd)
        finally:
            os.close(fd)
        got = cold_read(path, size, 0)
        assert got[cut:] == bytes(size - cut), (i, cut)
        assert got[:cut] == keep
    m.remount()
    assert cold_read(path, size, 0)[10000:] == bytes(size - 10000)


# ------------------------------------------------------------------------------- writeback


def test_background_writeback_after_age(mount_factory: MountFactory) -> None:
    m = mount_factory(opts={"writeback_age": 0.5, "commit_interval": 3600})
    path = m.path("f")
    data = random.Random(13).randbytes(1 * MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        t_write = time.monotonic()
        s0 = m.stats()
        if time.monotonic() - t_write < 0.3:  # not yet old enough
            assert s0.get("writeback.pages", 0) == 0
            assert s0["cache.dirty_pages"] == 256
        s1 = m.wait_stats(lambda s: s.get("writeback.pages", 0) >= 256
                          and s.get("cache.dirty_pages", 0) == 0, "background writeback")
        waited = time.monotonic() - t_write
        print(f"written back after {waited:.2f}s: pages {s1.get('writeback.pages')} "
              f"writes {s1.get('writeback.writes')}")
        assert waited >= 0.5, "written back before writeback_age"
        assert s1.get("writeback.writes", 0) <= 8  # contiguous pages batched (1 MiB runs)
    finally:
        os.close(fd)  # no fsync anywhere above
    assert cold_read(path, len(data), 0) == data


def test_writeback_under_memory_pressure(mount_factory: MountFactory) -> None:
    m = mount_factory(opts={"cache_size": "2M", **QUIET})
    path = m.path("f")
    data = random.Random(14).randbytes(8 * MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for off in range(0, len(data), 64 * KiB):
            os.pwrite(fd, data[off : off + 64 * KiB], off)
        s = m.stats()  # before any fsync
        assert s.get("writeback.pages", 0) >= (8 - 2) * MiB // PAGE, s
        assert s.get("writeback.pressure_passes", 0) + s.get("writeback.throttled", 0) > 0
        assert s["cache.dirty_pages"] * PAGE <= 2 * MiB
        print({k: s.get(k) for k in ("writeback.pages", "writeback.writes", "cache.dirty_pages",
                                     "writeback.pressure_passes", "writeback.throttled")})
        for off in range(0, len(data), MiB):
            assert cold_read(path, MiB, off) == data[off : off + MiB], off
    finally:
        os.close(fd)
    m.remount()
    assert cold_read(path, len(data), 0) == data
