"""The metadata blob (a checkpoint, diofs.format.layout): every inode (attributes, extents,
directory entries, symlink target) and the extended attributes, serialised, zlib-compressed
and checksummed (xxh64 in the commit slot).

Record layout (little endian), after decompression:

    header   "DIOFSmd1" next_ino:u64 n_inodes:u64 bitmap_len:u64
    inode    ino:u64 mode:u32 uid:u32 gid:u32 nlink:u32 size:u64 atime_ns:i64 mtime_ns:i64
             ctime_ns:i64 rdev:u64 n_extents:u32 payload_len:u32
             n_extents x (start:u64 phys:u64 count:u64 with bit 63 = unwritten)
             payload: directory entries (ino:u64 name_len:u16 name) or the symlink target
    bitmap   bitmap_len bytes: format 1's free-space bitmap; format 2 writes none (free space
             is rebuilt from the extents, diofs.alloc) and skips one when reading
    xattrs   only in a "DIOFSmd2" blob, the one written when some inode has extended
             attributes: the section of diofs.format.xattrs (which owns its layout)

`Inode.record` caches an inode's serialised bytes; whoever changes an inode calls
`Filesystem.dirty(inode)`, which clears it, so a checkpoint only re-serialises changed inodes.
A directory's entries are an `Entries` dict, which also logs the names changed since the last
commit: the journal (diofs.format.journal) writes those, not the whole directory.
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


class Entries(dict[bytes, int]):
    """A directory's entries, name -> ino (insertion ordered), with a log of the names set or
    deleted since the last commit (`changes`: name -> ino, or 0 when deleted; the last change
    of each name wins). Every change goes through `__setitem__`, `__delitem__` or `pop`."""

    __slots__ = ("changes",)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.changes: dict[bytes, int] = {}

    def __setitem__(self, name: bytes, ino: int) -> None:
        super().__setitem__(name, ino)
        self.changes[name] = ino

    def __delitem__(self, name: bytes) -> None:
        super().__delitem__(name)
        self.changes[name] = 0

    def pop(self, name: bytes, *default: int) -> int:  # type: ignore[override]
        if name in self:
            self.changes[name] = 0
        return super().pop(name, *default)

    def take_changes(self) -> dict[bytes, int]:
        changes, self.changes = self.changes, {}
        return changes


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
    entries: Entries | None = None  # directories: name -> ino (insertion ordered)
    target: bytes = b""  # symlinks
    record: bytes | None = None  # cached serialisation, None when changed since
    xattrs: dict[bytes, bytes] | None = None  # name -> value (diofs.format.xattrs)
    xattr_record: bytes | None = None  # cached encoding of `xattrs`, like `record`
    # run-time only (not on the image):
    lookups: int = 0
    opens: int = 0

    @property
    def is_dir(self) -> bool:
        return S.S_ISDIR(self.mode)

    @property
    def children(self) -> Entries:
        """A directory's entries; the caller has checked that it is one (Filesystem.get_dir)."""
        entries = self.entries
        assert entries is not None, f"inode {self.ino} is not a directory"
        return entries

    @property
    def is_reg(self) -> bool:
        return S.S_ISREG(self.mode)

    def serialise(self) -> bytes:
        """The checkpoint record (cached in `record`)."""
        if self.record is not None:
            return self.record
        if self.entries is not None:
            payload = b"".join(
                _DENT.pack(ino, len(name)) + name for name, ino in self.entries.items()
            )
        else:
            payload = self.target
        self.record = self.pack(payload)
        return self.record

    def pack(self, payload: bytes) -> bytes:
        """Attributes and extents, then `payload` (entries, a symlink target, or nothing)."""
        exts = b"".join(
            _EXT.pack(e.start, e.phys, e.count | (_UNWRITTEN if e.unwritten else 0))
            for e in self.extents
        )
        return (
            _INO.pack(
                self.ino, self.mode, self.uid, self.gid, self.nlink, self.size,
                self.atime_ns, self.mtime_ns, self.ctime_ns, self.rdev,
                len(self.extents), len(payload),
            )
            + exts
            + payload
        )


def unpack_inode(raw: bytes | memoryview, pos: int) -> tuple[Inode, bytes, int]:
    """The inode record at `pos`: (inode without entries, its payload, the end position).
    struct.error or ImageCorrupt when it is cut short."""
    f = _INO.unpack_from(raw, pos)
    pos += _INO.size
    extents = []
    for _ in range(f[10]):
        s, p, c = _EXT.unpack_from(raw, pos)
        pos += _EXT.size
        extents.append(Extent(s, p, c & ~_UNWRITTEN, bool(c & _UNWRITTEN)))
    payload = bytes(raw[pos : pos + f[11]])
    if len(payload) != f[11]:
        raise ImageCorrupt("metadata record is truncated")
    pos += f[11]
    inode = Inode(
        ino=f[0], mode=f[1], uid=f[2], gid=f[3], nlink=f[4], size=f[5],
        atime_ns=f[6], mtime_ns=f[7], ctime_ns=f[8], rdev=f[9],
        extents=ExtentMap.loaded(extents),
    )
    return inode, payload, pos


def unpack_entries(payload: bytes) -> Entries:
    entries = Entries()
    p = 0
    while p < len(payload):
        child, nlen = _DENT.unpack_from(payload, p)
        p += _DENT.size
        name = payload[p : p + nlen]
        if len(name) != nlen:
            raise ImageCorrupt("directory record is truncated")
        dict.__setitem__(entries, name, child)  # loading is no change
        p += nlen
    return entries


@dataclass(slots=True)
class Metadata:
    next_ino: int
    inodes: dict[int, Inode]
    # xattrs on the image that belong to no inode (left out by decode; fsck reports them)
    lost_xattrs: list[str] = field(default_factory=list)


def encode_raw(md: Metadata) -> bytes:
    """The uncompressed blob. Runs on the trio thread (it reads the live inodes); the
    compression (`compress`) may then run in a worker thread."""
    xattrs = xattr_format.encode_section(md.inodes.values())
    magic = _MAGIC_XATTRS if xattrs else _MAGIC
    parts = [_HDR.pack(magic, md.next_ino, len(md.inodes), 0)]
    parts.extend(ino.serialise() for ino in md.inodes.values())
    parts.append(xattrs)
    return b"".join(parts)


def compress(raw: bytes) -> bytes:
    return zlib.compress(raw, 1)


def encode(md: Metadata) -> bytes:
    return compress(encode_raw(md))


def decode(blob: bytes) -> Metadata:
    try:
        raw = zlib.decompress(blob)
        magic, next_ino, n_inodes, bitmap_len = _HDR.unpack_from(raw)
        if magic not in (_MAGIC, _MAGIC_XATTRS):
            raise ImageCorrupt("metadata blob has a bad magic")
        pos = _HDR.size
        inodes: dict[int, Inode] = {}
        for _ in range(n_inodes):
            start = pos
            inode, payload, pos = unpack_inode(raw, pos)
            if S.S_ISDIR(inode.mode):
                inode.entries = unpack_entries(payload)
            else:
                inode.target = payload
            inode.record = raw[start:pos]
            inodes[inode.ino] = inode
        pos += bitmap_len  # format 1's bitmap: free space is rebuilt from the extents
        lost: list[str] = []
        if magic == _MAGIC_XATTRS:
            pos, lost = xattr_format.decode_section(raw, pos, inodes)
        if len(raw) != pos:
            raise ImageCorrupt("metadata blob has trailing or missing bytes")
    except (struct.error, zlib.error, ValueError) as exc:
        raise ImageCorrupt(f"metadata blob is damaged ({exc})") from None
    return Metadata(next_ino, inodes, lost)
