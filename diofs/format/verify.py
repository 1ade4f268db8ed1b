"""Structural checks of a loaded commit, before anything uses it.

Checksums say a commit is the one that was written, not that it is sane: a crafted image (or a
bug) can carry valid checksums and an extent on the superblock, on the commit slots or on
another file's blocks. Reading such a file would return the superblock; writing it would
destroy the image. So the daemon refuses to mount a commit that fails any check here (one
line, exit 3, "run fsck.diofs"), and fsck.diofs reports every problem found.

The checks (cost O(inodes + entries + extents log extents); none depends on the image size):
    - the root exists and is a directory; every inode has a file type Linux knows and a size
      below the largest Linux file (MAX_LFS_FILESIZE); next_ino is above every inode number
    - directory entries: a valid name (1-255 bytes, no "/" or NUL) naming an existing inode
    - extents: not empty, in file order without overlap, inside the data area (never the
      superblock, the commit slots, the checkpoint regions or the journal), no block shared
      by two extents of any files. Free space is what the extents leave over (diofs.alloc),
      so no block in use can be marked free.
"""

from __future__ import annotations

import stat as S
from collections.abc import Iterator

from diofs.errors import ImageCorrupt
from diofs.format.image import ROOT_INO
from diofs.format.layout import Superblock
from diofs.format.metadata import Metadata

MAX_FILE_SIZE = (1 << 63) - 1  # MAX_LFS_FILESIZE on 64-bit Linux
NAME_MAX = 255
_FILE_TYPES = {S.S_IFREG, S.S_IFDIR, S.S_IFLNK, S.S_IFIFO, S.S_IFSOCK, S.S_IFCHR, S.S_IFBLK}


def dangling_entries(md: Metadata) -> Iterator[tuple[int, bytes, int]]:
    """(directory ino, name, missing ino) for each entry that names no inode."""
    for d in md.inodes.values():
        for name, ino in (d.entries or {}).items():
            if ino not in md.inodes:
                yield d.ino, name, ino


def inode_problems(md: Metadata) -> list[str]:
    """Root, file types, sizes, inode numbers and entry names (not dangling entries)."""
    problems = []
    root = md.inodes.get(ROOT_INO)
    if root is None or not root.is_dir:
        problems.append("root directory is missing")
    for inode in md.inodes.values():
        if S.S_IFMT(inode.mode) not in _FILE_TYPES:
            problems.append(f"inode {inode.ino}: unknown file type {S.S_IFMT(inode.mode):#o}")
        if inode.size > MAX_FILE_SIZE:
            problems.append(f"inode {inode.ino}: impossible size {inode.size}")
        if inode.ino >= md.next_ino or inode.ino < ROOT_INO:
            problems.append(f"inode {inode.ino}: number outside 1..{md.next_ino - 1}")
        for name in inode.entries or ():
            if not 0 < len(name) <= NAME_MAX or b"/" in name or b"\0" in name:
                problems.append(f"directory {inode.ino}: invalid entry name {name[:40]!r}")
    return problems


def extent_problems(md: Metadata, sb: Superblock) -> list[str]:
    """Every extent inside the data area, no block used twice (see the module docstring)."""
    problems = []
    spans: list[tuple[int, int, int]] = []  # (phys, count, ino)
    for inode in md.inodes.values():
        prev_end = 0
        for e in inode.extents:
            if e.count <= 0 or e.start < prev_end:
                problems.append(f"inode {inode.ino}: extents overlap or are empty at {e.start}")
            prev_end = e.start + e.count
            if e.phys < sb.data_start or e.phys + e.count > sb.total_blocks:
                problems.append(
                    f"inode {inode.ino}: extent at file block {e.start} points outside the "
                    f"data area ({e.phys}+{e.count})"
                )
                continue
            spans.append((e.phys, e.count, inode.ino))
    spans.sort()
    for (p0, c0, i0), (p1, _, i1) in zip(spans, spans[1:], strict=False):
        if p1 < p0 + c0:
            problems.append(f"block {p1} is used by inodes {i0} and {i1}")
    return problems


def used_runs(md: Metadata) -> list[tuple[int, int]]:
    """The image blocks the extents use, as (phys, count) runs: what diofs.alloc marks used.
    Call after `extent_problems` found nothing (no overlaps, all inside the data area)."""
    return [(e.phys, e.count) for inode in md.inodes.values() for e in inode.extents]


def check(md: Metadata, sb: Superblock) -> None:
    """Raise ImageCorrupt (one line, exit 3) if the commit fails any check."""
    problems = inode_problems(md) + extent_problems(md, sb)
    problems += [
        f"directory {d}: entry {name[:40]!r} points at missing inode {ino}"
        for d, name, ino in dangling_entries(md)
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ImageCorrupt(f"metadata fails its checks: {problems[0]}{more}; run fsck.diofs")
