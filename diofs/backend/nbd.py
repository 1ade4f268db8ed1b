"""NbdBackend: the image as an NBD export, through libnbd (Debian's python3-libnbd, module `nbd`).

Image names (`is_uri`, `parse_uri`: the one place a URI is recognised and checked):
    nbd://HOST[:PORT]/EXPORT              TCP (port 10809 by default)
    nbd+unix:///EXPORT?socket=PATH        a unix socket
libnbd parses the URI itself (nbd_connect_uri); `parse_uri` only rejects what diofs does not
support (TLS schemes `nbds`, vsock, a missing socket) with a one-line error.

How the trio loop never blocks on the network:
    - `inline_io_bytes` is 0: fs.Filesystem runs every call of this backend in a worker thread
      (trio.to_thread, at most 4 at a time: fs.io_limiter; commits use their own thread), never
      inline on the trio thread, and takes no synchronous fast path (fs.overwrite_inline). A
      request that takes 10 ms on the server costs the loop only the thread hop; cached reads
      and writes are served meanwhile (measured in tests/test_backend_nbd.py).
    - several requests in flight: a pool of up to `connections` libnbd handles (4, one per
      worker thread; 1 if the server does not advertise multi-conn, since then a read on one
      connection need not see a write completed on another; fewer if the server takes fewer
      clients than it would need: connections after the first that do not connect within
      _EXTRA_CONNECT_S are left out, with a warning). A call takes a handle from the
      pool, issues one aio_pread / aio_pwrite / aio_flush on it and drives that handle's
      state machine with nbd.poll() until the command completes or its deadline passes;
      libnbd releases the GIL while it waits. Each handle is used by one thread at a time, so
      there is no cross-thread libnbd state to reason about. Callers beyond the pool's size
      wait for a free handle (within the same deadline).

Durability (the Backend contract of diofs/backend/__init__.py):
    - flush() = NBD_CMD_FLUSH. With multi-conn, a flush on any connection covers writes
      completed on all of them (NBD spec); without it there is one connection. A server that
      cannot flush is refused (crash consistency needs it) unless `unsafe` (-o nbd_unsafe);
      flush() is then a no-op and the mount is not crash consistent.
    - write_durable() = NBD_CMD_WRITE with NBD_CMD_FLAG_FUA if the server offers FUA, else a
      write followed by a flush.
    - discard() = NBD_CMD_TRIM (if offered) of blocks a durable commit freed
      (fs.Filesystem.commit, with -o discard), so that thin-provisioned storage gets them
      back.
    - write_zeroes() = NBD_CMD_WRITE_ZEROES if the server offers it (the partial blocks of a
      truncate, punch or zero range: no zero bytes on the wire, and the server may keep them
      sparse), else a write of zeros. A write like any other for flush and the epochs.

Faults:
    - every call has a deadline of `timeout` seconds (-o nbd_timeout, default 30): waiting for
      a handle, connecting, and the request itself. Past it the handle is closed (the request
      is abandoned: libnbd never touches the caller's buffer after the close) and the call
      raises OSError(EIO). Server errors (nbdkit's error filter) raise OSError with the
      server's errno at once.
    - a connection that dies (server killed) is dropped; the next call reconnects, trying
      again every `retry` seconds (-o nbd_retry, default 1) until its deadline, so a server
      that returns within the timeout costs no error at all, and one that stays away gives
      EIO within the timeout. Once a reconnect has failed for a whole deadline the server
      counts as down: each later call makes one attempt of at most `retry` seconds and fails
      with EIO at once, so that a syscall that needs several image calls (writeback, flush,
      commit) also fails within about one timeout; the first connect that succeeds ends it.
      The daemon never hangs.
    - writes the server acknowledged but no flush has covered yet may be lost if the server
      crashed: a connection epoch counts connections lost or abandoned (timeouts); a flush
      whose oldest uncovered write was acknowledged in an earlier epoch than the one it ends
      in raises EIO (once), so that fsync and the metadata commit report it (the errseq path
      of diofs/durability.py) instead of claiming durability. This is conservative: a
      timeout alone also makes the next flush fail. All pooled connections are made at
      open, so every later connect follows a lost one and bumps the epoch.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diofs import bugs
from diofs.backend.raw import check_range
from diofs.bugs import Bug
from diofs.errors import DiofsError

__all__ = ["NbdBackend", "NbdOptions", "is_uri", "parse_uri"]

log = logging.getLogger(__name__)

SCHEMES = ("nbd", "nbd+unix")
_POLL_SLICE_S = 0.5  # a wait re-checks its deadline at least this often
_EXTRA_CONNECT_S = 2.0  # the pool's connections after the first must connect within this
_TRIM_MAX = 1 << 30  # NBD lengths are 32-bit (trim and write-zeroes requests)


def is_uri(image: str) -> bool:
    """True if `image` names an NBD export (nbd:// or nbd+unix://, or a scheme we refuse)."""
    return image.split(":", 1)[0].lower() in (*SCHEMES, "nbds", "nbds+unix", "nbd+vsock",
                                             "nbds+vsock") and "://" in image


def parse_uri(uri: str) -> str:
    """Check an NBD URI; return it unchanged, or raise DiofsError with a one-line reason."""
    try:
        u = urllib.parse.urlsplit(uri)
    except ValueError as exc:
        raise DiofsError(f"bad NBD URI {uri!r}: {exc}") from None
    if u.scheme not in SCHEMES:
        raise DiofsError(f"unsupported NBD URI scheme {u.scheme!r} in {uri!r} "
                         f"(use {' or '.join(s + '://' for s in SCHEMES)})")
    query = urllib.parse.parse_qs(u.query)
    if u.scheme == "nbd":
        if not u.hostname:
            raise DiofsError(f"bad NBD URI {uri!r}: no host (nbd://HOST[:PORT]/EXPORT)")
        try:
            u.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise DiofsError(f"bad NBD URI {uri!r}: bad port") from None
    elif not query.get("socket"):
        raise DiofsError(f"bad NBD URI {uri!r}: no socket (nbd+unix:///EXPORT?socket=PATH)")
    return uri


@dataclass
class NbdOptions:
    """The -o nbd_* mount options (defaults here)."""

    timeout: float = 30.0  # nbd_timeout=S: a call fails with EIO after this long
    retry: float = 1.0  # nbd_retry=S: pause between reconnect attempts
    unsafe: bool = False  # nbd_unsafe: accept a server that cannot flush
    connections: int = 4  # nbd_connections=N: handles in the pool (1 without multi-conn)


def _nbd() -> Any:
    try:
        import nbd
    except ImportError:
        raise DiofsError("NBD images need libnbd's Python module (python3-libnbd; run "
                         "scripts/setup)") from None
    return nbd


class _Slot:
    """One connection of the pool: a libnbd handle, None when it was lost."""

    __slots__ = ("h",)

    def __init__(self) -> None:
        self.h: Any = None  # an nbd.NBD (libnbd ships no type stubs)


class NbdBackend:
    """An NBD export as a Backend. Thread-safe: each call uses one pooled handle alone."""

    @property
    def inline_io_bytes(self) -> int:
        """fs.Filesystem: never call this backend on the trio thread (module docstring)."""
        return 1 << 20 if bugs.enabled(Bug.NBD_INLINE_IO) else 0

    def __init__(self, uri: str, opts: NbdOptions | None = None, *, writable: bool = True) -> None:
        self.nbd = _nbd()
        self.uri = parse_uri(uri)
        self.path = uri  # what error messages call the image
        self.opts = opts or NbdOptions()
        self.writable = writable
        self._lock = threading.Lock()  # guards _epoch and _dirty_epoch
        self._epoch = 0  # connections lost or abandoned so far
        self._dirty_epoch: int | None = None  # epoch of the oldest write no flush covered
        self._closed = False
        self._down = False  # a reconnect failed for a whole deadline; cleared by a connect
        first = _Slot()
        try:
            first.h = self._connect(time.monotonic() + self.opts.timeout)
        except OSError as exc:
            raise DiofsError(f"cannot connect to NBD server {uri}: {exc.strerror}") from None
        h = first.h
        self._size = h.get_size()
        self.can_flush = bool(h.can_flush())
        self.can_fua = bool(h.can_fua())
        self.multi_conn = bool(h.can_multi_conn())
        self.can_trim = bool(h.can_trim())
        self.can_zero = bool(h.can_zero())
        if writable and h.is_read_only():
            raise DiofsError(f"NBD export {uri} is read-only")
        if writable and not self.can_flush and not self.opts.unsafe:
            raise DiofsError(f"NBD server {uri} cannot flush: crash consistency needs "
                             f"NBD_CMD_FLUSH (mount with -o nbd_unsafe to accept that)")
        n = max(1, self.opts.connections) if self.multi_conn else 1
        self._slots = [first]
        # all now: see the module docstring (epochs). A server may advertise multi-conn and
        # still take fewer clients (qemu-nbd --shared=2 leaves the third one's handshake
        # unanswered): the pool is then as large as the server allows.
        until = time.monotonic() + min(self.opts.timeout, _EXTRA_CONNECT_S)
        while len(self._slots) < n:
            slot = _Slot()
            try:
                slot.h = self._connect(until)
            except OSError:
                log.warning("NBD server %s accepted %d of %d connections within %gs: using %d "
                            "(qemu-nbd: raise --shared)", uri, len(self._slots), n,
                            min(self.opts.timeout, _EXTRA_CONNECT_S), len(self._slots))
                break
            self._slots.append(slot)
        self._pool: queue.LifoQueue[_Slot] = queue.LifoQueue()
        for slot in reversed(self._slots):
            self._pool.put(slot)

    # ------------------------------------------------------------------ Backend
    def size(self) -> int:
        return int(self._size)

    def read(self, off: int, size: int) -> bytes:
        buf = bytearray(size)
        self.readinto(off, memoryview(buf))
        return bytes(buf)

    def readinto(self, off: int, buf: memoryview) -> None:
        mv = memoryview(buf).cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        check_range(off, mv.nbytes, self._size)
        if mv.nbytes:
            nbd = self.nbd
            self._call("read", lambda h: h.aio_pread(nbd.Buffer.from_buffer(mv), off))

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._write(off, data, fua=False)

    def write_durable(self, off: int, data: bytes | bytearray | memoryview) -> None:
        if self.can_fua:
            self._write(off, data, fua=True)
        else:
            self._write(off, data, fua=False)
            self.flush()

    def _write(self, off: int, data: bytes | bytearray | memoryview, *, fua: bool) -> None:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        check_range(off, mv.nbytes, self._size)
        if not self.writable:
            raise OSError(errno.EROFS, f"image {self.uri} is open read-only")
        if not mv.nbytes:
            return
        nbd = self.nbd
        flags = nbd.CMD_FLAG_FUA if fua else 0
        self._call("write", lambda h: h.aio_pwrite(nbd.Buffer.from_buffer(mv), off,
                                                   flags=flags), write=not fua)

    def write_zeroes(self, off: int, n: int) -> None:
        """NBD_CMD_WRITE_ZEROES of `[off, off + n)` if the server offers it, else a write of
        zeros (module docstring)."""
        check_range(off, n, self._size)
        if not self.writable:
            raise OSError(errno.EROFS, f"image {self.uri} is open read-only")
        if not self.can_zero:
            self._write(off, bytes(n), fua=False)
            return
        while n > 0:
            step = min(n, _TRIM_MAX)

            def zero(h: Any, o: int = off, c: int = step) -> int:
                return int(h.aio_zero(c, o))

            self._call("write-zeroes", zero, write=True)
            off += step
            n -= step

    def discard(self, off: int, n: int) -> None:
        """NBD_CMD_TRIM of a range that holds nothing (blocks a durable commit freed), if the
        server offers trim; a no-op otherwise. Not counted as a write to flush: losing a trim
        at a crash leaves old bytes in free blocks, which nothing reads."""
        check_range(off, n, self._size)
        if not self.can_trim or not self.writable:
            return
        while n > 0:
            step = min(n, _TRIM_MAX)

            def trim(h: Any, o: int = off, c: int = step) -> int:
                return int(h.aio_trim(c, o))

            self._call("trim", trim)
            off += step
            n -= step

    def flush(self) -> None:
        if not self.can_flush:
            return  # nbd_unsafe: nothing to ask the server for
        with self._lock:
            # the writes acknowledged so far; one acknowledged during the flush sets
            # _dirty_epoch again and waits for the next flush
            oldest, self._dirty_epoch = self._dirty_epoch, None
        try:
            self._call("flush", lambda h: h.aio_flush())
        except BaseException:
            self._mark_dirty(oldest)
            raise
        with self._lock:
            lost = oldest is not None and oldest != self._epoch
        if bugs.enabled(Bug.NBD_TRUST_RECONNECT):
            lost = False
        if lost:
            raise OSError(errno.EIO, f"NBD server {self.uri}: a connection died with "
                          "acknowledged writes that no flush had covered; they may be lost")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            h, slot.h = slot.h, None
            if h is not None:
                try:
                    if h.aio_is_ready():
                        h.shutdown()
                except self.nbd.Error:
                    pass
                del h  # the last reference: libnbd closes the socket

    def __repr__(self) -> str:
        return f"NbdBackend({self.uri!r}, size={self._size}, writable={self.writable})"

    # ------------------------------------------------------------------ requests
    def _call(self, what: str, submit: Callable[[Any], int], *, write: bool = False) -> None:
        """Run `submit(handle) -> cookie` on a pooled handle and wait for it, reconnecting
        after a dead connection, all within the deadline; OSError on failure."""
        nbd = self.nbd
        deadline = time.monotonic() + self.opts.timeout
        slot = self._take(deadline, what)
        try:
            while True:
                if slot.h is None:
                    # a server known to be down gets one short attempt, not the full wait
                    until = (min(deadline, time.monotonic() + self.opts.retry) if self._down
                             else deadline)
                    try:
                        slot.h = self._connect(until)
                    except OSError as exc:  # callers see EIO, as from a dead disk
                        self._down = True
                        raise OSError(errno.EIO, f"NBD {what} on {self.uri}: server lost "
                                      f"({exc.strerror})") from None
                    if self._down:
                        self._down = False
                        log.warning("NBD server %s is back", self.uri)
                h = slot.h
                try:
                    cookie = submit(h)
                    while not h.aio_command_completed(cookie):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self._drop(slot)
                            raise OSError(errno.EIO, f"NBD {what} on {self.uri}: no answer "
                                          f"within nbd_timeout={self.opts.timeout:g}s")
                        h.poll(max(1, int(min(left, _POLL_SLICE_S) * 1000)))
                except nbd.Error as exc:
                    if h.aio_is_ready() or h.aio_is_processing():
                        # the server answered with an error; the connection is fine
                        raise OSError(exc.errnum or errno.EIO,
                                      f"NBD {what} on {self.uri}: {exc.string}") from None
                    log.warning("NBD connection to %s lost during %s: %s", self.uri, what,
                                exc.string)
                    self._drop(slot)
                    if time.monotonic() >= deadline:
                        raise OSError(errno.EIO, f"NBD {what} on {self.uri}: connection "
                                      "lost") from None
                    continue  # reconnect and resend (reads, writes and flushes repeat safely)
                if write:
                    self._mark_dirty(self._epoch)
                return
        finally:
            self._pool.put(slot)

    def _take(self, deadline: float, what: str) -> _Slot:
        if self._closed:
            raise OSError(errno.EIO, f"NBD image {self.uri} is closed")
        try:
            return self._pool.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise OSError(errno.EIO, f"NBD {what} on {self.uri}: no free connection within "
                          f"nbd_timeout={self.opts.timeout:g}s") from None

    def _mark_dirty(self, epoch: int | None) -> None:
        if epoch is not None:
            with self._lock:
                if self._dirty_epoch is None or epoch < self._dirty_epoch:
                    self._dirty_epoch = epoch

    def _drop(self, slot: _Slot) -> None:
        """Close a slot's handle (dead or timed out): a new epoch (see the module docstring)."""
        h, slot.h = slot.h, None
        with self._lock:
            self._epoch += 1
        del h

    def _connect(self, deadline: float) -> Any:
        """A new handle, connected and negotiated; retries every `retry` seconds until the
        deadline, then OSError (ECONNREFUSED, ENOENT, ... or EIO for a timeout)."""
        nbd = self.nbd
        while True:
            h = nbd.NBD()
            h.set_handle_name("diofs")
            try:
                h.aio_connect_uri(self.uri)
                while not h.aio_is_ready():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise OSError(errno.EIO, f"NBD server {self.uri}: no connection "
                                      f"within nbd_timeout={self.opts.timeout:g}s")
                    if h.aio_is_dead() or h.aio_is_closed():
                        raise nbd.Error("connection closed during negotiation", errno.EIO)
                    h.poll(max(1, int(min(left, _POLL_SLICE_S) * 1000)))
                return h
            except nbd.Error as exc:
                err = OSError(exc.errnum or errno.EIO, f"NBD server {self.uri}: {exc.string}")
            del h
            pause = min(self.opts.retry, deadline - time.monotonic())
            if pause <= 0:
                raise err
            time.sleep(pause)
