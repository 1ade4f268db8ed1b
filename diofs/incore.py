"""The in-core inode: everything the daemon keeps about one inode while it runs, beside its
on-image record (format/metadata.py `Inode`). This is the kernel's `struct inode` with its
`address_space` (XFS says "incore inode" for `xfs_inode`, against the on-disk `xfs_dinode`):

    lookups, opens   the kernel's references (LOOKUP replies not yet FORGOTten) and open
                     handles; with the link count they decide when the inode is freed
    rwsem            the I/O rwsem of direct I/O, truncate and fallocate (Linux i_rwsem;
                     locks/rwsem.py), created on first use
    pagecache        the two-state pagecache lock, ADD / BLOCK (locks/two_state.py; the
                     address_space's invalidate lock in bcachefs), created on first use
    wb_err_*         the writeback error sequence (errseq_t of the address_space;
                     durability.py reports it)
    kernel_*         whether the kernel may cache its pages, and the opens whose whole-file
                     drop may still run (kernel_cache.py, "Which inodes")

Not here: the daemon's cached pages (diofs/cache: one LRU for the mount, keyed by ino), the
delayed-allocation reservations (fs.Filesystem.reserved: allocator state), the fault
marker (per task, not per inode), and the kernel-cache tracker's queue of ranges to drop
and its recent landed writes (kernel_cache.py: mount-wide state shared with its thread).

`IncoreInodes` is the one table of them, ino -> IncoreInode. An entry is made on first use
and lives until the inode is freed: `evict_if_unused` is the one teardown (the kernel's
iput_final -> evict), called wherever a reference goes away (FORGET, RELEASE, UNLINK, RMDIR,
RENAME over a name). So a reference taken across a checkpoint always names *the* object of
its inode, and so *the* lock (docs/concurrency.md invariant 6).

All fields are protected by trio's single thread (no await in any method here).
"""

from __future__ import annotations

from diofs.cache import PageCache
from diofs.format.metadata import Inode
from diofs.fs import Filesystem
from diofs.kernel_cache import KernelCache
from diofs.locks import PagecacheLock
from diofs.locks.rwsem import RwSem
from diofs.locks.two_state import State


class IncoreInode:
    __slots__ = (
        "_pagecache", "_rwsem", "ino", "kernel_may_cache", "kernel_open_drops", "lookups",
        "opens", "pool_writes", "wb_err_errno", "wb_err_seen", "wb_err_seq",
    )

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.lookups = 0  # LOOKUP (and READDIRPLUS) replies the kernel has not FORGOTten
        self.opens = 0  # open handles (handles.HandleTable)
        self._rwsem: RwSem | None = None
        self._pagecache: PagecacheLock | None = None
        # errseq (durability.Durability): writeback errors so far, the latest one's errno,
        # and whether some handle has reported it (errseq's SEEN flag)
        self.wb_err_seq = 0
        self.wb_err_errno = 0
        self.wb_err_seen = True
        # kernel_cache.KernelCache: the kernel may hold pages of this inode (it sent a buffered
        # READ or WRITE), and the fhs of O_DIRECT opens whose whole-file drop may still run
        self.kernel_may_cache = False
        self.kernel_open_drops: set[int] | None = None
        # durable_pool.DurablePool: its writes to this inode's blocks in flight (they hold
        # the rwsem shared and the pagecache BLOCK; the inode is not freed meanwhile)
        self.pool_writes = 0

    @property
    def rwsem(self) -> RwSem:
        sem = self._rwsem
        if sem is None:
            sem = self._rwsem = RwSem()
        return sem

    @property
    def pagecache(self) -> PagecacheLock:
        lock = self._pagecache
        if lock is None:
            lock = self._pagecache = PagecacheLock(self.ino)
        return lock

    def shared_io_free(self) -> bool:
        """A shared hold of the rwsem would be granted at once (dio.Direct.read_inline)."""
        return self._rwsem is None or self._rwsem.shared_free()

    def pool_admissible(self) -> bool:
        """A pool write's shared rwsem and BLOCK would be granted at once: nobody holds or
        waits for the rwsem exclusively, and the pagecache lock is free or in BLOCK with no ADD
        waiter (other pool writes share both: durable_pool.py)."""
        return self.shared_io_free() and (
            self._pagecache is None or self._pagecache.admissible(State.BLOCK)
        )

    def pool_io_begin(self, *, locked: bool) -> None:
        """A write that lands on the inode's blocks with no request in the daemon's hands
        starts: a pool write, or a handle armed for native writes (durable_pool.py (a)-(c),
        native_io.py (f); the kernel's inode_dio_begin). With `locked` (all but --bug
        pool-unlocked) it holds the rwsem shared and BLOCK, granted at once: the caller saw
        `pool_admissible`."""
        if locked:
            self.rwsem.acquire_shared_nowait()
            self.pagecache.acquire_nowait(State.BLOCK)
        self.pool_writes += 1

    def pool_io_end(self, *, locked: bool) -> bool:
        """The end of a `pool_io_begin`; True when none is left (the eviction that
        `evict_if_unused` deferred may run now)."""
        if locked:
            self.pagecache.release(State.BLOCK)
            self.rwsem.release_shared()
        self.pool_writes -= 1
        return not self.pool_writes

    def io_idle(self) -> bool:
        """Nobody holds or waits for the rwsem or the pagecache lock (dio.py, fast path)."""
        return (self._rwsem is None or self._rwsem.idle()) and (
            self._pagecache is None or self._pagecache.idle()
        )


class IncoreInodes:
    """ino -> IncoreInode, one per inode for as long as the inode exists (module docstring)."""

    def __init__(self, fs: Filesystem, cache: PageCache, kernel: KernelCache) -> None:
        self._fs = fs
        self._cache = cache
        self._kernel = kernel
        self._table: dict[int, IncoreInode] = {}

    def get(self, ino: int) -> IncoreInode:
        ii = self._table.get(ino)
        if ii is None:
            ii = self._table[ino] = IncoreInode(ino)
        return ii

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, ino: object) -> bool:
        return ino in self._table

    def evict_if_unused(self, inode: Inode) -> None:
        """Free `inode` once it has no name, no open handle and no kernel reference, and drop
        everything held for it: its in-core inode, its cached pages (dirty ones too: nobody
        can read them again) and the kernel-cache tracker's record of it. No holder of its
        locks can exist then (a holder has a handle or is answering a request about it, or
        is a pool write in flight: `pool_writes`, whose drain calls this again)."""
        ii = self._table.get(inode.ino)
        if inode.nlink or (ii is not None and (ii.lookups or ii.opens or ii.pool_writes)):
            return
        self._fs.free_inode(inode)
        self._cache.drop_inode(inode.ino)
        if ii is not None:  # without one, the kernel-cache tracker knows nothing of it
            del self._table[inode.ino]
            self._kernel.forget(ii)
