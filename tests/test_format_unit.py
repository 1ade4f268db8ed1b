"""Unit tests of the pure on-image parts: extent maps, metadata blobs, journal records."""

from __future__ import annotations

import random
import stat as S

import pytest

from diofs.errors import ImageCorrupt
from diofs.format import journal, metadata
from diofs.format.extents import Extent, ExtentMap
from diofs.format.layout import CommitSlot, Superblock


def model_lookup(model: dict[int, tuple[int, bool]], start: int, count: int):
    return [(b, model.get(b)) for b in range(start, start + count)]


def flatten(em: ExtentMap, start: int, count: int):
    out = []
    for seg in em.lookup(start, count):
        for i in range(seg.count):
            phys = None if seg.phys is None else (seg.phys + i, seg.unwritten)
            out.append((seg.start + i, phys))
    return out


def test_extent_map_matches_a_block_model_under_random_operations():
    rng = random.Random(7)
    em = ExtentMap()
    model: dict[int, tuple[int, bool]] = {}
    next_phys = 1000
    for _ in range(3000):
        start, count = rng.randrange(0, 200), rng.randrange(1, 20)
        op = rng.random()
        if op < 0.4:
            holes = [b for b in range(start, start + count) if b not in model]
            if len(holes) == count:
                em.insert(start, next_phys, count, unwritten=rng.random() < 0.5)
                for i in range(count):
                    model[start + i] = (next_phys + i, em.lookup(start, 1)[0].unwritten)
                next_phys += count + rng.randrange(0, 2)
        elif op < 0.7:
            em.set_written(start, count)
            for b in range(start, start + count):
                if b in model:
                    model[b] = (model[b][0], False)
        else:
            freed = em.remove(start, count)
            want = sorted(model.pop(b)[0] for b in range(start, start + count) if b in model)
            got = sorted(p + i for p, n in freed for i in range(n))
            assert got == want
        assert flatten(em, 0, 230) == model_lookup(model, 0, 230)
        exts = list(em)
        for a, b in zip(exts, exts[1:], strict=False):
            assert a.end <= b.start
            mergeable = a.phys + a.count == b.phys and a.unwritten == b.unwritten
            assert not (a.end == b.start and mergeable)


def test_insert_over_mapped_blocks_is_refused():
    em = ExtentMap([Extent(10, 100, 5, False)])
    with pytest.raises(ValueError):
        em.insert(12, 500, 10, False)


def test_metadata_blob_round_trip_and_damage_detection():
    root = metadata.Inode(1, S.S_IFDIR | 0o755, nlink=2, entries={b"a": 2, b"link": 3})
    f = metadata.Inode(2, S.S_IFREG | 0o644, size=9000,
                       extents=ExtentMap([Extent(0, 50, 2, False), Extent(2, 60, 1, True)]))
    ln = metadata.Inode(3, S.S_IFLNK | 0o777, target=b"a", size=1)
    md = metadata.Metadata(4, {1: root, 2: f, 3: ln})
    blob = metadata.encode(md)
    back = metadata.decode(blob)
    assert back.next_ino == 4
    assert back.inodes[1].entries == {b"a": 2, b"link": 3}
    assert [(e.start, e.phys, e.count, e.unwritten) for e in back.inodes[2].extents] == [
        (0, 50, 2, False), (2, 60, 1, True)]
    assert back.inodes[3].target == b"a"
    with pytest.raises(ImageCorrupt):
        metadata.decode(blob[:-3])


def test_superblock_and_commit_slot_checksums():
    sb = Superblock.for_size(64 << 20, 4096, 512, 1)
    raw = sb.pack()
    assert Superblock.unpack(raw, 64 << 20) == sb
    bad = bytearray(raw)
    bad[20] ^= 1
    with pytest.raises(ImageCorrupt):
        Superblock.unpack(bytes(bad), 64 << 20)
    with pytest.raises(ImageCorrupt, match="truncated"):
        Superblock.unpack(raw, 1 << 20)
    slot = CommitSlot(5, 1, 1234, 99)
    assert CommitSlot.unpack(slot.pack()) == slot
    torn = bytearray(slot.pack())
    torn[9] ^= 0xFF
    assert CommitSlot.unpack(bytes(torn)) is None


def test_journal_transaction_replays_onto_a_checkpoint():
    """A transaction's records (a changed inode, a new directory, names set and removed, an
    inode dropped) replayed onto the checkpoint give the state they were taken from."""
    root = metadata.Inode(1, S.S_IFDIR | 0o755, nlink=2, entries=metadata.Entries({b"a": 2}))
    f = metadata.Inode(2, S.S_IFREG | 0o644, size=10)
    md = metadata.Metadata(3, {1: root, 2: f})
    back = metadata.decode(metadata.encode(md))
    f.size = 8192
    f.extents = ExtentMap([Extent(0, 77, 2, False)])
    f.xattrs = {b"user.x": b"1"}
    d = metadata.Inode(3, S.S_IFDIR | 0o700, nlink=2, entries=metadata.Entries())
    ln = metadata.Inode(4, S.S_IFLNK | 0o777, target=b"a", size=1)
    root.entries[b"d"] = 3
    d.entries[b"ln"] = 4
    del root.entries[b"a"]
    root.entries[b"a2"] = 2
    md.inodes.update({3: d, 4: ln})
    changes = [(1, root.entries.take_changes()), (3, d.entries.take_changes())]
    body = journal.payload([f, d, ln, root], changes, [99])
    txn = journal.transaction((5, 1, 2, 5), body, 4096)
    assert len(txn) == 4096
    header = journal.Header.unpack(txn)
    assert header is not None and header.generation == 2 and header.next_ino == 5
    payload = txn[journal.HEADER_BYTES : journal.HEADER_BYTES + header.payload_len]
    assert journal.body_ok(header, payload)
    journal.apply(back, header, payload)
    assert back.next_ino == 5
    assert dict(back.inodes[1].entries) == {b"a2": 2, b"d": 3}
    assert dict(back.inodes[3].entries) == {b"ln": 4}
    assert back.inodes[4].target == b"a"
    assert back.inodes[2].size == 8192 and back.inodes[2].xattrs == {b"user.x": b"1"}
    assert [(e.phys, e.count) for e in back.inodes[2].extents] == [(77, 2)]
    assert journal.Header.unpack(bytes(64)) is None
    assert not journal.body_ok(header, payload[:-1] + b"?")
