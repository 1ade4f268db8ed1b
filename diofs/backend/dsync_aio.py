"""Durable image writes in flight together: Linux AIO (io_submit) of O_DIRECT writes with
RWF_DSYNC on a second descriptor of the raw image, completions reaped on the trio thread.

Why: O_DSYNC writes at queue depth 16 (fio libaio) were made durable by group commit, one
fdatasync of the whole image per batch: one flush at a time, ~7 writes each. The C peer issues
16 O_DSYNC pwrites from 16 threads and the host file system and block layer merge their flushes
(on this VM 16 threads of RWF_DSYNC writes do 11.7-18.1k writes/s, write + fdatasync groups
8.1-12.2k). Python threads cannot do that (GIL hand-offs cost more than the write: docs/bench.md,
"Measured and dropped"), but the kernel can: io_submit returns at once for O_DIRECT, the write
completes (as a FUA write, or write + flush) while the trio thread serves other requests, and
one eventfd wake-up reaps every completion that is ready. No thread, no GIL hand-off.

What it owns: one O_DIRECT descriptor of the image, one AIO context (`MAX_IN_FLIGHT` slots),
one eventfd, a pool of page-aligned bounce buffers (O_DIRECT needs aligned memory; the request
data is copied, `MAX_WRITE_BYTES` at most), and the reaper: a trio system task that waits for
the eventfd and wakes the writers (`trio.lowlevel.spawn_system_task`, because the backend has no
nursery of its own; it dies with the run). Units: bytes.

Invariants: a caller's `write` returns only after the kernel completed the write (the wait is
shielded from cancellation: the buffer and the image range stay in use until then), so the
caller's locks cover the whole flight. The host kernel keeps the O_DIRECT write coherent with
the buffered descriptor's page cache (it writes back and drops the range). Offsets and lengths
must be multiples of 4096 (diofs's block size); `available()` is False where O_DIRECT or AIO is
refused (then callers keep group commit).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os

import trio

MAX_IN_FLIGHT = 128
MAX_WRITE_BYTES = 128 << 10
_ALIGN = 4096

_SYS_IO_SETUP, _SYS_IO_DESTROY, _SYS_IO_GETEVENTS, _SYS_IO_SUBMIT = 206, 207, 208, 209  # x86_64
_IOCB_CMD_PWRITE = 1
_IOCB_FLAG_RESFD = 1

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Iocb(ctypes.Structure):  # struct iocb, linux/aio_abi.h (little-endian layout)
    _fields_ = (
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    )


class _IoEvent(ctypes.Structure):  # struct io_event
    _fields_ = (
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    )


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Flight:
    __slots__ = ("buf", "done", "iocb", "res")

    def __init__(self, buf: tuple[mmap.mmap, int], iocb: _Iocb) -> None:
        self.buf = buf
        self.iocb = iocb  # kept alive until the kernel is done with it
        self.done = trio.Event()
        self.res = 0


class DsyncAio:
    """See the module docstring. `DsyncAio.open(path)` or None where it cannot work."""

    def __init__(self, fd: int, ctx: int, efd: int) -> None:
        self._fd = fd
        self._ctx = ctx
        self._efd = efd
        self._flights: dict[int, _Flight] = {}
        self._tokens = itertools.count(1)
        self._free: list[tuple[mmap.mmap, int]] = []  # (buffer, its address)
        self._reaper_started = False
        self._events = (_IoEvent * MAX_IN_FLIGHT)()
        self._zero = _Timespec(0, 0)
        self._closed = False

    @classmethod
    def open(cls, path: str) -> DsyncAio | None:
        """An AIO writer on `path`, or None if O_DIRECT or AIO is refused there."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return None
        ctx = ctypes.c_ulong(0)
        if _syscall(_SYS_IO_SETUP, MAX_IN_FLIGHT, ctypes.byref(ctx)) != 0:
            os.close(fd)
            return None
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return cls(fd, ctx.value, efd)

    def _take_buffer(self) -> tuple[mmap.mmap, int]:
        if self._free:
            return self._free.pop()
        buf = mmap.mmap(-1, MAX_WRITE_BYTES)  # page-aligned; kept in the pool, never closed,
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # so its address stays valid
        return buf, addr

    def fits(self, off: int, size: int) -> bool:
        return (
            not self._closed and 0 < size <= MAX_WRITE_BYTES and not off % _ALIGN
            and not size % _ALIGN and len(self._flights) < MAX_IN_FLIGHT
        )

    async def write(self, off: int, data: bytes | memoryview) -> None:
        """Write `data` at image offset `off`, durable (RWF_DSYNC) when this returns. The
        caller checked `fits`. Raises OSError with the write's errno."""
        if not self._reaper_started:
            self._reaper_started = True
            trio.lowlevel.spawn_system_task(self._reap, name="diofs-dsync-aio-reaper")
        n = len(data)
        buf = self._take_buffer()
        buf[0][:n] = data
        token = next(self._tokens)
        iocb = _Iocb(
            aio_data=token, aio_rw_flags=os.RWF_DSYNC, aio_lio_opcode=_IOCB_CMD_PWRITE,
            aio_fildes=self._fd, aio_buf=buf[1], aio_nbytes=n, aio_offset=off,
            aio_flags=_IOCB_FLAG_RESFD, aio_resfd=self._efd,
        )
        flight = _Flight(buf, iocb)
        ptrs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(iocb))
        if _syscall(_SYS_IO_SUBMIT, ctypes.c_ulong(self._ctx), 1, ptrs) != 1:
            self._free.append(buf)
            err = ctypes.get_errno() or errno.EIO
            raise OSError(err, f"io_submit: {os.strerror(err)}")
        self._flights[token] = flight
        with trio.CancelScope(shield=True):  # the kernel owns buf and the range until done
            await flight.done.wait()
        self._free.append(buf)
        if flight.res < 0:
            raise OSError(-flight.res, f"durable image write at {off}: {os.strerror(-flight.res)}")
        if flight.res != n:
            raise OSError(errno.EIO, f"short durable image write at {off}: {flight.res} of {n}")

    async def _reap(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._efd)
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                continue
            self._reap_ready()

    def _reap_ready(self) -> None:
        while self._flights:
            got = _syscall(
                _SYS_IO_GETEVENTS, ctypes.c_ulong(self._ctx), 0, MAX_IN_FLIGHT, self._events,
                ctypes.byref(self._zero),
            )
            if got <= 0:
                return
            for ev in self._events[:got]:
                flight = self._flights.pop(ev.data, None)
                if flight is not None:
                    flight.res = ev.res
                    flight.done.set()

    def close(self) -> None:
        """Wait for writes still in flight (io_destroy does), then close the descriptors."""
        if self._closed:
            return
        self._closed = True
        _syscall(_SYS_IO_DESTROY, ctypes.c_ulong(self._ctx))
        os.close(self._efd)
        os.close(self._fd)
