"""I/O helpers for tests, demos and benchmarks: one helper per job, one signature each.

Argument order follows os.pread / os.pwrite: `(fd, size, off)` to read, `(fd, data, off)` to
write. Direct-I/O helpers take an open fd or a path (opened with O_DIRECT for the one call).
They return what the syscall returned (bytes read, count written) and never assert, so that a
test of short transfers or errors can use them too; tests of whole transfers assert the result.

Units: bytes; buffers from `aligned()` are anonymous mmaps, so page-aligned (O_DIRECT wants the
memory aligned to the logical block size, and a page always is).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import TypeVar

PAGE = mmap.PAGESIZE
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_PATTERN_MAGIC = 0xD10F5EED
_T = TypeVar("_T")

Target = int | str | os.PathLike[str]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def aligned(size: int = 0, data: bytes | memoryview = b"") -> mmap.mmap:
    """A page-aligned anonymous buffer of max(size, len(data), PAGE) bytes, `data` at 0."""
    buf = mmap.mmap(-1, max(size, len(data), PAGE))
    if data:
        buf[: len(data)] = data
    return buf


def pattern(size: int, seed: int = 0, base: int = 0) -> bytes:
    """`size` bytes whose every 512-byte sector names its file offset (`base` + position) and
    `seed`, in 16-byte units repeated 32 times. Never zeros, differs from sector to sector and
    from seed to seed: a shifted, stale, torn or missing sector reads as a mismatch."""
    sectors = (
        struct.pack("<QII", base + off, seed & 0xFFFFFFFF, _PATTERN_MAGIC) * 32
        for off in range(0, size, 512)
    )
    return b"".join(sectors)[:size]


def _open(target: Target, flags: int) -> tuple[int, bool]:
    """(fd, whether we opened it) for an fd or a path."""
    if isinstance(target, int):
        return target, False
    return os.open(target, flags), True


def direct_pwrite(target: Target, data: bytes | memoryview, off: int) -> int:
    """pwrite(2) of `data` at `off` from an aligned buffer (through an O_DIRECT fd when
    `target` is a path); returns the count written."""
    fd, opened = _open(target, os.O_RDWR | os.O_DIRECT)
    try:
        with aligned(len(data), data) as buf:
            return os.pwrite(fd, memoryview(buf)[: len(data)], off)
    finally:
        if opened:
            os.close(fd)


def direct_pread(target: Target, size: int, off: int) -> bytes:
    """pread(2) of up to `size` bytes at `off` into an aligned buffer (through an O_DIRECT fd
    when `target` is a path); returns the bytes read (short at EOF)."""
    fd, opened = _open(target, os.O_RDONLY | os.O_DIRECT)
    try:
        with aligned(size) as buf:
            n = os.preadv(fd, [memoryview(buf)[:size]], off)
            return bytes(buf[:n])
    finally:
        if opened:
            os.close(fd)


def read_full(fd: int, size: int, off: int) -> bytes:
    """pread until `size` bytes or EOF."""
    parts = []
    while size > 0:
        b = os.pread(fd, size, off)
        if not b:
            break
        parts.append(b)
        off += len(b)
        size -= len(b)
    return b"".join(parts)


def drop_kernel_cache(fd: int, off: int = 0, length: int = 0) -> None:
    """Drop the kernel's clean cached pages of `[off, off + length)` (length 0: to EOF), so
    that the next buffered read or fault is a READ request served by the daemon (its page
    cache or the image). POSIX_FADV_DONTNEED invalidates the clean pages of the file's mapping
    whatever the filesystem (diofs opens with keep_cache); pages mapped into some process
    stay. Ranges follow posix_fadvise / fallocate: (off, length)."""
    os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)


def cold_read(path: str | os.PathLike[str], size: int, off: int) -> bytes:
    """A buffered read through a fresh fd after dropping the kernel's cache of the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_kernel_cache(fd)
        return read_full(fd, size, off)
    finally:
        os.close(fd)


def map_read(path: str | os.PathLike[str], size: int) -> bytes:
    """The first `size` bytes through a MAP_SHARED read-only mapping."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            return m[:]
    finally:
        os.close(fd)


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    """fallocate(2) (os.posix_fallocate has no mode); OSError with the errno on failure."""
    if _libc.fallocate(fd, mode, off, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_file(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o644,
    chunk: int = 64 << 10,
    fsync: bool = False,
) -> int:
    """Create or truncate `path` and write `data` (buffered, in `chunk`-byte pwrites), fsync
    it if asked; returns its st_ino."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
    try:
        for off in range(0, len(data), chunk):
            piece = data[off : off + chunk]
            assert os.pwrite(fd, piece, off) == len(piece)
        if fsync:
            os.fsync(fd)
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The whole file, read buffered."""
    with open(path, "rb") as f:
        return f.read()


def wait_for(
    check: Callable[[], _T], what: str, timeout: float = 10.0, interval: float = 0.02
) -> _T:
    """Poll `check()` until it returns something truthy and return that; AssertionError naming
    `what` (and the last value) after `timeout` seconds. The one polling loop of the harness:
    wait on a real signal (a stats counter, a log line, a file or process state), never sleep
    a guessed time."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)
    return value
