"""In-place conversion of a format-1 image to format 2 (`fsck.diofs --upgrade`).

Format 1: superblock, two commit slots, two metadata regions of `meta_blocks` blocks each, then
data; the metadata is one blob with a free-space bitmap. Format 2 (diofs.format.layout) keeps
the superblock, the slots, the blob layout without the bitmap, and the data area where they
are, and cuts the same metadata area [meta_start, data_start) into two smaller checkpoint
regions of m2 blocks and a journal of j blocks, 2 * m2 + j = 2 * meta_blocks. No data block
moves and no extent changes.

Order (what a power cut leaves):
  1. the format-2 checkpoint goes into a format-2 region that does not overlap the live
     format-1 blob, then a flush: the image is still a valid format-1 image;
  2. the commit slot of that region, then a flush. An old diofs could now mistake it for a
     format-1 commit when it is region 0 (the offsets coincide) and read an empty bitmap:
     re-run the upgrade rather than mounting with an old diofs;
  3. the format-2 superblock, then a flush: from here the image is format 2. The superblock
     is one 4 KiB write, the one step that is not atomic against a torn write;
  4. the journal zeroed (it holds pieces of the old region 1; the new fs_id already keeps
     them from ever being replayed).
Re-running after an interruption before step 3 starts over from the newest valid commit.
"""

from __future__ import annotations

import os
import struct

import xxhash

from diofs.backend import Backend
from diofs.errors import DiofsError, ImageCorrupt
from diofs.format import metadata, verify
from diofs.format.layout import (
    _HEAD,
    MAGIC,
    MAX_JOURNAL_BYTES,
    SUPERBLOCK_SIZE,
    CommitSlot,
    Superblock,
    blob_hash,
)

_SB1 = struct.Struct("<8sIIIIQQQQQ")


def _v1_superblock(raw: bytes) -> tuple[int, int, int, int, int, int, int]:
    """(block_size, dio_align, total, meta_start, meta_blocks, data_start, created_ns)."""
    magic, version = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise ImageCorrupt("not a diofs image (bad magic)")
    if version != 1:
        raise DiofsError(f"image has format version {version}, not 1: nothing to upgrade")
    fields = _SB1.unpack_from(raw)
    (checksum,) = struct.unpack_from("<Q", raw, _SB1.size)
    if checksum != xxhash.xxh64_intdigest(raw[: _SB1.size]):
        raise ImageCorrupt("superblock checksum mismatch")
    _, _, bs, align, _, total, meta_start, meta_blocks, data_start, ns = fields
    return bs, align, total, meta_start, meta_blocks, data_start, ns


def format_version(backend: Backend) -> int | None:
    """The format version of a diofs image, or None if it is not one."""
    raw = backend.read(0, _HEAD.size)
    if len(raw) < _HEAD.size:
        return None
    magic, version = _HEAD.unpack_from(raw)
    return int(version) if magic == MAGIC else None


def upgrade(backend: Backend) -> str:
    """Convert the format-1 image behind `backend` in place; returns a one-line summary.
    Raises ImageCorrupt when its metadata does not check out (fsck the old way first)."""
    bs, align, total, meta_start, m1, data_start, ns = _v1_superblock(
        backend.read(0, SUPERBLOCK_SIZE))
    if backend.size() < total * bs or data_start != meta_start + 2 * m1:
        raise ImageCorrupt("format-1 superblock does not match the image")
    slots = [CommitSlot.unpack(backend.read((1 + i) * bs, 64)) for i in (0, 1)]
    best: tuple[CommitSlot, metadata.Metadata] | None = None
    for slot in sorted((s for s in slots if s), key=lambda s: -s.generation):
        if slot.blob_len > m1 * bs:
            continue
        blob = backend.read((meta_start + slot.region * m1) * bs, slot.blob_len)
        if blob_hash(blob) == slot.blob_hash:
            best = (slot, metadata.decode(blob))
            break
    if best is None:
        raise ImageCorrupt("no valid format-1 commit to upgrade")
    old, md = best
    # the journal takes at most a quarter of the metadata area (an even number of blocks)
    journal_blocks = min(m1 // 2, MAX_JOURNAL_BYTES // bs) & ~1
    m2 = (2 * m1 - journal_blocks) // 2
    sb = Superblock(bs, align, total, meta_start, m2, data_start, ns, journal_blocks,
                    int.from_bytes(os.urandom(8), "little") or 1)
    verify.check(md, sb)
    blob = metadata.encode(md)
    if len(blob) > m2 * bs:
        raise DiofsError(
            f"metadata ({len(blob)} bytes) does not fit a format-2 region of {m2 * bs} bytes: "
            "copy the files to a new image instead", 1)
    # (1) a region clear of the live format-1 blob
    live_start = meta_start + old.region * m1
    live_end = live_start + -(-old.blob_len // bs)
    region = next((r for r in (1, 0)
                   if meta_start + (r + 1) * m2 <= live_start or meta_start + r * m2 >= live_end),
                  None)
    if region is None:
        raise DiofsError("the format-1 commit is too large to upgrade in place: copy the "
                         "files to a new image instead", 1)
    backend.write(sb.region_offset(region), blob)
    backend.flush()
    # (2) its slot
    slot = CommitSlot(old.generation + 1, region, len(blob), blob_hash(blob))
    backend.write(sb.slot_offset(region), slot.pack())
    backend.flush()
    # (3) the superblock
    backend.write(0, sb.pack())
    backend.flush()
    # (4) the other slot (format-1 geometry) and the journal
    backend.write(sb.slot_offset(1 - region), bytes(bs))
    backend.write(sb.journal_offset, bytes(sb.journal_bytes))
    backend.flush()
    return (f"upgraded to format 2: {len(md.inodes)} inodes, checkpoint {len(blob)} bytes, "
            f"journal {sb.journal_bytes >> 10} KiB")
