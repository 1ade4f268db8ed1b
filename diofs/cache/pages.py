"""The page store: fixed-size pages per inode, clean LRU, dirty tracking, writeback marks.

Owns: the bytes of every cached page, which pages are dirty (and since when), which page
keys are under writeback, and the memory accounting (`used_bytes`, `dirty_bytes`,
`writeback_bytes`). It does not know the image: fills come in through `insert_clean*`,
and dirty data leaves through `diofs.cache.writeback` (which calls `begin_writeback` /
`end_writeback`; those two are for that module only).

Units: `index` is a page number (byte offset // page_size); byte ranges are half-open
`[start, end)` in bytes; times are nanoseconds of the injected `clock_ns`.

Invariants (every method is synchronous, so each one is atomic under trio):
- every page's `data` is a bytearray of exactly `page_size` bytes;
- a page is in exactly one of three states: clean (in the LRU, evictable), dirty (in the
  dirty maps, never evicted), or clean-under-writeback (its key is in `_wb`; neither in the
  LRU nor dirty; never evicted). A page redirtied while its key is under writeback is dirty
  *and* its key stays in `_wb` until that writeback ends;
- `_dirty` is ordered by `dirty_since_ns` (oldest first): a page enters it at its
  clean -> dirty transition stamped with `clock_ns()`; redirtying a dirty page keeps its stamp;
- a key under writeback refuses fills (`insert_clean` ignores it): the image may not yet
  hold the bytes being written, so a fill could cache stale data;
- a cached page refuses fills too, clean or dirty: a fill's bytes were read from the image
  before the insert and may predate a write + writeback of that page (`insert_clean`);
- `used_bytes() <= limit_bytes` except by dirty pages, pages under writeback and the
  max(2, min(HOT_PAGES, limit / 8)) most recent clean pages (or one insert's worth);
- `used_bytes() == page_size * (number of mapped pages)`; pages dropped while under
  writeback are no longer mapped nor counted, but their key stays in `_wb` (and in
  `writeback_bytes()`) until the write ends.

Hazards for callers: `lookup*`/`peek` return the live bytearray; copy out before the next
`await`. Mutate page bytes only through `write*` (which dirties) or `zero_*` (which does not).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator

from diofs import stats

_END = 1 << 63  # "to the end of the file" for byte ranges
HOT_PAGES = 16  # most recent clean pages automatic eviction leaves (at most limit/8, at least 2)


class Page:
    """One cached page. No lock: mutated only by synchronous PageCache methods."""

    __slots__ = ("data", "dirty", "dirty_since_ns", "discarded")

    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.dirty = False
        self.dirty_since_ns = 0
        # Set when dropped with discard_dirty / drop_inode: a queued writeback skips it.
        self.discarded = False


class PageCache:
    """Daemon page cache (SPEC 2). Single-threaded trio code only; no internal lock.

    Attributes (all guarded by "trio runs one task at a time"; no await inside a method):
      _inodes  ino -> {index -> Page}: every mapped page
      _lru     (ino, index) -> Page: clean, mapped, not under writeback; oldest first
      _dirty   (ino, index) -> Page: dirty pages, oldest dirtying first
      _dirty_by_ino  ino -> set of dirty indexes
      _wb      ino -> {index -> token}: keys under writeback (token = the writeback run)
    """

    def __init__(
        self,
        page_size: int,
        limit_bytes: int,
        *,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if limit_bytes < page_size:
            raise ValueError(f"cache limit {limit_bytes} is below one page ({page_size})")
        self.page_size = page_size
        self.limit_bytes = limit_bytes
        self.clock_ns = clock_ns
        self._shift = page_size.bit_length() - 1
        self._hot_pages = max(2, min(HOT_PAGES, (limit_bytes // page_size) // 8))
        self._zero = bytes(page_size)
        self._inodes: dict[int, dict[int, Page]] = {}
        self._lru: OrderedDict[tuple[int, int], Page] = OrderedDict()
        self._dirty: OrderedDict[tuple[int, int], Page] = OrderedDict()
        self._dirty_by_ino: dict[int, set[int]] = {}
        self._wb: dict[int, dict[int, object]] = {}
        self._npages = 0
        self._wb_pages = 0
        # Called after pages stop being dirty by other means than writeback (discard),
        # so that throttled writers re-check; set by Writeback.
        self.on_undirty: Callable[[], None] | None = None
        # Called with the ino when a page of an inode with no dirty page turns dirty, before
        # the bytes are in it (native_io.py: the image no longer has the newest data).
        self.on_first_dirty: Callable[[int], None] | None = None

    # ---------------------------------------------------------------- accounting

    def used_bytes(self) -> int:
        return self._npages << self._shift

    def dirty_bytes(self) -> int:
        return len(self._dirty) << self._shift

    def dirty_pages(self) -> int:
        return len(self._dirty)

    def writeback_bytes(self) -> int:
        """Bytes of page keys under writeback (written or queued, not yet completed)."""
        return self._wb_pages << self._shift

    def _gauge_used(self) -> None:
        stats.gauge("cache.used_bytes", self._npages << self._shift)

    def _gauge_dirty(self) -> None:
        stats.gauge("cache.dirty_pages", len(self._dirty))

    # ---------------------------------------------------------------- lookups

    def lookup(self, ino: int, index: int) -> bytearray | None:
        """The cached page or None; counts cache.hits / cache.misses and touches the LRU."""
        pages = self._inodes.get(ino)
        page = pages.get(index) if pages is not None else None
        if page is None:
            stats.add("cache.misses")
            return None
        stats.add("cache.hits")
        key = (ino, index)
        if key in self._lru:
            self._lru.move_to_end(key)
        return page.data

    def lookup_run(self, ino: int, first: int, n: int) -> list[bytearray | None]:
        """`lookup` of pages first .. first+n-1 at once (one stats update per call)."""
        pages = self._inodes.get(ino)
        if pages is None:
            if n > 0:
                stats.add("cache.misses", n)
            return [None] * n
        out: list[bytearray | None] = []
        lru = self._lru
        hits = 0
        for index in range(first, first + n):
            page = pages.get(index)
            if page is None:
                out.append(None)
                continue
            hits += 1
            key = (ino, index)
            if key in lru:
                lru.move_to_end(key)
            out.append(page.data)
        if hits:
            stats.add("cache.hits", hits)
        if n - hits:
            stats.add("cache.misses", n - hits)
        return out

    def peek(self, ino: int, index: int) -> bytearray | None:
        """The cached page or None, without stats or LRU touch."""
        pages = self._inodes.get(ino)
        if pages is None:
            return None
        page = pages.get(index)
        return page.data if page is not None else None

    def is_dirty(self, ino: int, index: int) -> bool:
        return index in self._dirty_by_ino.get(ino, ())

    def under_writeback(self, ino: int, index: int) -> bool:
        return index in self._wb.get(ino, ())

    def cached_indexes(self, ino: int) -> list[int]:
        return sorted(self._inodes.get(ino, ()))

    def dirty_indexes(self, ino: int) -> list[int]:
        return sorted(self._dirty_by_ino.get(ino, ()))

    def dirty_inodes(self) -> list[int]:
        return list(self._dirty_by_ino)

    # ---------------------------------------------------------------- inserts

    def _map(self, ino: int, index: int, page: Page) -> None:
        pages = self._inodes.get(ino)
        if pages is None:
            pages = self._inodes[ino] = {}
        pages[index] = page
        self._npages += 1

    def _pad(self, data: bytes | bytearray | memoryview) -> bytearray:
        n = len(data)
        if n > self.page_size:
            raise ValueError(f"page data of {n} bytes exceeds page size {self.page_size}")
        buf = bytearray(data)
        if n < self.page_size:
            buf += self._zero[n:]
        return buf

    def insert_clean(self, ino: int, index: int, data: bytes | bytearray | memoryview) -> None:
        """A fill: cache `data` (zero-padded to a page) as clean page `index`; counts
        cache.fills. Ignored if the page is already cached (clean or dirty) or its key is
        under writeback: a fill read the image before it inserts, and a cached page is never
        older than the image. A clean page may even be newer than the fill's bytes: written
        by a buffered write and written back (fsync) while the fill awaited its image read,
        which only ADD-sharing writers can do; replacing it would hide the written data and
        a later read-modify-write would write the stale bytes back to the image."""
        if self._insert_one(ino, index, data):
            stats.add("cache.fills")
            self._after_insert(1)

    def insert_clean_run(self, ino: int, first: int, data: bytes | bytearray | memoryview) -> int:
        """Fill consecutive pages first, first+1, ... from one buffer (last one zero-padded).
        Same rules as `insert_clean` per page; returns the number of pages inserted."""
        view = memoryview(data)
        ps = self.page_size
        n = len(view)
        inserted = new = 0
        index = first
        pages = self._inodes.get(ino)
        if pages is None:
            pages = self._inodes[ino] = {}
        wb = self._wb.get(ino, ())
        lru = self._lru
        full_end = n - n % ps
        for off in range(0, full_end, ps):  # fast path: whole pages, only missing ones
            if index not in wb and index not in pages:
                page = Page(bytearray(view[off : off + ps]))
                pages[index] = page
                lru[(ino, index)] = page
                new += 1
            index += 1
        self._npages += new
        inserted += new
        if not pages:
            del self._inodes[ino]
        if full_end < n and self._insert_one(ino, index, view[full_end:]):
            inserted += 1
        if inserted:
            stats.add("cache.fills", inserted)
            self._after_insert(inserted)
        return inserted

    def _insert_one(self, ino: int, index: int, data: bytes | bytearray | memoryview) -> bool:
        if index in self._wb.get(ino, ()):
            return False
        pages = self._inodes.get(ino)
        page = pages.get(index) if pages is not None else None
        if page is not None:
            return False  # never replace a cached page (see insert_clean)
        page = Page(self._pad(data))
        self._map(ino, index, page)
        self._lru[(ino, index)] = page
        return True

    def create_zero(self, ino: int, index: int) -> bytearray:
        """A zero page for a hole or past EOF, clean until written through `write`.
        If the page is already cached it is returned unchanged."""
        pages = self._inodes.get(ino)
        page = pages.get(index) if pages is not None else None
        if page is not None:
            return page.data
        page = Page(bytearray(self.page_size))
        self._map(ino, index, page)
        self._lru[(ino, index)] = page
        self._after_insert()
        return page.data

    def _after_insert(self, inserted: int = 1) -> None:
        if self._npages << self._shift > self.limit_bytes:
            self.evict_clean(self.limit_bytes, keep_pages=max(inserted, self._hot_pages))
        self._gauge_used()

    # ---------------------------------------------------------------- writes

    def write(
        self, ino: int, index: int, offset_in_page: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Copy `data` into page `index` at `offset_in_page` and mark it dirty.

        The page must be cached unless `data` covers the whole page (KeyError otherwise;
        the caller fills partial pages first: read-modify-write)."""
        n = len(data)
        if offset_in_page < 0 or offset_in_page + n > self.page_size:
            raise ValueError(f"write of {n} bytes at {offset_in_page} crosses the page")
        pages = self._inodes.get(ino)
        page = pages.get(index) if pages is not None else None
        if page is None:
            if n != self.page_size:
                raise KeyError((ino, index))
            page = Page(bytearray(data))
            self._map(ino, index, page)
            self._mark_dirty(ino, index, page)
            self._after_insert()
        else:
            page.data[offset_in_page : offset_in_page + n] = data
            if not page.dirty:
                self._mark_dirty(ino, index, page)

    def _mark_dirty(self, ino: int, index: int, page: Page) -> None:
        if page.dirty:
            return
        key = (ino, index)
        page.dirty = True
        page.dirty_since_ns = self.clock_ns()
        self._lru.pop(key, None)
        self._dirty[key] = page
        s = self._dirty_by_ino.get(ino)
        if s is None:
            s = self._dirty_by_ino[ino] = set()
            if self.on_first_dirty is not None:
                self.on_first_dirty(ino)
        s.add(index)
        stats.gauge("cache.dirty_pages", len(self._dirty))

    def _mark_clean(self, ino: int, index: int, page: Page) -> None:
        page.dirty = False
        del self._dirty[(ino, index)]
        s = self._dirty_by_ino[ino]
        s.discard(index)
        if not s:
            del self._dirty_by_ino[ino]

    # ---------------------------------------------------------------- zeroing

    def zero_range(self, ino: int, start: int, end: int) -> None:
        """Zero the cached bytes of [start, end) without changing any dirty state.

        Used for truncate and punch: the filesystem makes the image agree (deallocates or
        zeroes the blocks); a clean page stays clean because it will match the image."""
        pages = self._inodes.get(ino)
        if not pages or end <= start:
            return
        ps = self.page_size
        for index in self._indexes_in(pages, start, end):
            page = pages[index]
            lo = max(start - index * ps, 0)
            hi = min(end - index * ps, ps)
            page.data[lo:hi] = self._zero[: hi - lo]

    def zero_tail(self, ino: int, size: int) -> None:
        """Truncate helper: zero bytes >= size in the page containing `size`, if cached.

        Does not dirty the page; the filesystem zeroes (or deallocates) the on-image tail
        of the block, so that a later re-read or extension never shows the old bytes."""
        ps = self.page_size
        if size % ps:
            self.zero_range(ino, size, (size // ps + 1) * ps)

    # ---------------------------------------------------------------- drops

    def _indexes_in(self, mapping: Collection[int], start: int, end: int) -> Iterator[int]:
        """Indexes of `mapping` (a dict/set of indexes) of pages touching [start, end)."""
        first, last = start >> self._shift, (end - 1) >> self._shift
        # Walk whichever is smaller: the range (a 1 MiB direct write is 256 pages) or the
        # inode's pages (truncate to 0 of a small file); never the big one.
        if last - first < len(mapping):
            return (i for i in range(first, last + 1) if i in mapping)
        return (i for i in list(mapping) if first <= i <= last)

    def _any_in(
        self, mappings: tuple[Collection[int] | None, ...], start: int, end: int
    ) -> bool:
        """Some mapping holds a page touching [start, end). Absent or empty mappings (the
        direct-I/O steady state) cost no generator."""
        if not any(mappings):
            return False
        return any(
            next(self._indexes_in(m, start, end), None) is not None for m in mappings if m
        )

    def drop_range(self, ino: int, start: int, end: int, *, discard_dirty: bool = False) -> int:
        """Unmap the pages touching [start, end); returns how many; counts cache.dropped.

        Dirty pages are kept unless `discard_dirty` (which drops whole pages, including
        bytes outside the range: callers punching a partial page zero it instead). A clean
        page under writeback is dropped logically: its write still lands (unless
        `discard_dirty`, which cancels it if not yet started) and the page is not re-cached."""
        pages = self._inodes.get(ino)
        if not pages or end <= start:
            return 0
        dropped = 0
        had_dirty = False
        for index in list(self._indexes_in(pages, start, end)):
            page = pages[index]
            if page.dirty:
                if not discard_dirty:
                    continue
                self._mark_clean(ino, index, page)
                had_dirty = True
            self._unmap(ino, index, page, pages)
            if discard_dirty:
                page.discarded = True
            dropped += 1
        if not pages:
            del self._inodes[ino]
        if dropped:
            stats.add("cache.dropped", dropped)
            self._gauge_used()
            if had_dirty:
                self._gauge_dirty()
                self._notify_undirty()
        return dropped

    def drop_inode(self, ino: int) -> None:
        """Discard every page of `ino`, dirty ones included (last reference gone)."""
        pages = self._inodes.pop(ino, None)
        if not pages:
            return
        had_dirty = False
        for index, page in pages.items():
            if page.dirty:
                self._mark_clean(ino, index, page)
                had_dirty = True
            self._lru.pop((ino, index), None)
            page.discarded = True
        self._npages -= len(pages)
        stats.add("cache.dropped", len(pages))
        self._gauge_used()
        if had_dirty:
            self._gauge_dirty()
            self._notify_undirty()

    def _unmap(self, ino: int, index: int, page: Page, pages: dict[int, Page]) -> None:
        del pages[index]
        self._lru.pop((ino, index), None)
        self._npages -= 1

    def _notify_undirty(self) -> None:
        if self.on_undirty is not None:
            self.on_undirty()

    # ---------------------------------------------------------------- eviction

    def evict_clean(self, target_bytes: int, *, keep_pages: int = 0) -> int:
        """Evict least recently used clean pages (never dirty or under writeback) until
        used_bytes() <= target_bytes or only the `keep_pages` most recently used clean
        pages are left; returns pages evicted; counts cache.evictions.

        Inserts call it with keep_pages = max(pages inserted, 2 <= min(HOT_PAGES, limit / 8
        pages)): when the cache is
        full of dirty pages, a request's own fills (edge pages of a write, the pages of a
        read) survive until it has used them, at the cost of exceeding the limit by that
        many clean pages until the next insert."""
        lru = self._lru
        evicted = 0
        target_pages = target_bytes >> self._shift
        while self._npages > target_pages and len(lru) > keep_pages:
            (ino, index), page = lru.popitem(last=False)
            pages = self._inodes[ino]
            del pages[index]
            if not pages:
                del self._inodes[ino]
            self._npages -= 1
            evicted += 1
        if evicted:
            stats.add("cache.evictions", evicted)
            self._gauge_used()
        return evicted

    # ---------------------------------------------------------------- writeback hooks

    def oldest_dirty(self) -> Iterator[tuple[int, int, Page]]:
        """Dirty pages, oldest dirtying first: (ino, index, page). Do not mutate while
        iterating."""
        for (ino, index), page in self._dirty.items():
            yield ino, index, page

    def begin_writeback(self, ino: int, indexes: list[int], token: object) -> list[Page]:
        """(writeback.py only) Mark dirty pages `indexes` of `ino` clean and under
        writeback by `token`. Each must be dirty and not already under writeback."""
        pages = self._inodes[ino]
        wb = self._wb.get(ino)
        if wb is None:
            wb = self._wb[ino] = {}
        out = []
        for index in indexes:
            page = pages[index]
            assert page.dirty and index not in wb, (ino, index)
            self._mark_clean(ino, index, page)
            wb[index] = token
            out.append(page)
        self._wb_pages += len(indexes)
        self._gauge_dirty()
        return out

    def end_writeback(
        self, ino: int, indexes: list[int], pages: list[Page], token: object, *, redirty: bool
    ) -> None:
        """(writeback.py only) The writeback `token` of these pages ended. Pages still
        mapped return to the LRU if clean; with `redirty` (the write never happened) they
        become dirty again, unless they were discarded."""
        wb = self._wb.get(ino, {})
        mapped = self._inodes.get(ino, {})
        for index, page in zip(indexes, pages, strict=True):
            if wb.get(index) is token:
                del wb[index]
                self._wb_pages -= 1
            if mapped.get(index) is not page or index in wb:
                continue
            if redirty and not page.discarded:
                self._mark_dirty(ino, index, page)
            elif not page.dirty:
                self._lru[(ino, index)] = page
        if not wb:
            self._wb.pop(ino, None)
        if redirty:
            self._gauge_dirty()
        if self._npages << self._shift > self.limit_bytes:
            self.evict_clean(self.limit_bytes)

    def holds_nothing_in(self, ino: int, start: int, end: int) -> bool:
        """No page of `ino` touching [start, end) is cached or under writeback."""
        return not self._any_in((self._inodes.get(ino), self._wb.get(ino)), start, end)

    def writeback_token(self, ino: int, index: int) -> object | None:
        """The token of the writeback in flight on page key (ino, index), or None."""
        wb = self._wb.get(ino)
        return wb.get(index) if wb is not None else None

    def clean_in(self, ino: int, start: int, end: int) -> bool:
        """No page of `ino` touching [start, end) is dirty or under writeback: what
        Writeback.writeback_range would find nothing to do for (dio.Direct.read_inline)."""
        return not self._any_in((self._dirty_by_ino.get(ino), self._wb.get(ino)), start, end)

    def writeback_tokens(self, ino: int, start: int = 0, end: int = _END) -> set[object]:
        """Tokens of writebacks in flight on pages of `ino` touching [start, end)."""
        wb = self._wb.get(ino)
        if not wb or end <= start:
            return set()
        return {wb[i] for i in self._indexes_in(wb, start, end)}

    def dirty_in(self, ino: int, start: int = 0, end: int = _END) -> list[int]:
        """Sorted dirty page indexes of `ino` touching [start, end)."""
        s = self._dirty_by_ino.get(ino)
        if not s or end <= start:
            return []
        return sorted(self._indexes_in(s, start, end))

    def writeback_inodes(self) -> list[int]:
        return list(self._wb)
