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
from bisect import bisect_right
from collections.abc import Iterator
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
    """A directory's entries, name -> ino, with two more things:

    - `changes`: the names set or deleted since the last commit (name -> ino, or 0 when
      deleted; the last change of each name wins), which the journal writes
      (diofs.format.journal) instead of the whole directory;
    - readdir cookies (`listing`): each name gets a cookie when it is added, from a counter
      that only grows, and keeps it until it is removed (replacing its ino keeps it). A
      listing continues after a cookie by bisection, so a readdir page costs O(log n + page)
      whatever the directory's size, and a name present for the whole listing is returned
      exactly once however many names are created or removed meanwhile (new names come
      later or not at all, as POSIX allows). Cookies live in memory only (a remount numbers
      the names again; no listing survives a remount).

    Invariants: `_seq` has exactly the dict's names; `_cookies` is ascending and holds every
    live cookie plus stale ones (removed names), `_names` beside it; stale entries are
    dropped when they are more than half (`_compact`). Every change goes through
    `__setitem__`, `__delitem__`, `pop` or `load` (which is not logged in `changes`)."""

    __slots__ = ("_cookies", "_names", "_next", "_seq", "_stale", "changes")

    def __init__(self, items: dict[bytes, int] | None = None) -> None:
        super().__init__()
        self.changes: dict[bytes, int] = {}
        self._seq: dict[bytes, int] = {}
        self._cookies: list[int] = []
        self._names: list[bytes] = []
        self._next = 3  # 1 and 2 are left for "." and ".." should they ever be listed
        self._stale = 0
        for name, ino in (items or {}).items():
            self[name] = ino

    def _unsupported(self, *args: object, **kwargs: object) -> None:
        raise TypeError("Entries changes go through [name] = ino, del and pop")

    update = clear = setdefault = popitem = __ior__ = _unsupported  # type: ignore[assignment]

    def _add_cookie(self, name: bytes) -> None:
        if name not in self._seq:
            self._seq[name] = self._next
            self._cookies.append(self._next)
            self._names.append(name)
            self._next += 1

    def _drop_cookie(self, name: bytes) -> None:
        if self._seq.pop(name, None) is not None:
            self._stale += 1
            if self._stale > 64 and 2 * self._stale > len(self._cookies):
                self._compact()

    def _compact(self) -> None:
        live = [(c, n) for c, n in zip(self._cookies, self._names, strict=True)
                if self._seq.get(n) == c]
        self._cookies = [c for c, _ in live]
        self._names = [n for _, n in live]
        self._stale = 0

    def load(self, name: bytes, ino: int) -> None:
        """Set without logging a change (loading a checkpoint, replaying the journal)."""
        super().__setitem__(name, ino)
        self._add_cookie(name)

    def unload(self, name: bytes) -> None:
        """Delete (if present) without logging a change (replaying the journal)."""
        if super().pop(name, None) is not None:
            self._drop_cookie(name)

    def __setitem__(self, name: bytes, ino: int) -> None:
        self.load(name, ino)
        self.changes[name] = ino

    def __delitem__(self, name: bytes) -> None:
        super().__delitem__(name)
        self._drop_cookie(name)
        self.changes[name] = 0

    def pop(self, name: bytes, *default: int) -> int:  # type: ignore[override]
        if name in self:
            self.changes[name] = 0
            self._drop_cookie(name)
        return super().pop(name, *default)

    def take_changes(self) -> dict[bytes, int]:
        changes, self.changes = self.changes, {}
        return changes

    def listing(self, after: int) -> Iterator[tuple[int, bytes, int]]:
        """(cookie, name, ino) of the names whose cookie is above `after`, in cookie order.
        The caller does not change the directory while it iterates."""
        i = bisect_right(self._cookies, after)
        cookies, names, seq = self._cookies, self._names, self._seq
        for j in range(i, len(cookies)):
            name = names[j]
            if seq.get(name) == cookies[j]:
                yield cookies[j], name, self[name]


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
        entries.load(name, child)
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
