"""Writeback: moving dirty pages of the PageCache to the image.

Owns: the background worker (age-based and memory-pressure writeback), on-demand writeback
of a range / an inode / everything (fsync, direct I/O, unmount), the dirty throttle for
buffered writers, and the reporting of write errors.

How a run is written (one `_Run` = up to `max_run_bytes` of contiguous dirty pages of one
inode):
  1. atomically (no await): the pages are marked clean and their keys "under writeback"
     (`PageCache.begin_writeback`); from here a new `write` redirties the page, and the
     page stays dirty after this run ends (its next writeback is a new run);
  2. the run waits for a slot of the CapacityLimiter (`concurrency` runs write at once);
  3. it snapshots the pages (`bytes`) that were not discarded meanwhile (drop with
     `discard_dirty`, drop_inode) and calls `write(ino, byte_offset, data)`, one call per
     contiguous piece; the fs clips data past i_size (the last page is a whole page);
  4. `end_writeback`: keys leave "under writeback", clean pages still mapped go back to the
     LRU (evictable again), waiters are woken.

Invariants:
- two writebacks of one page key never overlap: a dirty page whose key is already under
  writeback is skipped by the worker and waited for by `writeback_range` before it starts
  its own run;
- pages under writeback are never evicted (they are not in the LRU) and refuse fills;
- errors: like Linux, a failed write leaves the pages clean (the data is lost from the
  cache); the error is counted (`writeback.errors`) and reported exactly once per run via
  `on_error(ino, exc)` (the errseq of diofs.durability); a `writeback_range` that started or
  waited for the failed run also raises it. If a run is cancelled before its data was
  written, its pages become dirty again (unmount cancels only after `writeback_all`).

Units: bytes, page indexes; ages in seconds (`age_s`), compared against the cache's
`clock_ns` stamps; the worker sleeps on trio's clock (MockClock in tests: pass
`clock_ns=lambda: int(trio.current_time() * 1e9)` to the PageCache).

The worker must be running (`nursery.start(wb.run)`) for `wait_for_room` to make progress.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator

import trio

from diofs import stats
from diofs.cache.pages import _END, Page, PageCache

log = logging.getLogger(__name__)

WriteFn = Callable[[int, int, bytes], Awaitable[None]]
"""(ino, byte offset, data) -> writes to the image; raises OSError on failure."""


class _Run:
    """Contiguous pages of one inode being written back together."""

    __slots__ = ("done", "error", "indexes", "ino", "pages")

    def __init__(self, ino: int, indexes: list[int], pages: list[Page]) -> None:
        self.ino = ino
        self.indexes = indexes
        self.pages = pages
        self.done = trio.Event()
        self.error: BaseException | None = None


class Writeback:
    """Writeback of one PageCache. State guarded by trio's one-task-at-a-time rule; each
    `_start_runs` call is atomic (no await between choosing pages and marking them)."""

    def __init__(
        self,
        cache: PageCache,
        write: WriteFn,
        *,
        age_s: float = 5.0,
        max_run_bytes: int = 1 << 20,
        on_error: Callable[[int, BaseException], None],
        concurrency: int = 4,
    ) -> None:
        if age_s <= 0:
            raise ValueError("writeback age must be positive")
        self._cache = cache
        self._write = write
        self.age_s = age_s
        self._max_run_pages = max(1, max_run_bytes // cache.page_size)
        self._on_error = on_error
        self._concurrency = concurrency
        self._limiter = trio.CapacityLimiter(concurrency)
        self._kicked = trio.Event()
        self._progress = trio.Event()
        cache.on_undirty = self._notify_progress

    # ---------------------------------------------------------------- helpers

    def _notify_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _pressure(self) -> bool:
        c = self._cache
        return c.dirty_bytes() + c.writeback_bytes() > c.limit_bytes // 2

    def _start_runs(self, ino: int, indexes: list[int]) -> list[_Run]:
        """Mark sorted dirty `indexes` of `ino` (none under writeback) as under writeback,
        grouped into contiguous runs of at most max_run_pages. Synchronous: atomic."""
        runs: list[_Run] = []
        if not indexes:
            return runs
        cur = [indexes[0]]
        groups = [cur]
        for index in indexes[1:]:
            if index == cur[-1] + 1 and len(cur) < self._max_run_pages:
                cur.append(index)
            else:
                cur = [index]
                groups.append(cur)
        for group in groups:
            run = _Run(ino, group, [])
            run.pages = self._cache.begin_writeback(ino, group, run)
            runs.append(run)
        return runs

    def _pieces(self, run: _Run) -> Iterator[tuple[int, bytes, int]]:
        """(byte offset, snapshot, pages) per contiguous piece of not-discarded pages.
        Lazy: each snapshot is taken just before its write."""
        ps = self._cache.page_size
        first = -1
        cur: list[Page] = []
        for index, page in zip(run.indexes, run.pages, strict=True):
            if page.discarded:
                if cur:
                    yield first * ps, b"".join(p.data for p in cur), len(cur)
                    cur = []
                continue
            if not cur:
                first = index
            cur.append(page)
        if cur:
            yield first * ps, b"".join(p.data for p in cur), len(cur)

    async def _write_run(self, run: _Run) -> None:
        redirty = False
        try:
            async with self._limiter:
                for off, data, npages in self._pieces(run):
                    await self._write(run.ino, off, data)
                    stats.add("writeback.writes")
                    stats.add("writeback.pages", npages)
        except Exception as exc:
            run.error = exc
            stats.add("writeback.errors")
            log.warning(
                "writeback of inode %d pages %d..%d failed: %s",
                run.ino,
                run.indexes[0],
                run.indexes[-1],
                exc,
            )
            try:
                self._on_error(run.ino, exc)
            except Exception:  # a bug in the reporter must not kill the worker
                log.exception("on_error callback failed for inode %d", run.ino)
        except BaseException:
            redirty = True  # cancelled before or during the write: keep the data dirty
            raise
        finally:
            self._cache.end_writeback(run.ino, run.indexes, run.pages, run, redirty=redirty)
            run.done.set()
            self._notify_progress()
            if self._pressure():
                self.kick()

    # ---------------------------------------------------------------- the worker

    def kick(self) -> None:
        """Wake the background worker now (memory pressure, throttled writer)."""
        self._kicked.set()

    async def _write_runs(self, runs: Iterator[_Run]) -> None:
        try:
            for run in runs:  # shared with the pass's other writers: each run is taken once
                await self._write_run(run)
        except BaseException:
            # cancelled: the runs no writer took yet stay dirty, as a cancelled run's do
            for run in runs:
                self._cache.end_writeback(run.ino, run.indexes, run.pages, run, redirty=True)
                run.done.set()
            self._notify_progress()
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background worker: every age_s/2 (or when kicked) starts writeback of pages dirty
        for at least age_s and, if dirty + under-writeback bytes exceed limit/2, of the
        oldest dirty pages until dirty bytes are at most limit/4. Runs forever; cancel it
        after `writeback_all` (cancellation redirties runs that had not written yet)."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                with trio.move_on_after(self.age_s / 2):
                    await self._kicked.wait()
                self._kicked = trio.Event()
                runs = self._background_pass()
                # at most `concurrency` writers share the pass's runs, not a task per run:
                # a copy of small files makes a run (and a task spawn) per file
                shared = iter(runs)
                for _ in range(min(self._concurrency, len(runs))):
                    nursery.start_soon(self._write_runs, shared)

    def _background_pass(self) -> list[_Run]:
        c = self._cache
        now = c.clock_ns()
        age_ns = int(self.age_s * 1e9)
        need = 0
        if self._pressure():
            need = c.dirty_pages() - (c.limit_bytes // 4) // c.page_size
            stats.add("writeback.pressure_passes")
        chosen: dict[int, list[int]] = {}
        for ino, index, page in c.oldest_dirty():
            if need <= 0 and now - page.dirty_since_ns < age_ns:
                break  # ordered by dirty time: all the rest are younger
            if c.under_writeback(ino, index):
                continue  # redirtied during its writeback: next pass
            chosen.setdefault(ino, []).append(index)
            need -= 1
        runs: list[_Run] = []
        for ino, indexes in chosen.items():
            indexes.sort()
            runs.extend(self._start_runs(ino, indexes))
        return runs

    # ---------------------------------------------------------------- on demand

    async def writeback_range(self, ino: int, start: int, end: int) -> None:
        """Write back the dirty pages of `ino` touching [start, end) and wait for them and
        for every writeback of those pages already in flight. Raises the first error of
        those runs (which have also been reported through on_error).

        No checkpoint when there is nothing to do (hot path of every direct I/O)."""
        c = self._cache
        waited: dict[_Run, None] = {}
        while True:
            dirty = c.dirty_in(ino, start, end)
            busy = [c.writeback_token(ino, i) for i in dirty if c.under_writeback(ino, i)]
            if not busy:
                break
            for run in busy:  # a page redirtied while written back: wait, then rescan
                assert isinstance(run, _Run)
                waited[run] = None
                await run.done.wait()
        # Atomic from the last scan: in-flight runs to wait for, then our own runs.
        for run in c.writeback_tokens(ino, start, end):
            assert isinstance(run, _Run)
            waited[run] = None
        mine = self._start_runs(ino, dirty)
        if mine:
            async with trio.open_nursery() as nursery:
                for run in mine:
                    waited[run] = None
                    nursery.start_soon(self._write_run, run)
        for run in waited:
            await run.done.wait()
        for run in waited:
            if run.error is not None:
                raise run.error

    async def writeback_inode(self, ino: int) -> None:
        await self.writeback_range(ino, 0, _END)

    async def writeback_all(self) -> None:
        """Write back every dirty page and wait for all writebacks in flight (unmount,
        syncfs). Every inode is attempted; raises the first error afterwards."""
        c = self._cache
        inos = dict.fromkeys(c.dirty_inodes() + c.writeback_inodes())
        errors: list[BaseException] = []

        async def one(ino: int) -> None:
            try:
                await self.writeback_inode(ino)
            except Exception as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for ino in inos:
                nursery.start_soon(one, ino)
        if errors:
            raise errors[0]

    async def wait_for_room(self) -> None:
        """Dirty throttle (balance_dirty_pages-like), called by buffered writers before
        dirtying: if dirty + under-writeback bytes exceed 3/4 of the cache limit, kick the
        worker and wait until they are at most limit/2. Counts writeback.throttled.
        No checkpoint when there is room."""
        c = self._cache
        limit = c.limit_bytes
        if c.dirty_bytes() + c.writeback_bytes() <= limit * 3 // 4:
            return
        stats.add("writeback.throttled")
        while c.dirty_bytes() + c.writeback_bytes() > limit // 2:
            progress = self._progress
            self.kick()
            await progress.wait()
