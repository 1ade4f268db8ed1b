"""RawImage: the image file (or block device) accessed with pread / pwrite / fdatasync.

Invariants:
    - one file descriptor, opened O_RDWR (or O_RDONLY when not writable), O_CLOEXEC;
    - positional I/O only (os.pread / os.preadv / os.pwrite), so concurrent calls from several
      worker threads need no lock: the kernel keeps no shared file position for them;
    - every range must lie inside `[0, size())` (ValueError otherwise); `size()` is measured
      once at open (st_size for a file; ioctl BLKGETSIZE64 for a block device, whose st_size
      is 0);
    - short transfers are retried until complete; a read that hits end-of-file inside the
      size measured at open (the image shrank under us) raises OSError(EIO);
    - OSError from the kernel propagates unchanged (callers map `exc.errno`).

Flush on a block device (a disk, a loop device, rbd-nbd's /dev/nbdN): the device is opened
without O_DIRECT, so writes land in the block device's page cache. fdatasync (blkdev_fsync)
writes those pages back and then sends the device a cache flush (REQ_PREFLUSH: a SCSI SYNCHRONIZE
CACHE, an NVMe Flush, NBD_CMD_FLUSH for /dev/nbdN, an fsync of the backing file for a loop
device); RWF_DSYNC writes take the same path for their range (generic_write_sync) and so also
flush the device's whole volatile cache. Both are what the Backend contract asks. A device that
lies about flushes (a write cache without power-loss protection that ignores them) breaks crash
consistency as it breaks every filesystem's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

__all__ = ["RawImage", "block_device_size", "check_range"]

_ZERO_CHUNK = 1 << 20  # write_zeroes writes from a zero buffer of at most this size
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): a block device's size in bytes


def block_device_size(fd: int) -> int:
    """The size in bytes of the block device open on `fd` (ioctl BLKGETSIZE64)."""
    return int(struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0])


def check_range(off: int, n: int, size: int) -> None:
    """ValueError unless `[off, off + n)` lies inside `[0, size)`."""
    if off < 0 or n < 0 or off + n > size:
        raise ValueError(f"range [{off}, {off + n}) outside the image [0, {size})")


class RawImage:
    """pread / pwrite on one image. Thread-safe without locks (positional I/O only)."""

    def __init__(self, path: str, *, writable: bool = True) -> None:
        self.path = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self._fd = os.open(path, flags)
        try:
            st = os.fstat(self._fd)
            self.block_device = stat.S_ISBLK(st.st_mode)
            self._size = block_device_size(self._fd) if self.block_device else st.st_size
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False

    @property
    def fd(self) -> int:
        """The image's file descriptor (for copying it; do not move its file position)."""
        return self._fd

    def size(self) -> int:
        return self._size

    def read(self, off: int, size: int) -> bytes:
        check_range(off, size, self._size)
        data = os.pread(self._fd, size, off)
        if len(data) == size:
            return data
        buf = bytearray(size)
        buf[: len(data)] = data
        self._readinto(off + len(data), memoryview(buf)[len(data) :])
        return bytes(buf)

    def readinto(self, off: int, buf: memoryview) -> None:
        mv = memoryview(buf).cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        check_range(off, mv.nbytes, self._size)
        self._readinto(off, mv)

    def _readinto(self, off: int, mv: memoryview) -> None:
        done = 0
        n = mv.nbytes
        while done < n:
            got = os.preadv(self._fd, [mv[done:]], off + done)
            if got == 0:
                raise OSError(errno.EIO, f"short read at {off + done}: image {self.path} shrank")
            done += got

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._write(off, data, 0)

    def write_durable(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._write(off, data, os.RWF_DSYNC)

    def write_zeroes(self, off: int, n: int) -> None:
        """A plain write of zeros (diofs zeroes only partial blocks, < one block each: a
        pwrite from a zero buffer is as cheap as fallocate(FALLOC_FL_ZERO_RANGE) there, and
        works the same on a file and a block device)."""
        check_range(off, n, self._size)
        zero = bytes(min(n, _ZERO_CHUNK))
        while n > 0:
            step = min(n, _ZERO_CHUNK)
            self._write(off, memoryview(zero)[:step], 0)
            off += step
            n -= step

    def _write(self, off: int, data: bytes | bytearray | memoryview, flags: int) -> None:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        check_range(off, n, self._size)
        if not self.writable:
            raise OSError(errno.EROFS, f"image {self.path} is open read-only")
        done = os.pwritev(self._fd, [mv], off, flags)
        while done < n:
            put = os.pwritev(self._fd, [mv[done:]], off + done, flags)
            if put == 0:
                raise OSError(errno.EIO, f"short write at {off + done} on image {self.path}")
            done += put

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"RawImage({self.path!r}, size={self._size}, writable={self.writable})"
