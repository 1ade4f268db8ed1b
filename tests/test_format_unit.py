"""Unit tests of the pure on-image parts: extent maps, metadata blobs, journal records."""

from __future__ import annotations

import random
import stat as S

import pytest

from diofs.errors import ImageCorrupt
from diofs.format import journal, metadata, verify
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


def _tree(n_files: int) -> metadata.Metadata:
    """A root with `n_files` one-block files (blocks 5000, 5001, ...)."""
    root = metadata.Inode(1, S.S_IFDIR | 0o755, nlink=2, entries=metadata.Entries())
    inodes = {1: root}
    for i in range(n_files):
        ino = 2 + i
        inodes[ino] = metadata.Inode(ino, S.S_IFREG | 0o644, size=100,
                                     extents=ExtentMap([Extent(0, 5000 + i, 1, False)]))
        root.entries[b"f%d" % i] = ino
    return metadata.Metadata(2 + n_files, inodes)


def test_checkpoint_records_are_decoded_on_first_use():
    """Lazy loading (metadata.InodeTable): `in`, len and the mount's checks decode nothing; a
    lookup decodes one record; a checkpoint of a partly decoded table keeps every inode."""
    back = metadata.decode(metadata.encode(_tree(50)))
    table = back.inodes
    assert table.raw_count == 51 and len(table) == 51 and 7 in table and 99 not in table
    sb = Superblock.for_size(64 << 20, 4096, 512, 1)
    found = verify.survey(back, sb)
    assert found.problems == [] and found.orphans == []
    assert found.used == [(5000, 50)]  # merged into one run
    assert table.raw_count == 50  # only the root (survey looks at it first)
    assert table[7].size == 100 and [e.phys for e in table[7].extents] == [5005]
    assert table.raw_count == 49 and len(table) == 51
    table[7].size = 5
    table[7].record = None
    del table[8]
    again = metadata.decode(metadata.encode(metadata.Metadata(back.next_ino, table)))
    assert len(again.inodes) == 50 and 8 not in again.inodes
    assert again.inodes[7].size == 5 and again.inodes[9].size == 100
    assert sorted(again.inodes[1].entries) == sorted(b"f%d" % i for i in range(50))


@pytest.mark.parametrize("damage, problem", [
    ("overlap", "is used by inodes 2 and 3"),
    ("outside", "points outside the data area"),
    ("dangling", "points at missing inode 4000"),
    ("bad-name", "invalid entry name"),
    ("orphan", None),
])
def test_undecoded_records_are_checked(damage: str, problem: str | None):
    """The mount's checks read records that nothing has decoded (diofs.format.verify)."""
    md = _tree(5)
    f2, f3 = md.inodes[2], md.inodes[3]
    if damage == "overlap":
        f3.extents = ExtentMap([Extent(0, 5000, 1, False)])
    elif damage == "outside":
        f3.extents = ExtentMap([Extent(0, 1, 1, False)])
    elif damage == "dangling":
        md.inodes[1].entries[b"ghost"] = 4000
    elif damage == "bad-name":
        md.inodes[1].entries[b"a/b"] = 2
        f2.nlink = 2
    else:
        f2.nlink = 0
    back = metadata.decode(metadata.encode(md))
    back.inodes[1]  # decoded: the root's problems too come from the right pass
    found = verify.survey(back, Superblock.for_size(64 << 20, 4096, 512, 1))
    if problem is None:
        assert found.problems == [] and found.orphans == [2]
    else:
        assert any(problem in p for p in found.problems), found.problems
    assert back.inodes.raw_count == 5


def test_entries_load_all_matches_load():
    names = [b"n%d" % i for i in range(100)]
    bulk = metadata.Entries()
    bulk.load_all(names, list(range(100)))
    one = metadata.Entries()
    for i, name in enumerate(names):
        one.load(name, i)
    assert list(bulk.listing(0)) == list(one.listing(0)) and not bulk.changes
    dup = metadata.Entries()
    dup.load_all([b"a", b"b", b"a"], [1, 2, 3])  # damage: the last one wins, as with load
    assert list(dup.listing(0)) == [(3, b"a", 3), (4, b"b", 2)]


def test_a_directory_record_cut_inside_an_entry_is_damage():
    """The mount's checks parse undecoded directory records (verify.survey): an entry cut
    short, even at the very end of the blob, is ImageCorrupt, never struct.error."""
    assert metadata.entry_lists(bytes(8) + b"\x02\x00ab", 0, 12) == ([b"ab"], [0])
    with pytest.raises(ImageCorrupt, match="truncated"):
        metadata.entry_lists(b"\x02" + bytes(8), 0, 9)  # header past the end
    with pytest.raises(ImageCorrupt, match="truncated"):
        metadata.entry_lists(bytes(8) + b"\x05\x00ab", 0, 12)  # name past the end
