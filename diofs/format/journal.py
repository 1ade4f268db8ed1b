"""The metadata journal: one transaction per commit, holding the records of what changed since
the previous commit (where the journal sits and how it is replayed: diofs.format.layout).

Transaction layout (little endian), starting on a block boundary, padded to whole blocks:

    header   "DIOFSjt1" fs_id:u64 epoch:u64 generation:u64 next_ino:u64 payload_len:u64
             payload_hash:u64 header_hash:u64 (xxh64 of the 56 bytes before it)
    payload  records, each starting with a kind byte:
      INODE  kind=1, the inode record of diofs.format.metadata without directory entries
             (a symlink keeps its target), xattr_len:u32, the inode's part of the xattr
             section of diofs.format.xattrs (xattr_len 0: no xattrs)
      DENT   kind=2, dir:u64 child:u64 name_len:u16 name; child 0 removes the name
      DROP   kind=3, ino:u64: the inode is gone

Invariants:
  - `epoch` is the generation of the checkpoint the transaction follows; `generation` is one
    more than the commit before it; `fs_id` is the superblock's (a transaction left by an
    earlier filesystem on the same image, or by an earlier epoch, is never replayed);
  - within a transaction, INODE records come first, then DENT, then DROP. INODE replaces the
    inode's attributes, extents, target and xattrs but keeps the entries of a directory that
    exists (a new directory starts empty); DENT names only directories that exist after the
    INODE records; DROP of an inode that does not exist does nothing (created and freed
    between two commits);
  - a transaction costs O(inodes changed + their extents + names changed), never O(all).

Replay builds the same Metadata as a checkpoint does; the mount then checks it
(diofs.format.verify) before anything uses it. A record that names a missing directory is
damage (ImageCorrupt), as is a checksummed transaction that does not parse.
"""

from __future__ import annotations

import stat as S
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

from diofs.errors import ImageCorrupt
from diofs.format import xattrs as xattr_format
from diofs.format.metadata import Entries, Inode, Metadata, unpack_inode

MAGIC = b"DIOFSjt1"
_HDR = struct.Struct("<8sQQQQQQ")
HEADER_BYTES = _HDR.size + 8
_KIND = struct.Struct("<B")
_U32 = struct.Struct("<I")
_DENT = struct.Struct("<QQH")
_DROP = struct.Struct("<Q")
INODE, DENT, DROP = 1, 2, 3


def _hash(data: bytes | memoryview) -> int:
    return xxhash.xxh64_intdigest(data)


def inode_record(inode: Inode) -> bytes:
    """The INODE record of `inode` (its current state)."""
    xattrs = xattr_format.encode_inode(inode)
    core = inode.pack(b"" if inode.entries is not None else inode.target)
    return _KIND.pack(INODE) + core + _U32.pack(len(xattrs)) + xattrs


def dent_record(dir_ino: int, name: bytes, child: int) -> bytes:
    return _KIND.pack(DENT) + _DENT.pack(dir_ino, child, len(name)) + name


def drop_record(ino: int) -> bytes:
    return _KIND.pack(DROP) + _DROP.pack(ino)


def payload(changed: Iterable[Inode], dir_changes: Iterable[tuple[int, dict[bytes, int]]],
            dropped: Iterable[int]) -> bytes:
    """The records of one commit, in the order the module docstring requires."""
    parts = [inode_record(inode) for inode in changed]
    for dir_ino, changes in dir_changes:
        parts.extend(dent_record(dir_ino, name, child) for name, child in changes.items())
    parts.extend(drop_record(ino) for ino in dropped)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Header:
    fs_id: int
    epoch: int
    generation: int
    next_ino: int
    payload_len: int
    payload_hash: int

    def pack(self) -> bytes:
        body = _HDR.pack(MAGIC, self.fs_id, self.epoch, self.generation, self.next_ino,
                         self.payload_len, self.payload_hash)
        return body + struct.pack("<Q", _hash(body))

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Header | None:
        """The header, or None if this is not one (end of the journal, torn, stale)."""
        if len(raw) < HEADER_BYTES:
            return None
        magic, fs_id, epoch, gen, next_ino, plen, phash = _HDR.unpack_from(raw)
        (checksum,) = struct.unpack_from("<Q", raw, _HDR.size)
        if magic != MAGIC or checksum != _hash(raw[: _HDR.size]):
            return None
        return cls(fs_id, epoch, gen, next_ino, plen, phash)


def transaction(header_fields: tuple[int, int, int, int], body: bytes, block_size: int) -> bytes:
    """A whole transaction, padded to blocks. `header_fields`: fs_id, epoch, generation,
    next_ino."""
    fs_id, epoch, generation, next_ino = header_fields
    head = Header(fs_id, epoch, generation, next_ino, len(body), _hash(body)).pack()
    total = len(head) + len(body)
    return head + body + bytes(-total % block_size)


def padded_len(body_len: int, block_size: int) -> int:
    total = HEADER_BYTES + body_len
    return total + -total % block_size


def body_ok(header: Header, body: bytes | memoryview) -> bool:
    return len(body) == header.payload_len and _hash(body) == header.payload_hash


def apply(md: Metadata, header: Header, body: bytes | memoryview) -> None:
    """Replay one checksummed transaction onto `md`. ImageCorrupt if it does not parse or
    names a directory that does not exist."""
    inodes = md.inodes
    pos = 0
    try:
        while pos < len(body):
            (kind,) = _KIND.unpack_from(body, pos)
            pos += 1
            if kind == INODE:
                inode, target, pos = unpack_inode(body, pos)
                (xlen,) = _U32.unpack_from(body, pos)
                pos += _U32.size
                if xlen:
                    ino, xattrs, end = xattr_format.decode_inode(body, pos)
                    if ino != inode.ino or end != pos + xlen:
                        raise ImageCorrupt(f"journal: bad xattrs of inode {inode.ino}")
                    inode.xattrs = xattrs or None
                    pos = end
                if S.S_ISDIR(inode.mode):
                    old = inodes.get(inode.ino)  # a file's old record stays undecoded
                    keep = old.entries if old is not None else None
                    inode.entries = keep if keep is not None else Entries()
                else:
                    inode.target = target
                inodes[inode.ino] = inode
            elif kind == DENT:
                dir_ino, child, nlen = _DENT.unpack_from(body, pos)
                pos += _DENT.size
                name = bytes(body[pos : pos + nlen])
                pos += nlen
                d = inodes.get(dir_ino)
                if d is None or d.entries is None or len(name) != nlen:
                    raise ImageCorrupt(f"journal: entry {name[:40]!r} of missing directory "
                                       f"{dir_ino}")
                if child:
                    d.entries.load(name, child)
                else:
                    d.entries.unload(name)
                d.record = None
            elif kind == DROP:
                (ino,) = _DROP.unpack_from(body, pos)
                pos += _DROP.size
                inodes.pop(ino, None)
            else:
                raise ImageCorrupt(f"journal: unknown record kind {kind}")
    except struct.error as exc:
        raise ImageCorrupt(f"journal transaction {header.generation} is damaged ({exc})") from None
    md.next_ino = header.next_ino
