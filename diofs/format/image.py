"""Reading and writing whole images: mkfs, loading the newest valid commit, writing a commit.

The commit protocol (shadow paging) is described in diofs.format.layout. These functions are
synchronous and do blocking backend I/O: the daemon calls them from a worker thread.
"""

from __future__ import annotations

import stat as S
import time
from dataclasses import dataclass

from diofs.backend import Backend
from diofs.errors import ImageCorrupt
from diofs.format import metadata
from diofs.format.layout import SUPERBLOCK_SIZE, CommitSlot, Superblock, blob_hash

ROOT_INO = 1


@dataclass(slots=True)
class Loaded:
    sb: Superblock
    md: metadata.Metadata
    generation: int


def mkfs(backend: Backend, size: int, block_size: int, dio_align: int) -> Superblock:
    now = time.time_ns()
    sb = Superblock.for_size(size, block_size, dio_align, now)
    backend.write(0, sb.pack())
    zero = bytes(block_size)
    backend.write(sb.slot_offset(0), zero)
    backend.write(sb.slot_offset(1), zero)
    bitmap = bytearray(sb.total_blocks)
    bitmap[: sb.data_start] = b"\x01" * sb.data_start
    root = metadata.Inode(
        ROOT_INO, S.S_IFDIR | 0o755, nlink=2, atime_ns=now, mtime_ns=now, ctime_ns=now,
        entries={},
    )
    md = metadata.Metadata(next_ino=ROOT_INO + 1, inodes={ROOT_INO: root}, bitmap=bitmap)
    write_commit(backend, sb, 1, metadata.encode(md))
    return sb


def read_superblock(backend: Backend) -> Superblock:
    size = backend.size()
    if size < SUPERBLOCK_SIZE:
        raise ImageCorrupt(f"image is truncated ({size} bytes): not a diofs image")
    return Superblock.unpack(backend.read(0, SUPERBLOCK_SIZE), size)


def read_slots(backend: Backend, sb: Superblock) -> list[CommitSlot | None]:
    return [CommitSlot.unpack(backend.read(sb.slot_offset(i), 64)) for i in (0, 1)]


def load(backend: Backend) -> Loaded:
    """The newest commit whose slot and blob both check out."""
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
        md = metadata.decode(blob, sb.total_blocks)
        return Loaded(sb, md, slot.generation)
    raise ImageCorrupt("no valid metadata commit (" + ("; ".join(problems) or "none") + ")")


def write_commit(backend: Backend, sb: Superblock, generation: int, blob: bytes) -> None:
    """Make `blob` the current metadata. Raises OSError (ENOSPC if it does not fit)."""
    if len(blob) > sb.region_bytes:
        import errno

        raise OSError(errno.ENOSPC, "metadata region full")
    region = generation % 2
    backend.write(sb.region_offset(region), blob)
    backend.flush()  # blob (and all data written before it) durable before the slot
    slot = CommitSlot(generation, region, len(blob), blob_hash(blob))
    backend.write(sb.slot_offset(region), slot.pack())
    backend.flush()
