"""Unit tests of diofs.cache (pure: an in-memory fake image behind the WriteFn)."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from diofs import stats
from diofs.cache import PageCache, Readahead, Writeback

PS = 4096


def mock_clock_ns() -> int:
    return int(trio.current_time() * 1e9)


class FakeImage:
    """Records write calls; can hold writes at a gate or fail them."""

    def __init__(self) -> None:
        self.files: dict[int, bytearray] = {}
        self.calls: list[tuple[int, int, int]] = []  # (ino, off, len)
        self.gate: trio.Event | None = None
        self.started = trio.Event()
        self.fail: OSError | None = None
        self.active = 0
        self.max_active = 0

    async def write(self, ino: int, off: int, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.calls.append((ino, off, len(data)))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            self.started.set()
            if self.gate is not None:
                await self.gate.wait()
            await trio.lowlevel.checkpoint()
            if self.fail is not None:
                raise self.fail
            f = self.files.setdefault(ino, bytearray())
            if len(f) < off + len(data):
                f.extend(bytes(off + len(data) - len(f)))
            f[off : off + len(data)] = data
        finally:
            self.active -= 1

    def read(self, ino: int, off: int, n: int) -> bytes:
        return bytes(self.files.get(ino, b"")[off : off + n])


class Errors:
    def __init__(self) -> None:
        self.seen: list[tuple[int, BaseException]] = []

    def __call__(self, ino: int, exc: BaseException) -> None:
        self.seen.append((ino, exc))


@pytest.fixture(autouse=True)
def _reset_stats() -> None:
    stats.reset()


def make(limit_pages: int = 64, **kw: object) -> tuple[PageCache, FakeImage, Errors, Writeback]:
    cache = PageCache(PS, limit_pages * PS, clock_ns=mock_clock_ns)
    img = FakeImage()
    errs = Errors()
    wb = Writeback(cache, img.write, on_error=errs, **kw)  # type: ignore[arg-type]
    return cache, img, errs, wb


def page(b: int) -> bytes:
    return bytes([b]) * PS


# ------------------------------------------------------------------ PageCache basics


def test_lookup_insert_stats_and_padding() -> None:
    cache = PageCache(PS, 16 * PS)
    assert cache.lookup(1, 0) is None
    cache.insert_clean(1, 0, b"abc")
    got = cache.lookup(1, 0)
    assert got is not None and len(got) == PS and got[:3] == b"abc" and not any(got[3:])
    assert stats.get("cache.hits") == 1 and stats.get("cache.misses") == 1
    assert stats.get("cache.fills") == 1
    assert cache.peek(1, 1) is None and stats.get("cache.misses") == 1
    assert cache.used_bytes() == PS and stats.get("cache.used_bytes") == PS


def test_insert_clean_run_and_lookup_run() -> None:
    cache = PageCache(PS, 16 * PS)
    data = page(1) + page(2) + b"xy"
    assert cache.insert_clean_run(5, 10, data) == 3
    run = cache.lookup_run(5, 9, 5)
    assert run[0] is None and run[4] is None
    assert run[1] == page(1) and run[2] == page(2)
    assert run[3] is not None and run[3][:2] == b"xy" and not any(run[3][2:])
    assert stats.get("cache.hits") == 3 and stats.get("cache.misses") == 2
    assert stats.get("cache.fills") == 3


def test_fill_never_overwrites_a_cached_page() -> None:
    """Clean or dirty: a fill's bytes may predate a write + writeback of the page (found by
    tests/fsx.py concurrent mode; real-mount reproduction in test_cache_mount.py)."""
    cache = PageCache(PS, 16 * PS)
    cache.insert_clean(1, 0, page(1))
    cache.insert_clean(1, 0, page(2))
    assert cache.peek(1, 0) == page(1)
    assert cache.insert_clean_run(1, 0, page(2) * 2) == 1  # only the missing page 1
    assert cache.peek(1, 0) == page(1) and cache.peek(1, 1) == page(2)
    cache.write(1, 0, 0, b"new")
    cache.insert_clean(1, 0, page(3))
    got = cache.peek(1, 0)
    assert got is not None and got[:3] == b"new" and got[3:] == page(1)[3:]


def test_write_partial_needs_page_whole_page_does_not() -> None:
    cache = PageCache(PS, 16 * PS)
    with pytest.raises(KeyError):
        cache.write(1, 0, 10, b"x")
    cache.write(1, 0, 0, page(7))
    assert cache.is_dirty(1, 0) and cache.dirty_bytes() == PS
    assert stats.get("cache.dirty_pages") == 1
    z = cache.create_zero(1, 1)
    assert z == bytes(PS) and not cache.is_dirty(1, 1)
    cache.write(1, 1, 100, b"y")
    assert cache.is_dirty(1, 1) and cache.peek(1, 1)[100:101] == b"y"  # type: ignore[index]


def test_lru_eviction_never_drops_dirty_pages() -> None:
    cache = PageCache(PS, 4 * PS)
    cache.write(1, 0, 0, page(1))
    cache.write(1, 1, 0, page(2))
    for i in range(2, 10):
        cache.insert_clean(1, i, page(i))
    assert cache.used_bytes() <= 4 * PS
    assert cache.peek(1, 0) == page(1) and cache.peek(1, 1) == page(2)
    assert stats.get("cache.evictions") == 6
    # Most recently inserted clean pages survive.
    assert cache.cached_indexes(1) == [0, 1, 8, 9]


def test_lru_touch_on_lookup_keeps_hot_page() -> None:
    cache = PageCache(PS, 3 * PS)
    for i in range(3):
        cache.insert_clean(1, i, page(i))
    cache.lookup(1, 0)  # page 0 becomes most recent
    cache.insert_clean(1, 3, page(3))
    assert cache.cached_indexes(1) == [0, 2, 3]


def test_all_dirty_cache_goes_over_limit_instead_of_losing_data() -> None:
    cache = PageCache(PS, 2 * PS)
    for i in range(4):
        cache.write(1, i, 0, page(i))
    assert cache.used_bytes() == 4 * PS and cache.evict_clean(0) == 0


def test_drop_range_keeps_dirty_unless_discard() -> None:
    cache = PageCache(PS, 16 * PS)
    cache.insert_clean_run(1, 0, page(0) * 4)
    cache.write(1, 2, 0, b"d")
    # [PS + 1, 3 * PS) touches pages 1 and 2; page 2 is dirty and kept.
    assert cache.drop_range(1, PS + 1, 3 * PS) == 1
    assert cache.cached_indexes(1) == [0, 2, 3]
    assert cache.drop_range(1, PS + 1, 3 * PS, discard_dirty=True) == 1
    assert cache.cached_indexes(1) == [0, 3] and cache.dirty_bytes() == 0
    assert stats.get("cache.dropped") == 2 and stats.get("cache.dirty_pages") == 0
    assert cache.drop_range(1, 0, 1 << 62) == 2 and cache.used_bytes() == 0


def test_drop_inode_discards_everything() -> None:
    cache = PageCache(PS, 16 * PS)
    cache.insert_clean(1, 0, page(1))
    cache.write(1, 1, 0, page(2))
    cache.insert_clean(2, 0, page(3))
    cache.drop_inode(1)
    assert cache.cached_indexes(1) == [] and cache.dirty_bytes() == 0
    assert cache.used_bytes() == PS


def test_zero_tail_and_zero_range() -> None:
    cache = PageCache(PS, 16 * PS)
    cache.insert_clean_run(1, 0, page(9) * 3)
    cache.zero_tail(1, PS + 100)
    p1 = cache.peek(1, 1)
    assert p1 is not None and p1[:100] == page(9)[:100] and not any(p1[100:])
    assert cache.peek(1, 0) == page(9) and cache.peek(1, 2) == page(9)
    assert not cache.is_dirty(1, 1)
    cache.zero_tail(1, 2 * PS)  # page-aligned size: nothing to zero
    assert cache.peek(1, 2) == page(9)
    cache.zero_range(1, 10, 2 * PS + 5)
    assert cache.peek(1, 0)[:10] == page(9)[:10] and not any(cache.peek(1, 0)[10:])  # type: ignore[index]
    assert not any(cache.peek(1, 2)[:5]) and cache.peek(1, 2)[5:] == page(9)[5:]  # type: ignore[index]


# ------------------------------------------------------------------ Readahead


def test_readahead_grows_on_sequential_and_resets_on_random() -> None:
    ra = Readahead(min_pages=4, max_pages=64)
    sizes = []
    index = 0
    for _ in range(7):
        sizes.append(ra.window(index, 2))
        index += 2
    assert sizes == [4, 8, 16, 32, 64, 64, 64]
    assert ra.window(1000, 2) == 2  # random: only the request
    assert ra.window(5, 1) == 1
    assert ra.window(6, 1) == 4  # sequential again: starts small
    assert ra.window(7, 100) == 100  # never less than the request


def test_readahead_small_reads_in_one_page_keep_window() -> None:
    ra = Readahead(min_pages=4, max_pages=64)
    assert ra.window(0, 1) == 4
    assert ra.window(0, 1) == 4  # second 1 KiB read in page 0
    assert ra.window(1, 1) == 8
    assert ra.window(1, 2) == 16  # unaligned read starting in the previous read's last page
    first = Readahead()
    assert first.window(50, 4) == 4  # first read not at 0: random


# ------------------------------------------------------------------ Writeback


async def test_writeback_batches_contiguous_runs() -> None:
    cache, img, errs, wb = make(limit_pages=64, max_run_bytes=4 * PS)
    for i in [0, 1, 2, 3, 4, 5, 8, 9]:
        cache.write(1, i, 0, page(i))
    cache.write(2, 0, 0, page(42))
    await wb.writeback_all()
    assert sorted(img.calls) == [
        (1, 0, 4 * PS),
        (1, 4 * PS, 2 * PS),
        (1, 8 * PS, 2 * PS),
        (2, 0, PS),
    ]
    assert stats.get("writeback.writes") == 4 and stats.get("writeback.pages") == 9
    assert cache.dirty_bytes() == 0 and cache.writeback_bytes() == 0
    assert img.read(1, 9 * PS, PS) == page(9) and img.read(2, 0, PS) == page(42)
    # Written pages are clean and evictable again.
    assert cache.evict_clean(0) == 9
    assert errs.seen == []


async def test_writeback_range_only_touches_its_range() -> None:
    cache, img, _errs, wb = make()
    for i in range(4):
        cache.write(1, i, 0, page(i))
    await wb.writeback_range(1, PS + 1, 2 * PS + 1)  # pages 1 and 2
    assert img.calls == [(1, PS, 2 * PS)]
    assert cache.dirty_indexes(1) == [0, 3]


async def test_pages_under_writeback_are_not_evicted_and_refuse_fills() -> None:
    cache, img, _errs, wb = make(limit_pages=4)
    cache.write(1, 0, 0, page(1))
    img.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wb.writeback_inode, 1)
        await img.started.wait()
        assert cache.under_writeback(1, 0) and not cache.is_dirty(1, 0)
        for i in range(1, 10):
            cache.insert_clean(2, i, page(i))
        assert cache.peek(1, 0) == page(1)
        cache.insert_clean(1, 0, page(99))  # a fill that may have read the old image
        assert cache.peek(1, 0) == page(1)
        img.gate.set()
    assert not cache.under_writeback(1, 0)
    cache.evict_clean(0)
    assert cache.peek(1, 0) is None


async def test_redirty_during_writeback_stays_dirty() -> None:
    cache, img, _errs, wb = make()
    cache.write(1, 0, 0, page(1))
    img.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wb.writeback_inode, 1)
        await img.started.wait()
        cache.write(1, 0, 0, b"22")  # redirty while the snapshot is being written
        img.gate.set()
    assert img.read(1, 0, PS) == page(1)  # the snapshot taken when the write started
    assert cache.is_dirty(1, 0)
    img.gate = None
    await wb.writeback_inode(1)
    assert img.read(1, 0, 2) == b"22" and not cache.is_dirty(1, 0)


async def test_writeback_range_waits_for_in_flight_writeback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache, img, _errs, wb = make(age_s=1.0)
    cache.write(1, 0, 0, page(1))
    img.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        wb.kick()
        # Age the page past age_s so the worker picks it up.
        await trio.sleep(1.0)
        await img.started.wait()
        assert cache.under_writeback(1, 0) and cache.dirty_bytes() == 0
        done = False

        async def fsync() -> None:
            nonlocal done
            await wb.writeback_range(1, 0, PS)
            done = True

        nursery.start_soon(fsync)
        await trio.testing.wait_all_tasks_blocked()
        assert not done  # nothing dirty, but the worker's write is still in flight
        img.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert done and len(img.calls) == 1
        nursery.cancel_scope.cancel()


async def test_second_writeback_of_a_page_waits_for_the_first() -> None:
    cache, img, _errs, wb = make()
    cache.write(1, 0, 0, page(1))
    img.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wb.writeback_inode, 1)
        await img.started.wait()
        cache.write(1, 0, 0, b"2")
        nursery.start_soon(wb.writeback_inode, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert len(img.calls) == 1 and img.max_active == 1
        img.gate.set()
    assert len(img.calls) == 2 and img.max_active == 1
    assert img.read(1, 0, 1) == b"2" and cache.dirty_bytes() == 0


async def test_runs_write_concurrently_up_to_the_limit() -> None:
    cache, img, _errs, wb = make(concurrency=2)
    for i in range(0, 10, 2):  # five separate runs
        cache.write(1, i, 0, page(i))
    img.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wb.writeback_inode, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert img.active == 2
        img.gate.set()
    assert len(img.calls) == 5 and img.max_active == 2


async def test_age_based_background_writeback(autojump_clock: trio.testing.MockClock) -> None:
    cache, img, _errs, wb = make(age_s=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        cache.write(1, 0, 0, page(1))
        await trio.sleep(2.0)
        cache.write(1, 5, 0, page(5))
        await trio.sleep(2.0)
        assert img.calls == []  # t=4: nothing is 5 s old
        # The worker wakes every age_s / 2 = 2.5 s: at t=5 page 0 is 5 s old, page 5 is 3 s.
        await trio.sleep(1.5)
        assert img.calls == [(1, 0, PS)]
        assert cache.dirty_indexes(1) == [5]
        await trio.sleep(2.1)  # t=7.6: page 5 (dirtied at t=2) was written at t=7.5
        assert img.calls == [(1, 0, PS), (1, 5 * PS, PS)]
        assert cache.dirty_bytes() == 0
        nursery.cancel_scope.cancel()


async def test_memory_pressure_writes_oldest_first(autojump_clock: trio.testing.MockClock) -> None:
    cache, img, _errs, wb = make(limit_pages=16, age_s=1000.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        for i in range(9):  # 9 pages dirty > limit/2 = 8 pages
            cache.write(1, 100 - i, 0, page(i))  # page 100 is oldest, 92 youngest
            await trio.sleep(0.001)
        wb.kick()
        await trio.sleep(0.01)
        # Written down to limit/4 = 4 dirty pages: the 5 oldest (pages 96..100).
        assert img.calls == [(1, 96 * PS, 5 * PS)]
        assert cache.dirty_indexes(1) == [92, 93, 94, 95]
        assert stats.get("writeback.pressure_passes") >= 1
        nursery.cancel_scope.cancel()


async def test_error_reported_once_and_pages_left_clean() -> None:
    cache, img, errs, wb = make(max_run_bytes=2 * PS)
    for i in range(2):
        cache.write(1, i, 0, page(i))
    img.fail = OSError(errno.EIO, "injected")
    with pytest.raises(OSError) as info:
        await wb.writeback_inode(1)
    assert info.value.errno == errno.EIO
    assert len(errs.seen) == 1 and errs.seen[0][0] == 1
    assert stats.get("writeback.errors") == 1
    assert cache.dirty_bytes() == 0  # like Linux: the failed pages are clean now
    await wb.writeback_inode(1)  # nothing left to write, nothing new reported
    assert len(errs.seen) == 1


async def test_worker_error_reported_once_and_raised_to_waiting_fsync(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache, img, errs, wb = make(age_s=1.0)
    cache.write(1, 0, 0, page(1))
    img.gate = trio.Event()
    img.fail = OSError(errno.ENOSPC, "full")
    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        await img.started.wait()
        raised: list[BaseException] = []

        async def fsync() -> None:
            try:
                await wb.writeback_inode(1)
            except OSError as exc:
                raised.append(exc)

        nursery.start_soon(fsync)
        await trio.testing.wait_all_tasks_blocked()
        img.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [e.errno for e in raised] == [errno.ENOSPC]  # type: ignore[attr-defined]
        assert len(errs.seen) == 1
        nursery.cancel_scope.cancel()


async def test_discarded_pages_under_writeback_are_not_written_or_recached() -> None:
    cache, img, _errs, wb = make(concurrency=1)
    cache.write(1, 0, 0, page(1))
    img.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wb.writeback_range, 1, 0, PS)  # run A holds the only slot
        await img.started.wait()
        cache.write(1, 2, 0, page(2))
        cache.write(1, 3, 0, page(3))
        nursery.start_soon(wb.writeback_range, 1, 2 * PS, 4 * PS)  # run B, queued
        await trio.testing.wait_all_tasks_blocked()
        assert cache.under_writeback(1, 3) and len(img.calls) == 1
        assert cache.drop_range(1, 0, 3 * PS, discard_dirty=True) == 2  # pages 0 and 2
        img.gate.set()
    # Run A had started: its write lands; run B had not: only page 3 is written.
    assert img.calls == [(1, 0, PS), (1, 3 * PS, PS)]
    assert cache.cached_indexes(1) == [3]
    cache.insert_clean(1, 0, page(7))  # the key is free again
    assert cache.peek(1, 0) == page(7)


async def test_cancelled_writeback_redirties(autojump_clock: trio.testing.MockClock) -> None:
    cache, img, _errs, wb = make()
    cache.write(1, 0, 0, page(1))
    img.gate = trio.Event()
    with trio.move_on_after(1):
        await wb.writeback_inode(1)
    assert cache.is_dirty(1, 0) and not cache.under_writeback(1, 0)
    img.gate = None
    await wb.writeback_all()
    assert img.read(1, 0, PS) == page(1)


async def test_cancelled_background_pass_redirties_runs_not_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A pass of 10 runs (one per inode) shared by 4 writers, cancelled while the writers
    wait in their first write: every page is dirty again, none left under writeback."""
    cache, img, _errs, wb = make(age_s=1.0)
    for ino in range(1, 11):
        cache.write(ino, 0, 0, page(ino))
    img.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        await trio.sleep(2)  # the pass has started; 4 writes wait at the gate
        assert len(img.calls) == 4
        nursery.cancel_scope.cancel()
    for ino in range(1, 11):
        assert cache.is_dirty(ino, 0) and not cache.under_writeback(ino, 0), ino
    img.gate = None
    await wb.writeback_all()
    assert all(img.read(ino, 0, PS) == page(ino) for ino in range(1, 11))


async def test_wait_for_room_throttles_and_releases(autojump_clock: trio.testing.MockClock) -> None:
    cache, img, _errs, wb = make(limit_pages=16, age_s=1000.0)
    img.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        await wb.wait_for_room()  # empty cache: returns at once
        for i in range(13):  # 13 > 3/4 * 16
            cache.write(1, i, 0, page(i))
        released = False

        async def writer() -> None:
            nonlocal released
            await wb.wait_for_room()
            released = True

        nursery.start_soon(writer)
        await trio.sleep(10)
        assert not released and stats.get("writeback.throttled") == 1
        assert cache.writeback_bytes() > 0  # the worker was kicked and is writing
        img.gate.set()
        await trio.sleep(0.1)
        assert released
        assert cache.dirty_bytes() + cache.writeback_bytes() <= 8 * PS
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("seed", range(6))
async def test_random_ops_against_a_model(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    """Buffered writes, fills, direct writes with shootdown, punches and fsyncs against a
    model of the file, with the background worker and a small cache; at the end the image
    equals the model. Foreground operations are serialized (the pagecache lock's job);
    the worker and the image writes (with random delays) run concurrently with them."""
    import random

    rnd = random.Random(seed)
    npages = 24
    cache = PageCache(PS, 8 * PS, clock_ns=mock_clock_ns)
    img = FakeImage()
    img.files[1] = bytearray(npages * PS)
    truth = bytearray(npages * PS)

    async def slow_write(ino: int, off: int, data: bytes) -> None:
        await trio.sleep(rnd.random() * 0.3)
        await img.write(ino, off, data)

    wb = Writeback(cache, slow_write, age_s=0.5, max_run_bytes=4 * PS, on_error=Errors())

    def fill(index: int) -> None:
        if cache.lookup(1, index) is None:  # a hit touches the LRU
            assert not cache.under_writeback(1, index)
            cache.insert_clean(1, index, img.read(1, index * PS, PS))

    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        for _ in range(300):
            op = rnd.random()
            off = rnd.randrange(npages * PS)
            n = rnd.randrange(1, min(3 * PS, npages * PS - off) + 1)
            data = bytes([rnd.randrange(1, 256)]) * n
            if op < 0.45:  # buffered write (read-modify-write of the edge pages)
                await wb.wait_for_room()
                fill(off // PS)
                fill((off + n - 1) // PS)
                for index in range(off // PS, (off + n - 1) // PS + 1):  # as Buffered.write
                    s, e = max(off, index * PS), min(off + n, (index + 1) * PS)
                    cache.write(1, index, s - index * PS, data[s - off : e - off])
                truth[off : off + n] = data
            elif op < 0.65:  # buffered read
                for index in range(off // PS, (off + n - 1) // PS + 1):
                    fill(index)
                    assert cache.lookup(1, index) == truth[index * PS : (index + 1) * PS]
            elif op < 0.8:  # direct write: write back + wait, shoot down, write, shoot down
                await wb.writeback_range(1, off, off + n)
                cache.drop_range(1, off, off + n)
                await img.write(1, off, data)
                truth[off : off + n] = data
                cache.drop_range(1, off, off + n)
            elif op < 0.88:  # punch whole pages
                first, last = off // PS, (off + n - 1) // PS
                # as Direct._blocking: write back and wait, then drop
                await wb.writeback_range(1, first * PS, (last + 1) * PS)
                cache.drop_range(1, first * PS, (last + 1) * PS, discard_dirty=True)
                zeros = bytes((last + 1 - first) * PS)
                await img.write(1, first * PS, zeros)
                truth[first * PS : (last + 1) * PS] = zeros
            elif op < 0.95:  # fsync
                await wb.writeback_inode(1)
                assert cache.dirty_indexes(1) == []
            else:
                await trio.sleep(rnd.random())
            slack = cache.dirty_bytes() + cache.writeback_bytes() + 3 * PS
            assert cache.used_bytes() <= cache.limit_bytes + slack
        await wb.writeback_all()
        nursery.cancel_scope.cancel()
    assert img.files[1] == truth
    assert cache.dirty_bytes() == 0 and cache.writeback_bytes() == 0
