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

The mount's pass (`survey`) reads the checkpoint records that nothing has decoded yet straight
from the blob (diofs.format.metadata.InodeTable, lazy loading): every record is checked at
mount, before any is used, without building its objects. The same pass yields what the mount
needs next: the used block runs (diofs.alloc) and the orphans (nlink 0).
"""

from __future__ import annotations

import stat as S
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from diofs.errors import ImageCorrupt
from diofs.format.image import ROOT_INO
from diofs.format.layout import Superblock
from diofs.format.metadata import (
    EXTENT,
    INODE,
    INODE_CHECKED,
    UNWRITTEN,
    Metadata,
    entry_lists,
)

MAX_FILE_SIZE = (1 << 63) - 1  # MAX_LFS_FILESIZE on 64-bit Linux
NAME_MAX = 255
_FILE_TYPES = {S.S_IFREG, S.S_IFDIR, S.S_IFLNK, S.S_IFIFO, S.S_IFSOCK, S.S_IFCHR, S.S_IFBLK}


def _bad_name(name: bytes) -> bool:
    return not 0 < len(name) <= NAME_MAX or b"/" in name or b"\0" in name


def dangling_entries(md: Metadata) -> Iterator[tuple[int, bytes, int]]:
    """(directory ino, name, missing ino) for each entry that names no inode (decodes every
    inode: fsck)."""
    for d in md.inodes.values():
        for name, ino in (d.entries or {}).items():
            if ino not in md.inodes:
                yield d.ino, name, ino


def _inode_problems(ino: int, mode: int, size: int, next_ino: int) -> list[str]:
    problems = []
    if S.S_IFMT(mode) not in _FILE_TYPES:
        problems.append(f"inode {ino}: unknown file type {S.S_IFMT(mode):#o}")
    if size > MAX_FILE_SIZE:
        problems.append(f"inode {ino}: impossible size {size}")
    if ino >= next_ino or ino < ROOT_INO:
        problems.append(f"inode {ino}: number outside 1..{next_ino - 1}")
    return problems


def inode_problems(md: Metadata) -> list[str]:
    """Root, file types, sizes, inode numbers and entry names (not dangling entries)."""
    problems = []
    root = md.inodes.get(ROOT_INO)
    if root is None or not root.is_dir:
        problems.append("root directory is missing")
    for inode in md.inodes.values():
        problems += _inode_problems(inode.ino, inode.mode, inode.size, md.next_ino)
        for name in inode.entries or ():
            if _bad_name(name):
                problems.append(f"directory {inode.ino}: invalid entry name {name[:40]!r}")
    return problems


def _extent_problems(ino: int, extents: Iterable[tuple[int, int, int]], sb: Superblock,
                     spans: list[tuple[int, int, int]]) -> list[str]:
    """Checks of one inode's (start, phys, count) extents; the good ones go to `spans` as
    (phys, count, ino)."""
    problems = []
    prev_end = 0
    for start, phys, count in extents:
        if count <= 0 or start < prev_end:
            problems.append(f"inode {ino}: extents overlap or are empty at {start}")
        prev_end = start + count
        if phys < sb.data_start or phys + count > sb.total_blocks:
            problems.append(
                f"inode {ino}: extent at file block {start} points outside the "
                f"data area ({phys}+{count})"
            )
            continue
        spans.append((phys, count, ino))
    return problems


def _shared_blocks(spans: list[tuple[int, int, int]]) -> tuple[list[str], list[tuple[int, int]]]:
    """Sort `spans` (phys, count, ino); (a problem per block used twice, the merged used
    runs). Spans come mostly in image order (the allocator's next-fit): the sort is cheap."""
    spans.sort()
    problems = []
    runs: list[tuple[int, int]] = []
    run_start = run_end = -1
    prev_ino = 0
    for phys, count, ino in spans:
        if phys < run_end:
            problems.append(f"block {phys} is used by inodes {prev_ino} and {ino}")
        if phys > run_end:
            if run_end > run_start:
                runs.append((run_start, run_end - run_start))
            run_start = phys
        run_end = max(run_end, phys + count)
        prev_ino = ino
    if run_end > run_start:
        runs.append((run_start, run_end - run_start))
    return problems, runs


def extent_problems(md: Metadata, sb: Superblock) -> list[str]:
    """Every extent inside the data area, no block used twice (see the module docstring)."""
    problems = []
    spans: list[tuple[int, int, int]] = []
    for inode in md.inodes.values():
        problems += _extent_problems(
            inode.ino, ((e.start, e.phys, e.count) for e in inode.extents), sb, spans)
    return problems + _shared_blocks(spans)[0]


@dataclass(slots=True)
class Survey:
    """What `survey` found: `problems` (empty when the commit may be used), `used` (the
    block runs the extents hold, sorted and merged: what diofs.alloc marks used), `orphans`
    (inodes with nlink 0), `parents` (directory ino -> the directory that names it, for
    every named directory: ".." without a scan, diofs.fs)."""

    problems: list[str]
    used: list[tuple[int, int]]
    orphans: list[int]
    parents: dict[int, int]


def _name_problems(d: int, names: list[bytes], children: list[int],
                   md: Metadata) -> list[str]:
    """A directory's entry names and the inodes they name. The common case (all good) runs
    at C speed: the names joined by "/" hold exactly len - 1 slashes and no NUL."""
    problems = []
    joined = b"/".join(names)
    if names and (
        joined.count(b"/") != len(names) - 1 or b"\0" in joined
        or not 0 < min(map(len, names)) <= max(map(len, names)) <= NAME_MAX
    ):
        problems += [f"directory {d}: invalid entry name {name[:40]!r}"
                     for name in names if _bad_name(name)]
    missing = set(md.inodes.missing(children))
    if missing:
        problems += [f"directory {d}: entry {name[:40]!r} points at missing inode {child}"
                     for name, child in zip(names, children, strict=True) if child in missing]
    return problems


def survey(md: Metadata, sb: Superblock) -> Survey:
    """Every check of the module docstring in one pass over the inodes, decoded or not."""
    inodes, next_ino = md.inodes, md.next_ino
    problems: list[str] = []
    root = inodes.get(ROOT_INO)
    if root is None or not root.is_dir:
        problems.append("root directory is missing")
    spans: list[tuple[int, int, int]] = []
    orphans: list[int] = []
    children_of: list[tuple[int, list[int]]] = []  # (directory, the inos it names)
    dirs: set[int] = set()
    for inode in inodes.decoded():
        ino = inode.ino
        problems += _inode_problems(ino, inode.mode, inode.size, next_ino)
        if inode.nlink == 0:
            orphans.append(ino)
        if inode.extents:
            problems += _extent_problems(
                ino, ((e.start, e.phys, e.count) for e in inode.extents), sb, spans)
        if inode.entries is not None:
            dirs.add(ino)
        if inode.entries:
            children = list(inode.entries.values())
            problems += _name_problems(ino, list(inode.entries), children, md)
            children_of.append((ino, children))
    blob, offsets = inodes.raw_records()
    head, esize = INODE_CHECKED.unpack_from, EXTENT.size
    unpack_ext = EXTENT.unpack_from
    hsize = INODE.size
    data_start, total = sb.data_start, sb.total_blocks
    file_types = _FILE_TYPES
    for pos in offsets:
        ino, mode, nlink, size, n_ext, plen = head(blob, pos)
        if S.S_IFMT(mode) not in file_types or size > MAX_FILE_SIZE or not (
                ROOT_INO <= ino < next_ino):
            problems += _inode_problems(ino, mode, size, next_ino)
        if nlink == 0:
            orphans.append(ino)
        pos += hsize
        if n_ext == 1:  # the common case, inline
            start, phys, count = unpack_ext(blob, pos)
            count &= ~UNWRITTEN
            if count > 0 and phys >= data_start and phys + count <= total:
                spans.append((phys, count, ino))
            else:
                problems += _extent_problems(ino, [(start, phys, count)], sb, spans)
        elif n_ext:
            problems += _extent_problems(
                ino, [(s, p, c & ~UNWRITTEN) for s, p, c in
                      EXTENT.iter_unpack(blob[pos : pos + n_ext * esize])], sb, spans)
        if S.S_ISDIR(mode):
            dirs.add(ino)
            pos += n_ext * esize
            names, children = entry_lists(blob, pos, pos + plen)
            problems += _name_problems(ino, names, children, md)
            children_of.append((ino, children))
    parents = {child: d for d, children in children_of for child in dirs.intersection(children)}
    shared, used = _shared_blocks(spans)
    return Survey(problems + shared, used, orphans, parents)


def refusal(problems: list[str]) -> ImageCorrupt:
    """The one-line error of a commit that fails its checks (exit 3)."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return ImageCorrupt(f"metadata fails its checks: {problems[0]}{more}; run fsck.diofs")


def check(md: Metadata, sb: Superblock) -> Survey:
    """Raise ImageCorrupt (one line, exit 3) if the commit fails any check."""
    found = survey(md, sb)
    if found.problems:
        raise refusal(found.problems)
    return found
