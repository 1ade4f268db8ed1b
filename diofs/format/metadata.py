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

In memory the checkpoint stays as it was read: `InodeTable` keeps the decompressed blob and
an index ino -> record, and decodes a record into an `Inode` on first use (lazy loading; the
mount checks every record first, diofs.format.verify). `Inode.record` caches an inode's
serialised bytes; whoever changes an inode calls `Filesystem.mark_changed(inode)`, which
clears it, so a checkpoint only re-serialises changed inodes.
A directory's entries are an `Entries` dict, which also logs the names changed since the last
commit: the journal (diofs.format.journal) writes those, not the whole directory.
"""

from __future__ import annotations

import itertools
import stat as S
import struct
import zlib
from bisect import bisect_right
from collections.abc import ItemsView, Iterable, Iterator, MutableMapping, ValuesView
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
INODE = _INO  # the record header
# the fields of the record header that the load's walk (ino, n_extents, payload_len) and the
# mount's checks (ino, mode, nlink, size, n_extents, payload_len) read: fewer objects
_WALK = struct.Struct("<Q56xII")
INODE_CHECKED = struct.Struct("<QI8xIQ32xII")
EXTENT = _EXT  # start:u64 phys:u64 count:u64 with UNWRITTEN (verify reads raw records)
UNWRITTEN = _UNWRITTEN


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

    def load_all(self, names: list[bytes], inos: list[int]) -> None:
        """Load an empty directory's entries in one go (decoding a checkpoint record): the
        same state as `load` of each, in order, at a fraction of the cost."""
        assert not self, "load_all fills an empty directory"
        dict.update(self, zip(names, inos, strict=True))
        if len(self) != len(names):  # a name twice (damage): the slow path keeps invariants
            dict.clear(self)
            for name, ino in zip(names, inos, strict=True):
                self.load(name, ino)
            return
        first = self._next
        self._next = first + len(names)
        self._seq = dict(zip(names, range(first, self._next), strict=True))
        self._cookies = list(range(first, self._next))
        self._names = list(names)

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
    end = pos + _EXT.size * f[10]
    extents = [
        Extent(s, p, c & ~_UNWRITTEN, c >= _UNWRITTEN)
        for s, p, c in _EXT.iter_unpack(raw[pos:end])
    ] if f[10] else []
    payload = bytes(raw[end : end + f[11]])
    if len(payload) != f[11] or len(raw) < end:
        raise ImageCorrupt("metadata record is truncated")
    # positional: ino, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev
    inode = Inode(*f[:10], ExtentMap.loaded(extents))  # type: ignore[call-arg]
    return inode, payload, end + f[11]


def unpack_entries(payload: bytes | memoryview) -> Entries:
    """A directory's entries from its payload, loaded in one go (no per-name `load`)."""
    names, inos = entry_lists(payload, 0, len(payload))
    entries = Entries()
    entries.load_all(names, inos)
    return entries


def entry_lists(raw: bytes | memoryview, pos: int, end: int) -> tuple[list[bytes], list[int]]:
    """The names and child inos of the directory entries in raw[pos:end]. ImageCorrupt when
    one is cut short."""
    unpack = _DENT.unpack_from
    size = _DENT.size
    names: list[bytes] = []
    inos: list[int] = []
    try:
        while pos < end:
            child, nlen = unpack(raw, pos)
            pos += size
            names.append(bytes(raw[pos : pos + nlen]))
            inos.append(child)
            pos += nlen
    except struct.error:
        pos = end + 1  # an entry header past the end of the blob
    if pos > end:
        raise ImageCorrupt("directory record is truncated")
    return names, inos


class InodeTable(MutableMapping[int, Inode]):
    """ino -> Inode for the whole mount, each checkpoint record decoded on first use.

    Two stores, an ino in at most one of them: `_live` (Inode objects: decoded, created or
    replaced since the checkpoint was read) and `_raw` (ino -> offset << 32 | length of the
    record in `_blob`, the decompressed checkpoint, not decoded yet). Looking an ino up
    (`[]`, `get`, `pop`) decodes its record and moves it to `_live`; `in`, `len` and
    iterating the keys decode nothing; `values()` and `items()` decode everything (fsck).
    A raw record is the checkpoint's bytes unchanged, so a checkpoint copies it as it is
    (`raw_parts`), and it has no xattrs (those decode their inode at load).

    Verify before use still holds: the mount checks every record, raw or not
    (diofs.format.verify, `raw_records`), before anything looks one up.

    Protected by: trio's single thread (like the Inodes themselves); `_blob` never changes.
    """

    __slots__ = ("_blob", "_live", "_raw")

    def __init__(self, inodes: dict[int, Inode] | None = None, blob: bytes = b"",
                 raw: dict[int, int] | None = None) -> None:
        self._live: dict[int, Inode] = dict(inodes or {})
        self._blob = blob
        self._raw: dict[int, int] = raw or {}

    def _decode(self, ino: int) -> Inode:
        loc = self._raw.pop(ino)
        start = loc >> 32
        end = start + (loc & 0xFFFFFFFF)
        inode, payload, _ = unpack_inode(self._blob, start)
        if S.S_ISDIR(inode.mode):
            inode.entries = unpack_entries(payload)
        else:
            inode.target = payload
        inode.record = self._blob[start:end]
        self._live[ino] = inode
        return inode

    def __getitem__(self, ino: int) -> Inode:
        inode = self._live.get(ino)
        if inode is None:
            return self._decode(ino)
        return inode

    def get(self, ino: int, default: Inode | None = None) -> Inode | None:  # type: ignore[override]
        inode = self._live.get(ino)
        if inode is not None:
            return inode
        return self._decode(ino) if ino in self._raw else default

    def __contains__(self, ino: object) -> bool:
        return ino in self._live or ino in self._raw

    def __len__(self) -> int:
        return len(self._live) + len(self._raw)

    def __iter__(self) -> Iterator[int]:
        return itertools.chain(list(self._live), list(self._raw))

    def __setitem__(self, ino: int, inode: Inode) -> None:
        self._raw.pop(ino, None)
        self._live[ino] = inode

    def __delitem__(self, ino: int) -> None:
        if self._raw.pop(ino, None) is None:
            del self._live[ino]

    def values(self) -> ValuesView[Inode]:
        """Every inode: decodes the records not decoded yet (fsck), then iterates at C speed
        (the mixin's view would look every key up again)."""
        self._decode_all()
        return self._live.values()

    def items(self) -> ItemsView[int, Inode]:
        self._decode_all()
        return self._live.items()

    def _decode_all(self) -> None:
        for ino in list(self._raw):
            self._decode(ino)

    def decoded(self) -> ValuesView[Inode]:
        """The Inode objects that exist (decoded or new); the rest are checkpoint records
        unchanged since the mount."""
        return self._live.values()

    @property
    def raw_count(self) -> int:
        return len(self._raw)

    def raw_records(self) -> tuple[memoryview, list[int]]:
        """The records not decoded yet, for diofs.format.verify to check without building
        objects: (the blob, the offset of each record in it). A record is INODE (the header,
        ino to payload_len), n_extents x EXTENT, then the payload."""
        return memoryview(self._blob), [loc >> 32 for loc in self._raw.values()]

    def missing(self, inos: Iterable[int]) -> list[int]:
        """The inos that are not in the table (C-speed membership tests: verify)."""
        live = self._live
        return [i for i in itertools.filterfalse(self._raw.__contains__, inos) if i not in live]

    def raw_snapshot(self) -> RawRecords:
        """The undecoded records as they are now, for a checkpoint: O(1) objects per record
        copied at C speed on the caller's thread; `RawRecords.parts` does the rest anywhere
        (the blob never changes)."""
        return RawRecords(self._blob, list(self._raw.values()))


@dataclass(slots=True)
class RawRecords:
    """Records of a checkpoint blob, as locations (offset << 32 | length)."""

    blob: bytes
    locations: list[int]

    def parts(self) -> list[memoryview]:
        """The records as slices of the blob, neighbours merged."""
        blob = memoryview(self.blob)
        parts: list[memoryview] = []
        run_start = run_end = -1
        for loc in sorted(self.locations):
            start = loc >> 32
            if start != run_end:
                if run_end > run_start:
                    parts.append(blob[run_start:run_end])
                run_start = start
            run_end = start + (loc & 0xFFFFFFFF)
        if run_end > run_start:
            parts.append(blob[run_start:run_end])
        return parts


@dataclass(slots=True)
class Metadata:
    next_ino: int
    inodes: InodeTable
    # xattrs on the image that belong to no inode (left out by decode; fsck reports them)
    lost_xattrs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.inodes, InodeTable):  # a plain dict (mkfs, tests)
            self.inodes = InodeTable(self.inodes)


@dataclass(slots=True)
class Checkpoint:
    """A checkpoint blob in pieces (`encode_parts`): nothing in it changes afterwards, so
    `join` may run in a worker thread."""

    head: list[bytes]  # the blob header, then the records of the inodes decoded or created
    raw: RawRecords  # the records nothing decoded since the mount
    xattrs: bytes  # the xattr section

    def join(self) -> bytes:
        return b"".join([*self.head, *self.raw.parts(), self.xattrs])


def encode_parts(md: Metadata) -> Checkpoint:
    """The checkpoint of `md`. O(inodes decoded) plus a copy of the undecoded records'
    locations (C speed): the part of a checkpoint that runs on the trio thread."""
    live = md.inodes.decoded()
    xattrs = xattr_format.encode_section(live)  # raw records have none (InodeTable)
    magic = _MAGIC_XATTRS if xattrs else _MAGIC
    head = [_HDR.pack(magic, md.next_ino, len(md.inodes), 0)]
    head.extend([ino.serialise() for ino in live])
    return Checkpoint(head, md.inodes.raw_snapshot(), xattrs)


def encode_raw(md: Metadata) -> bytes:
    """The uncompressed blob."""
    return encode_parts(md).join()


def compress(raw: bytes) -> bytes:
    return zlib.compress(raw, 1)


def encode(md: Metadata) -> bytes:
    return compress(encode_raw(md))


def decode(blob: bytes) -> Metadata:
    """The checkpoint: one pass that finds each record (no Inode built: InodeTable decodes
    them on first use) and the xattr section, whose inodes are decoded."""
    try:
        raw = zlib.decompress(blob)
        magic, next_ino, n_inodes, bitmap_len = _HDR.unpack_from(raw)
        if magic not in (_MAGIC, _MAGIC_XATTRS):
            raise ImageCorrupt("metadata blob has a bad magic")
        pos = _HDR.size
        index: dict[int, int] = {}
        walk = _WALK.unpack_from
        hsize, esize = _INO.size, _EXT.size
        for _ in range(n_inodes):
            ino, n_ext, plen = walk(raw, pos)
            length = hsize + esize * n_ext + plen
            if length > 0xFFFFFFFF:
                raise ImageCorrupt(f"metadata record of inode {ino} is damaged")
            index[ino] = pos << 32 | length
            pos += length
        if len(index) != n_inodes:
            raise ImageCorrupt("metadata blob holds an inode twice")
        if pos > len(raw):
            raise ImageCorrupt("metadata record is truncated")
        inodes = InodeTable(blob=raw, raw=index)
        pos += bitmap_len  # format 1's bitmap: free space is rebuilt from the extents
        lost: list[str] = []
        if magic == _MAGIC_XATTRS:
            pos, lost = xattr_format.decode_section(raw, pos, inodes)
        if len(raw) != pos:
            raise ImageCorrupt("metadata blob has trailing or missing bytes")
    except (struct.error, zlib.error, ValueError) as exc:
        raise ImageCorrupt(f"metadata blob is damaged ({exc})") from None
    return Metadata(next_ino, inodes, lost)
