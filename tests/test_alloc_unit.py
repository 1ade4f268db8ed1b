"""Unit tests of the chunked free space (diofs/alloc.py) against a one-byte-per-block model."""

from __future__ import annotations

import random
import time

import pytest

from diofs.alloc import CHUNK_BLOCKS, Allocator, FreeSpace
from diofs.errors import FsError


def _model_check(fs: FreeSpace, model: bytearray) -> None:
    assert fs.free_blocks == model.count(0)
    assert fs.used_in(0, len(model)) == model.count(1)
    runs = fs.runs_used(0, len(model))
    rebuilt = bytearray(len(model))
    for p, n in runs:
        rebuilt[p : p + n] = b"\x01" * n
    assert rebuilt == model
    for (p0, n0), (p1, _) in zip(runs, runs[1:], strict=False):
        assert p0 + n0 < p1, "runs are merged"


@pytest.mark.parametrize("seed", range(6))
def test_random_marks_and_takes_match_a_byte_map(seed: int) -> None:
    rng = random.Random(seed)
    total = rng.choice([3 * CHUNK_BLOCKS, 2 * CHUNK_BLOCKS + 777, CHUNK_BLOCKS - 5])
    fs = FreeSpace(total)
    model = bytearray(total)
    for _ in range(300):
        op = rng.random()
        p = rng.randrange(total)
        n = rng.randrange(1, min(total - p, rng.choice([10, 5000, 2 * CHUNK_BLOCKS])) + 1)
        if op < 0.35:
            assert fs.mark_used(p, n) == model.count(0, p, p + n)
            model[p : p + n] = b"\x01" * n
        elif op < 0.7:
            assert fs.mark_free(p, n) == model.count(1, p, p + n)
            model[p : p + n] = bytes(n)
        else:
            start = rng.randrange(total)
            want = min(n, model.count(0))
            runs = fs.take(want, p, start)
            assert sum(c for _, c in runs) == want or model.count(0, start) < want
            for rp, rc in runs:
                assert model.count(1, rp, rp + rc) == 0, "took a used block"
                model[rp : rp + rc] = b"\x01" * rc
        _model_check(fs, model)


def test_whole_chunks_need_no_storage() -> None:
    total = 4 * CHUNK_BLOCKS
    fs = FreeSpace(total)
    fs.mark_used(0, 2 * CHUNK_BLOCKS)
    assert fs.mixed_chunks == 0
    fs.mark_used(2 * CHUNK_BLOCKS, 10)
    assert fs.mixed_chunks == 1
    fs.mark_free(2 * CHUNK_BLOCKS, 10)
    assert fs.mixed_chunks == 0
    assert fs.free_blocks == 2 * CHUNK_BLOCKS


def test_fifteen_tib_map_is_small_and_fast() -> None:
    """An empty 15 TiB image (4 KiB blocks): the map is built, filled with a 1 GiB file and
    emptied again in well under a second, with at most two chunk maps."""
    total = (15 << 40) // 4096
    t0 = time.monotonic()
    alloc = Allocator(total, 540_000, [])
    runs = alloc.allocate((1 << 30) // 4096)
    assert runs == [(540_000, (1 << 30) // 4096)]
    assert alloc.space.mixed_chunks <= 2
    alloc.free_later(runs)
    alloc.release_committed(alloc.take_pending())
    assert alloc.free_blocks == total - 540_000
    assert time.monotonic() - t0 < 1.0


def test_allocate_wraps_and_reports_enospc() -> None:
    alloc = Allocator(100, 10, [(20, 70)])  # free: 10..20 and 90..100
    alloc.rover = 95
    runs = alloc.allocate(12)
    assert runs == [(95, 5), (10, 7)]
    alloc.reserve(7, 0)
    with pytest.raises(FsError):
        alloc.allocate(8)  # 8 free, one of them reserved
    assert alloc.allocate(7) == [(17, 3), (90, 4)]


# ------------------------------------------------------------------ directory listings
def test_listing_pages_are_stable_and_cheap() -> None:
    """Entries.listing (format/metadata.py): resuming after a cookie skips nothing that
    stayed, repeats nothing, and costs the same at the end of a 200k-entry directory as at
    its start."""
    from diofs.format.metadata import Entries

    d = Entries()
    for i in range(200_000):
        d[f"f{i}".encode()] = i + 10
    seen: list[bytes] = []
    cookie = 0
    rng = random.Random(5)
    removed: set[bytes] = set()
    pages = 0
    while True:
        page = []
        for c, name, _ino in d.listing(cookie):
            page.append((c, name))
            if len(page) == 5000:
                break
        if not page:
            break
        seen += [n for _, n in page]
        cookie = page[-1][0]
        pages += 1
        for _ in range(300 if pages < 30 else 0):  # unlinks and creates between pages
            victim = f"f{rng.randrange(200_000)}".encode()
            if victim in d:
                del d[victim]
                removed.add(victim)
            d[f"new{rng.randrange(10**9)}".encode()] = 1
    assert len(seen) == len(set(seen)), "a name was listed twice"
    kept = {f"f{i}".encode() for i in range(200_000)} - removed
    assert kept <= set(seen), "a name present all along was skipped"
    t0 = time.perf_counter()
    for _ in range(100):
        next(iter(d.listing(cookie - 1)), None)
    assert time.perf_counter() - t0 < 0.05
    assert d.changes and all(isinstance(k, bytes) for k in d.changes)
