"""fsck.diofs IMAGE [--repair] [--force]: check an image; exit 0 when clean, 4 on damage, 3 if
it cannot be read at all, 7 if the image is in use. Read-only unless --repair (which rebuilds
the bitmap, fixes link counts, drops dangling entries and frees unreachable inodes, then
commits).

A mounted image is locked by its daemon (diofs.image_lock) until its final commit is durable;
fsck refuses it (exit 7, one line), as e2fsck refuses a mounted filesystem: its last commit may
be seconds old, and a repair would be overwritten by, or corrupt, the daemon's next commit.
`--force` checks a locked image anyway, read-only, and says that it did; `--repair` never runs
on a locked image. A check holds the lock shared (checks may run side by side, a mount waits),
a repair exclusively.

Checks: superblock and commit checksums (diofs.format.layout), the metadata blob, the checks
a mount makes before it uses a commit (diofs.format.verify: file types, sizes, entry names),
every directory entry points at an inode, link counts match the entries, every inode is reachable
from the root (except orphans: nlink 0 and no entry, freed at the next mount), extents lie in
the data area, do not overlap (within or across files), blocks past EOF are only unwritten
(SPEC 5: a block turns written together with the i_size that covers it), the bitmap marks
exactly the metadata area plus the blocks extents use, and extended attributes are well formed
(names in a supported namespace, user.* only on files and directories, sizes within the limits
of diofs.format.xattrs) and belong to an existing inode (--repair drops the bad ones).
"""

from __future__ import annotations

import os
import stat as S
from collections import Counter

from diofs import image_lock
from diofs.backend import open_backend
from diofs.cli.common import ArgumentParser, run_main
from diofs.errors import EXIT_DAMAGED
from diofs.format import image, metadata, verify
from diofs.format import xattrs as xattr_format
from diofs.format.image import ROOT_INO


def check(loaded: image.Loaded, *, repair: bool) -> list[str]:
    sb, md = loaded.sb, loaded.md
    inodes = md.inodes
    problems = verify.inode_problems(md)
    if ROOT_INO not in inodes or not S.S_ISDIR(inodes[ROOT_INO].mode):
        return problems
    for dir_ino, name, ino in list(verify.dangling_entries(md)):
        problems.append(f"directory {dir_ino}: entry {name!r} points at missing inode {ino}")
        if repair:
            (inodes[dir_ino].entries or {}).pop(name)
            inodes[dir_ino].record = None
    refs: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for d in inodes.values():
        for ino in (d.entries or {}).values():
            child = inodes.get(ino)
            if child is None:
                continue  # dangling, reported above
            refs[ino] += 1
            if child.is_dir:
                subdirs[d.ino] += 1
    reachable = {ROOT_INO}
    stack = [ROOT_INO]
    while stack:
        d = inodes[stack.pop()]
        for ino in (d.entries or {}).values():
            if ino in inodes and ino not in reachable:
                reachable.add(ino)
                stack.append(ino)
    for ino in sorted(set(inodes) - reachable):
        if inodes[ino].nlink == 0 and refs[ino] == 0:
            # an orphan: unlinked while open when this commit was made (the daemon may have
            # been killed or the power cut before the last close); Filesystem.load frees it
            # at the next mount, so it is not damage. --repair frees it now.
            if repair:
                del inodes[ino]
            continue
        problems.append(f"inode {ino} is not reachable from the root (nlink {inodes[ino].nlink})")
        if repair:
            del inodes[ino]
    for inode in inodes.values():
        want = 2 + subdirs[inode.ino] if inode.is_dir else refs[inode.ino]
        if inode.nlink != want:
            problems.append(f"inode {inode.ino}: link count {inode.nlink}, expected {want}")
            if repair:
                inode.nlink = want
                inode.record = None
    for inode in inodes.values():
        problems += _check_written_within_size(inode, sb.block_size, repair=repair)
        problems += xattr_format.check(inode, repair=repair)
    problems += md.lost_xattrs  # not loaded: a repair's commit drops them
    problems += verify.extent_problems(md, sb)
    used = bytearray(sb.total_blocks)
    used[: sb.data_start] = b"\x01" * sb.data_start
    for inode in inodes.values():
        for e in inode.extents:
            if sb.data_start <= e.phys and e.phys + e.count <= sb.total_blocks:
                used[e.phys : e.phys + e.count] = b"\x01" * e.count
    if used != md.bitmap:
        leaked = sum(1 for a, b in zip(md.bitmap, used, strict=True) if a and not b)
        missing = sum(1 for a, b in zip(md.bitmap, used, strict=True) if b and not a)
        problems.append(
            f"free-space bitmap is wrong: {leaked} blocks marked used but unreferenced, "
            f"{missing} used blocks marked free"
        )
        if repair:
            md.bitmap[:] = used
    return problems


def _check_written_within_size(inode: metadata.Inode, bs: int, *, repair: bool) -> list[str]:
    """Unwritten extents (SPEC 5): blocks past EOF may be allocated (KEEP_SIZE preallocation,
    a direct write that failed) but only as unwritten. A *written* block past EOF would show
    its old bytes after a truncate up or an extension that skips it; the daemon never
    commits one (an extent turns written together with the i_size that covers it), so one
    here is damage. --repair marks those blocks unwritten (they read as zeros)."""
    eof_block = -(-inode.size // bs)
    bad = [(max(e.start, eof_block), e.phys + max(0, eof_block - e.start),
            e.end - max(e.start, eof_block))
           for e in inode.extents if not e.unwritten and e.end > eof_block]
    if not bad:
        return []
    if repair:
        for start, phys, count in bad:
            inode.extents.remove(start, count)
            inode.extents.insert(start, phys, count, unwritten=True)
        inode.record = None
    n = sum(count for _, _, count in bad)
    return [f"inode {inode.ino}: {n} written block(s) past EOF (size {inode.size}, first at "
            f"file block {bad[0][0]}): they must be unwritten"]


def fsck(argv: list[str]) -> int:
    p = ArgumentParser(prog="fsck.diofs", description=__doc__)
    p.add_argument("image")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed")
    p.add_argument("--force", action="store_true",
                   help="check a locked (mounted) image anyway, read-only: its last commit")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    backend = open_backend(a.image, writable=a.repair)  # first: its one-line errors
    lock: int | None = None
    try:
        lock, stale = _lock(a.image, repair=a.repair, force=a.force)
        loaded = image.load(backend)  # ImageCorrupt -> one line, exit 3
        problems = check(loaded, repair=a.repair)
        for line in problems:
            print(f"fsck.diofs: {a.image}: {line}")
        if problems and a.repair:
            blob = metadata.encode(loaded.md)
            image.write_commit(backend, loaded.sb, loaded.generation + 1, blob)
            print(f"fsck.diofs: {a.image}: repaired {len(problems)} problem(s)")
            return 0
    finally:
        backend.close()
        if lock is not None:
            os.close(lock)
    if problems:
        return EXIT_DAMAGED
    n = len(loaded.md.inodes)
    print(f"fsck.diofs: {a.image}: clean ({n} inodes, generation {loaded.generation}){stale}")
    return 0


def _lock(image: str, *, repair: bool, force: bool) -> tuple[int | None, str]:
    """Lock the image for the check: (the descriptor holding the lock, or None under
    --force; a note for the result line). Raises ImageInUse (exit 7) unless `force` allows a
    read-only look."""
    try:
        return image_lock.lock_image(image, exclusive=repair), ""
    except image_lock.ImageInUse as exc:
        if repair:
            exc.message += "; unmount it first (--repair never runs on an image in use)"
            raise
        if not force:
            exc.message += "; unmount it first, or check its last commit with --force"
            raise
        print(f"fsck.diofs: {image}: in use; checking its last commit read-only (--force)")
        return None, " [in use: the last commit, not the live state]"


def main(argv: list[str] | None = None) -> None:
    run_main("fsck.diofs", fsck, argv)
