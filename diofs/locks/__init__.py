"""Locking in diofs: the per-inode pagecache lock, the per-task fault marker, the LOCK ORDER.

Primitives (details and race scenarios: docs/concurrency.md):
    PagecacheLock   per inode, two shared states: ADD (fills) / BLOCK (direct writes,
                    truncate, punch, zero range); phase-fair, never starves (two_state.py);
                    `IncoreInode.pagecache` (diofs/incore.py: one per inode while it exists)
    FaultMarker     per mount: (tid, ino) -> count; "this tid is inside its own DIO BLOCK
                    section of ino" (bcachefs faults_disabled_mapping; fault_marker.py)
    RwSem           per inode (rwsem.py), `IncoreInode.rwsem`: the I/O rwsem of direct I/O,
                    truncate and fallocate, like Linux i_rwsem; always OUTSIDE PagecacheLock
    trio atomicity  code between two checkpoints runs alone; per-inode metadata and extent
                    state need no lock object, only "no await inside the critical step"

Lock ordering (outer first; each edge names where the nesting happens):

  kernel folio lock             (taken by the kernel BEFORE it sends a fault/readahead READ,
                                 released only when that READ is answered: fuse-facts row 3)
    ->PagecacheLock ADD         (buffered.Buffered._fill: read miss + readahead)
      ->inode metadata/extents  (no lock object: plain trio code between checkpoints)
        ->image I/O             (fs.read_data -> trio.to_thread.run_sync, named
                                 CapacityLimiter; worker threads touch no diofs state)

  [buffered WRITE: Writeback.wait_for_room() first, outside every lock]
    ->PagecacheLock ADD         (buffered.Buffered.write -> _write_pages)
      ->image I/O               (read-modify-write of a partial page)

  [direct WRITE: no kernel lock is held for the daemon]
  inode RwSem (locks/rwsem.py)  (dio.Direct._write_locked: shared, or exclusive if
                                 extending or sub-block)
    ->PagecacheLock BLOCK       (dio.Direct._write_locked)
      ->FaultMarker (tid, ino)  (dio.Direct._write_locked: marked() inside BLOCK, rule M2)
        ->page writeback wait   (Writeback.writeback_range: takes no diofs lock)
        ->inode metadata/extents
          ->image I/O           (fs.write_data)
    [after release: the kernel range is POSTED to the invalidator if the kernel may cache
     the inode (Direct.write's landed-write hint), never awaited; then the sync flush
     (durability.sync_write)]

  [O_DSYNC direct overwrite in the native write pool: no await from grant to submission]
  inode RwSem shared            (durable_pool.DurablePool.offer: acquire_shared_nowait)
    ->PagecacheLock BLOCK       (durable_pool.DurablePool.offer: acquire_nowait, owner 0)
      ->image I/O               (a native pool thread, pwritev2 RWF_DSYNC, then its answer)
    [both released when the loop drains the completion (DurablePool.drain); a holder that
     waits only for an image write, so the "holders never wait for a new request" rule holds]

  [truncate, punch hole, zero range, preallocate]
  inode RwSem exclusive         (dio.Direct._blocking)
    ->PagecacheLock BLOCK       (dio.Direct._blocking, owner 0)
      ->page writeback wait     (Writeback.writeback_range)
        ->inode metadata/extents
          ->image I/O
    [no kernel invalidation: the kernel truncates its own cache after our answer]

  [direct READ]
  inode RwSem shared            (dio.Direct.read; takes no PagecacheLock)
    ->page writeback wait
      ->image I/O

  [READ of a tid that gets marked while it waits for ADD (rule M6, fault_marker.waiting):
   the mark cancels the wait and the READ takes the faults-disabled path below; without it,
   its own DIO waiting on kernel folio locks in shootdown=locked mode deadlocks]

  [READ with faults_disabled(tid, ino): the writer's own fault while its chunk holds BLOCK]
  kernel folio lock
    ->(no PagecacheLock)        (buffered.Buffered._read_faults_disabled: reads the image,
      ->image I/O                overlays cached pages, inserts nothing)

  [background writeback, memory-pressure writeback: no diofs lock at all]
  page "under writeback" state  (cache.writeback: such pages refuse fills)
    ->image I/O

  At most one PagecacheLock per task. If a path ever needs two inodes (none does today), it
  takes them in ascending ino order, both in the same state: with a fair lock even two shared
  holders can deadlock through queued waiters of the other state.

Kernel waits: what the kernel holds while it waits for one of OUR answers, and why no answer
of ours waits on it (the deadlock-freedom argument; fuse-facts rows 3 and 10, issue 12).
Our answers wait only for: diofs locks (whose holders wait for nothing below: invariant
"holders never wait for a new request"), image I/O, the image flush, and the trio scheduler.
None of those touches a kernel lock. The one daemon activity that does wait on kernel locks,
the reverse invalidation (FUSE_NOTIFY_INVAL_INODE: locks every cached folio of the range,
waits for writeback, launders dirty folios), runs on the invalidator thread of
diofs/kernel_cache.py, which no answer waits for. So each wait below ends:
  K1 folio locks across a fault / readahead READ (filemap_fault, readahead), until that READ
     is answered. The READ waits at most for ADD; ADD/BLOCK holders finish on their own.
  K2 folio locks (and i_rwsem) across a buffered WRITE (fuse_perform_write), until answered.
     The WRITE waits for ADD, for room in the daemon cache (image writes) and, if sync, the
     image flush. Measured hang when a direct write's answer waited for an invalidation
     stuck on these folios (generic/036: fcntl toggling O_DIRECT under AIO writes).
  K3 folio writeback: a page under writeback until its WRITE (tid 0) is answered; direct
     I/O and fsync wait for it first (filemap_write_and_wait_range). That WRITE takes the
     buffered path (ADD, image), also through an O_DIRECT handle (ops.write).
  K4 NOWRITE (fuse_set_nowrite) across SETATTR(size): writeback / launder WRITEs are queued,
     not sent, until SETATTR is answered. Our truncate answers after its own work only; the
     kernel truncates its cache after the answer, once NOWRITE is released (fuse_do_setattr:
     "Only call invalidate_inode_pages2() after removing FUSE_NOWRITE"). Measured hang when
     the answer waited for an invalidation stuck in fuse_launder_folio (generic/029).
     FALLOCATE (punch, zero range) likewise: the kernel drops the range after the answer.
  K5 i_rwsem across buffered and direct writes, SETATTR, FALLOCATE and FSYNC. The daemon
     never takes it (nor does a reverse invalidation): no answer depends on it.
  K6 the 12 background slots (max_background): async DIO requests, readahead READs and
     writeback WRITEs beyond 12 wait in the kernel's bg_queue, unseen by us. No answer waits
     for another request to arrive (no invalidation before an answer, no awaited fill), so
     the slots drain. Measured hang when direct writes holding slots waited for invalidations
     that waited for readahead READs queued behind them (generic/095, mixed fio engines).
  K7 async-DIO completion inside our reply write(2) (fuse_aio_complete_req ->
     folio_mark_dirty_lock) of a direct READ into a mapping of one of our files: the reply
     write waits on a folio lock whose holder may wait for a launder WRITE of ours. Such
     replies are written from a worker thread (dio.Direct.read, ReplyFromThread), so the loop
     and the other pyfuse3 workers keep reading and answering; holds while fewer than
     max_tasks (64) replies are blocked at once. The folio lock holders: a direct write's
     invalidate_inode_pages2_range, our invalidator, and the whole-file drop that follows
     our answer to an OPEN without keep_cache, which runs after that answer: an O_DIRECT
     open counts as having dropped the file's pages only once a request with its fh arrives
     (kernel_cache.KernelCache.fh_used; measured hang otherwise, `--bug open-drop-at-answer`).
  K8 the invalidator itself waits on K1-K4, and only it does; at unmount the daemon gives it
     5 s (kernel_cache.KernelCache.stop), by which time the kernel has answered everything.
Switched off by `--bug inval-before-reply` (answers of direct writes, truncate and fallocate
wait for the invalidation again: the three hangs above) and, on purpose, in the demonstration
mode `shootdown=locked`.

Never:
  - make an answer wait for a kernel invalidation (request.invalidate_kernel_range, i.e. the
    patched pyfuse3.invalidate_inode_range; pyfuse3.invalidate_inode; a raw
    FUSE_NOTIFY_INVAL_INODE write), and so never invalidate while holding any PagecacheLock
    state (ABBA with K1, fuse-facts row 3: measured hang, unkillable client; even ADD, since
    new ADD requests queue behind a BLOCK waiter). Post the range to the invalidator
    (kernel_cache.KernelCache.direct_write_landed). The only exception is the opt-in mount
    option `shootdown=locked`, which exists to demonstrate the hang: it invalidates while
    holding BLOCK, and the FaultMarker makes the task's OWN faults safe; other processes
    faulting the file still deadlock (row 3), so it is never the default.
  - await a page-cache fill of the same inode (a fill's completion, a READ's reply) from a
    DIO handler. Under BLOCK the fill waits for the ADD state we exclude; without BLOCK the
    kernel may send that READ only after our reply (direct_io=True runs chunks strictly
    one after another, and with direct_io=False the faults of chunk N+1 follow chunk N's
    request: fuse-facts row 2).
  - request the other state of a lock this task already holds (self-deadlock; not detected),
    or take an inode RwSem (it is the outer lock).
  - wait for a PagecacheLock in writeback (a cache WriteFn): dio.Direct.write waits for the
    writeback of its range while holding BLOCK.
  - while holding a PagecacheLock, wait for anything that only a new FUSE request can
    deliver (see below).

pyfuse3 worker model: pyfuse3.main(min_tasks, max_tasks) runs up to max_tasks worker tasks,
each reading one request from /dev/fuse and running its handler to completion before it reads
again. A handler waiting for a PagecacheLock occupies its worker. If all max_tasks workers
wait, nobody reads /dev/fuse, and a request that would let them proceed is never read. diofs
keeps this a stall and never a deadlock by the rules above: a lock holder never waits for a
new request (no invalidation under the lock; no waiting on fills), so holders always finish
and release. The mount runs pyfuse3.main with a high max_tasks (cli/mount.py: 64 by
default, `-o max_tasks=N`; well above what the kernel keeps in flight per inode, about 4 DIO
chunks plus their fault READs, row 2), so waiters do not stall unrelated requests. In
`shootdown=locked` mode the holder does wait for the kernel, which needs the task's own
fault READs read and answered: that mode is only safe while a worker is free, one more
reason it is a demonstration, not a default.

Exports: State, PagecacheLock, LockStatistics, FaultMarker.
"""

from diofs.locks.fault_marker import FaultMarker
from diofs.locks.two_state import LockStatistics, PagecacheLock, State

__all__ = ["FaultMarker", "LockStatistics", "PagecacheLock", "State"]
