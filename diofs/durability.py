"""Durability: fsync / fdatasync, synchronous writes flushed before their reply, group
commit, and writeback error reporting (SPEC 6, seed 001).

The kernel sends no FSYNC for asynchronous non-extending O_DSYNC/O_SYNC direct writes, nor
for any write on a direct_io handle (fuse-facts row 4): `sync_write` is called by the write
paths themselves for every WRITE whose request or handle carries O_DSYNC or O_SYNC, before
the reply (seed 001: complete the AIO only after the sync).

Group commit: `Coalescer.run()` returns once a run of its function that *started after the
call* has finished, so concurrent callers share one image flush (or one metadata commit).
Counters: `durability.flushes`, `durability.commits`, `durability.sync_writes`,
`durability.writes_per_flush` (sync writes served per flush or commit, running mean).

Errors (errseq, like mm/filemap.c): a failed background writeback bumps the inode's error
sequence (kept in its in-core inode, diofs/incore.py); each handle keeps the sequence it has
seen. `check_and_advance` (consume) reports the error once per handle, at its next fsync.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import trio

from diofs import bugs, request, stats
from diofs.bugs import Bug
from diofs.errors import FsError
from diofs.fs import Filesystem
from diofs.handles import Handle
from diofs.incore import IncoreInode, IncoreInodes

log = logging.getLogger(__name__)


GATHER_MAX_S = 0.002  # longest a run waits for more callers (jbd2's max_batch_time)


class Coalescer:
    """Group commit: many waiters, one run of `fn` per batch. Runs never overlap.

    Batching (like jbd2's commit batching, fs/jbd2/transaction.c `jbd2_journal_stop`): the
    caller about to start a run first waits, at most min(GATHER_MAX_S, the mean duration of
    recent runs), while
      (a) `pending()` says more callers are on their way: sync WRITEs the daemon has read that
          have not reached `sync_write` yet (still taking their locks or writing their data);
      (b) fewer callers wait than the previous run served (when it served more than one):
          concurrent sync writers keep coming, the kernel just has not sent them yet.
    Without this, a run started the instant the previous one ended and covered 2-3 of the
    ~12 asynchronous WRITEs the kernel keeps at the daemon (fio libaio QD16 O_DIRECT|O_DSYNC,
    measured). A single writer (QD1) never waits: nothing is pending and the previous run
    served one caller. Waiting is on `_arrival` (set by each new caller) with a timeout, not
    a busy loop.

    State is protected by trio's single thread; `_running` says a run is in progress (the
    caller that runs it is inside the shielded `fn`).
    """

    def __init__(
        self, fn: Callable[[], Awaitable[None]], counter: str,
        pending: Callable[[], int] | None = None,
    ) -> None:
        self._fn = fn
        self._counter = counter
        self._pending = pending
        self._started = 0
        self._done = 0
        self._running = False
        self._finished = trio.Event()
        self._arrival = trio.Event()
        self._errors: dict[int, BaseException] = {}
        self._waiters: defaultdict[int, int] = defaultdict(int)
        self._last_served = 0
        self._mean_run_s = 0.0  # exponentially weighted mean duration of `fn`

    @property
    def running(self) -> bool:
        return self._running

    def _want_more(self, target: int) -> bool:
        if self._pending is not None and self._pending() > 0:
            return True
        return self._last_served > 1 and self._waiters[target] < self._last_served

    async def _gather(self, target: int) -> bool:
        """Wait while more callers are expected (class docstring). Returns True if a run was
        started by someone else meanwhile (the caller re-checks its state)."""
        if not self._want_more(target):
            return False
        stats.add("durability.gathers")
        deadline = trio.current_time() + min(GATHER_MAX_S, self._mean_run_s)
        while self._want_more(target):
            with trio.move_on_at(deadline):
                await self._arrival.wait()
            if self._running or self._done >= target:
                return True
            if trio.current_time() >= deadline:
                stats.add("durability.gather_timeouts")
                break
        return False

    async def run(self) -> None:
        """Return once a run that started after this call completed; raise its error."""
        target = self._started + 1
        self._waiters[target] += 1
        arrival, self._arrival = self._arrival, trio.Event()
        arrival.set()
        while self._done < target:
            if self._running:
                await self._finished.wait()
                continue
            if await self._gather(target):
                continue  # someone else started a run meanwhile
            self._running = True
            self._started += 1
            run_no = self._started
            t0 = trio.current_time()
            try:
                with trio.CancelScope(shield=True):
                    await self._fn()
            except Exception as exc:
                self._errors[run_no] = exc
            finally:
                self._running = False
                self._done = run_no
                self._mean_run_s += (trio.current_time() - t0 - self._mean_run_s) / 8
                stats.add(self._counter)
                served = self._waiters.pop(run_no, 0)
                self._last_served = served
                stats.add("durability.sync_writes_served", served)
                runs = stats.get("durability.flushes") + stats.get("durability.commits")
                if runs:
                    stats.gauge(
                        "durability.writes_per_flush",
                        round(stats.get("durability.sync_writes_served") / runs, 2),
                    )
                for old in [k for k in self._errors if k < run_no - 64]:
                    del self._errors[old]
                event, self._finished = self._finished, trio.Event()
                event.set()
        error = self._errors.get(target)
        if error is not None:
            raise error


class Durability:
    def __init__(self, fs: Filesystem, inodes: IncoreInodes) -> None:
        self.fs = fs
        self.inodes = inodes  # each in-core inode keeps its error sequence (wb_err_*)
        # sync WRITEs read by the daemon (ops.write, `incoming_write`) and those that reached
        # `sync_write`: the difference is what a flush about to start may wait for
        self._incoming = 0
        self._arrived = 0
        self.flusher = Coalescer(fs.flush, "durability.flushes", self.pending_sync_writes)
        self.committer = Coalescer(fs.commit, "durability.commits", self.pending_sync_writes)

    # -- errseq
    def record_writeback_error(self, ino: int, exc: BaseException) -> None:
        stats.add("errors.writeback")
        if ino not in self.fs.inodes:  # freed while its pages were written: nobody can ask
            return
        ii = self.inodes.get(ino)
        ii.wb_err_seq += 1
        ii.wb_err_errno = getattr(exc, "errno", None) or errno.EIO
        ii.wb_err_seen = False
        # not logged here: Writeback._write_run already logged it, once, with the page range

    def sample(self, ii: IncoreInode) -> int:
        """The cursor a newly opened handle starts from: errors some handle already reported
        are not its own, but an error nobody has seen yet is (errseq_sample since Linux 4.14:
        open-then-fsync, as PostgreSQL does, must learn of a failed writeback)."""
        return ii.wb_err_seq if ii.wb_err_seen else ii.wb_err_seq - 1

    def check_and_advance(self, h: Handle) -> None:
        """Consume: raise the inode's writeback error once for this handle."""
        ii = h.incore
        if ii.wb_err_seq > h.wb_err_seen:
            h.wb_err_seen = ii.wb_err_seq
            ii.wb_err_seen = True
            raise FsError(ii.wb_err_errno)

    # -- flushing
    async def make_durable(self, *, metadata: bool) -> None:
        """Flush the image; with `metadata` (or if extents / sizes changed since the last
        commit) commit the metadata too. Shared by concurrent callers (group commit)."""
        if metadata or not self.fs.layout_committed:
            await self.committer.run()
        else:
            await self.flusher.run()

    def pending_sync_writes(self) -> int:
        """Sync WRITEs inside the daemon that have not reached `sync_write` yet."""
        return self._incoming - self._arrived

    @contextmanager
    def incoming_write(self) -> Iterator[None]:
        """Wrap the handling of one sync WRITE (ops.write): it counts as on its way to
        `sync_write`, so group commit waits for it (see Coalescer)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    def lone_sync_write(self) -> bool:
        """The calling sync WRITE (inside `incoming_write`) is the only one in the daemon, the
        kernel has no other request queued for us, no flush or commit runs and the committed
        metadata already maps every written block: writing its data durably (RWF_DSYNC, a
        flush of that range only, like the kernel's own O_DSYNC path) is all O_DSYNC asks, and
        there is nobody to share a group commit with (dio.py, fast path).

        The queue check matters: the RWF_DSYNC write blocks the trio loop for a whole flush, so
        the next WRITE of a libaio QD16 job is read only after it and again finds itself alone
        in the daemon. Without the check every write of the queue was flushed alone, one after
        the other (4 KiB O_DSYNC QD16: 665 IOPS against 2672 with it, same run; docs/bench.md,
        "O_DSYNC")."""
        return (
            self._incoming == 1
            and not request.requests_queued()
            and not self.flusher.running
            and not self.committer.running
            and self.fs.layout_committed
        )

    def durable_write_done(self) -> None:
        stats.add("durability.sync_writes")
        stats.add("durability.durable_writes")

    async def sync_write(self, *, full_sync: bool) -> None:
        """Called after a WRITE with O_DSYNC/O_SYNC landed, before its reply."""
        stats.add("durability.sync_writes")
        if bugs.enabled(Bug.NO_SYNC_FLUSH):
            return
        self._arrived += 1
        try:
            await self.make_durable(metadata=full_sync)
        finally:
            self._arrived -= 1


class SyncWanted(NamedTuple):
    """What a WRITE's flags ask of durability before its reply (SPEC 6)."""

    sync: bool  # O_DSYNC or O_SYNC: the data (and what maps it) is durable before the reply
    full: bool  # O_SYNC: the inode's other metadata too (a commit, not just a flush)


NO_SYNC = SyncWanted(sync=False, full=False)
DATA_SYNC = SyncWanted(sync=True, full=False)
FULL_SYNC = SyncWanted(sync=True, full=True)


def wants_sync(flags: int) -> SyncWanted:
    """For request or open flags (O_SYNC includes the O_DSYNC bit). Returns one of the three
    constants: no tuple is built per WRITE."""
    if not flags & os.O_DSYNC:
        return NO_SYNC
    return FULL_SYNC if flags & os.O_SYNC == os.O_SYNC else DATA_SYNC
