"""The daemon page cache (SPEC 2): pages, LRU, dirty tracking, readahead, writeback.

Modules:
  pages      PageCache: the bytes of cached pages, clean LRU, dirty and writeback state,
             memory accounting. Synchronous, so each call is atomic under trio.
  readahead  Readahead: per-handle on-demand window (grows on sequential, resets on random).
  writeback  Writeback: background worker (age and memory pressure), writeback_range /
             _inode / _all for fsync, direct I/O and unmount, dirty throttle, error reports.

This package imports nothing of the filesystem: the image-facing write is the injected
`WriteFn(ino, byte_offset, data)`; fills come from the caller (`insert_clean*`). It holds
no lock of its own and takes none: the read/write paths hold the pagecache add/block lock
(diofs.locks) around fills and around shootdown; writeback takes no diofs lock, so a
WriteFn must not wait for the pagecache block lock (it may wait for fs metadata locks).

Units: one page = `page_size` bytes (the filesystem block size, 4096 by default); page
`index` = byte offset // page_size; byte ranges are half-open [start, end); dirty times are
nanoseconds of the cache's `clock_ns` (time.monotonic_ns unless injected).

Invariants (details in each module):
- a page is clean (evictable, LRU), dirty (never evicted), or under writeback (never
  evicted, refuses fills) -- redirtied-under-writeback pages are dirty and stay dirty after
  that writeback ends;
- two writebacks of one page never run at once;
- a failed writeback leaves its pages clean and is reported once via on_error (errseq);
- used_bytes may exceed limit_bytes only by dirty / under-writeback pages; buffered writers
  call `Writeback.wait_for_room()` before dirtying to bound those.

Stats: cache.hits, cache.misses, cache.fills, cache.evictions, cache.dropped,
cache.dirty_pages (gauge), cache.used_bytes (gauge), writeback.pages, writeback.writes,
writeback.errors, writeback.throttled, writeback.pressure_passes. The caller counts
cache.readahead_pages.
"""

from diofs.cache.pages import Page, PageCache
from diofs.cache.readahead import Readahead
from diofs.cache.writeback import Writeback, WriteFn

__all__ = ["Page", "PageCache", "Readahead", "WriteFn", "Writeback"]
