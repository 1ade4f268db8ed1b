"""Reading and writing whole images: mkfs, loading the newest valid commit (a checkpoint and
the journal after it), writing a checkpoint, appending a journal transaction.

The commit protocol is described in diofs.format.layout. These functions are synchronous and
do blocking backend I/O: the daemon calls them from a worker thread.
"""

from __future__ import annotations

import errno
import os
import stat as S
import time
from dataclasses import dataclass

from diofs import bugs
from diofs.backend import Backend
from diofs.bugs import Bug
from diofs.errors import ImageCorrupt
from diofs.format import journal, metadata
from diofs.format.layout import SUPERBLOCK_SIZE, CommitSlot, Superblock, blob_hash

ROOT_INO = 1


@dataclass(slots=True)
class Loaded:
    """A loaded commit. `generation`: of the last commit replayed; `checkpoint`: the
    checkpoint it builds on (its generation is the journal's epoch, its region the one the next
    checkpoint must not overwrite); `journal_end`: where the next transaction goes (bytes from
    the start of the journal); `replayed`: transactions replayed."""

    sb: Superblock
    md: metadata.Metadata
    generation: int
    checkpoint: CommitSlot | None = None
    journal_end: int = 0
    replayed: int = 0


_ZERO_CHUNK = 1 << 20


def mkfs(
    backend: Backend, size: int, block_size: int, dio_align: int,
    journal_bytes: int | None = None,
) -> Superblock:
    """Write an empty filesystem. Cost: O(journal), not O(size): nothing covers the data area
    or the free space (diofs.alloc rebuilds it from the extents)."""
    now = time.time_ns()
    fs_id = int.from_bytes(os.urandom(8), "little") or 1
    sb = Superblock.for_size(size, block_size, dio_align, now, fs_id, journal_bytes)
    backend.write(0, sb.pack())
    zero = bytes(block_size)
    backend.write(sb.slot_offset(0), zero)
    backend.write(sb.slot_offset(1), zero)
    # a zeroed journal: allocated in the image file up front (its first appends do not
    # allocate), and nothing of an earlier filesystem is left there
    chunk = bytes(min(_ZERO_CHUNK, sb.journal_bytes))
    for off in range(0, sb.journal_bytes, len(chunk)):
        backend.write(sb.journal_offset + off, chunk[: sb.journal_bytes - off])
    root = metadata.Inode(
        ROOT_INO, S.S_IFDIR | 0o755, nlink=2, atime_ns=now, mtime_ns=now, ctime_ns=now,
        entries=metadata.Entries(),
    )
    md = metadata.Metadata(ROOT_INO + 1, metadata.InodeTable({ROOT_INO: root}))
    write_commit(backend, sb, 1, metadata.encode(md), region=0)
    return sb


def read_superblock(backend: Backend) -> Superblock:
    size = backend.size()
    if size < SUPERBLOCK_SIZE:
        raise ImageCorrupt(f"image is truncated ({size} bytes): not a diofs image")
    return Superblock.unpack(backend.read(0, SUPERBLOCK_SIZE), size)


def read_slots(backend: Backend, sb: Superblock) -> list[CommitSlot | None]:
    return [CommitSlot.unpack(backend.read(sb.slot_offset(i), 64)) for i in (0, 1)]


def load(backend: Backend) -> Loaded:
    """The newest checkpoint whose slot and blob both check out, with its journal replayed."""
    sb = read_superblock(backend)
    slots = [s for s in read_slots(backend, sb) if s is not None]
    problems = []
    for slot in sorted(slots, key=lambda s: -s.generation):
        if slot.blob_len > sb.region_bytes:
            problems.append(f"commit {slot.generation}: blob larger than its region")
            continue
        blob = backend.read(sb.region_offset(slot.region), slot.blob_len)
        if blob_hash(blob) != slot.blob_hash:
            problems.append(f"commit {slot.generation}: metadata checksum mismatch")
            continue
        md = metadata.decode(blob)
        loaded = Loaded(sb, md, slot.generation, slot)
        replay(backend, loaded)
        return loaded
    raise ImageCorrupt("no valid metadata commit (" + ("; ".join(problems) or "none") + ")")


def replay(backend: Backend, loaded: Loaded) -> None:
    """Apply the journal's transactions of the checkpoint's epoch, in generation order, until
    the first one that does not check out (the end of the journal, or a torn append)."""
    sb = loaded.sb
    assert loaded.checkpoint is not None
    epoch = loaded.checkpoint.generation
    bs = sb.block_size
    pos = 0
    while pos + bs <= sb.journal_bytes:
        first = backend.read(sb.journal_offset + pos, bs)
        header = journal.Header.unpack(first)
        if (
            header is None or header.fs_id != sb.fs_id or header.epoch != epoch
            or header.generation != loaded.generation + 1
        ):
            break
        length = journal.padded_len(header.payload_len, bs)
        if pos + length > sb.journal_bytes:
            break
        raw = first if length == bs else first + backend.read(
            sb.journal_offset + pos + bs, length - bs)
        body = memoryview(raw)[journal.HEADER_BYTES : journal.HEADER_BYTES + header.payload_len]
        if not journal.body_ok(header, body) and not bugs.enabled(Bug.TRUST_TORN_JOURNAL):
            break
        journal.apply(loaded.md, header, body)
        loaded.generation = header.generation
        loaded.replayed += 1
        pos += length
    loaded.journal_end = pos


def current_region(backend: Backend, sb: Superblock) -> int | None:
    """The region of the newest valid slot (whose blob may still be damaged), or None."""
    slots = [s for s in read_slots(backend, sb) if s is not None]
    return max(slots, key=lambda s: s.generation).region if slots else None


def write_commit(
    backend: Backend, sb: Superblock, generation: int, blob: bytes, *, region: int | None = None
) -> CommitSlot:
    """Make `blob` the current checkpoint, in `region` (default: the one the newest slot does
    not name). The journal then starts over (its old transactions have an older epoch).
    Raises OSError (ENOSPC if it does not fit)."""
    if len(blob) > sb.region_bytes:
        raise OSError(errno.ENOSPC, "metadata region full")
    if region is None:
        cur = current_region(backend, sb)
        region = 0 if cur is None else 1 - cur
    backend.write(sb.region_offset(region), blob)
    backend.flush()  # blob (and all data written before it) durable before the slot
    slot = CommitSlot(generation, region, len(blob), blob_hash(blob))
    backend.write(sb.slot_offset(region), slot.pack())
    backend.flush()
    return slot


def append_transaction(
    backend: Backend, sb: Superblock, pos: int, txn: bytes, flush_data: bool
) -> None:
    """Write one journal transaction at byte `pos` of the journal and make it durable.
    `flush_data`: flush first, so that data written before the commit's snapshot lands
    before the transaction that points at it (data ordering, diofs.format.layout)."""
    if pos + len(txn) > sb.journal_bytes:
        raise OSError(errno.ENOSPC, "journal full")
    if flush_data:
        backend.flush()
    backend.write(sb.journal_offset + pos, txn)
    backend.flush()
