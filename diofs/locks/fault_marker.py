"""The per-task fault marker: diofs' `task_struct->faults_disabled_mapping` (SPEC section 4).

Why (seed 004, bcachefs): a direct write holds the inode's pagecache lock in the BLOCK state so
that no page-cache fill can insert old bytes while it runs. But the writer's own buffer may be
mmap'ed from the same file; faulting it in needs a fill, and a fill needs the ADD state, which
its own direct write is holding: a recursive deadlock (and, with a kernel-cache invalidation
inside the lock, an ABBA with the kernel folio lock: fuse-facts row 3). bcachefs lets the DIO
code tell its own page-fault handler "you are inside my BLOCK section of this mapping"; gfs2
(seed 002) gets there by disabling page faults around the I/O and retrying.

In diofs the "task" is the client thread behind a FUSE request, known by its tid (fuse-facts
row 1b; the patched binding passes it on READ/WRITE). A fault READ carries the tid of the
thread whose get_user_pages caused it (row 2). So:

    dio.write (holding BLOCK of ino):   with marker.marked(tid, ino): <image I/O>
    cache fill of a READ:               if marker.faults_disabled(tid, ino): faults-disabled
                                        path (no wait for ADD, read from the image, insert
                                        nothing into the daemon cache) else: normal fill

Invariants and rules:
    M1  Marks are counted per (tid, ino): with direct_io=False the 1 MiB chunks of one syscall
        are separate requests outstanding together (row 2), each marks and unmarks on its own.
    M2  A tid is marked for ino only while it holds the BLOCK state of ino's PagecacheLock: mark
        after acquiring, unmark before releasing, and keep the span as short as possible
        (bcachefs `bch2_dio_write_loop`). Never hold a mark across a wait for anything else.
    M3  Marks are independent per inode: a fault on inode X is faults-disabled only if the tid
        is marked for X (bcachefs compares the mapping pointer the same way). One tid may be
        marked on two inodes at once only through AIO (one io_submit thread with requests on
        two files); each inode's mark is then its own, never "nested" into the other.
    M4  tid 0 (unknown requester: stock pyfuse3, writeback, RELEASE) is never marked:
        `mark(0, ...)` / `unmark(0, ...)` do nothing and `faults_disabled(0, ...)` is False.
    M6  A fill already queued for ADD when its tid gets marked for that inode leaves the queue
        and takes the faults-disabled path: `mark()` cancels the waits registered with
        `waiting()`. Without this, a fault READ that reached the daemon while its own DIO
        chunk was still queued for BLOCK (behind another fill) stays queued behind that
        chunk; a locked shootdown (`-o shootdown=locked`) then waits for the READ's folio
        lock: the row 3 deadlock despite the marker (measured: shootdown=locked,
        dio_delay=0.2, fill_delay=0.3, 4 MiB mmap self-write hung in every run; without
        fill_delay about 1 run in 10 under load).
    M5  A false positive (a READ of the marked tid that is not its own fault, e.g. an AIO
        submitter reading the file while its write is in flight) only costs an uncached read;
        a false negative is the deadlock this marker exists to prevent.

The `--bug no-fault-marker` switch lives at the one place that sets the marker
(dio.Direct._write_locked): unmarked, the writer's own faults wait for the lock its own direct
write holds.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import trio

__all__ = ["FaultMarker"]


class _Marked(contextlib.AbstractContextManager[None]):
    __slots__ = ("_ino", "_marker", "_tid")

    def __init__(self, marker: FaultMarker, tid: int, ino: int) -> None:
        self._marker = marker
        self._tid = tid
        self._ino = ino

    def __enter__(self) -> None:
        self._marker.mark(self._tid, self._ino)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._marker.unmark(self._tid, self._ino)


class FaultMarker:
    """Which (tid, ino) pairs are inside a direct-I/O BLOCK section. One per mount.

    `_marks` ((tid, ino) -> count > 0) is protected by trio's run-to-checkpoint atomicity;
    all methods are synchronous.
    """

    def __init__(self) -> None:
        self._marks: dict[tuple[int, int], int] = {}
        # (tid, ino) -> cancel scopes of fills of that tid waiting for ADD on ino (rule M6)
        self._waiting: dict[tuple[int, int], set[trio.CancelScope]] = {}

    def mark(self, tid: int, ino: int) -> None:
        """Count one more outstanding DIO section of `tid` on `ino` (no-op for tid 0)."""
        if tid == 0:
            return
        key = (tid, ino)
        self._marks[key] = self._marks.get(key, 0) + 1
        for scope in self._waiting.pop(key, ()):  # rule M6
            scope.cancel()

    def unmark(self, tid: int, ino: int) -> None:
        """Undo one `mark`; raises RuntimeError if `tid` is not marked for `ino`."""
        if tid == 0:
            return
        key = (tid, ino)
        count = self._marks.get(key, 0)
        if count == 0:
            raise RuntimeError(f"unmark of tid {tid} on ino {ino}, which is not marked")
        if count == 1:
            del self._marks[key]
        else:
            self._marks[key] = count - 1

    def marked(self, tid: int, ino: int) -> contextlib.AbstractContextManager[None]:
        """`with marker.marked(tid, ino):` around the shortest span inside BLOCK (rule M2)."""
        return _Marked(self, tid, ino)

    @contextlib.contextmanager
    def waiting(self, tid: int, ino: int) -> Iterator[trio.CancelScope]:
        """`with marker.waiting(tid, ino) as scope, scope: await <acquire ADD>` (rule M6):
        `mark(tid, ino)` cancels the scope, so a fill of `tid` queued for ADD on `ino` stops
        waiting once its own task's DIO holds BLOCK; `scope.cancelled_caught` then tells the
        caller to take the faults-disabled path. tid 0 is never cancelled."""
        scope = trio.CancelScope()
        key = (tid, ino)
        if tid != 0:
            self._waiting.setdefault(key, set()).add(scope)
        try:
            yield scope
        finally:
            scopes = self._waiting.get(key)
            if scopes is not None:
                scopes.discard(scope)
                if not scopes:
                    del self._waiting[key]

    def faults_disabled(self, tid: int, ino: int) -> bool:
        """True if a fill of `ino` requested by `tid` must take the faults-disabled path."""
        return tid != 0 and (tid, ino) in self._marks

    def count(self, tid: int, ino: int) -> int:
        """Outstanding marks of `tid` on `ino` (for the unit tests)."""
        return self._marks.get((tid, ino), 0)
