"""The --bug registry: each member switches one protection off (for demos and tests).

The code asks `bugs.enabled(Bug.X)` at the one place where the protection lives.
"""

from __future__ import annotations

import enum


class Bug(enum.Enum):
    NO_SHOOTDOWN = "no-shootdown"  # direct I/O leaves daemon cached pages in place (seed 004)
    NO_PAGECACHE_LOCK = "no-pagecache-lock"  # fills do not take the add/block lock (seed 004)
    NO_FAULT_MARKER = "no-fault-marker"  # own faults wait for their own BLOCK (seed 002/004)
    NO_ALIGN_CHECK = "no-align-check"  # misaligned O_DIRECT is accepted (SPEC 3)
    NO_SYNC_FLUSH = "no-sync-flush"  # O_SYNC/O_DSYNC writes replied before the flush (seed 001)
    SIZE_BEFORE_DATA = "size-before-data"  # i_size/extent published before data lands (seed 003)
    REPLY_IN_LOOP = "reply-in-loop"  # direct READ replies always from the main loop (seed 002)
    INVAL_BEFORE_REPLY = "inval-before-reply"  # answers wait for kernel invalidation (seed 002)
    # kernel writeback through an O_DIRECT fh goes direct; with inval-before-reply its
    # invalidation waits for the writeback of its own pages (generic/095 hang needs both)
    WRITEBACK_AS_DIRECT = "writeback-as-direct"
    # after every direct write of a kernel-cached file the invalidator drops its range, also
    # when no older page can be cached: a later O_DIRECT read into a mapping loses its bytes
    INVAL_ALWAYS = "inval-always"
    # an O_DIRECT open unmarks its inode when answered, before the kernel's whole-file drop
    # ran: a direct READ into a mapping, answered from the loop, hangs against that drop
    OPEN_DROP_AT_ANSWER = "open-drop-at-answer"
    # the mount uses a commit whose checksums match without checking it (format/verify.py): a
    # crafted extent on the superblock reads it back, and a write there destroys the image
    TRUST_CHECKSUMS = "trust-checksums"
    # the INIT reply lacks FUSE_HANDLE_KILLPRIV_V2 (libfuse 3.14's own): with xattrs answered,
    # the kernel sends GETXATTR(security.capability) before every WRITE
    NO_KILLPRIV_V2 = "no-killpriv-v2"
    # NBD requests up to 1 MiB run inline on the trio thread, as for the raw image: one slow
    # server round trip stalls every request, cached ones too (diofs/backend/nbd.py)
    NBD_INLINE_IO = "nbd-inline-io"
    # a flush after a lost NBD connection reports success for writes acknowledged before
    # the loss, which a crashed server may have dropped (diofs/backend/nbd.py, epochs)
    NBD_TRUST_RECONNECT = "nbd-trust-reconnect"

    # the mount replays a journal transaction whose header checks out without checking its
    # records' checksum (format/image.py, replay): a torn append is replayed as garbage
    TRUST_TORN_JOURNAL = "trust-torn-journal"
    # O_DSYNC direct writes in the native write pool hold neither the inode rwsem nor the
    # pagecache BLOCK while in flight: a truncate or punch runs under them (durable_pool.py)
    POOL_UNLOCKED = "pool-unlocked"
    # direct READs the binding answers natively stay armed when the file's mapping changes or
    # an exclusive rwsem hold is asked: after a punch hole or truncate they return the freed
    # blocks' old bytes (diofs/native_io.py)
    NATIVE_READ_ARMED = "native-read-armed"

    __hash__ = object.__hash__  # members are singletons; asked on every request (hot path)


_enabled: set[Bug] = set()


def names() -> list[str]:
    return [b.value for b in Bug]


def enable(names_: list[str]) -> None:
    """Enable the named bugs; raises ValueError naming the first unknown one."""
    for name in names_:
        try:
            _enabled.add(Bug(name))
        except ValueError:
            raise ValueError(f"unknown bug {name!r} (known: {', '.join(names())})") from None


def enabled(bug: Bug) -> bool:
    return bug in _enabled


def any_enabled() -> bool:
    return bool(_enabled)


def only(bug: Bug) -> bool:
    """`bug` is the one bug enabled."""
    return _enabled == {bug}


def active() -> list[str]:
    return sorted(b.value for b in _enabled)
