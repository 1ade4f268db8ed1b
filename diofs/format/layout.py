"""On-image layout: the superblock, the two commit slots and the two metadata regions.

Units: offsets in bytes unless named `*_blocks`; one block = `block_size` bytes.

    block 0              superblock (static: geometry, written once by mkfs)
    block 1, block 2     commit slots 0 and 1 (which metadata region is current)
    meta_start ..        metadata region 0 (meta_blocks blocks)
    .. data_start        metadata region 1 (meta_blocks blocks)
    data_start ..        data blocks (file contents); block numbers are absolute

Crash consistency is by shadow paging (the ordering discipline, instead of a journal):
all metadata lives in one checksummed blob (diofs.format.metadata). Commit number g writes
its blob into region g % 2 (never the region of the current commit g - 1), flushes the image,
then writes commit slot g % 2 (generation, region, length, xxh64 of the blob; the slot itself
checksummed) and flushes again. Mount takes the valid slot with the highest generation whose
blob checksum matches. A torn blob or a torn slot leaves the previous commit intact, so after
a power cut at any moment the image holds exactly the last completed commit.

Data ordering (SPEC 5): the first flush of a commit also makes durable every data write that
completed before the commit's snapshot, and an extent is only marked written after its data
write completed. So a committed written extent never points at blocks whose data did not
land (unless `--bug size-before-data`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from diofs.errors import ImageCorrupt

MAGIC = b"DIOFSv1\0"
COMMIT_MAGIC = b"DIOFScmt"
VERSION = 1
SUPERBLOCK_SIZE = 4096
MIN_BLOCK_SIZE = 4096
MIN_META_BYTES = 1 << 20
MAX_META_BYTES = 64 << 20

# magic version block_size dio_align pad total meta_start meta_blocks data_start created_ns
_SB = struct.Struct("<8sIIIIQQQQQ")
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

    @classmethod
    def for_size(cls, size: int, block_size: int, dio_align: int, created_ns: int) -> Superblock:
        total = size // block_size
        meta_bytes = min(MAX_META_BYTES, max(MIN_META_BYTES, size // 32))
        meta_blocks = -(-meta_bytes // block_size)
        meta_start = 3
        data_start = meta_start + 2 * meta_blocks
        if data_start + 16 > total:
            raise ValueError(
                f"image too small: at least {(data_start + 16) * block_size >> 20} MiB needed"
            )
        return cls(block_size, dio_align, total, meta_start, meta_blocks, data_start, created_ns)

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
        )
        body += struct.pack("<Q", _hash(body))
        return body.ljust(SUPERBLOCK_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes, image_size: int) -> Superblock:
        if len(raw) < _SB.size + 8:
            raise ImageCorrupt("image is truncated: no superblock")
        fields = _SB.unpack_from(raw)
        if fields[0] != MAGIC:
            raise ImageCorrupt("not a diofs image (bad magic)")
        (checksum,) = struct.unpack_from("<Q", raw, _SB.size)
        if checksum != _hash(raw[: _SB.size]):
            raise ImageCorrupt("superblock checksum mismatch")
        _, version, block_size, dio_align, _, total, meta_start, meta_blocks, data_start, ns = (
            fields
        )
        if version != VERSION:
            raise ImageCorrupt(f"unsupported diofs format version {version}")
        sb = cls(block_size, dio_align, total, meta_start, meta_blocks, data_start, ns)
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
