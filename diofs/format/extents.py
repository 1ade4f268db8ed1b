"""Per-file extent map: file block ranges -> image block ranges, each written or unwritten.

Units: file blocks and image (physical) blocks. Invariants: extents are sorted by `start`,
never overlap, never have count 0, and neighbours that continue each other in both file and
image space with the same state are merged. An unwritten extent owns its blocks but reads as
zeros (SPEC 5, seed 003): blocks allocated for a write become written only after the data
landed on the image.

Pure data structure: no I/O, no awaits; callers run it between trio checkpoints.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class Extent:
    start: int
    phys: int
    count: int
    unwritten: bool

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of a looked-up range: `phys` is None for a hole."""

    start: int
    count: int
    phys: int | None
    unwritten: bool

    @property
    def block(self) -> int:
        """The image block of `start`, for a segment that has one (the caller has checked
        `readable`, or allocated the range)."""
        assert self.phys is not None, "a hole has no image block"
        return self.phys

    @property
    def readable(self) -> bool:
        """True if the blocks hold file data (mapped and written)."""
        return self.phys is not None and not self.unwritten


class ExtentMap:
    """`on_change`, when set, is called (and cleared) before the map changes what any block
    maps to: native_io.py disarms the binding's copy of this map there."""

    __slots__ = ("_ext", "_starts", "on_change")

    def __init__(self, extents: list[Extent] | None = None) -> None:
        self._ext: list[Extent] = sorted(extents or [], key=lambda e: e.start)
        self._starts = [e.start for e in self._ext]
        self.on_change: Callable[[], None] | None = None

    @classmethod
    def loaded(cls, extents: list[Extent]) -> ExtentMap:
        """A map of extents read from the image in the order they were written (sorted): no
        sort. Unsorted or overlapping ones are damage that diofs/format/verify.py reports
        before the map is used."""
        em = cls.__new__(cls)
        em._ext = extents
        em._starts = [e.start for e in extents]
        em.on_change = None
        return em

    def __iter__(self) -> Iterator[Extent]:
        return iter(self._ext)

    def __len__(self) -> int:
        return len(self._ext)

    def mapped_blocks(self) -> int:
        return sum(e.count for e in self._ext)

    def end_block(self) -> int:
        """One past the last mapped file block (0 if empty)."""
        return self._ext[-1].end if self._ext else 0

    def lookup(self, start: int, count: int) -> list[Segment]:
        """Segments covering [start, start + count), holes included, in file order."""
        out: list[Segment] = []
        end = start + count
        pos = start
        i = max(0, bisect_right(self._starts, start) - 1)
        while pos < end:
            e = self._ext[i] if i < len(self._ext) else None
            if e is None or e.start >= end:
                out.append(Segment(pos, end - pos, None, False))
                break
            if e.end <= pos:
                i += 1
                continue
            if e.start > pos:
                out.append(Segment(pos, e.start - pos, None, False))
                pos = e.start
            n = min(e.end, end) - pos
            out.append(Segment(pos, n, e.phys + (pos - e.start), e.unwritten))
            pos += n
            i += 1
        return out

    def written_phys(self, start: int, count: int) -> int | None:
        """The image block of `start` if [start, start + count) lies inside one written
        extent, else None (the direct-write fast path: no Segment list, no allocation)."""
        i = bisect_right(self._starts, start) - 1
        if i < 0:
            return None
        e = self._ext[i]
        if e.unwritten or start + count > e.start + e.count:
            return None
        return e.phys + (start - e.start)

    def _changing(self) -> None:
        notify, self.on_change = self.on_change, None
        if notify is not None:
            notify()

    def _split_at(self, block: int) -> None:
        """Make `block` an extent boundary (if it falls inside an extent)."""
        i = bisect_right(self._starts, block) - 1
        if i < 0:
            return
        e = self._ext[i]
        if e.start < block < e.end:
            tail = Extent(block, e.phys + (block - e.start), e.end - block, e.unwritten)
            e.count = block - e.start
            self._ext.insert(i + 1, tail)
            self._starts.insert(i + 1, block)

    def _range_indexes(self, start: int, end: int) -> tuple[int, int]:
        """After splitting at start and end: the slice of extents inside [start, end)."""
        self._split_at(start)
        self._split_at(end)
        lo = bisect_right(self._starts, start - 1)
        hi = bisect_right(self._starts, end - 1)
        return lo, hi

    def _merge_around(self, lo: int, hi: int) -> None:
        i = max(0, lo - 1)
        while i < min(hi + 1, len(self._ext) - 1):
            a, b = self._ext[i], self._ext[i + 1]
            if a.end == b.start and a.phys + a.count == b.phys and a.unwritten == b.unwritten:
                a.count += b.count
                del self._ext[i + 1]
                del self._starts[i + 1]
                hi -= 1
            else:
                i += 1

    def insert(self, start: int, phys: int, count: int, unwritten: bool) -> None:
        """Map a hole [start, start + count) to image blocks [phys, phys + count)."""
        if any(s.phys is not None for s in self.lookup(start, count)):
            raise ValueError(f"insert over mapped blocks at file block {start}")
        self._changing()
        i = bisect_right(self._starts, start)
        self._ext.insert(i, Extent(start, phys, count, unwritten))
        self._starts.insert(i, start)
        self._merge_around(i, i)

    def set_written(self, start: int, count: int) -> int:
        """Mark the mapped parts of [start, start + count) written; returns blocks converted."""
        lo, hi = self._range_indexes(start, start + count)
        converted = 0
        for e in self._ext[lo:hi]:
            if e.unwritten:
                self._changing()
                e.unwritten = False
                converted += e.count
        self._merge_around(lo, hi)
        return converted

    def remove(self, start: int, count: int) -> list[tuple[int, int]]:
        """Unmap [start, start + count); returns the freed image runs (phys, count)."""
        lo, hi = self._range_indexes(start, start + count)
        if lo < hi:
            self._changing()
        freed = [(e.phys, e.count) for e in self._ext[lo:hi]]
        del self._ext[lo:hi]
        del self._starts[lo:hi]
        return freed
