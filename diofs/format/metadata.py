"""The metadata blob: every inode (attributes, extents, directory entries, symlink target) and
the free-space bitmap, serialised, zlib-compressed and checksummed (xxh64 in the commit slot).

Record layout (little endian), after decompression:

    header   "DIOFSmd1" next_ino:u64 n_inodes:u64 bitmap_len:u64
    inode    ino:u64 mode:u32 uid:u32 gid:u32 nlink:u32 size:u64 atime_ns:i64 mtime_ns:i64
             ctime_ns:i64 rdev:u64 n_extents:u32 payload_len:u32
             n_extents x (start:u64 phys:u64 count:u64 with bit 63 = unwritten)
             payload: directory entries (ino:u64 name_len:u16 name) or the symlink target
    bitmap   one bit per image block, 1 = in use (metadata area included), LSB first
    xattrs   only in a "DIOFSmd2" blob, the one written when some inode has extended
             attributes: the section of diofs.format.xattrs (which owns its layout)

`Inode.record` caches an inode's serialised bytes; whoever changes an inode calls
`Filesystem.dirty(inode)`, which clears it, so a commit only re-serialises changed inodes.
"""

from __future__ import annotations

import stat as S
import struct
import zlib
from dataclasses import dataclass, field

from diofs.errors import ImageCorrupt
from diofs.format import xattrs as xattr_format
from diofs.format.extents import Extent, ExtentMap

_HDR = struct.Struct("<8sQQQ")
_INO = struct.Struct("<QIIIIQqqqQII")
_EXT = struct.Struct("<QQQ")
_DENT = struct.Struct("<QH")
_MAGIC = b"DIOFSmd1"
_MAGIC_XATTRS = b"DIOFSmd2"  # md1 + the xattr section
_UNWRITTEN = 1 << 63


@dataclass(slots=True, eq=False)
class Inode:
    """One file, directory or symlink. Protected by: trio's single thread (mutated only
    between checkpoints); data ranges additionally by the inode's locks (diofs.locks)."""

    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    extents: ExtentMap = field(default_factory=ExtentMap)
    entries: dict[bytes, int] | None = None  # directories: name -> ino (insertion ordered)
    target: bytes = b""  # symlinks
    record: bytes | None = None  # cached serialisation, None when changed since
    xattrs: dict[bytes, bytes] | None = None  # name -> value (diofs.format.xattrs)
    xattr_record: bytes | None = None  # cached encoding of `xattrs`, like `record`

    @property
    def is_dir(self) -> bool:
        return S.S_ISDIR(self.mode)

    @property
    def children(self) -> dict[bytes, int]:
        """A directory's entries; the caller has checked that it is one (Filesystem.get_dir)."""
        entries = self.entries
        assert entries is not None, f"inode {self.ino} is not a directory"
        return entries

    @property
    def is_reg(self) -> bool:
        return S.S_ISREG(self.mode)

    def serialise(self) -> bytes:
        if self.record is not None:
            return self.record
        if self.entries is not None:
            payload = b"".join(
                _DENT.pack(ino, len(name)) + name for name, ino in self.entries.items()
            )
        else:
            payload = self.target
        exts = b"".join(
            _EXT.pack(e.start, e.phys, e.count | (_UNWRITTEN if e.unwritten else 0))
            for e in self.extents
        )
        self.record = (
            _INO.pack(
                self.ino, self.mode, self.uid, self.gid, self.nlink, self.size,
                self.atime_ns, self.mtime_ns, self.ctime_ns, self.rdev,
                len(self.extents), len(payload),
            )
            + exts
            + payload
        )
        return self.record


_TO_ASCII = bytes.maketrans(b"\x00\x01", b"01")
_FROM_ASCII = bytes.maketrans(b"01", b"\x00\x01")


def pack_bitmap(used: bytearray) -> bytes:
    """One byte per block (0/1) -> one bit per block, LSB = lowest block."""
    n = len(used)
    if n == 0:
        return b""
    bits = bytes(used[::-1]).translate(_TO_ASCII)
    return int(bits, 2).to_bytes((n + 7) // 8, "little")


def unpack_bitmap(raw: bytes, nblocks: int) -> bytearray:
    value = int.from_bytes(raw, "little")
    bits = format(value, f"0{nblocks}b")[-nblocks:] if nblocks else ""
    return bytearray(bits.encode()[::-1].translate(_FROM_ASCII))


@dataclass(slots=True)
class Metadata:
    next_ino: int
    inodes: dict[int, Inode]
    bitmap: bytearray  # one byte per image block, 1 = in use
    # xattrs on the image that belong to no inode (left out by decode; fsck reports them)
    lost_xattrs: list[str] = field(default_factory=list)


def encode(md: Metadata) -> bytes:
    bitmap = pack_bitmap(md.bitmap)
    xattrs = xattr_format.encode_section(md.inodes.values())
    magic = _MAGIC_XATTRS if xattrs else _MAGIC
    parts = [_HDR.pack(magic, md.next_ino, len(md.inodes), len(bitmap))]
    parts.extend(ino.serialise() for ino in md.inodes.values())
    parts.append(bitmap)
    parts.append(xattrs)
    return zlib.compress(b"".join(parts), 1)


def decode(blob: bytes, total_blocks: int) -> Metadata:
    try:
        raw = zlib.decompress(blob)
        magic, next_ino, n_inodes, bitmap_len = _HDR.unpack_from(raw)
        if magic not in (_MAGIC, _MAGIC_XATTRS):
            raise ImageCorrupt("metadata blob has a bad magic")
        pos = _HDR.size
        inodes: dict[int, Inode] = {}
        for _ in range(n_inodes):
            start = pos
            f = _INO.unpack_from(raw, pos)
            pos += _INO.size
            extents = []
            for _ in range(f[10]):
                s, p, c = _EXT.unpack_from(raw, pos)
                pos += _EXT.size
                extents.append(Extent(s, p, c & ~_UNWRITTEN, bool(c & _UNWRITTEN)))
            payload = raw[pos : pos + f[11]]
            if len(payload) != f[11]:
                raise ImageCorrupt("metadata blob is truncated")
            pos += f[11]
            inode = Inode(
                ino=f[0], mode=f[1], uid=f[2], gid=f[3], nlink=f[4], size=f[5],
                atime_ns=f[6], mtime_ns=f[7], ctime_ns=f[8], rdev=f[9],
                extents=ExtentMap(extents),
            )
            if S.S_ISDIR(inode.mode):
                inode.entries = {}
                p = 0
                while p < len(payload):
                    child, nlen = _DENT.unpack_from(payload, p)
                    p += _DENT.size
                    inode.entries[payload[p : p + nlen]] = child
                    p += nlen
            else:
                inode.target = payload
            inode.record = raw[start:pos]
            inodes[inode.ino] = inode
        bitmap = unpack_bitmap(raw[pos : pos + bitmap_len], total_blocks)
        pos += bitmap_len
        lost: list[str] = []
        if magic == _MAGIC_XATTRS:
            pos, lost = xattr_format.decode_section(raw, pos, inodes)
        if len(raw) != pos:
            raise ImageCorrupt("metadata blob has trailing or missing bytes")
    except (struct.error, zlib.error, ValueError) as exc:
        raise ImageCorrupt(f"metadata blob is damaged ({exc})") from None
    return Metadata(next_ino, inodes, bitmap, lost)
