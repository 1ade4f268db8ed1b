"""Who made the current FUSE request, with which flags; the kernel-cache invalidation hook.

This is the one module that reads the additions of the patched pyfuse3 binding (the series
patches/pyfuse3/series, installed by scripts/setup), except the init-time switches, which are
attributes of `diofs.ops.Operations`. Everything else asks here.

Where each field comes from (notes/fuse-facts.md):
- `Request.tid` is `fuse_req_ctx(req)->pid`, which is the **thread id** of the calling
  thread, not the process id (row 1b). It is 0 for requests the kernel makes on its own
  behalf: RELEASE and writeback WRITEs. Stock pyfuse3 gives no pid at all to read/write.
- `Request.flags` is `fi->flags` of the request: the file's f_flags at the time of the
  request. It is the only truth about O_DIRECT and O_[D]SYNC (row 1c): O_DIRECT set with
  fcntl(F_SETFL) after open, and RWF_DSYNC/RWF_SYNC given to pwritev2, show up here but never
  at open time. FLUSH and FSYNC carry flags 0 (libfuse leaves them unset).
- The binding publishes both in `pyfuse3.request_context`, a ContextVar set at the start of
  the read, write, flush, fsync, release and fallocate handlers (in that request's trio task)
  and reset to (0, 0) before every other request. `current()` outside those handlers returns
  `Request(0, 0)`.
- `invalidate_kernel_range` wraps `pyfuse3.invalidate_inode_range`, which passes a byte range
  to `fuse_lowlevel_notify_inval_inode` (stock pyfuse3 can only invalidate the whole file,
  row 7). It blocks until the kernel has locked and dropped every cached page in the range; a
  page that is locked because a READ of it is waiting for diofs is only dropped once diofs
  answers that READ (row 3: the ABBA deadlock), so only the invalidator thread calls it.
- The binding's request_context also carries KILL_SUIDGID (bit 32 of the flags) on the
  WRITE, SETATTR and OPEN requests in which the kernel leaves killing suid/sgid to diofs
  (FUSE_HANDLE_KILLPRIV_V2, which libfuse 3.14 cannot negotiate: the binding adds it to the
  INIT reply itself when `Operations.enable_handle_killpriv_v2` is set). For setattr and open
  the context is set only when the bit is.
- `requests_queued()` polls the daemon's /dev/fuse descriptor (libfuse opened it; the binding
  exports it as `pyfuse3.get_session_fd()`): whether the kernel has another request waiting
  for the daemon right now.
- The patched binding also reads `Operations.enable_auto_inval_data`, which diofs sets to
  False: with FUSE_CAP_AUTO_INVAL_DATA, an mtime change seen in GETATTR makes the kernel drop
  the whole file's cache, which lost data under threaded mmap + O_DIRECT (row 9). diofs is
  the only writer of its image and invalidates explicitly instead.
"""

from __future__ import annotations

import errno
import select
from dataclasses import dataclass

import pyfuse3

from diofs.errors import EXIT_MOUNT_FAILED, DiofsError

#: What diofs needs of the patched binding, one name per patch of patches/pyfuse3/series
#: (module attributes, then `pyfuse3.Operations` attributes): check_binding() looks for each.
_BINDING_NAMES = (
    "request_context", "invalidate_inode_range", "ReplyFromThread", "KILL_SUIDGID",
    "handle_killpriv_v2_negotiated", "get_session_fd", "PooledWrite", "arm_native_read",
    "arm_native_writes",
)
_OPERATIONS_NAMES = (
    "fallocate", "enable_auto_inval_data", "enable_async_dio", "enable_write_views",
    "enable_eager_receive", "checkpoint_interval", "enable_handle_killpriv_v2", "read_sync",
    "write_sync", "receive_spin_us",
)

#: In `Request.flags` when the kernel asks diofs to kill suid/sgid (FUSE_HANDLE_KILLPRIV_V2,
#: negotiated with `Operations.enable_handle_killpriv_v2`): a WRITE, a SETATTR (truncate, chown) or
#: an OPEN with O_TRUNC by a caller without CAP_FSETID. Above the 32 open-flag bits.
KILL_SUIDGID: int = getattr(pyfuse3, "KILL_SUIDGID", 1 << 32)

# off_t is a signed 64-bit integer: lengths beyond it mean "to the end of the file".
_OFF_T_MAX = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Request:
    """Identity and flags of one FUSE data request.

    `tid`: thread id of the caller, 0 for kernel-initiated requests (writeback, RELEASE).
    `flags`: the request's fi->flags (open(2) flag bits as of this request).
    """

    tid: int
    flags: int

    @property
    def kill_suidgid(self) -> bool:
        """The kernel asks diofs to clear suid/sgid as it would (see KILL_SUIDGID)."""
        return bool(self.flags & KILL_SUIDGID)


def current() -> Request:
    """The request handled by the calling task (`Request(0, 0)` outside data handlers)."""
    tid, flags = pyfuse3.request_context.get()
    return Request(tid, flags)


def current_flags() -> int:
    """`current().flags` without building a Request (ops.read_sync / write_sync)."""
    return pyfuse3.request_context.get()[1]


def current_kill_suidgid() -> bool:
    """`current().kill_suidgid` without building a Request."""
    return bool(pyfuse3.request_context.get()[1] & KILL_SUIDGID)


def killpriv_v2_negotiated() -> bool:
    """Whether the INIT reply carried FUSE_HANDLE_KILLPRIV_V2 (the kernel offered it and the
    mount's Operations had `enable_handle_killpriv_v2` set at `pyfuse3.init`)."""
    return bool(pyfuse3.handle_killpriv_v2_negotiated())


def check_binding() -> None:
    """Raise DiofsError (exit code EXIT_MOUNT_FAILED) unless pyfuse3 carries the patch series."""
    missing = [n for n in _BINDING_NAMES if not hasattr(pyfuse3, n)]
    missing += [f"Operations.{n}" for n in _OPERATIONS_NAMES if not hasattr(pyfuse3.Operations, n)]
    if missing:
        raise DiofsError(
            f"pyfuse3 lacks patches/pyfuse3 (no {', '.join(missing)}); run scripts/setup",
            EXIT_MOUNT_FAILED,
        )


def invalidate_kernel_range(ino: int, start: int, end: int) -> None:
    """Drop the kernel's cached pages of inode `ino` overlapping [start, end), and its attrs.

    `end == 0` (or any `end` beyond off_t) means "up to the end of the file", the kernel's
    own convention for a zero length; otherwise an empty range (`end <= start`) does nothing.
    The kernel widens the range to whole pages. An inode the kernel has never looked up
    (ENOENT) has nothing cached and is ignored; other errors raise OSError.

    BLOCKING: it waits for folio locks, writeback and launder WRITEs that the kernel only
    ends once diofs answers other requests (fuse-facts rows 3 and 10). Called from the
    invalidator thread of diofs/kernel_cache.py, which no answer waits for; a handler that
    awaits it (`--bug inval-before-reply`, `-o shootdown=locked`) can hang the mount.
    """
    if start < 0:
        raise ValueError(f"negative start {start}")
    if end == 0 or end > _OFF_T_MAX:
        length = 0
    elif end <= start:
        return
    else:
        length = end - start
    try:
        pyfuse3.invalidate_inode_range(ino, start, length)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


_fuse_poll: select.poll | None = None
_fuse_poll_looked = False


def _find_fuse_fd() -> int | None:
    """The daemon's /dev/fuse descriptor, or None (no session: unit tests)."""
    try:
        return int(pyfuse3.get_session_fd())
    except RuntimeError:  # pyfuse3.init not called
        return None


def requests_queued() -> bool:
    """Whether the kernel has another request queued for the daemon right now: a zero-timeout
    poll(2) of /dev/fuse (about 1 us). False without a /dev/fuse descriptor. Looked up on the
    first call, which the daemon makes only once mounted (a sync WRITE)."""
    global _fuse_poll, _fuse_poll_looked
    if not _fuse_poll_looked:
        _fuse_poll_looked = True
        fd = _find_fuse_fd()
        if fd is not None:
            _fuse_poll = select.poll()
            _fuse_poll.register(fd, select.POLLIN)
    return _fuse_poll is not None and bool(_fuse_poll.poll(0))
