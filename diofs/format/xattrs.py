"""Extended attributes on the image: their limits, the names allowed, and their encoding.

This is the one module that knows how xattrs are stored; the metadata blob
(diofs.format.metadata) calls `encode_section` / `decode_section`, fsck calls `check`.

In memory an inode's xattrs are `Inode.xattrs`, a dict name -> value (bytes, insertion
ordered), or None when it has none. On the image they form one section after the inodes of a
"DIOFSmd2" metadata blob (a checkpoint); a blob with no xattrs at all keeps the "DIOFSmd1"
layout. In a journal transaction each INODE record carries its inode's part of the section
(`encode_inode` / `decode_inode`, diofs.format.journal).

Section layout (little endian, inside the compressed blob):

    n_inodes:u32
    n_inodes x (ino:u64 n_xattrs:u32
                n_xattrs x (name_len:u8 value_len:u32 name value))

Invariants (checked by `check`, enforced by diofs.fs on every change):
- a name is 1..NAME_MAX bytes, has no NUL, starts with a supported namespace prefix and has
  at least one byte after it; a value is at most VALUE_MAX bytes; user.* only on regular files
  and directories (as Linux: other file types are EPERM);
- the names and values of one inode total at most INODE_MAX bytes (ENOSPC beyond, as ext4's
  one-block limit); an inode with no xattrs has `xattrs = None`, never an empty dict (an
  empty table on the image loads as None);
- each ino appears once and belongs to an inode of the same blob.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING

from diofs.errors import ImageCorrupt

if TYPE_CHECKING:
    from diofs.format.metadata import Inode

NAME_MAX = 255  # XATTR_NAME_MAX: a longer name is ERANGE
VALUE_MAX = 65536  # XATTR_SIZE_MAX: a longer value is E2BIG
INODE_MAX = 65536  # names + values of one inode: ENOSPC beyond
USER, TRUSTED, SECURITY, SYSTEM = b"user.", b"trusted.", b"security.", b"system."
NAMESPACES = (USER, TRUSTED, SECURITY)  # system.* (POSIX ACLs): EOPNOTSUPP
CAPABILITY = b"security.capability"  # dropped with suid/sgid (fs.Filesystem.kill_privs)

_COUNT = struct.Struct("<I")
_INODE = struct.Struct("<QI")
_ENTRY = struct.Struct("<BI")


def namespace(name: bytes) -> bytes | None:
    """The supported prefix `name` starts with, or None."""
    for prefix in NAMESPACES:
        if name.startswith(prefix):
            return prefix
    return None


def total_bytes(xattrs: dict[bytes, bytes]) -> int:
    return sum(len(n) + len(v) for n, v in xattrs.items())


def _encode_inode(inode: Inode) -> bytes:
    xattrs = inode.xattrs
    assert xattrs
    parts = [_INODE.pack(inode.ino, len(xattrs))]
    for name, value in xattrs.items():
        parts.append(_ENTRY.pack(len(name), len(value)) + name + value)
    return b"".join(parts)


def encode_inode(inode: Inode) -> bytes:
    """One inode's part of the section (b"" when it has no xattrs), cached like
    `encode_section` caches it; the journal (diofs.format.journal) writes it per inode."""
    if not inode.xattrs:
        return b""
    if inode.xattr_record is None:
        inode.xattr_record = _encode_inode(inode)
    return inode.xattr_record


def decode_inode(raw: bytes | memoryview, pos: int) -> tuple[int, dict[bytes, bytes], int]:
    """The part at `pos`: (ino, xattrs, end position). struct.error when it is short."""
    ino, n = _INODE.unpack_from(raw, pos)
    pos += _INODE.size
    xattrs: dict[bytes, bytes] = {}
    for _ in range(n):
        nlen, vlen = _ENTRY.unpack_from(raw, pos)
        pos += _ENTRY.size
        name, value = bytes(raw[pos : pos + nlen]), bytes(raw[pos + nlen : pos + nlen + vlen])
        if len(name) != nlen or len(value) != vlen:
            raise ImageCorrupt("metadata is truncated (xattrs)")
        pos += nlen + vlen
        xattrs[name] = value
    return ino, xattrs, pos


def encode_section(inodes: Iterable[Inode]) -> bytes:
    """The xattr section of the blob, b"" when no inode has xattrs (then the blob stays md1).
    Each inode's part is cached in `Inode.xattr_record`; whoever changes `Inode.xattrs` sets
    it to None (diofs.fs, the xattr methods)."""
    parts: list[bytes] = []
    for inode in inodes:
        if inode.xattrs:
            if inode.xattr_record is None:
                inode.xattr_record = _encode_inode(inode)
            parts.append(inode.xattr_record)
    if not parts:
        return b""
    return _COUNT.pack(len(parts)) + b"".join(parts)


def decode_section(
    raw: bytes, pos: int, inodes: MutableMapping[int, Inode]
) -> tuple[int, list[str]]:
    """Read the section at `pos` into the inodes' `xattrs`. Returns the end position and the
    problems found: xattrs of an ino that is not in `inodes`, or stored twice, are left out
    (fsck reports them; the next commit drops them). struct.error when the section is short."""
    lost: list[str] = []
    (count,) = _COUNT.unpack_from(raw, pos)
    pos += _COUNT.size
    for _ in range(count):
        start = pos
        ino, xattrs, pos = decode_inode(raw, pos)
        inode = inodes.get(ino)
        if inode is None:
            lost.append(f"xattrs of inode {ino}, which does not exist")
        elif inode.xattrs is not None:
            lost.append(f"xattrs of inode {ino} stored twice")
        else:
            inode.xattrs = xattrs or None
            inode.xattr_record = raw[start:pos] if xattrs else None
    return pos, lost


def _entry_problem(inode: Inode, name: bytes, value: bytes) -> str | None:
    prefix = namespace(name)
    if not name or len(name) > NAME_MAX or b"\0" in name:
        return f"xattr name {name[:40]!r} is not a valid name"
    if prefix is None or len(name) == len(prefix):
        return f"xattr name {name[:40]!r} has no supported namespace"
    if prefix == USER and not (inode.is_reg or inode.is_dir):
        return f"user xattr {name[:40]!r} on a special file"
    if len(value) > VALUE_MAX:
        return f"xattr {name[:40]!r} has a value of {len(value)} bytes"
    return None


def check(inode: Inode, *, repair: bool) -> list[str]:
    """What is wrong with the xattrs of one loaded inode (fsck); `repair` drops the bad
    entries, then the last ones while the inode is over INODE_MAX."""
    out: list[str] = []
    xattrs = inode.xattrs
    if xattrs is None:
        return out
    for name, value in list(xattrs.items()):
        problem = _entry_problem(inode, name, value)
        if problem:
            out.append(f"inode {inode.ino}: {problem}")
            if repair:
                del xattrs[name]
    total = total_bytes(xattrs)
    if total > INODE_MAX:
        out.append(f"inode {inode.ino}: xattrs total {total} bytes, more than {INODE_MAX}")
        while repair and total_bytes(xattrs) > INODE_MAX:
            del xattrs[next(reversed(xattrs))]
    if out and repair:
        inode.xattrs = xattrs or None
        inode.xattr_record = None
    return out
