"""Readahead window per open handle, after Linux's on-demand readahead (mm/readahead.c).

Owns only the window state of one handle; it reads nothing and counts nothing (the caller
fills the pages and counts `cache.readahead_pages`).

Policy (units: pages):
- a read is *sequential* if it starts where the previous one ended or inside the last page
  of the previous read (unaligned or small reads); the first read of a handle at page 0 is
  sequential too (a file read from the start);
- on a sequential read the window doubles (starting from max(min_pages, 2 * npages)),
  capped at max_pages; a one-page read inside the previous read's last page (small reads
  walking through a page) keeps the window;
- any other read is random: the window resets and only the request itself is read;
- the answer is always >= npages (a request larger than max_pages is read whole).

The caller is expected to call `window` for every buffered read and fill only the pages of
[index, index + window) that are missing; with a warm window that keeps up to max_pages
pages ahead of a sequential reader at the cost of one extra fill per request.
"""

from __future__ import annotations


class Readahead:
    """Per-handle readahead state. No lock: one handle's reads run in one trio task at a
    time, and a racing pair only makes the guess worse, never wrong."""

    __slots__ = ("_next", "_size", "max_pages", "min_pages")

    def __init__(self, min_pages: int = 4, max_pages: int = 64) -> None:
        if not 1 <= min_pages <= max_pages:
            raise ValueError(f"need 1 <= min_pages <= max_pages, got {min_pages}, {max_pages}")
        self.min_pages = min_pages
        self.max_pages = max_pages
        self._next = 0  # page after the last read (0: a first read at page 0 is sequential)
        self._size = 0  # current window in pages; 0 = no readahead (random)

    @property
    def size(self) -> int:
        """The current window in pages (0 after a random read)."""
        return self._size

    def window(self, index: int, npages: int) -> int:
        """For a read of pages [index, index + npages), how many pages from `index` to read
        (>= npages)."""
        npages = max(npages, 1)
        if index == self._next - 1 and npages == 1 and self._size:
            pass  # another small read within the previous read's last page: keep the window
        elif index == self._next or (index == self._next - 1 and self._next > 0):
            if self._size == 0:
                self._size = min(self.max_pages, max(self.min_pages, 2 * npages))
            else:
                self._size = min(self.max_pages, 2 * self._size)
        else:
            self._size = 0
        self._next = index + npages
        return max(npages, self._size)
