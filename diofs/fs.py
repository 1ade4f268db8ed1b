"""The in-memory filesystem: inodes, directories, extents, block allocation, image data I/O,
and metadata commits. It knows nothing of FUSE, the page cache or its locks.

Concurrency: all metadata (inodes, extent maps, free space) is changed by trio tasks between
checkpoints, so each synchronous method is atomic. Image I/O goes through `_io`, which may
await a worker thread; every `await` inside a method here ends an atomic section, and the
comment next to it says what may have changed. Callers (buffered.py, dio.py) hold the inode's
locks (diofs.locks) that keep data ranges stable across those awaits.

Block allocation, reservations and delayed frees: diofs.alloc (`self.alloc`).

Commits (diofs.format.layout): `mark_changed(inode)` records the inode in `_changed`,
`free_inode` in `_dropped`, and a directory's `Entries` logs its changed names; `commit` writes
those as one journal transaction (O(what changed)), or a whole checkpoint when the journal is
full, after a failed commit, and at unmount.

Order of a data write into holes (SPEC 5, seed 003, in `write_data`):
    (1) allocate blocks as unwritten extents (they read as zeros)
    (2) write the data (and zero the rest of partially covered new blocks)
    (3) mark the extents written, then grow i_size
With `--bug size-before-data`, (3) happens before (2).
"""

from __future__ import annotations

import errno
import logging
import mmap
import stat as S
import time
from collections.abc import Callable
from typing import TypeVar

import trio

from diofs import bugs, stats
from diofs.alloc import Allocator
from diofs.backend import Backend, write_zeroes
from diofs.bugs import Bug
from diofs.errors import FsError
from diofs.format import image, journal, metadata, verify
from diofs.format import xattrs as xattr_format
from diofs.format.extents import Segment
from diofs.format.layout import CommitSlot, Superblock
from diofs.format.metadata import Entries, Inode

log = logging.getLogger(__name__)

T = TypeVar("T")
ROOT_INO = image.ROOT_INO
NAME_MAX = 255
INLINE_IO_BYTES = 1 << 20  # image I/O up to this size runs on the trio thread (see _io)


class Filesystem:
    """Attributes are protected by trio's single thread (see module docstring); `commit_lock`
    serialises commits."""

    def __init__(self, backend: Backend, loaded: image.Loaded,
                 found: verify.Survey | None = None) -> None:
        """`found`: the mount's checks of `loaded` (verify.survey), made here when None."""
        self.backend = backend
        self.sb: Superblock = loaded.sb
        self.bs = loaded.sb.block_size
        self.generation = loaded.generation
        self.inodes: metadata.InodeTable = loaded.md.inodes
        self.next_ino = loaded.md.next_ino
        found = verify.survey(loaded.md, loaded.sb) if found is None else found
        self.alloc = Allocator(self.sb.total_blocks, self.sb.data_start, found.used)
        # directory ino -> the directory naming it (".." and rename's loop check in O(depth));
        # the root and unnamed directories have none
        self.parents: dict[int, int] = found.parents
        # the journal (module docstring): the checkpoint the journal follows, where the next
        # transaction goes, what changed since the last commit
        self.checkpoint: CommitSlot | None = loaded.checkpoint
        self.journal_end = loaded.journal_end
        self._changed: dict[int, Inode] = {}
        self._dropped: set[int] = set()
        self._need_checkpoint = False
        self.meta_dirty = False
        # Bumped whenever extents or i_size change: fdatasync and O_DSYNC need a commit only
        # if this moved past what the last commit covered (timestamps alone do not count).
        self.layout_seq = 0
        self.committed_layout_seq = 0
        self.commit_lock = trio.Lock()
        # Data writes issued to the image, and how many of them the last completed flush or
        # commit covered (flush skips when nothing new was written).
        self.image_writes = 0
        self.flushed_writes = 0
        self.io_limiter = trio.CapacityLimiter(4)
        # image I/O up to this size runs inline (see _io); an NBD backend says 0
        self.inline_io_bytes: int = getattr(backend, "inline_io_bytes", INLINE_IO_BYTES)
        # Demo hook (`-o data_delay=S`): `write_data` sleeps this long between allocating
        # (and, with --bug size-before-data, publishing) and writing the data, when the range
        # has new or unwritten blocks or extends the file: a deterministic race window.
        self.data_delay = 0.0
        # `-o discard`: a commit that frees blocks trims them (backend.discard, NBD trim)
        self.discard_freed = False

    # ------------------------------------------------------------------ loading, commits
    @classmethod
    def load(cls, backend: Backend) -> Filesystem:
        """Load the newest commit and check it (verify.survey) before anything uses it. The
        checkpoint's inodes stay undecoded until first use (metadata.InodeTable)."""
        loaded = image.load(backend)
        found = verify.survey(loaded.md, loaded.sb)
        if found.problems and not bugs.enabled(Bug.TRUST_CHECKSUMS):
            raise verify.refusal(found.problems)  # ImageCorrupt, one line, exit 3
        fs = cls(backend, loaded, found)
        for ino in found.orphans:
            fs.free_inode(fs.inodes[ino])  # orphans of a crash (unlinked while open)
        return fs

    def mark_changed(self, inode: Inode, *, layout: bool = False) -> None:
        """Record that `inode` changed: it is journaled at the next commit (and re-serialised
        at the next checkpoint). `layout`: its extents or size changed (data reads depend
        on it)."""
        inode.record = None
        self._changed[inode.ino] = inode
        self.meta_dirty = True
        if layout:
            self.layout_seq += 1

    @property
    def layout_committed(self) -> bool:
        return self.committed_layout_seq >= self.layout_seq

    async def commit(self) -> None:
        """Make the current metadata durable: one journal transaction of what changed, or a
        checkpoint (module docstring; the protocol is in format/layout.py)."""
        async with self.commit_lock:
            # Atomic snapshot: blocks freed so far are free once this commit is durable;
            # blocks freed during the awaits below wait for the next one.
            freed = self.alloc.take_pending()
            changed, self._changed = self._changed, {}
            dropped, self._dropped = self._dropped, set()
            dir_changes = [
                (inode.ino, inode.entries.take_changes())
                for inode in changed.values()
                if inode.entries is not None and inode.entries.changes
            ]
            self.meta_dirty = False
            layout_seq = self.layout_seq
            generation = self.generation + 1
            writes = self.image_writes
            flush_data = writes > self.flushed_writes
            bs = self.sb.block_size
            txn: bytes | None = None
            checkpoint: metadata.Checkpoint | None = None
            if not self._need_checkpoint and self.checkpoint is not None:
                body = journal.payload(changed.values(), dir_changes, dropped)
                if self.journal_end + journal.padded_len(len(body), bs) <= self.sb.journal_bytes:
                    header = (self.sb.fs_id, self.checkpoint.generation, generation, self.next_ino)
                    txn = journal.transaction(header, body, bs)
            if txn is None:
                # O(inodes decoded since the mount) here; joining the undecoded records (slices
                # of the immutable loaded blob) and compressing run in the worker thread
                checkpoint = metadata.encode_parts(metadata.Metadata(self.next_ino, self.inodes))
            self._need_checkpoint = False
            try:
                if txn is not None:
                    await trio.to_thread.run_sync(
                        image.append_transaction, self.backend, self.sb, self.journal_end, txn,
                        flush_data,
                    )
                else:
                    assert checkpoint is not None
                    region = 0 if self.checkpoint is None else 1 - self.checkpoint.region
                    slot = await trio.to_thread.run_sync(
                        self._write_checkpoint, checkpoint, generation, region
                    )
            except BaseException:
                self.alloc.commit_failed(freed)
                # what changed before the snapshot is in no journal record now: only a
                # checkpoint covers it
                self._need_checkpoint = True
                self.meta_dirty = True
                raise
            self.generation = generation
            if txn is not None:
                self.journal_end += len(txn)
                stats.add("meta.journal_bytes", len(txn))
            else:
                self.checkpoint = slot
                self.journal_end = 0
                stats.add("meta.checkpoints")
                stats.gauge("meta.blob_bytes", slot.blob_len)
            discard = getattr(self.backend, "discard", None) if self.discard_freed else None
            if discard is not None and freed:
                # the durable commit no longer points at them and, still marked used in
                # memory, no allocation can reuse them before the discard returns
                await trio.to_thread.run_sync(self._discard, discard, freed, self.bs)
            self.flushed_writes = max(self.flushed_writes, writes)  # the commit flushed them
            self.committed_layout_seq = max(self.committed_layout_seq, layout_seq)
            self.alloc.release_committed(freed)
            stats.add("meta.commits")

    def _write_checkpoint(
        self, checkpoint: metadata.Checkpoint, generation: int, region: int
    ) -> CommitSlot:
        """Join, compress and write a checkpoint (a worker thread: zlib releases the GIL;
        nothing in `checkpoint` changes after encode_parts)."""
        blob = metadata.compress(checkpoint.join())
        return image.write_commit(self.backend, self.sb, generation, blob, region=region)

    @staticmethod
    def _discard(discard: Callable[[int, int], None], freed: list[tuple[int, int]],
                 bs: int) -> None:
        """Tell the backend (NBD trim) that freed blocks hold nothing; best effort."""
        for phys, count in freed:
            try:
                discard(phys * bs, count * bs)
            except OSError as exc:
                stats.add("errors.discard")
                log.info("discard of blocks %d+%d failed: %s", phys, count, exc)
                return
            stats.add("meta.discarded_blocks", count)

    async def flush(self) -> None:
        """fdatasync the image, unless no data write was issued since the last flush (or
        commit) that completed: the kernel's own FSYNC after a sync write the daemon already
        flushed (fuse-facts row 4) then costs nothing. Flushes never overlap (durability)."""
        writes = self.image_writes
        if writes == self.flushed_writes:
            stats.add("durability.flushes_skipped")
            return
        await trio.to_thread.run_sync(self.backend.flush, limiter=self.io_limiter)
        self.flushed_writes = max(self.flushed_writes, writes)

    async def _write_image(self, off: int, data: bytes | bytearray | memoryview) -> None:
        await self._io(self.backend.write, off, data, nbytes=len(data))
        # counted once the write returned: a flush covers only writes that returned before
        # it started (backend contract), so a flush snapshot must not include one in flight
        self.image_writes += 1

    # ------------------------------------------------------------------ namespace
    def get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def get_dir(self, ino: int) -> Inode:
        inode = self.get(ino)
        if inode.entries is None:
            raise FsError(errno.ENOTDIR)
        return inode

    def lookup(self, parent: int, name: bytes) -> Inode:
        d = self.get_dir(parent)
        if name == b".":
            return d
        if name == b"..":
            return self.get(self._parent_of(d))
        try:
            return self.inodes[d.children[name]]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def _parent_of(self, d: Inode) -> int:
        return self.parents.get(d.ino, ROOT_INO)

    def _check_new_name(self, d: Inode, name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if name in (b".", b"..") or b"/" in name or not name:
            raise FsError(errno.EINVAL)
        if name in d.children:
            raise FsError(errno.EEXIST)

    def make_inode(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
        target: bytes = b"",
    ) -> Inode:
        d = self.get_dir(parent)
        self._check_new_name(d, name)
        now = time.time_ns()
        inode = Inode(
            self.next_ino, mode, uid, gid, nlink=1, atime_ns=now, mtime_ns=now, ctime_ns=now,
            rdev=rdev, target=target,
        )
        if S.S_ISDIR(mode):
            inode.entries = Entries()
            inode.nlink = 2
            d.nlink += 1
            self.parents[inode.ino] = d.ino
        if S.S_ISLNK(mode):
            inode.size = len(target)
        self.next_ino += 1
        self.inodes[inode.ino] = inode
        d.children[name] = inode.ino
        d.mtime_ns = d.ctime_ns = now
        self.mark_changed(d)
        self.mark_changed(inode)
        return inode

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EPERM)
        d = self.get_dir(parent)
        self._check_new_name(d, name)
        d.children[name] = ino
        inode.nlink += 1
        d.mtime_ns = d.ctime_ns = inode.ctime_ns = time.time_ns()
        self.mark_changed(d)
        self.mark_changed(inode)
        return inode

    def unlink(self, parent: int, name: bytes, *, want_dir: bool) -> Inode:
        d = self.get_dir(parent)
        inode = self.lookup(parent, name)
        if name in (b".", b".."):
            raise FsError(errno.EINVAL)
        if want_dir:
            if not inode.is_dir:
                raise FsError(errno.ENOTDIR)
            if inode.entries:
                raise FsError(errno.ENOTEMPTY)
        elif inode.is_dir:
            raise FsError(errno.EISDIR)
        del d.children[name]
        now = time.time_ns()
        d.mtime_ns = d.ctime_ns = inode.ctime_ns = now
        if inode.is_dir:
            d.nlink -= 1
            inode.nlink = 0
        else:
            inode.nlink -= 1
        self.mark_changed(d)
        self.mark_changed(inode)
        return inode

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """True if directory `ancestor` is `ino` or contains it (for rename loops)."""
        seen = ino
        while True:
            if seen == ancestor:
                return True
            if seen == ROOT_INO:
                return False
            seen = self.parents.get(seen, ROOT_INO)  # no decode of the directories above

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
        *, noreplace: bool = False, exchange: bool = False,
    ) -> Inode | None:
        """Returns the inode replaced (and maybe freed) at the destination, if any."""
        od, nd = self.get_dir(old_parent), self.get_dir(new_parent)
        src = self.lookup(old_parent, old_name)
        if len(new_name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        dst_ino = nd.children.get(new_name)
        dst = self.inodes[dst_ino] if dst_ino is not None else None
        if src.is_dir and self._is_ancestor(src.ino, nd.ino):
            raise FsError(errno.EINVAL)
        now = time.time_ns()
        if exchange:
            if dst is None:
                raise FsError(errno.ENOENT)
            if dst.is_dir and self._is_ancestor(dst.ino, od.ino):
                raise FsError(errno.EINVAL)
            od.children[old_name], nd.children[new_name] = dst.ino, src.ino
            for moved, to in ((dst, od), (src, nd)):
                if moved.is_dir:
                    self.parents[moved.ino] = to.ino
            if src.is_dir != dst.is_dir and od is not nd:
                delta = 1 if src.is_dir else -1
                od.nlink -= delta
                nd.nlink += delta
            for n in (od, nd, src, dst):
                n.ctime_ns = now
                self.mark_changed(n)
            od.mtime_ns = nd.mtime_ns = now
            return None
        if dst is not None:
            if noreplace:
                raise FsError(errno.EEXIST)
            if dst is src:
                return None
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if dst.is_dir and not src.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir and dst.entries:
                raise FsError(errno.ENOTEMPTY)
        del od.children[old_name]
        nd.children[new_name] = src.ino
        if dst is not None:
            if dst.is_dir:
                dst.nlink = 0
                nd.nlink -= 1
            else:
                dst.nlink -= 1
            dst.ctime_ns = now
            self.mark_changed(dst)
        if src.is_dir:
            self.parents[src.ino] = nd.ino
        if src.is_dir and od is not nd:
            od.nlink -= 1
            nd.nlink += 1
        od.mtime_ns = od.ctime_ns = nd.mtime_ns = nd.ctime_ns = src.ctime_ns = now
        for n in (od, nd, src):
            self.mark_changed(n)
        return dst

    # ------------------------------------------------------------------ extended attributes
    # Linux's rules (fs/xattr.c xattr_permission, the ext4 namespace handlers); the kernel
    # checks most of them before the request reaches us (name length, value size, user.* on
    # special files, trusted.* without CAP_SYS_ADMIN): repeated here so that the daemon's
    # answer never depends on it. Limits and the on-image encoding: diofs.format.xattrs.
    # Privilege is uid 0 (CAP_SYS_ADMIN is not visible to a FUSE daemon).
    def _xattr_check(
        self, inode: Inode, name: bytes, uid: int, *, write: bool, remove: bool = False
    ) -> None:
        if not name or len(name) > xattr_format.NAME_MAX:
            raise FsError(errno.ERANGE)
        prefix = xattr_format.namespace(name)
        if prefix is None:  # system.* (POSIX ACLs: not supported) and unknown namespaces
            raise FsError(errno.EOPNOTSUPP)
        if len(name) == len(prefix) or b"\0" in name:
            raise FsError(errno.EINVAL)
        denied = errno.EPERM if write else errno.ENODATA
        if prefix == xattr_format.USER and not (inode.is_reg or inode.is_dir):
            raise FsError(denied)
        if prefix == xattr_format.TRUSTED and uid != 0:
            raise FsError(denied)
        # removal is not checked: without KILLPRIV_V2 the kernel itself removes
        # security.capability on a non-root write (REMOVEXATTR with the writer's uid); a
        # user's removexattr is checked by the kernel first (cap_inode_removexattr)
        if prefix == xattr_format.SECURITY and write and not remove and uid != 0:
            raise FsError(errno.EPERM)

    def getxattr(self, inode: Inode, name: bytes, uid: int) -> bytes:
        self._xattr_check(inode, name, uid, write=False)
        value = inode.xattrs.get(name) if inode.xattrs else None
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def listxattr(self, inode: Inode, uid: int) -> list[bytes]:
        """Names of `inode`'s xattrs; trusted.* only for root (as ext4)."""
        if not inode.xattrs:
            return []
        return [
            n for n in inode.xattrs if uid == 0 or not n.startswith(xattr_format.TRUSTED)
        ]

    def setxattr(self, inode: Inode, name: bytes, value: bytes, uid: int) -> None:
        """Create or replace (pyfuse3 checks XATTR_CREATE / XATTR_REPLACE with getxattr
        first, in the same atomic section: neither call awaits)."""
        self._xattr_check(inode, name, uid, write=True)
        if len(value) > xattr_format.VALUE_MAX:
            raise FsError(errno.E2BIG)
        xattrs = inode.xattrs or {}
        old = xattrs.get(name)
        used = xattr_format.total_bytes(xattrs) - (len(name) + len(old) if old is not None else 0)
        if used + len(name) + len(value) > xattr_format.INODE_MAX:
            raise FsError(errno.ENOSPC)
        xattrs[name] = bytes(value)
        self._xattrs_changed(inode, xattrs)

    def removexattr(self, inode: Inode, name: bytes, uid: int) -> None:
        self._xattr_check(inode, name, uid, write=True, remove=True)
        if not inode.xattrs or name not in inode.xattrs:
            raise FsError(errno.ENODATA)
        del inode.xattrs[name]
        self._xattrs_changed(inode, inode.xattrs)

    def _xattrs_changed(self, inode: Inode, xattrs: dict[bytes, bytes]) -> None:
        inode.xattrs = xattrs or None
        inode.xattr_record = None
        inode.ctime_ns = time.time_ns()
        self.mark_changed(inode)

    def kill_privs(self, inode: Inode, *, suidgid: bool) -> None:
        """A write or truncate changes the file: what the kernel's file_remove_privs does
        when it leaves this to the daemon (FUSE_HANDLE_KILLPRIV_V2). `suidgid` (the request
        asked for it; the caller lacks CAP_FSETID): clear S_ISUID, and S_ISGID when S_IXGRP
        is set (should_remove_suid). security.capability goes in any case, as the kernel
        removes it for every writer (security_inode_killpriv). Unlike the kernel's
        setattr_should_drop_sgid, an S_ISGID without S_IXGRP stays also for a writer outside
        the file's group: a WRITE does not say who wrote it."""
        kill = (S.S_ISUID | (S.S_ISGID if inode.mode & S.S_IXGRP else 0)) if suidgid else 0
        killed = inode.mode & kill
        xattrs = inode.xattrs
        capability = xattrs is not None and xattr_format.CAPABILITY in xattrs
        if not (killed or capability):
            return
        inode.mode &= ~kill
        stats.add("xattr.privs_killed")
        if xattrs is not None and capability:
            del xattrs[xattr_format.CAPABILITY]
            self._xattrs_changed(inode, xattrs)  # ctime and dirty with it
        else:
            inode.ctime_ns = time.time_ns()
            self.mark_changed(inode)

    def free_inode(self, inode: Inode) -> None:
        self.unreserve(inode.ino, 0, 1 << 62)
        self._free_runs(inode.extents.remove(0, inode.extents.end_block()))
        self.inodes.pop(inode.ino, None)
        self.parents.pop(inode.ino, None)
        self._changed.pop(inode.ino, None)
        self._dropped.add(inode.ino)
        self.meta_dirty = True
        self.layout_seq += 1

    def _free_runs(self, runs: list[tuple[int, int]]) -> None:
        if runs:
            self.alloc.free_later(runs)
            self.meta_dirty = True

    # ------------------------------------------------------------------ allocation
    # (diofs.alloc; these keep the names the I/O paths call)
    @property
    def free_blocks(self) -> int:
        return self.alloc.free_blocks

    @property
    def available_blocks(self) -> int:
        return self.alloc.available_blocks

    @property
    def pending_free(self) -> list[tuple[int, int]]:
        return self.alloc.pending_free

    @property
    def reserved(self) -> dict[int, set[int]]:
        return self.alloc.reserved

    def reserve(self, inode: Inode, fblock: int) -> None:
        """Reserve a block for a dirty cached page over a hole (delayed allocation)."""
        if inode.extents.lookup(fblock, 1)[0].phys is not None:
            return
        self.alloc.reserve(inode.ino, fblock)

    def unreserve(self, ino: int, first: int, count: int) -> int:
        """Release reservations of file blocks [first, first + count); returns how many."""
        return self.alloc.unreserve(ino, first, count)

    def allocate(self, count: int, goal: int | None = None) -> list[tuple[int, int]]:
        """`count` blocks as runs (phys, n), next-fit from `goal`. Raises ENOSPC."""
        return self.alloc.allocate(count, goal)

    def map_for_write(self, inode: Inode, first: int, nblocks: int) -> list[Segment]:
        """Allocate holes in [first, first + nblocks) as unwritten extents; return the
        segments of the range (all mapped now)."""
        if inode.ino in self.reserved:
            self.unreserve(inode.ino, first, nblocks)
        segs = inode.extents.lookup(first, nblocks)
        if all(seg.phys is not None for seg in segs):
            return segs  # overwrite of mapped blocks: the common direct-I/O case
        for seg in segs:
            if seg.phys is not None:
                continue
            goal = self._goal(inode, seg.start)
            fblock = seg.start
            for phys, n in self.allocate(seg.count, goal):
                inode.extents.insert(fblock, phys, n, unwritten=True)
                fblock += n
            self.mark_changed(inode, layout=True)
        return inode.extents.lookup(first, nblocks)

    def _goal(self, inode: Inode, fblock: int) -> int | None:
        prev = inode.extents.lookup(max(0, fblock - 1), 1)[0] if fblock else None
        return prev.phys + 1 if prev is not None and prev.phys is not None else None

    # ------------------------------------------------------------------ image data I/O
    async def _io(self, fn: Callable[..., T], *args: object, nbytes: int) -> T:
        """Run blocking image I/O. Small transfers run inline on the trio thread: a thread
        hop costs more than a 4 KiB pread from the host page cache (measured: see
        docs/design.md); large ones and flushes go to a worker thread."""
        if nbytes <= self.inline_io_bytes:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self.io_limiter)

    async def read_data(
        self, inode: Inode, off: int, size: int, into: bytearray | mmap.mmap | None = None
    ) -> memoryview:
        """Bytes [off, off + size) clipped to i_size; holes and unwritten blocks read as
        zeros. `into` (at least `size` bytes) is reused instead of a new buffer (the direct-I/O
        context). The caller keeps the range's blocks from being freed across the awaits."""
        inline = self.read_data_inline(inode, off, size, into)
        if inline is not None:
            return inline
        view, reads = self._read_plan(inode, off, size, into)
        for img, part in reads:
            await self._io(self.backend.readinto, img, part, nbytes=len(part))
        return view

    def read_data_inline(
        self, inode: Inode, off: int, size: int, into: bytearray | mmap.mmap | None = None
    ) -> memoryview | None:
        """read_data without an await, or None: every image read of the range runs inline
        (`_io`) anyway when `size` is at most `inline_io_bytes`, so this is read_data for
        those sizes (ops.read_sync takes it without a coroutine)."""
        if size > self.inline_io_bytes:
            return None
        view, reads = self._read_plan(inode, off, size, into)
        for img, part in reads:
            self.backend.readinto(img, part)
        return view

    def _read_plan(
        self, inode: Inode, off: int, size: int, into: bytearray | mmap.mmap | None
    ) -> tuple[memoryview, list[tuple[int, memoryview]]]:
        """The buffer of a read_data and the image reads that fill it, as (image offset, part
        of the buffer). Holes and unwritten blocks need no read: zeroed here in a reused
        buffer, already zero in a new one."""
        end = min(off + size, inode.size)
        if end <= off:
            return memoryview(b""), []
        bs = self.bs
        first = off // bs
        nblocks = (end - 1) // bs - first + 1
        view = memoryview(bytearray(end - off) if into is None else into)[: end - off]
        phys = inode.extents.written_phys(first, nblocks)
        if phys is not None:  # one written extent (most direct reads): no segment list
            return view, [(phys * bs + (off - first * bs), view)]
        reads = []
        for seg in inode.extents.lookup(first, nblocks):
            s = max(off, seg.start * bs)
            e = min(end, (seg.start + seg.count) * bs)
            if seg.readable:
                reads.append((seg.block * bs + (s - seg.start * bs), view[s - off : e - off]))
            elif into is not None:
                view[s - off : e - off] = bytes(e - s)
        return view, reads

    async def write_data(
        self, inode: Inode, off: int, data: bytes | memoryview, *, touch: bool = True
    ) -> None:
        """Write `data` at `off`: allocate, write, then publish (module docstring). Partially
        covered new blocks get zeros around the data. The caller holds the locks that make
        this safe (dio.py: sub-block or extending writes run exclusively)."""
        size = len(data)
        if size == 0:
            return
        bs = self.bs
        end = off + size
        first = off // bs
        nblocks = (end - 1) // bs - first + 1
        segs = await self.retry_on_enospc(lambda: self.map_for_write(inode, first, nblocks))
        convert = any(s.unwritten for s in segs)
        delay = self.data_delay and (end > inode.size or convert)
        if bugs.enabled(Bug.SIZE_BEFORE_DATA):
            self._publish(inode, first, nblocks, end, touch, convert)
        if delay:
            await trio.sleep(self.data_delay)  # demo hook (see __init__)
        src = memoryview(data)
        for seg in segs:
            seg_start, seg_end = seg.start * bs, (seg.start + seg.count) * bs
            s, e = max(off, seg_start), min(end, seg_end)
            img = seg.block * bs
            if seg.unwritten and (s % bs or e % bs):
                # zero-fill the whole new blocks around the data (never expose old bytes)
                bs_s, bs_e = s // bs * bs, -(-e // bs) * bs
                buf = bytearray(bs_e - bs_s)
                buf[s - bs_s : e - bs_s] = src[s - off : e - off]
                await self._write_image(img + (bs_s - seg_start), buf)
            else:
                await self._write_image(img + (s - seg_start), src[s - off : e - off])
        # awaits above: other tasks may have read (zeros) or written other ranges
        self._publish(inode, first, nblocks, end, touch, convert)

    def overwrite_inline(
        self, inode: Inode, off: int, data: bytes | memoryview, *, durable: bool = False
    ) -> bool:
        """write_data's fast path, or False: a block-aligned overwrite of at most
        `inline_io_bytes` inside i_size, all in one written extent, is one synchronous image
        write and an mtime update. Nothing to allocate, convert or grow, and no await, so
        whatever the caller checked before still holds after (dio.py: the fast path).
        `durable`: the image write is durable on return (backend.write_durable)."""
        phys = self.inline_overwrite_block(inode, off, len(data))
        if phys is None:
            return False
        self.overwrite_at(inode, phys, off, data, durable=durable)
        return True

    def inline_overwrite_block(self, inode: Inode, off: int, size: int) -> int | None:
        """The first image block of an overwrite of [off, off + size) that
        `overwrite_inline` would do, or None when it would return False (checks only)."""
        bs = self.bs
        end = off + size
        if (
            size > self.inline_io_bytes or off % bs or end % bs or end > inode.size
            or self.data_delay or inode.ino in self.reserved
        ):
            return None
        return inode.extents.written_phys(off // bs, size // bs)

    def overwrite_at(
        self, inode: Inode, phys: int, off: int, data: bytes | memoryview, *, durable: bool
    ) -> None:
        """The write of `overwrite_inline`, at the block `inline_overwrite_block` found."""
        bs = self.bs
        size = len(data)
        end = off + size
        if durable:
            self.backend.write_durable(phys * bs, data)
        else:
            self.backend.write(phys * bs, data)
        self.image_writes += 1  # after the write returned (see _write_image)
        self._publish(inode, off // bs, size // bs, end, touch=True, convert=False)

    def touch_overwrite(self, inode: Inode) -> None:
        """What `overwrite_at` publishes besides the data, for an overwrite whose image write
        another thread does (durable_pool.py): the mtime (no extent or size changes)."""
        inode.mtime_ns = inode.ctime_ns = time.time_ns()
        self.mark_changed(inode)

    def _publish(
        self, inode: Inode, first: int, nblocks: int, end: int, touch: bool, convert: bool
    ) -> None:
        """Step (3): extents written, then i_size (seed 003: i_size only after the I/O)."""
        converted = inode.extents.set_written(first, nblocks) if convert else 0
        if converted:
            stats.add("extents.converted_blocks", converted)
        grew = end > inode.size
        if grew:
            inode.size = end
        if touch:  # writeback of buffered data keeps the mtime of the write() itself
            inode.mtime_ns = inode.ctime_ns = time.time_ns()
        self.mark_changed(inode, layout=bool(converted) or grew)

    # ------------------------------------------------------------------ size and ranges
    async def truncate(self, inode: Inode, size: int) -> None:
        """Set i_size. Shrinking frees whole blocks past the end and zeroes the tail of the
        last block on the image, so a later extension reads zeros there."""
        bs = self.bs
        if size < inode.size:
            keep = -(-size // bs)
            self.unreserve(inode.ino, keep, 1 << 62)
            self._free_runs(inode.extents.remove(keep, max(0, inode.extents.end_block() - keep)))
            if size % bs:
                await self.zero_range_on_image(inode, size, keep * bs)
        inode.size = size
        inode.mtime_ns = inode.ctime_ns = time.time_ns()
        self.mark_changed(inode, layout=True)

    async def zero_range_on_image(self, inode: Inode, start: int, end: int) -> None:
        """Write zeros over the written blocks of [start, end) (for partial blocks):
        NBD_CMD_WRITE_ZEROES where the backend offers it (backend.write_zeroes)."""
        bs = self.bs
        if end <= start:
            return
        for seg in inode.extents.lookup(start // bs, (end - 1) // bs - start // bs + 1):
            if not seg.readable:
                continue
            s, e = max(start, seg.start * bs), min(end, (seg.start + seg.count) * bs)
            img = seg.block * bs + (s - seg.start * bs)
            await self._io(write_zeroes, self.backend, img, e - s, nbytes=e - s)
            self.image_writes += 1  # after the write returned (see _write_image)

    async def punch(self, inode: Inode, start: int, end: int) -> None:
        """Deallocate whole blocks of [start, end), zero the partial ones."""
        bs = self.bs
        first, last = -(-start // bs), end // bs
        if first < last:
            self.unreserve(inode.ino, first, last - first)
            self._free_runs(inode.extents.remove(first, last - first))
        if start % bs:
            await self.zero_range_on_image(inode, start, min(end, first * bs))
        if end % bs and not (start % bs and end <= first * bs):  # inside one block: done above
            await self.zero_range_on_image(inode, max(start, last * bs), end)
        inode.ctime_ns = inode.mtime_ns = time.time_ns()
        self.mark_changed(inode, layout=True)

    def preallocate(self, inode: Inode, start: int, end: int) -> None:
        """fallocate mode 0 / KEEP_SIZE: allocate holes of [start, end) as unwritten."""
        bs = self.bs
        self.map_for_write(inode, start // bs, (end - 1) // bs - start // bs + 1)
        inode.ctime_ns = time.time_ns()
        self.mark_changed(inode)

    # ------------------------------------------------------------------ attributes
    def blocks_512(self, inode: Inode) -> int:
        """st_blocks: mapped blocks (written or unwritten) plus the blocks reserved for
        dirty cached pages over holes (delayed allocation), as ext4 counts its reserved
        blocks: `du` right after a buffered write agrees with `du` after writeback or a
        remount. The two sets are disjoint (`reserve` skips mapped blocks; mapping a block
        drops its reservation in the same step), so the sum never changes at writeback."""
        reserved = self.reserved.get(inode.ino)
        n = inode.extents.mapped_blocks() + (len(reserved) if reserved else 0)
        return n * (self.bs // 512)

    def statfs_counts(self) -> tuple[int, int, int]:
        """(data blocks, free blocks, inodes in use). Free counts blocks waiting for the
        next commit (pending_free) and excludes reservations."""
        pending = self.alloc.pending_blocks
        return self.sb.data_blocks, self.available_blocks + pending, len(self.inodes)

    async def retry_on_enospc(self, fn: Callable[[], T]) -> T:
        """Run `fn`; on ENOSPC with freed blocks waiting for a commit, commit and retry once
        (the way ext4 forces a journal commit before giving up)."""
        try:
            return fn()
        except FsError as exc:
            if exc.errno != errno.ENOSPC or not self.pending_free:
                raise
        await self.commit()
        return fn()

    def unmount_cleanup(self) -> None:
        """Before the final commit: free the orphans; that commit is a checkpoint, so the next
        mount replays no journal."""
        # undecoded records have nlink > 0: the mount freed the orphans it loaded
        for inode in [n for n in self.inodes.decoded() if n.nlink == 0]:
            self.free_inode(inode)
        self._need_checkpoint = True

