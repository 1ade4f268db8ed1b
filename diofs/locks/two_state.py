"""The per-inode two-state pagecache lock (SPEC section 4); each in-core inode has one
(diofs/incore.py).

A `PagecacheLock` has two states, `State.ADD` (page-cache fills, readahead, buffered inserts)
and `State.BLOCK` (direct writes, truncate, hole punch, zero range). Any number of tasks may
hold the lock in one state at the same time; the two states exclude each other. This is the
shape of bcachefs' `two_state_lock_t` (`bch2_pagecache_add_get` / `bch2_pagecache_block_get`),
with one difference: ours does not starve either side.

Fairness ("phase-fair"):
    (a) A request is admitted at once only if the lock is free or held in the same state AND
        nobody waits for the other state. So once a BLOCK waiter exists, new ADD arrivals queue
        behind it even though ADD is currently held (and vice versa).
    (b) When the last holder releases, ALL waiters of the other state are admitted together
        (one batch, one handover). Waiters of the released state that queued behind that batch
        stay queued: they are now "the other state" and form the next batch.
    (c) Batches therefore alternate ADD, BLOCK, ADD, ... A late arrival joins the pending
        batch of its own state, so a waiter waits for at most the current phase plus one
        phase of the other state.
    (d) A waiter cancelled while it waits leaves no trace. If it was the last member of the
        pending batch of the other state, the waiters of the current state that had queued
        behind that batch have nothing left to wait for, and are admitted at once (they join
        the current phase).

Invariants (checked by `_check_invariants`, which the unit tests call after every step):
    I1  `_holders == 0` iff `_state is None`; `_holders` equals the sum of the owner counts of
        `_state`, and the other state has no owner counts.
    I2  Waiters exist only while the lock is held (a free lock has no waiters: a release that
        frees the lock always hands it over in the same step).
    I3  Waiters of the current state exist only while waiters of the other state exist
        (rule (a) is the only reason to queue for the held state; rule (d) restores I3).
    I4  Every waiter is in exactly one queue and is not rescheduled until it is admitted; the
        admitting code (release or abort) has already counted it as a holder when it wakes, so
        no newcomer can slip in between handover and wake-up.

Atomicity: everything here is synchronous except the single `wait_task_rescheduled` in
`acquire`; trio runs code between checkpoints alone, so no further locking is needed. The
abort callback (cancellation) runs synchronously in the run loop and repairs the queues in
the same step.

Owners are the requesting thread ids (`tid`, fuse-facts row 1b) that ops.py gets from the
patched binding; 0 means "unknown" (stock pyfuse3, writeback, RELEASE). One owner may hold
the same state several times at once: with direct_io=False the kernel sends the 1 MiB chunks of
one O_DIRECT syscall as separate requests that are outstanding together (fuse-facts row 2), so
owner counts are counted, not flags. `holds(0, ...)` is always False: tid 0 is nobody.

A task must never request a state of a lock while it (the same trio task) holds the other
state: that is a self-deadlock, and the lock does not detect it (owners are tids, and one tid
legitimately has several requests in flight). See diofs/locks/__init__.py for the lock order.

Stats (diofs.stats): `locks.add_waits` / `locks.block_waits` (acquisitions that had to wait),
`locks.add_wait_ns` / `locks.block_wait_ns` (total time waited, trio clock),
`locks.cancelled_waits`, `locks.handovers` (batches admitted by release or abort),
gauges `locks.waiters_now` (tasks waiting on any lock) and `locks.contended_now` (locks with at
least one waiter).

Not here: the `--bug no-pagecache-lock` switch. The fill path (diofs/buffered.py) decides
whether to take the ADD state at all; the lock itself always works.
"""

from __future__ import annotations

import contextlib
import enum
import types
from dataclasses import dataclass, field

import trio

from diofs import stats

__all__ = ["LockStatistics", "PagecacheLock", "State"]


class State(enum.Enum):
    ADD = "add"
    BLOCK = "block"

    # Members are singletons: identity hashing (a C slot) instead of Enum's Python-level
    # hash(name), a Python call per dict lookup on the direct-write hot path.
    __hash__ = object.__hash__


def _other(state: State) -> State:
    return State.BLOCK if state is State.ADD else State.ADD


_WAITS = {State.ADD: "locks.add_waits", State.BLOCK: "locks.block_waits"}
_WAIT_NS = {State.ADD: "locks.add_wait_ns", State.BLOCK: "locks.block_wait_ns"}


@dataclass(frozen=True, slots=True)
class LockStatistics:
    """A snapshot of one lock (`PagecacheLock.statistics()`), for the unit tests.

    `holders` / `waiters`: state value ("add", "block") -> number of tasks.
    `owners`: state value -> tid -> number of holds (tid 0 = unknown requester).
    `waiting_owners`: the same for waiters. `state`: the held state's value, or None if free.
    """

    holders: dict[str, int]
    waiters: dict[str, int]
    owners: dict[str, dict[int, int]]
    waiting_owners: dict[str, dict[int, int]] = field(default_factory=dict)
    state: str | None = None


@dataclass(eq=False, slots=True)
class _Waiter:
    task: trio.lowlevel.Task
    owner: int


class _PagecacheHold(contextlib.AbstractAsyncContextManager[None]):
    """`async with lock.add(tid):` acquires on entry and releases on exit."""

    __slots__ = ("_lock", "_owner", "_state")

    def __init__(self, lock: PagecacheLock, state: State, owner: int) -> None:
        self._lock = lock
        self._state = state
        self._owner = owner

    async def __aenter__(self) -> None:
        await self._lock.acquire(self._state, self._owner)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._lock.release(self._state, self._owner)


class PagecacheLock:
    """The two-state shared lock of one inode. trio only, one event loop, no threads.

    All attributes are protected by trio's run-to-checkpoint atomicity (no lock object):
        `_state`, `_holders`, `_owners`: the held state, its holder count, per-tid counts.
        `_waiters`: per state, an insertion-ordered dict of `_Waiter` (FIFO, O(1) removal).
    """

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self._state: State | None = None
        self._holders = 0
        self._owners: dict[State, dict[int, int]] = {State.ADD: {}, State.BLOCK: {}}
        self._waiters: dict[State, dict[_Waiter, None]] = {State.ADD: {}, State.BLOCK: {}}

    def __repr__(self) -> str:
        st = self._state.value if self._state else "free"
        return (
            f"<PagecacheLock ino={self.ino} {st} holders={self._holders} "
            f"waiting add={len(self._waiters[State.ADD])} "
            f"block={len(self._waiters[State.BLOCK])}>"
        )

    # -- acquiring -------------------------------------------------------------------------

    def _admissible(self, state: State) -> bool:
        """Rule (a): free or held in `state`, and nobody waits for the other state."""
        return (self._state is None or self._state is state) and not self._waiters[_other(state)]

    def _grant(self, state: State, owner: int) -> None:
        self._state = state
        self._holders += 1
        owners = self._owners[state]
        owners[owner] = owners.get(owner, 0) + 1

    def acquire_nowait(self, state: State, owner: int = 0) -> None:
        """`acquire` without waiting; trio.WouldBlock if it would wait (rule (a))."""
        if not self._admissible(state):
            raise trio.WouldBlock
        self._grant(state, owner)

    def admissible(self, state: State) -> bool:
        """`acquire_nowait(state)` would succeed."""
        return self._admissible(state)

    @trio.lowlevel.enable_ki_protection
    async def acquire(self, state: State, owner: int = 0) -> None:
        """Take `state` for `owner` (the requesting tid; 0 = unknown), waiting if needed.

        A checkpoint only when it has to wait: the uncontended path is on every request
        (measured: a schedule point here cost ~10% of a 4 KiB direct write), and the handler
        around it checkpoints anyway. Cancelled while waiting: nothing is held and no trace
        is left.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._admissible(state):
            self._grant(state, owner)
            return

        waiter = _Waiter(trio.lowlevel.current_task(), owner)
        queue = self._waiters[state]
        if not self._waiters[State.ADD] and not self._waiters[State.BLOCK]:
            stats.add("locks.contended_now", 1)
        queue[waiter] = None
        stats.add("locks.waiters_now", 1)
        start = trio.current_time()

        def abort(_raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._abandon(state, waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        # The one checkpoint: on return we have been admitted by _admit_all (I4).
        await trio.lowlevel.wait_task_rescheduled(abort)
        stats.add(_WAITS[state], 1)
        stats.add(_WAIT_NS[state], int((trio.current_time() - start) * 1e9))

    def _admit_all(self, state: State) -> None:
        """Rules (b) and (d): admit every waiter of `state`, in FIFO order, in one step."""
        queue = self._waiters[state]
        n = len(queue)
        for waiter in queue:
            self._grant(state, waiter.owner)
            trio.lowlevel.reschedule(waiter.task)
        queue.clear()
        stats.add("locks.waiters_now", -n)
        stats.add("locks.handovers", 1)
        if not self._waiters[_other(state)]:
            stats.add("locks.contended_now", -1)

    def _abandon(self, state: State, waiter: _Waiter) -> None:
        """Abort callback of a cancelled waiter (runs synchronously in the run loop)."""
        queue = self._waiters[state]
        del queue[waiter]
        stats.add("locks.waiters_now", -1)
        stats.add("locks.cancelled_waits", 1)
        current = _other(state)
        if not queue and self._state is current and self._waiters[current]:
            # (d): waiters of the held state queued only behind this (now empty) batch.
            self._admit_all(current)
        elif not self._waiters[State.ADD] and not self._waiters[State.BLOCK]:
            stats.add("locks.contended_now", -1)

    # -- releasing -------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    def release(self, state: State, owner: int = 0) -> None:
        """Drop one hold of `state` by `owner`; the last one hands the lock over (rule (b)).

        Raises RuntimeError if `owner` does not hold `state` (nothing changes then).
        """
        owners = self._owners[state]
        count = owners.get(owner, 0)
        if self._state is not state or count == 0:
            raise RuntimeError(
                f"release of {state.value} on ino {self.ino} by tid {owner}, which does not "
                f"hold it ({self!r})"
            )
        if count == 1:
            del owners[owner]
        else:
            owners[owner] = count - 1
        self._holders -= 1
        if self._holders == 0:
            self._state = None
            if self._waiters[_other(state)]:
                self._admit_all(_other(state))
            elif self._waiters[state]:  # impossible by I3; kept so a bug cannot strand tasks
                self._admit_all(state)

    # -- context managers (say the intent at the call site) --------------------------------

    def add(self, owner: int = 0) -> contextlib.AbstractAsyncContextManager[None]:
        """`async with lock.add(tid):` hold the ADD state (page-cache fills)."""
        return _PagecacheHold(self, State.ADD, owner)

    def block(self, owner: int = 0) -> contextlib.AbstractAsyncContextManager[None]:
        """`async with lock.block(tid):` hold the BLOCK state (DIO write, truncate, punch)."""
        return _PagecacheHold(self, State.BLOCK, owner)

    # -- queries ---------------------------------------------------------------------------

    def idle(self) -> bool:
        """No holders and no waiters."""
        return (
            self._holders == 0 and not self._waiters[State.ADD] and not self._waiters[State.BLOCK]
        )

    def statistics(self) -> LockStatistics:
        waiting: dict[str, dict[int, int]] = {}
        for st, queue in self._waiters.items():
            counts: dict[int, int] = {}
            for w in queue:
                counts[w.owner] = counts.get(w.owner, 0) + 1
            waiting[st.value] = counts
        return LockStatistics(
            holders={st.value: (self._holders if st is self._state else 0) for st in State},
            waiters={st.value: len(self._waiters[st]) for st in State},
            owners={st.value: dict(self._owners[st]) for st in State},
            waiting_owners=waiting,
            state=self._state.value if self._state else None,
        )

    # -- internals -------------------------------------------------------------------------

    def _check_invariants(self) -> None:
        """Assert I1-I3 (tests call this after every step; cheap enough for debugging)."""
        if self._state is None:
            assert self._holders == 0, self
            assert not any(self._owners[s] for s in State), self
            assert not any(self._waiters[s] for s in State), self  # I2
        else:
            assert self._holders > 0, self
            assert self._holders == sum(self._owners[self._state].values()), self
            assert not self._owners[_other(self._state)], self
            if self._waiters[self._state]:  # I3
                assert self._waiters[_other(self._state)], self
        assert all(c > 0 for s in State for c in self._owners[s].values()), self
