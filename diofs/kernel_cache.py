"""What the kernel may cache of each inode, and the invalidator that drops it without ever
holding up an answer (SPEC 3 coherency, SPEC 4 "nothing hangs"; seeds 002 and 004).

The kernel keeps its own page cache above the daemon's. diofs is the only writer of its image,
so the kernel's copy goes stale in one case only: an *asynchronous* O_DIRECT write (libaio,
io_uring). The kernel drops the range itself before it sends the WRITE, and again after a
synchronous direct write returns, in the client's context; FUSE's AIO completion path has no
such post-write drop, so a buffered READ answered while the write was on its way leaves old
bytes cached (fuse-facts-more row 11). Truncate and fallocate need nothing from the daemon:
the kernel truncates its own cache after the SETATTR / FALLOCATE answer (fs/fuse/dir.c
fuse_do_setattr, fs/fuse/file.c fuse_file_fallocate).

Which inodes: `note_buffered` when a buffered READ or WRITE arrives (its folios are in the
kernel's cache, locked, from before it was sent); `dropped_by_open` when an O_DIRECT OPEN is
answered without keep_cache, which makes the kernel drop the whole file in the opener's context
(ops._file_info, fuse-facts-more row 17). A direct write of an inode in the set posts its range.

Why invalidation never precedes an answer (the rule, and the kernel waits it avoids, are in
diofs/locks/__init__.py "Kernel waits"): a reverse invalidation (FUSE_NOTIFY_INVAL_INODE) locks
every cached folio of the range, waits for folios under writeback and launders dirty ones. The
kernel holds folio locks across buffered WRITEs and readahead READs, holds NOWRITE (so launder
WRITEs are not sent) across SETATTR, and queues launder and readahead requests behind the 12
background slots that our in-flight async direct requests occupy, each time *waiting for one of
our answers*. Any answer of ours that waited for an invalidation could close that cycle
(measured hangs: fuse-facts row 10). So the invalidator is one OS thread of its own, fed
through a queue that never blocks the loop; no handler awaits it; the kernel resolves each of
its waits with answers that do not depend on it, and then the invalidation completes.

What this costs in coherency (SPEC 3, docs/concurrency.md): after an asynchronous direct write
completes, a buffered read or mmap of a page the kernel cached *while the write was in flight*
may return the old bytes until the invalidator has dropped the range (posted before the answer,
done in about 0.1-1 ms unless the kernel holds the folios; `kernel.invalidations_pending` is 0
once it is done). O_DIRECT reads, pages not cached at the time, and every read after a
synchronous direct write see the new bytes at once.
"""

from __future__ import annotations

import logging
import threading

from diofs import request, stats

log = logging.getLogger(__name__)


class KernelCache:
    def __init__(self) -> None:
        self._may_cache: set[int] = set()
        self._pending: dict[int, tuple[int, int]] = {}  # ino -> merged [start, end)
        self._cond = threading.Condition()
        self._busy = False  # the thread is inside an invalidation
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.done = 0  # invalidations completed; written by the thread only (stats may not be)

    # ---------------------------------------------------------------- what may be cached
    def note_buffered(self, ino: int) -> None:
        self._may_cache.add(ino)

    def dropped_by_open(self, ino: int) -> None:
        self._may_cache.discard(ino)

    def may_cache(self, ino: int) -> bool:
        return ino in self._may_cache

    def may_cache_any(self) -> bool:
        return bool(self._may_cache)

    def forget(self, ino: int) -> None:
        """The inode is gone: the kernel forgot it too (nothing left to invalidate)."""
        self._may_cache.discard(ino)
        with self._cond:
            self._pending.pop(ino, None)

    # ---------------------------------------------------------------- invalidation
    def invalidate_later(self, ino: int, start: int, end: int) -> None:
        """Queue a drop of the kernel's pages of [start, end) and return at once.

        Ranges of one inode merge into their hull (dropping a clean page too many only costs a
        re-READ). Safe from the trio loop: it takes a lock that nothing holds for long."""
        with self._cond:
            old = self._pending.get(ino)
            self._pending[ino] = (start, end) if old is None else (
                min(old[0], start), max(old[1], end)
            )
            self._cond.notify()
        stats.add("kernel.invalidations_posted")

    def pending(self) -> int:
        """Inodes queued or being invalidated (0: every posted range has been dropped)."""
        with self._cond:
            return len(self._pending) + self._busy

    def publish_stats(self) -> None:
        stats.set("kernel.invalidations", self.done)
        stats.set("kernel.invalidations_pending", self.pending())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="diofs-invalidate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Unmount: discard what is queued, wait for the one in progress (it ends once the
        kernel has answered or the connection is gone), then the thread exits."""
        with self._cond:
            self._stopping = True
            self._pending.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("kernel invalidation still blocked in the kernel at unmount")

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                ino, (start, end) = self._pending.popitem()
                self._busy = True
            try:
                request.invalidate_kernel_range(ino, start, end)
                self.done += 1
            except OSError as exc:  # the connection is going away; nothing left to drop
                log.debug("kernel invalidation of inode %d failed: %s", ino, exc)
