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

Which inodes (the in-core inode's `kernel_may_cache` flag, diofs/incore.py): set by
`note_buffered` when a buffered READ or WRITE arrives (its folios are in the
kernel's cache, locked, from before it was sent). An O_DIRECT OPEN answered without keep_cache
makes the kernel drop the whole file in the opener's context (ops._file_info, fuse-facts-more
row 17), but only *after* our answer, and that drop may itself need us: it locks each folio and
launders a dirty one with a WRITE. So `dropped_by_open(ii, fh)` only notes the drop as
pending; it is done once a request carrying that fh arrives (`fh_used`: the fd exists, so the
open, drop included, has returned), and the flag is cleared when every such drop is done
and no buffered READ or WRITE arrived meanwhile (that cancels them: it may come after the drop).
Dropping the mark at the answer instead hung a mount: a direct READ into a MAP_SHARED mapping
of the file, answered from the loop, blocked in the reply's write(2) on the folio lock that a
concurrent O_DIRECT open's drop held while it waited for its launder WRITE, which the blocked
loop never read (tests/test_dio_kernel_cache.py::test_direct_open_while_reading_into_mapping).
Only direct writes of an inode with the flag set are watched.

Which pages: only those a buffered answer may have filled with bytes older than the write.
The kernel drops the write's range before it queues the WRITE, so a stale page comes from a
buffered READ (or whole-page WRITE) the kernel sent after that drop and that we answered with
bytes taken before the write landed. Such an answer is given after the daemon was last idle
(no request in its hands, ops._fuse_handler) before the write arrived: then a pyfuse3 worker
waits to read /dev/fuse, so the kernel's queue to us is empty, its 12 background slots are not full,
and a write it has prepared (its range dropped) is not held back there but arrives next. (Not
covered: a write already queued but not yet read at that very instant, one scheduling round of
the loop.) So `direct_write_landed` queues the pages of the range that answers since that idle
point filled with older bytes (`answered` records them with their `generation`, which the
write's landing raises), and an answer taken before a write landed but given after it queues
its own pages. A synchronous direct write, the kernel drops again itself after it; and pages
refilled with new bytes leave the queue (`_spare`).

Why so narrow: dropping a page is not harmless. `invalidate_inode_pages2_range` takes a page
out of the page cache even while a direct READ has it pinned as its destination (an O_DIRECT
read into a MAP_SHARED mapping of a file of the mount): the READ's bytes then land in an
orphaned page and are lost (docs/concurrency.md race 19). With every direct write's range
queued (`--bug inval-always`, the first design) 25-30% of such reads were lost in
tests/test_dio_kernel_cache.py::test_direct_read_into_own_mapping_keeps_its_bytes; with the
narrow queue, 0. What stays open: a drop the queue still needs, racing such a read of the same
pages (buffered READ, async direct write and direct read into a mapping, all at once).

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

What this costs in coherency (SPEC 3, docs/concurrency.md race 18): after an asynchronous
direct write completes, a buffered read or mmap of a page the kernel cached *while the write was
in flight* may return the old bytes until the invalidator has dropped it (queued before the
answer, done in about 0.1-1 ms unless the kernel holds the folios; `kernel.invalidations_pending`
is 0 once it is done). O_DIRECT reads, pages not cached at the time, and every read after a
synchronous direct write see the new bytes at once.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from diofs import bugs, request, stats
from diofs.bugs import Bug

if TYPE_CHECKING:
    from diofs.incore import IncoreInode

log = logging.getLogger(__name__)


PAGE = mmap.PAGESIZE  # the kernel's page: what a reverse invalidation drops
MAX_RANGES = 64  # pending ranges kept apart per inode; beyond it the closest two merge
ANSWERS_KEPT = 4096  # buffered answers remembered since the daemon was last idle
POSTS_KEPT = 16  # landed direct writes remembered per inode


class KernelCache:
    """Mount-wide state here; what it knows of one inode (may the kernel cache it, which
    opens' drops may still run) is in that inode's IncoreInode (diofs/incore.py)."""

    def __init__(self) -> None:
        self._may_cache_count = 0  # in-core inodes with kernel_may_cache set
        # ino -> sorted, disjoint [first_page, end_page, generation] still to drop
        self._pending: dict[int, list[list[int]]] = {}
        self._generation = 0  # direct writes landed so far (the loop's alone, like the rest)
        self._answer_seq = 0  # buffered answers so far
        self._idle_answer_seq = 0  # ... as of the last moment the daemon held no request
        # buffered answers since the daemon was last idle: (seq, ino, first, stop, generation)
        self._recent: deque[tuple[int, int, int, int, int]] = deque(maxlen=ANSWERS_KEPT)
        self._posts: dict[int, deque[tuple[int, int, int]]] = {}  # ino -> recent landed writes
        self._cond = threading.Condition()
        self._busy = False  # the thread is inside an invalidation
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.done = 0  # invalidations completed; written by the thread only (stats may not be)
        self._held = 0  # requests answered elsewhere but still in the daemon's hands (hold)
        # called when the first inode becomes one the kernel may cache (native_io.py)
        self.on_may_cache: Callable[[], None] | None = None

    # ---------------------------------------------------------------- what may be cached
    def note_buffered(self, ii: IncoreInode) -> None:
        self._set_may_cache(ii, True)
        ii.kernel_open_drops = None

    def dropped_by_open(self, ii: IncoreInode, fh: int) -> None:
        """An open of the inode as `fh` is answered without keep_cache: a whole-file drop
        follows."""
        if ii.kernel_may_cache and not bugs.enabled(Bug.OPEN_DROP_AT_ANSWER):
            if ii.kernel_open_drops is None:
                ii.kernel_open_drops = set()
            ii.kernel_open_drops.add(fh)
        else:
            self._set_may_cache(ii, False)

    def fh_used(self, ii: IncoreInode, fh: int) -> None:
        """A request carrying `fh` arrived: its open has returned, its drop is done."""
        fhs = ii.kernel_open_drops
        if fhs is None or fh not in fhs:
            return
        fhs.discard(fh)
        if not fhs:
            ii.kernel_open_drops = None
            self._set_may_cache(ii, False)

    def _set_may_cache(self, ii: IncoreInode, value: bool) -> None:
        if ii.kernel_may_cache is not value:
            ii.kernel_may_cache = value
            self._may_cache_count += 1 if value else -1
            if value and self._may_cache_count == 1 and self.on_may_cache is not None:
                self.on_may_cache()

    def may_cache_any(self) -> bool:
        return self._may_cache_count > 0

    def forget(self, ii: IncoreInode) -> None:
        """The inode is gone: the kernel forgot it too (nothing left to invalidate)."""
        self._set_may_cache(ii, False)
        ii.kernel_open_drops = None
        self._posts.pop(ii.ino, None)
        with self._cond:
            self._pending.pop(ii.ino, None)

    # ---------------------------------------------------------------- invalidation
    def direct_write_arrived(self) -> int:
        """A direct write begins; returns the token `direct_write_landed` wants."""
        return self._idle_answer_seq

    def hold(self) -> None:
        """A request stays in the daemon's hands after its handler returned (a pool write in
        flight, durable_pool.py): the daemon is not idle until `release`."""
        self._held += 1

    def release(self) -> None:
        self._held -= 1

    def daemon_idle(self) -> None:
        """No request is in the daemon's hands: a direct write the kernel has prepared by now
        (dropped its range) arrives after this point (module docstring)."""
        if self._held:
            return
        self._idle_answer_seq = self._answer_seq
        self._recent.clear()

    def direct_write_landed(self, ii: IncoreInode, start: int, end: int, token: int) -> None:
        """The write's bytes are in the image and the daemon cache holds no older page of
        [start, end) (the direct write's shootdowns). Queue a drop of the kernel pages of the
        range that a buffered answer filled with older bytes since the daemon was last idle
        before the write arrived, and return at once. Safe from the trio loop: it takes a lock that
        nothing holds for long."""
        self._generation += 1
        if not ii.kernel_may_cache:  # nothing cached; a READ arriving later sees these bytes
            return
        ino = ii.ino
        first, stop = start // PAGE, -(-end // PAGE)
        posts = self._posts.setdefault(ino, deque(maxlen=POSTS_KEPT))
        posts.append((self._generation, first, stop))
        recent = self._recent
        if bugs.enabled(Bug.INVAL_ALWAYS) or (
            len(recent) == recent.maxlen and recent[0][0] > token + 1  # some are forgotten
        ):
            self._post(ino, first, stop)
            return
        for seq, a_ino, a_first, a_stop, a_gen in recent:
            if (a_ino == ino and seq > token and a_gen < self._generation
                    and a_first < stop and a_stop > first):
                self._post(ino, max(first, a_first), min(stop, a_stop))

    def generation(self) -> int:
        """Take it when the bytes of a buffered answer are final: they hold every direct
        write landed up to it."""
        return self._generation

    def answered(self, ino: int, first: int, stop: int, generation: int) -> None:
        """A buffered answer filled the kernel's pages [first, stop) whole (a READ's pages,
        or the whole pages of a buffered WRITE) with our bytes of `generation`."""
        if first >= stop:
            return
        self._answer_seq += 1
        self._recent.append((self._answer_seq, ino, first, stop, generation))
        posts = self._posts.get(ino)
        if posts and posts[-1][0] > generation:
            # bytes taken before a direct write landed, answered after it: stale at once
            if len(posts) == posts.maxlen and posts[0][0] > generation + 1:
                self._post(ino, first, stop)  # some such writes are no longer kept
            for gen, p_first, p_stop in posts:
                if gen > generation and p_first < stop and p_stop > first:
                    self._post(ino, max(first, p_first), min(stop, p_stop))
        if ino in self._pending:
            self._spare(ino, first, stop, generation)

    def _post(self, ino: int, first: int, stop: int) -> None:
        with self._cond:
            self._pending[ino] = _merge(self._pending.get(ino, []),
                                        [first, stop, self._generation])
            self._cond.notify()
        stats.add("kernel.invalidations_posted")

    def _spare(self, ino: int, first: int, stop: int, generation: int) -> None:
        """Pages refilled with bytes of `generation` leave the ranges queued up to it:
        the stale copy they replaced is gone."""
        with self._cond:
            kept = []
            for r in self._pending.get(ino, ()):
                if r[2] > generation or r[1] <= first or r[0] >= stop:
                    kept.append(r)
                    continue
                if r[0] < first:
                    kept.append([r[0], first, r[2]])
                if r[1] > stop:
                    kept.append([stop, r[1], r[2]])
            if kept:
                self._pending[ino] = kept
            else:
                self._pending.pop(ino, None)

    def pending(self) -> int:
        """Inodes queued or being invalidated (0: every posted range has been dropped)."""
        with self._cond:
            return len(self._pending) + self._busy

    def publish_stats(self) -> None:
        stats.gauge("kernel.invalidations", self.done)
        stats.gauge("kernel.invalidations_pending", self.pending())

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
                ino, ranges = self._pending.popitem()
                self._busy = True
            for first, stop, _ in ranges:
                try:
                    request.invalidate_kernel_range(ino, first * PAGE, stop * PAGE)
                    self.done += 1
                except OSError as exc:  # the connection is going away; nothing left to drop
                    log.debug("kernel invalidation of inode %d failed: %s", ino, exc)
                    break


def _merge(ranges: list[list[int]], new: list[int]) -> list[list[int]]:
    """`ranges` (sorted, disjoint) with `new` added: overlapping or touching ranges join and
    keep the later generation; past MAX_RANGES the two closest join (a few pages too many
    dropped, which only costs re-READs)."""
    out: list[list[int]] = []
    for r in ranges:
        if r[1] < new[0] or r[0] > new[1]:
            out.append(r)
        else:
            new = [min(r[0], new[0]), max(r[1], new[1]), max(r[2], new[2])]
    out.append(new)
    out.sort()
    if len(out) > MAX_RANGES:
        i = min(range(len(out) - 1), key=lambda k: out[k + 1][0] - out[k][1])
        a, b = out[i], out.pop(i + 1)
        out[i] = [a[0], b[1], max(a[2], b[2])]
    return out
