"""fsck.diofs IMAGE [--repair] [--force] [--upgrade]: check an image; exit 0 when clean, 4 on
damage, 3 if it cannot be read at all, 7 if the image is in use. Read-only unless --repair
(which fixes link counts, drops dangling entries and frees unreachable inodes, then writes a
checkpoint) or --upgrade (which converts a format-1 image to format 2 in place,
diofs.format.upgrade, then checks it). On a terminal it shows its progress on stderr.

A mounted image is locked by its daemon (diofs.image_lock) until its final commit is durable;
fsck refuses it (exit 7, one line), as e2fsck refuses a mounted filesystem: its last commit may
be seconds old, and a repair would be overwritten by, or corrupt, the daemon's next commit.
`--force` checks a locked image anyway, read-only, and says that it did; `--repair` never runs
on a locked image. A check holds the lock shared (checks may run side by side, a mount waits),
a repair exclusively.

Checks: superblock and commit checksums (diofs.format.layout), the checkpoint blob, every
journal transaction of its epoch (checksums, records naming existing directories), the checks
a mount makes before it uses a commit (diofs.format.verify: file types, sizes, entry names),
every directory entry points at an inode, link counts match the entries, every inode is reachable
from the root (except orphans: nlink 0 and no entry, freed at the next mount), extents lie in
the data area, do not overlap (within or across files), blocks past EOF are only unwritten
(SPEC 5: a block turns written together with the i_size that covers it), and extended
attributes are well formed
(names in a supported namespace, user.* only on files and directories, sizes within the limits
of diofs.format.xattrs) and belong to an existing inode (--repair drops the bad ones). Free
space is not on the image in format 2 (diofs.alloc rebuilds it from the extents), so the
overlap check is the whole free-space check. Cost: O(inodes + entries + extents log extents),
whatever the image size.
"""

from __future__ import annotations

import gc
import os
import stat as S
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TypeVar

from diofs import image_lock
from diofs.backend import open_backend
from diofs.cli.common import ArgumentParser, run_main
from diofs.errors import EXIT_DAMAGED
from diofs.format import image, metadata, upgrade, verify
from diofs.format import xattrs as xattr_format
from diofs.format.image import ROOT_INO

T = TypeVar("T")


class Progress:
    """A percentage on stderr, rewritten in place at most every 0.2 s, when stderr is a
    terminal; nothing otherwise (scripts, tests, logs)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._shown = 0.0

    def over(self, what: str, items: Iterable[T], total: int) -> Iterator[T]:
        if not self.enabled or total < 1000:
            yield from items
            return
        for i, item in enumerate(items):
            if i % 256 == 0 and time.monotonic() - self._shown > 0.2:
                self._shown = time.monotonic()
                sys.stderr.write(f"\rfsck.diofs: {what}: {100 * i // total:3d}%")
                sys.stderr.flush()
            yield item
        self.done()

    def done(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = 0.0


def check(loaded: image.Loaded, *, repair: bool, progress: Progress | None = None) -> list[str]:
    progress = progress or Progress(False)
    sb, md = loaded.sb, loaded.md
    inodes = md.inodes
    problems = verify.inode_problems(md)
    if ROOT_INO not in inodes or not S.S_ISDIR(inodes[ROOT_INO].mode):
        return problems
    for dir_ino, name, ino in list(verify.dangling_entries(md)):
        problems.append(f"directory {dir_ino}: entry {name!r} points at missing inode {ino}")
        entries = inodes[dir_ino].entries
        if repair and entries is not None:
            entries.pop(name)
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
    for inode in progress.over("inodes", list(inodes.values()), len(inodes)):
        problems += _check_written_within_size(inode, sb.block_size, repair=repair)
        problems += xattr_format.check(inode, repair=repair)
    problems += md.lost_xattrs  # not loaded: a repair's commit drops them
    problems += verify.extent_problems(md, sb)
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
    p.add_argument("--upgrade", action="store_true",
                   help="convert a format-1 image to format 2 in place, then check it")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    writable = a.repair or a.upgrade
    backend = open_backend(a.image, writable=writable)  # first: its one-line errors
    lock: int | None = None
    progress = Progress(sys.stderr.isatty())
    try:
        lock, stale = _lock(a.image, repair=writable, force=a.force)
        if a.upgrade and upgrade.format_version(backend) == 1:
            print(f"fsck.diofs: {a.image}: {upgrade.upgrade(backend)}")
        loaded = image.load(backend)  # ImageCorrupt -> one line, exit 3
        problems = check(loaded, repair=a.repair, progress=progress)
        for line in problems:
            print(f"fsck.diofs: {a.image}: {line}")
        if problems and a.repair:
            blob = metadata.encode(loaded.md)
            region = None if loaded.checkpoint is None else 1 - loaded.checkpoint.region
            image.write_commit(backend, loaded.sb, loaded.generation + 1, blob, region=region)
            print(f"fsck.diofs: {a.image}: repaired {len(problems)} problem(s)")
            return 0
    finally:
        backend.close()
        if lock is not None:
            os.close(lock)
    if problems:
        return EXIT_DAMAGED
    n = len(loaded.md.inodes)
    journal = f"; {loaded.replayed} journal transactions" if loaded.replayed else ""
    print(f"fsck.diofs: {a.image}: clean ({n} inodes, generation {loaded.generation}{journal})"
          f"{stale}")
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
    # the process builds an object per inode, entry and extent and keeps them all to the
    # end: the cyclic GC would only rescan them (a third of the CPU at 1M files). Here, not
    # in fsck(): the test harness calls that in its own process.
    gc.disable()
    run_main("fsck.diofs", fsck, argv)
