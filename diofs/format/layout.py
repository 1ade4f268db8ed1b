"""On-image layout (format version 2): the superblock, the two commit slots, the two
checkpoint regions and the metadata journal.

Units: offsets in bytes unless named `*_blocks`; one block = `block_size` bytes.

    block 0              superblock (static: geometry, written once by mkfs)
    block 1, block 2     commit slots 0 and 1 (which checkpoint region is current)
    meta_start ..        checkpoint region 0 (meta_blocks blocks)
    ..                   checkpoint region 1 (meta_blocks blocks)
    journal_start ..     the metadata journal (journal_blocks blocks)
    .. data_start        (journal end)
    data_start ..        data blocks (file contents); block numbers are absolute

Metadata is a checkpoint plus a journal (jbd2's scheme with logical records, see
diofs.format.journal). A checkpoint is one checksummed blob holding every inode
(diofs.format.metadata); it is written shadow-paged: checkpoint number g goes into the region
that does not hold the current checkpoint, the image is flushed, then the commit slot of that
region (generation g, region, length, xxh64 of the blob; the slot itself checksummed) is
written and flushed. Between checkpoints, each commit appends one transaction to the journal:
the records of what changed since the previous commit, with the checkpoint's generation as
its epoch and a checksum over header and records. Mount takes the valid slot with the highest
generation whose blob checksum matches, then replays the transactions of that epoch in
generation order from the start of the journal, stopping at the first one that does not
check out. A checkpoint restarts the journal at offset 0 with a new epoch, only after its
slot is durable. So a torn transaction, blob or slot leaves the previous commit intact, and
after a power cut at any moment the image holds exactly the last completed commit.

Free space is not on the image: it is what the extents leave over (diofs.alloc).

Data ordering (SPEC 5): a commit first flushes the image when data was written since the
last flush, so its transaction (or checkpoint) only lands after every data write that
completed before the commit's snapshot, and an extent is only marked written after its data
write completed. So a committed written extent never points at blocks whose data did not
land (unless `--bug size-before-data`).

Version 1 (a single blob with a free-space bitmap, rewritten whole at every commit) is not
mounted: `fsck.diofs --upgrade` converts it in place (diofs.format.upgrade).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from diofs.errors import ImageCorrupt


class OldFormat(ImageCorrupt):
    """A version-1 image: the message says how to convert it (exit 3 at mount)."""

MAGIC = b"DIOFSv1\0"  # the same for every format version (identifies a diofs image)
COMMIT_MAGIC = b"DIOFScmt"
VERSION = 2
SUPERBLOCK_SIZE = 4096
MIN_BLOCK_SIZE = 4096
MIN_META_BYTES = 1 << 20
MAX_META_BYTES = 1 << 30  # one checkpoint region (two of them), sparse until used
MIN_JOURNAL_BYTES = 1 << 20
MAX_JOURNAL_BYTES = 64 << 20  # bounds the replay at mount

_HEAD = struct.Struct("<8sI")  # magic version: the same place in every version
# magic version block_size dio_align pad total meta_start meta_blocks data_start created_ns
# journal_blocks fs_id
_SB = struct.Struct("<8sIIIIQQQQQQQ")
_SLOT = struct.Struct("<8sQIIQQ")  # magic generation region pad blob_len blob_hash


def _hash(data: bytes | memoryview) -> int:
    return xxhash.xxh64_intdigest(data)


@dataclass(frozen=True, slots=True)
class Superblock:
    block_size: int
    dio_align: int
    total_blocks: int
    meta_start: int
    meta_blocks: int
    data_start: int
    created_ns: int
    journal_blocks: int
    fs_id: int  # random at mkfs; every journal transaction carries it

    @classmethod
    def for_size(
        cls, size: int, block_size: int, dio_align: int, created_ns: int, fs_id: int = 0,
        journal_bytes: int | None = None,
    ) -> Superblock:
        """The geometry mkfs writes; `journal_bytes` None: size / 256, within
        [MIN_JOURNAL_BYTES, MAX_JOURNAL_BYTES]."""
        total = size // block_size
        meta_bytes = min(MAX_META_BYTES, max(MIN_META_BYTES, size // 32))
        meta_blocks = -(-meta_bytes // block_size)
        if journal_bytes is None:
            journal_bytes = min(MAX_JOURNAL_BYTES, max(MIN_JOURNAL_BYTES, size // 256))
        if not 4 * block_size <= journal_bytes <= MAX_JOURNAL_BYTES:
            raise ValueError(f"journal size must be 4 blocks to {MAX_JOURNAL_BYTES >> 20} MiB")
        journal_blocks = -(-journal_bytes // block_size)
        meta_start = 3
        data_start = meta_start + 2 * meta_blocks + journal_blocks
        if data_start + 16 > total:
            raise ValueError(
                f"image too small: at least {(data_start + 16) * block_size >> 20} MiB needed"
            )
        return cls(block_size, dio_align, total, meta_start, meta_blocks, data_start,
                   created_ns, journal_blocks, fs_id)

    @property
    def journal_start(self) -> int:
        """First block of the journal (after the two checkpoint regions)."""
        return self.meta_start + 2 * self.meta_blocks

    @property
    def journal_offset(self) -> int:
        return self.journal_start * self.block_size

    @property
    def journal_bytes(self) -> int:
        return self.journal_blocks * self.block_size

    @property
    def data_blocks(self) -> int:
        return self.total_blocks - self.data_start

    def region_offset(self, region: int) -> int:
        return (self.meta_start + region * self.meta_blocks) * self.block_size

    @property
    def region_bytes(self) -> int:
        return self.meta_blocks * self.block_size

    def slot_offset(self, slot: int) -> int:
        return (1 + slot) * self.block_size

    def pack(self) -> bytes:
        body = _SB.pack(
            MAGIC,
            VERSION,
            self.block_size,
            self.dio_align,
            0,
            self.total_blocks,
            self.meta_start,
            self.meta_blocks,
            self.data_start,
            self.created_ns,
            self.journal_blocks,
            self.fs_id,
        )
        body += struct.pack("<Q", _hash(body))
        return body.ljust(SUPERBLOCK_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes, image_size: int) -> Superblock:
        if len(raw) < _SB.size + 8:
            raise ImageCorrupt("image is truncated: no superblock")
        magic, version = _HEAD.unpack_from(raw)
        if magic != MAGIC:
            raise ImageCorrupt("not a diofs image (bad magic)")
        if version == 1:
            raise OldFormat(
                "diofs format version 1 (made by an older diofs); this diofs needs version "
                f"{VERSION}: convert it in place with `fsck.diofs --upgrade IMAGE`"
            )
        if version != VERSION:
            raise ImageCorrupt(f"unsupported diofs format version {version}")
        fields = _SB.unpack_from(raw)
        (checksum,) = struct.unpack_from("<Q", raw, _SB.size)
        if checksum != _hash(raw[: _SB.size]):
            raise ImageCorrupt("superblock checksum mismatch")
        (_, _, block_size, dio_align, _, total, meta_start, meta_blocks, data_start, ns,
         journal_blocks, fs_id) = fields
        sb = cls(block_size, dio_align, total, meta_start, meta_blocks, data_start, ns,
                 journal_blocks, fs_id)
        if (
            block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1) or meta_start != 3
            or meta_blocks < 1 or journal_blocks < 1 or data_start != sb.journal_start
            + journal_blocks or data_start >= total
        ):
            raise ImageCorrupt("superblock geometry is impossible")
        if image_size < total * block_size:
            raise ImageCorrupt(
                f"image is truncated: {image_size} bytes, superblock says {total * block_size}"
            )
        return sb


@dataclass(frozen=True, slots=True)
class CommitSlot:
    generation: int
    region: int
    blob_len: int
    blob_hash: int

    def pack(self) -> bytes:
        body = _SLOT.pack(
            COMMIT_MAGIC, self.generation, self.region, 0, self.blob_len, self.blob_hash
        )
        return body + struct.pack("<Q", _hash(body))

    @classmethod
    def unpack(cls, raw: bytes) -> CommitSlot | None:
        """The slot, or None if it is empty, torn or damaged."""
        if len(raw) < _SLOT.size + 8:
            return None
        magic, generation, region, _, blob_len, blob_hash = _SLOT.unpack_from(raw)
        (checksum,) = struct.unpack_from("<Q", raw, _SLOT.size)
        if magic != COMMIT_MAGIC or checksum != _hash(raw[: _SLOT.size]) or region > 1:
            return None
        return cls(generation, region, blob_len, blob_hash)


def blob_hash(blob: bytes) -> int:
    return _hash(blob)
