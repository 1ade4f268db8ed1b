"""Block allocation: which image blocks are free, next-fit allocation, reservations for delayed
allocation, and frees that wait for the commit that makes them safe.

Units: image blocks (absolute block numbers, as in extents); runs are (phys, count) pairs
covering [phys, phys + count).

Free space is not stored on the image (format v2, diofs/format/layout.py): it is what the
extents of the loaded commit leave over, rebuilt at mount in O(extents). So a commit writes
no free-space bytes at all, and a power cut can never leave the map and the extents
disagreeing.

In memory, `FreeSpace` keeps the image in chunks of CHUNK_BLOCKS blocks. A chunk is in one of
three states: all free (no storage), all used (one byte in `_full`, no storage), or mixed (a
bytearray of one byte per block in `_maps`, 1 = used). Memory is therefore bounded by the
number of chunks that are partly used, not by the image size: an empty 15 TiB image holds a
131,072-byte chunk table and nothing else.

Invariants (FreeSpace):
  - a chunk is in `_maps` iff it has both used and free blocks; `_full[c]` is 1 iff all its
    blocks are used; `_used[c]` counts the used blocks of a mixed chunk;
  - `free_blocks` is the number of free blocks in [0, total_blocks);
  - blocks past `total_blocks` in the last chunk count as used (never handed out).

Freeing (Allocator): blocks that leave an extent map go to `pending_free`, still marked in
use, and become free only after the next commit is durable (`release_committed`). So the
committed metadata never points at blocks that have since been reused by another file (a
power cut cannot mix files' data).

Protected by: trio's single thread (every method is synchronous).
"""

from __future__ import annotations

import errno

from diofs.errors import FsError

CHUNK_BLOCKS = 1 << 15  # 128 MiB of 4 KiB blocks per chunk; 32 KiB of map when mixed
_ONES = b"\x01" * CHUNK_BLOCKS
_ZEROS = bytes(CHUNK_BLOCKS)


class FreeSpace:
    """The in-use map of an image of `total_blocks` blocks (module docstring)."""

    __slots__ = ("_full", "_maps", "_used", "free_blocks", "total_blocks")

    def __init__(self, total_blocks: int) -> None:
        self.total_blocks = total_blocks
        nchunks = -(-total_blocks // CHUNK_BLOCKS)
        self._full = bytearray(nchunks)
        self._maps: dict[int, bytearray] = {}
        self._used: dict[int, int] = {}
        self.free_blocks = total_blocks
        tail = nchunks * CHUNK_BLOCKS - total_blocks
        if tail:  # the last chunk's blocks past the end: used, and not counted as free
            self._mark(total_blocks, tail, used=True)
            self.free_blocks = total_blocks

    # -------------------------------------------------------------- queries
    @property
    def mixed_chunks(self) -> int:
        return len(self._maps)

    def used_in(self, phys: int, count: int) -> int:
        """How many blocks of [phys, phys + count) are in use."""
        n = 0
        for c, lo, hi in self._pieces(phys, count):
            if self._full[c]:
                n += hi - lo
            else:
                m = self._maps.get(c)
                if m is not None:
                    n += m.count(1, lo, hi)
        return n

    def runs_used(self, start: int, end: int) -> list[tuple[int, int]]:
        """The used runs inside [start, end), merged (fsck: compare with the extents)."""
        out: list[tuple[int, int]] = []

        def add(p: int, n: int) -> None:
            if out and out[-1][0] + out[-1][1] == p:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((p, n))

        for c, lo, hi in self._pieces(start, end - start):
            base = c * CHUNK_BLOCKS
            if self._full[c]:
                add(base + lo, hi - lo)
                continue
            m = self._maps.get(c)
            i = lo
            while m is not None and i < hi:
                i = m.find(1, i, hi)
                if i < 0:
                    break
                j = m.find(0, i, hi)
                j = hi if j < 0 else j
                add(base + i, j - i)
                i = j
        return out

    # -------------------------------------------------------------- changes
    def mark_used(self, phys: int, count: int) -> int:
        """Mark [phys, phys + count) used; returns how many of them were free."""
        return self._mark(phys, count, used=True)

    def mark_free(self, phys: int, count: int) -> int:
        """Mark [phys, phys + count) free; returns how many of them were used."""
        return self._mark(phys, count, used=False)

    def _pieces(self, phys: int, count: int) -> list[tuple[int, int, int]]:
        """[phys, phys + count) cut at chunk boundaries: (chunk, lo, hi) with lo, hi offsets
        in the chunk."""
        out = []
        end = phys + count
        while phys < end:
            c = phys // CHUNK_BLOCKS
            base = c * CHUNK_BLOCKS
            hi = min(end - base, CHUNK_BLOCKS)
            out.append((c, phys - base, hi))
            phys = base + hi
        return out

    def _mark(self, phys: int, count: int, *, used: bool) -> int:
        changed = 0
        for c, lo, hi in self._pieces(phys, count):
            n = hi - lo
            m = self._maps.get(c)
            if m is None:
                if bool(self._full[c]) == used:
                    continue  # already in that state
                if n == CHUNK_BLOCKS:  # the whole chunk flips
                    self._full[c] = 1 if used else 0
                    changed += n
                    continue
                m = bytearray(_ONES if self._full[c] else _ZEROS)
                self._maps[c] = m
                self._used[c] = CHUNK_BLOCKS if self._full[c] else 0
                self._full[c] = 0
            before = m.count(1, lo, hi)
            m[lo:hi] = _ONES[:n] if used else _ZEROS[:n]
            delta = n - before if used else before
            changed += delta
            u = self._used[c] + (delta if used else -delta)
            if u == CHUNK_BLOCKS:
                del self._maps[c], self._used[c]
                self._full[c] = 1
            elif u == 0:
                del self._maps[c], self._used[c]
            else:
                self._used[c] = u
        self.free_blocks += -changed if used else changed
        return changed

    def take(self, count: int, pos: int, start: int) -> list[tuple[int, int]]:
        """Mark up to `count` free blocks used, next-fit: [pos, end) first, then [start, pos);
        returns the runs taken (fewer blocks only if fewer are free there), merged."""
        runs = self._take_range(count, pos, self.total_blocks)
        rest = count - sum(n for _, n in runs)
        if rest and start < pos:
            more = self._take_range(rest, start, pos)
            runs += more  # [start, pos) never continues a run that ends at or past pos
        return runs

    def _take_range(self, count: int, pos: int, end: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        full = self._full
        while count and pos < end:
            c = pos // CHUNK_BLOCKS
            base = c * CHUNK_BLOCKS
            if full[c]:
                nxt = full.find(0, c + 1)
                if nxt < 0:
                    break
                pos = nxt * CHUNK_BLOCKS
                continue
            lo, hi = pos - base, min(CHUNK_BLOCKS, end - base)
            m = self._maps.get(c)
            if m is None:
                i, j = lo, hi
            else:
                i = m.find(0, lo, hi)
                if i < 0:
                    pos = base + hi
                    continue
                j = m.find(1, i, hi)
                j = hi if j < 0 else j
            n = min(count, j - i)
            self._mark(base + i, n, used=True)
            if runs and runs[-1][0] + runs[-1][1] == base + i:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((base + i, n))
            count -= n
            pos = base + i + n
        return runs


class Allocator:
    """Free space plus what the daemon promised (reservations) and what waits for a commit
    (pending frees). Attributes are protected by trio's single thread."""

    def __init__(self, total_blocks: int, data_start: int,
                 used: list[tuple[int, int]]) -> None:
        """`used`: the runs the loaded commit's extents hold (already checked not to
        overlap; diofs/format/verify.py)."""
        self.data_start = data_start
        self.space = FreeSpace(total_blocks)
        self.space.mark_used(0, data_start)
        merged: list[tuple[int, int]] = []
        for phys, count in sorted(used):  # neighbours merged: one mark per contiguous run
            if merged and merged[-1][0] + merged[-1][1] >= phys:
                last_phys, last_count = merged[-1]
                merged[-1] = (last_phys, max(last_count, phys + count - last_phys))
            else:
                merged.append((phys, count))
        for phys, count in merged:  # clipped: with --bug trust-checksums nothing checked them
            end = min(phys + count, total_blocks)
            if phys < end:
                self.space.mark_used(phys, end - phys)
        self.pending_free: list[tuple[int, int]] = []
        # Delayed allocation: file blocks (ino -> set) that dirty cached pages will need at
        # writeback, reserved at write() time so that ENOSPC is reported there, not later.
        self.reserved: dict[int, set[int]] = {}
        self.reserved_count = 0
        self.rover = data_start

    @property
    def free_blocks(self) -> int:
        return self.space.free_blocks

    @property
    def available_blocks(self) -> int:
        return self.space.free_blocks - self.reserved_count

    @property
    def pending_blocks(self) -> int:
        return sum(n for _, n in self.pending_free)

    def reserve(self, ino: int, fblock: int) -> None:
        """Reserve file block `fblock` of `ino` (the caller checked it is a hole)."""
        r = self.reserved.get(ino)
        if r is not None and fblock in r:
            return
        if self.available_blocks < 1:
            raise FsError(errno.ENOSPC)
        self.reserved.setdefault(ino, set()).add(fblock)
        self.reserved_count += 1

    def unreserve(self, ino: int, first: int, count: int) -> int:
        """Release reservations of file blocks [first, first + count); returns how many."""
        r = self.reserved.get(ino)
        if not r:
            self.reserved.pop(ino, None)
            return 0
        if count >= len(r):
            gone = {b for b in r if first <= b < first + count}
        else:
            gone = {b for b in range(first, first + count) if b in r}
        r -= gone
        if not r:
            del self.reserved[ino]
        self.reserved_count -= len(gone)
        return len(gone)

    def allocate(self, count: int, goal: int | None = None) -> list[tuple[int, int]]:
        """`count` blocks as runs (phys, n), next-fit from `goal` (or the rover). Raises
        ENOSPC (and takes nothing) if fewer are available."""
        if count > self.available_blocks:
            raise FsError(errno.ENOSPC)
        if count <= 0:
            return []
        total = self.space.total_blocks
        pos = goal if goal is not None and self.data_start <= goal < total else self.rover
        runs = self.space.take(count, pos, self.data_start)
        got = sum(n for _, n in runs)
        if got < count:  # free_blocks said there was room: the map disagrees
            for phys, n in runs:
                self.space.mark_free(phys, n)
            raise FsError(errno.ENOSPC)
        last_phys, last_n = runs[-1]
        self.rover = last_phys + last_n
        return runs

    def free_later(self, runs: list[tuple[int, int]]) -> None:
        """Blocks that left an extent map: free once the next commit is durable."""
        self.pending_free.extend(runs)

    def take_pending(self) -> list[tuple[int, int]]:
        """The frees a commit about to snapshot the metadata covers."""
        freed, self.pending_free = self.pending_free, []
        return freed

    def release_committed(self, freed: list[tuple[int, int]]) -> None:
        """The commit covering `freed` is durable: the blocks are free now."""
        for phys, count in freed:
            self.space.mark_free(phys, count)

    def commit_failed(self, freed: list[tuple[int, int]]) -> None:
        self.pending_free[:0] = freed
