"""The pyfuse3 Operations: translate FUSE requests into diofs calls. The only module that
raises pyfuse3.FUSEError.

Every handler is wrapped by `_fuse_handler`: diofs errors become their errno, OSError from the
image keeps its errno, anything else is logged once with its traceback, answered with EIO, and
switches the mount to failsafe (later writes fail with EIO, the image is flagged for fsck in
the log) — pyfuse3 itself would end its main loop on any exception that is not FUSEError.
`_fuse_handler` also keeps the table of outstanding requests that diofs.hang_detector scans.

Kernel caching of names and attributes (entry and attribute timeouts, `-o entry_timeout=S,
attr_timeout=S`, default an hour): the kernel may trust a dentry and an inode's attributes
that long without asking. That is safe because diofs is the only writer of its image (the
image lock) and changes attributes only while answering a request that the kernel updates
or invalidates its copy after: replies to SETATTR, CREATE, MKDIR, LINK carry the new
attributes; WRITE, FALLOCATE, an O_TRUNC OPEN, RENAME, UNLINK and a directory change make
the kernel drop the affected attributes; st_blocks does not move at writeback (fs.blocks_512)
and atime is only set by SETATTR. Nothing else changes an attribute. With a 1 s timeout
(libfuse's default) `git add -A` and `rm -rf` of a tree copied seconds earlier looked every
name up again. A missing name is answered as a negative entry with the same timeout (a name
cannot appear but through the kernel), so a second look-up of it (git: "is this object
there?", then link() to that name) stays in the kernel. Figures: docs/bench.md, "Tree copy".
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import stat as S
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

from diofs import bugs, hang_detector, request, stats
from diofs.buffered import Buffered
from diofs.bugs import Bug
from diofs.dio import Direct
from diofs.errors import FsError
from diofs.format.metadata import Inode
from diofs.handles import Handle, HandleTable
from diofs.iocontext import IoContext

log = logging.getLogger(__name__)

# Extended attributes (diofs.fs, diofs/format/xattrs.py). Answering getxattr at all makes
# the kernel ask for security.capability before every WRITE (file_remove_privs; measured:
# 6013 GETXATTR for 6011 WRITEs, fuse-facts-more row 10) unless the mount has SB_NOSEC, which
# the kernel sets when the INIT reply carries FUSE_HANDLE_KILLPRIV_V2. libfuse 3.14 cannot
# negotiate it; the patched binding adds it (`enable_handle_killpriv_v2` below),
# and diofs then kills suid/sgid itself where the request asks (request.KILL_SUIDGID:
# `write`, `setattr`, `open` with O_TRUNC; fs.kill_privs). `-o xattr=off` answers ENOSYS to
# the four xattr requests, so the kernel stops sending them (and setfattr gets EOPNOTSUPP).
# The counters are read from a virtual file at the root (`diofs stats MNT`), not an xattr.
STATS_NAME = b".diofs-stats"
STATS_INO = 1 << 62
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
SyncF = TypeVar("SyncF", bound=Callable[..., Any])


def _fuse_error(self: Operations, exc: Exception, name: str) -> pyfuse3.FUSEError:
    """The answer to a handler's exception other than FUSEError (module docstring): a diofs
    error's errno, an image OSError's errno, else EIO with the traceback logged once and the
    mount switched to failsafe. Call it from the `except` clause (log.exception)."""
    if isinstance(exc, FsError):
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    if isinstance(exc, OSError):
        if exc.errno is None:
            return pyfuse3.FUSEError(errno.EIO)
        stats.add("errors.io")
        return pyfuse3.FUSEError(exc.errno)
    if not self.failsafe:
        log.exception("unexpected error in %s; mount is failsafe, run fsck", name)
        self.io.native.disarm_all()  # the binding's native writes would not see it
    self.failsafe = True
    stats.add("errors.internal")
    return pyfuse3.FUSEError(errno.EIO)


def _fuse_handler(fn: F) -> F:
    counter = f"ops.{fn.__name__}"
    # the hung-request detector's table (diofs/hang_detector.py): one insert and one delete per
    # request; the binding's (tid, flags) only exists for the data requests
    outstanding, next_key = hang_detector.OUTSTANDING, hang_detector.next_key
    monotonic = time.monotonic
    binding = pyfuse3.request_context if fn.__name__ in hang_detector.BINDING_TID_OPS else None

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any, **kwargs: Any) -> Any:
        stats.add(counter)
        key = next_key()
        try:
            coro = fn(self, *args, **kwargs)
            outstanding[key] = (
                monotonic(), fn, coro, self, args, kwargs, binding.get() if binding else None
            )
            return await coro
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise _fuse_error(self, exc, fn.__name__) from None
        finally:
            outstanding.pop(key, None)
            if not outstanding:
                self.io.kernel.daemon_idle()

    return wrapper  # type: ignore[return-value]


def _sync_handler(handler: Callable[..., Any]) -> Callable[[SyncF], SyncF]:
    """The boundary of a synchronous fast path that the binding tries before `handler`, the
    `_fuse_handler`-wrapped coroutine of the same request (pyfuse3's sync dispatch:
    `Operations.read_sync` / `write_sync`, patches/pyfuse3/0011-sync-dispatch.patch). The
    method returns the answer, or None having changed nothing: the binding then calls
    `handler`, which counts and handles the request as always. An answer or an exception is
    treated as `_fuse_handler` treats them (counter, errno mapping, failsafe, the hang
    detector's table under `handler`'s name, daemon_idle)."""
    raw = handler.__wrapped__  # type: ignore[attr-defined]  # functools.wraps
    counter = f"ops.{raw.__name__}"
    outstanding, next_key = hang_detector.OUTSTANDING, hang_detector.next_key
    monotonic = time.monotonic
    binding = pyfuse3.request_context

    def decorate(fn: SyncF) -> SyncF:
        @functools.wraps(fn)
        def wrapper(self: Operations, *args: Any) -> Any:
            key = next_key()
            outstanding[key] = (monotonic(), raw, None, self, args, {}, binding.get())
            try:
                result = fn(self, *args)
            except BaseException as exc:
                stats.add(counter)
                outstanding.pop(key, None)
                if not outstanding:
                    self.io.kernel.daemon_idle()
                if isinstance(exc, pyfuse3.FUSEError) or not isinstance(exc, Exception):
                    raise
                raise _fuse_error(self, exc, counter) from None
            outstanding.pop(key, None)
            if result is None:  # to `handler`, which enters the table again at once
                return None
            stats.add(counter)
            if not outstanding:
                self.io.kernel.daemon_idle()
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


class Operations(pyfuse3.Operations):
    """The diofs request handlers.

    The `enable_*` attributes and `checkpoint_interval` are the binding's init-time switches
    (pyfuse3 reads them in `fuse_init`, `init` or `main`; patches/pyfuse3/). The class values
    are diofs' choices; `__init__` sets the two that mount options and `--bug` switches decide
    on the instance, which is what pyfuse3 reads.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False  # per-task reasoning needs synchronous WRITEs (fuse-facts 6b)
    enable_acl = False
    # diofs is the only writer of its image: drop the kernel's whole-file invalidation on
    # mtime change, which loses data under threaded mmap + O_DIRECT (fuse-facts row 9); diofs
    # invalidates explicitly (request.invalidate_kernel_range)
    enable_auto_inval_data = False
    # read the next queued request at once instead of after an epoll round trip
    enable_eager_receive = True
    # and pass a trio checkpoint only before every 8th request: a handler that answered
    # without suspending let nobody run, and one that suspends yields anyway. 4 KiB direct
    # QD16, daemon CPU per request: read 24.8 -> 19.8 us, write 39.6 -> 26.2 us (docs/bench.md,
    # "Per-request CPU")
    checkpoint_interval = 8
    # and, finding none queued, keep reading for up to this many microseconds (without the
    # GIL, yielding the CPU) before sleeping in trio: a cp -a whose requests come one at a
    # time from another CPU took 6.4 s instead of 4.3-4.7 s, daemon CPU 5.2 s instead of 4.2-4.6
    # (docs/bench.md, "Tree copy, runs H-N"); `-o receive_spin=US` (__init__)
    receive_spin_us = 50.0
    # WRITE data as a view of the request buffer, not a copy: every write path copies what it
    # keeps (cache pages) or writes it to the image before the handler returns
    enable_write_views = True
    # SB_NOSEC: no GETXATTR(security.capability) before every WRITE; diofs kills suid/sgid
    # itself where the requests ask (top comment). Off with `--bug no-killpriv-v2` (__init__).
    enable_handle_killpriv_v2 = True
    # FUSE_CAP_ASYNC_DIO: `-o async_dio=` (__init__); see cli/mount.py
    enable_async_dio = True

    def __init__(
        self, io: IoContext, buffered: Buffered, direct: Direct, *,
        entry_timeout: float, attr_timeout: float, xattrs: bool = True, async_dio: bool = True,
        sync_dispatch: bool = True, receive_spin_us: float = 50.0,
    ):
        super().__init__()
        self.receive_spin_us = receive_spin_us
        self.enable_async_dio = async_dio
        self.enable_handle_killpriv_v2 = not bugs.enabled(Bug.NO_KILLPRIV_V2)
        if not sync_dispatch:  # -o sync_dispatch=off: the binding sees no synchronous handler
            self.read_sync = self.write_sync = None  # type: ignore[method-assign,assignment]
        self.xattrs = xattrs
        self.entry_timeout = entry_timeout  # seconds; see the module docstring
        self.attr_timeout = attr_timeout
        self.io = io
        self.fs = io.fs  # the namespace, which most handlers work on
        self.buffered = buffered
        self.direct = direct
        self.handles = HandleTable()
        self.stats_reads: dict[int, bytes] = {}  # fh -> JSON snapshot of an open stats file
        self.failsafe = False

    # ------------------------------------------------------------------ helpers
    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = inode.mode
        a.st_nlink = inode.nlink
        a.st_uid = inode.uid
        a.st_gid = inode.gid
        a.st_rdev = inode.rdev
        a.st_size = inode.size
        a.st_blksize = self.fs.bs
        a.st_blocks = self.fs.blocks_512(inode)
        a.st_atime_ns = inode.atime_ns
        a.st_mtime_ns = inode.mtime_ns
        a.st_ctime_ns = inode.ctime_ns
        return a

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        self.io.inodes.get(inode.ino).lookups += 1
        return self._attrs(inode)

    def _check_writable(self) -> None:
        if self.failsafe:
            raise FsError(errno.EIO)

    # ------------------------------------------------------------------ namespace
    @_fuse_handler
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext | None = None
    ) -> EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == STATS_NAME:
            return self._stats_attrs()
        try:
            node = self.fs.lookup(parent_inode, name)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # a negative entry: the kernel caches the absence (module docstring) and creates
            # the name on this same dentry when it is made; no inode, so no lookup count
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = self.entry_timeout
            return a
        return self._entry(node)

    def _stats_attrs(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = STATS_INO
        a.st_mode = S.S_IFREG | 0o444
        a.st_nlink = 1
        a.st_blksize = self.fs.bs
        return a

    @_fuse_handler
    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, nlookup in inode_list:
            inode = self.fs.inodes.get(ino)
            if inode is not None:
                incore = self.io.inodes.get(ino)
                incore.lookups = max(0, incore.lookups - nlookup)
                self.io.inodes.evict_if_unused(inode)

    @_fuse_handler
    async def getattr(self, inode: InodeT, ctx: RequestContext | None = None) -> EntryAttributes:
        if inode == STATS_INO:
            return self._stats_attrs()
        self._native_writes_seen()
        return self._attrs(self.fs.get(inode))

    @_fuse_handler
    async def setattr(
        self, inode: InodeT, attr: EntryAttributes, fields: SetattrFields,
        fh: FileHandleT | None, ctx: RequestContext,
    ) -> EntryAttributes:
        self._native_writes_seen()  # before an mtime the caller sets
        node = self.fs.get(inode)
        now = time.time_ns()
        kill = request.current().kill_suidgid  # truncate or chown (KILLPRIV_V2)
        if fields.update_size:
            self._check_writable()
            if node.is_dir:
                raise FsError(errno.EISDIR)
            self.fs.kill_privs(node, suidgid=kill)
            await self.direct.truncate(node, attr.st_size)
        elif kill:
            self.fs.kill_privs(node, suidgid=True)
        if fields.update_mode:
            node.mode = (node.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = now
        self.fs.mark_changed(node)
        return self._attrs(node)

    @_fuse_handler
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        node = self.fs.get(inode)
        if not S.S_ISLNK(node.mode):
            raise FsError(errno.EINVAL)
        return node.target

    @_fuse_handler
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        self._check_writable()
        return self._entry(self.fs.make_inode(parent_inode, name, mode, ctx.uid, ctx.gid, rdev))

    @_fuse_handler
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        self._check_writable()
        node = self.fs.make_inode(parent_inode, name, S.S_IFDIR | (mode & 0o7777), ctx.uid, ctx.gid)
        return self._entry(node)

    @_fuse_handler
    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        self._check_writable()
        node = self.fs.make_inode(
            parent_inode, name, S.S_IFLNK | 0o777, ctx.uid, ctx.gid, target=target
        )
        return self._entry(node)

    @_fuse_handler
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        self._check_writable()
        return self._entry(self.fs.link(inode, new_parent_inode, new_name))

    @_fuse_handler
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self._check_writable()
        self.io.inodes.evict_if_unused(self.fs.unlink(parent_inode, name, want_dir=False))

    @_fuse_handler
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self._check_writable()
        self.io.inodes.evict_if_unused(self.fs.unlink(parent_inode, name, want_dir=True))

    @_fuse_handler
    async def rename(
        self, parent_inode_old: InodeT, name_old: FileNameT, parent_inode_new: InodeT,
        name_new: FileNameT, flags: FlagT, ctx: RequestContext,
    ) -> None:
        self._check_writable()
        if flags & ~(pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE):
            raise FsError(errno.EINVAL)
        replaced = self.fs.rename(
            parent_inode_old, name_old, parent_inode_new, name_new,
            noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
            exchange=bool(flags & pyfuse3.RENAME_EXCHANGE),
        )
        if replaced is not None:
            self.io.inodes.evict_if_unused(replaced)

    # ------------------------------------------------------------------ directories
    @_fuse_handler
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        self.fs.get_dir(inode)
        return inode

    @_fuse_handler
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        d = self.fs.get_dir(fh)
        # Cookies are the entries' own (format/metadata.py, Entries.listing): a page costs
        # O(log n + page), and a name present for the whole listing is listed exactly once.
        for pos, name, ino in d.children.listing(start_id):
            child = self.fs.inodes.get(ino)
            if child is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), pos):
                return
            self.io.inodes.get(ino).lookups += 1

    @_fuse_handler
    async def releasedir(self, fh: FileHandleT) -> None:
        return None

    @_fuse_handler
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        await self.io.durability.make_durable(metadata=True)

    # ------------------------------------------------------------------ files
    def _file_info(self, h: Handle) -> pyfuse3.FileInfo:
        # direct_io stays off even for O_DIRECT handles: MAP_SHARED on a direct_io handle
        # fails with ENODEV (fuse-facts 6a), and the kernel's O_DIRECT path reaches us anyway.
        # keep_cache: diofs is the only writer of its image and invalidates what it changes.
        # Except for an O_DIRECT open: without keep_cache the kernel drops the file's whole
        # cache in the opener's context, after this reply and before open() returns; any page
        # cached later comes with a READ or WRITE that marks the inode again. So a file opened
        # for direct I/O skips the kernel-range invalidation after each direct write (its
        # landed-write hint, Direct.write) until a buffered request arrives, once that drop
        # is known to be done (kernel_cache.py "Which inodes": the first request with this
        # fh, `_handle`).
        if h.flags & os.O_DIRECT:
            self.io.kernel.dropped_by_open(h.incore, h.fh)
            return pyfuse3.FileInfo(fh=h.fh, keep_cache=False, direct_io=False)
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=True, direct_io=False)

    @_fuse_handler
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        if inode == STATS_INO:  # a snapshot per open; direct_io: the size is not known
            fh = STATS_INO + len(self.stats_reads) + 1
            while fh in self.stats_reads:
                fh += 1
            self.stats_reads[fh] = json.dumps(self.stats_snapshot(), sort_keys=True).encode()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        node = self.fs.get(inode)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._check_writable()
        if flags & os.O_TRUNC:
            self.fs.kill_privs(node, suidgid=request.current().kill_suidgid)
            if node.size:  # before the handle exists: no leak if it fails
                await self.direct.truncate(node, 0)
        incore = self.io.inodes.get(node.ino)
        h = self.handles.open(node, incore, flags, self.io.durability.sample(incore))
        return self._file_info(h)

    @_fuse_handler
    async def create(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
        ctx: RequestContext,
    ) -> tuple[FileInfo, EntryAttributes]:
        self._check_writable()
        node = self.fs.make_inode(parent_inode, name, S.S_IFREG | (mode & 0o7777), ctx.uid, ctx.gid)
        h = self.handles.open(node, self.io.inodes.get(node.ino), flags, 0)
        return self._file_info(h), self._entry(node)

    def _native_writes_seen(self) -> None:
        """Drain the write pool's completed native writes: their mtime (native_io.py (g)).
        Every write answered before this request was sent is among them."""
        if self.io.native.writes_in_hand:
            self.io.pool.drain()

    def _handle(self, fh: int) -> Handle:
        """The open file `fh` of a request: the open that made it has returned."""
        h = self.handles.get(fh)
        self.io.kernel.fh_used(h.incore, fh)
        return h

    @_fuse_handler
    async def read(  # type: ignore[override]  # the binding also sends these two (below)
        self, fh: FileHandleT, off: int, size: int
    ) -> bytes | memoryview | pyfuse3.ReplyFromThread:
        """bytes, a memoryview of the direct-I/O context's buffer (pyfuse3 copies it into
        the reply before the next checkpoint), or a ReplyFromThread (the patched binding
        writes the reply from a worker thread: dio.Direct.read)."""
        if fh >= STATS_INO:
            return self.stats_reads[fh][off : off + size]
        h = self._handle(fh)
        req = request.current()
        if req.flags & os.O_DIRECT:  # the request's flags, not the handle's (fuse-facts 1c)
            return await self.direct.read(h, off, size, req)
        return await self.buffered.read(h, off, size, req)

    @_fuse_handler
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        self._check_writable()
        h = self._handle(fh)
        req = request.current()
        # The request's flags are the whole truth (fcntl may have cleared O_APPEND/O_DIRECT
        # since open, fuse-facts 1c). tid 0 is the kernel writing back its own page cache
        # (mmap, writeback, launder; flags 0): buffered whatever the handle, even one opened
        # with O_DIRECT, whose writeback of a partial last page is not block-aligned.
        by_handle = not req.tid and bugs.enabled(Bug.WRITEBACK_AS_DIRECT)
        flags = h.flags if by_handle else req.flags
        kill = req.kill_suidgid
        if kill or h.inode.xattrs is not None:
            self.fs.kill_privs(h.inode, suidgid=kill)
        path = self.direct if flags & os.O_DIRECT else self.buffered
        if not flags & os.O_DSYNC:
            return await path.write(h, off, buf, req, flags)
        with self.io.durability.incoming_write():  # group commit waits for sync writes
            return await path.write(h, off, buf, req, flags)

    # The synchronous fast paths (`_sync_handler`): the steady state of a direct-I/O
    # workload -- an aligned read or overwrite of written blocks, nothing cached, no lock
    # held or awaited -- answered without a coroutine or a trio task step. Each returns None
    # (having changed nothing) wherever `read` / `write` could take another branch, so every
    # protection and --bug switch stays on the coroutine path. Figures: docs/bench.md.
    @_sync_handler(read)
    def read_sync(self, fh: FileHandleT, off: int, size: int) -> memoryview | None:
        if fh >= STATS_INO or not request.current_flags() & os.O_DIRECT:
            return None
        return self.direct.read_inline(self._handle(fh), off, size)

    @_sync_handler(write)
    def write_sync(
        self, fh: FileHandleT, off: int, buf: bytes
    ) -> int | pyfuse3.PooledWrite | None:
        flags = request.current_flags()
        if self.failsafe or not flags & os.O_DIRECT:  # tid 0 (writeback): flags 0, buffered
            return None
        return self.direct.write_inline(self._handle(fh), off, buf, flags)

    @_fuse_handler
    async def fallocate(self, fh: FileHandleT, mode: int, offset: int, length: int) -> None:
        self._check_writable()
        h = self._handle(fh)
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FsError(errno.EOPNOTSUPP)
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise FsError(errno.EOPNOTSUPP)
        await self.direct.fallocate(
            h.inode, offset, offset + length,
            punch=bool(mode & FALLOC_FL_PUNCH_HOLE),
            zero=bool(mode & FALLOC_FL_ZERO_RANGE),
            keep_size=bool(mode & FALLOC_FL_KEEP_SIZE),
        )

    @_fuse_handler
    async def flush(self, fh: FileHandleT) -> None:
        if fh < STATS_INO:
            self._handle(fh)  # close(2) of this fd: its open has long returned

    @_fuse_handler
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        if fh >= STATS_INO:
            return
        h = self._handle(fh)
        self._native_writes_seen()  # their mtime, for the commit below
        await self.io.pool.wait_inode(h.incore)  # its pool writes in flight (durable_pool.py)
        with contextlib.suppress(OSError):  # recorded (errseq) by the writeback; reported below
            await self.io.writeback.writeback_inode(h.inode.ino)
        await self.io.durability.make_durable(metadata=not datasync)
        self.io.durability.check_and_advance(h)

    @_fuse_handler
    async def release(self, fh: FileHandleT) -> None:
        if fh >= STATS_INO:
            self.stats_reads.pop(fh, None)
            return
        h = self.handles.close(fh)
        self.io.native.released(h)
        self.io.kernel.fh_used(h.incore, fh)
        self.io.inodes.evict_if_unused(h.inode)

    # ------------------------------------------------------------------ extended attributes
    def _xattr_inode(self, inode: int, stats_errno: int = errno.EPERM) -> Inode:
        if not self.xattrs:  # -o xattr=off: the kernel stops asking after this
            raise FsError(errno.ENOSYS)
        if inode == STATS_INO:  # the virtual stats file has none and takes none
            raise FsError(stats_errno)
        return self.fs.get(inode)

    @_fuse_handler
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        return self.fs.getxattr(self._xattr_inode(inode, errno.ENODATA), name, ctx.uid)

    @_fuse_handler
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> list[XAttrNameT]:
        if inode == STATS_INO and self.xattrs:
            return []
        return self.fs.listxattr(self._xattr_inode(inode), ctx.uid)

    @_fuse_handler
    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext
    ) -> None:
        node = self._xattr_inode(inode)
        self._check_writable()
        self.io.native.disarm_inode(node.ino)  # a write must now see the xattrs (KILLPRIV)
        self.fs.setxattr(node, name, value, ctx.uid)

    @_fuse_handler
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        node = self._xattr_inode(inode)
        self._check_writable()
        self.fs.removexattr(node, name, ctx.uid)

    # ------------------------------------------------------------------ misc
    @_fuse_handler
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        blocks, free, files = self.fs.statfs_counts()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = self.fs.bs
        s.f_blocks = blocks
        s.f_bfree = s.f_bavail = free
        s.f_files = files + 1_000_000
        s.f_ffree = s.f_favail = 1_000_000
        s.f_namemax = 255
        return s

    def stats_snapshot(self) -> dict[str, float]:
        blocks, free, files = self.fs.statfs_counts()
        stats.gauge("fs.inodes", files)
        stats.gauge("fs.free_blocks", free)
        stats.gauge("fs.open_handles", len(self.handles))
        stats.gauge("fuse.killpriv_v2", int(request.killpriv_v2_negotiated()))
        self.io.kernel.publish_stats()
        self.io.native.fold_stats()
        hang_detector.publish_stats()
        return stats.snapshot()
