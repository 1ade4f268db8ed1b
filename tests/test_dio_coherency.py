"""Direct I/O coherency and alignment on a real mount (SPEC 3).

Coherency: once an O_DIRECT write has returned, a buffered read (fd opened before or after),
an existing MAP_SHARED mapping, another process and an O_DIRECT read all see the new bytes;
once a buffered write has returned, an O_DIRECT read sees it (the daemon writes its dirty pages
back first). `--bug no-shootdown` leaves the daemon's cached copy of the range in place: every
path that reaches the daemon cache then reads the old bytes (the kernel drops its own pages for
direct I/O through the mount, fuse-facts 7b, so the mapping's re-fault reaches the daemon too).

Alignment: offset and length of an O_DIRECT request must be multiples of the logical block
size (512 by default; `-o dio_align=4096` or `mkfs --dio-align 4096`), else EINVAL and nothing
changes. The kernel does not check for FUSE (fuse-facts 5): `--bug no-align-check` shows that
a misaligned request then reaches the image. `test_statx_dioalign_reported` records what
statx(STATX_DIOALIGN) shows on a FUSE file.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from harness.io import direct_pread, direct_pwrite
from harness.mount import Mount, MountFactory, run_in_child

pytestmark = pytest.mark.deadline(60)

PAGE = 4096
SIZE = 256 * 1024  # 64 pages; the direct write covers [OFF, OFF + LEN)
OFF = 64 * 1024
LEN = 128 * 1024
OLD, NEW = b"o", b"N"


def buffered_read(path: str, size: int, off: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, off)
    finally:
        os.close(fd)


def stale_pages(data: bytes, new: bytes = NEW) -> int:
    """Pages of `data` (the written range) that do not start with the new byte."""
    return sum(1 for i in range(0, len(data), PAGE) if data[i : i + 1] != new)


def make_cached_file(m: Mount) -> str:
    """A file of OLD bytes whose pages are cached (clean) in the daemon."""
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(OLD * SIZE)
        f.flush()
        os.fsync(f.fileno())
    assert buffered_read(path, SIZE, 0) == OLD * SIZE
    return path


def mount_for(factory: MountFactory, bug_on: bool, bug: str = "no-shootdown") -> Mount:
    return factory(bugs=[bug] if bug_on else [])


# --------------------------------------------------------------------------- coherency


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "no-shootdown"])
def test_direct_write_then_buffered_read(mount_factory: MountFactory, bug_on: bool) -> None:
    m = mount_for(mount_factory, bug_on)
    path = make_cached_file(m)
    old_fd = os.open(path, os.O_RDONLY)  # opened (and read) before the write
    try:
        assert os.pread(old_fd, SIZE, 0) == OLD * SIZE
        assert direct_pwrite(path, NEW * LEN, OFF) == LEN
        via_old_fd = os.pread(old_fd, LEN, OFF)
    finally:
        os.close(old_fd)
    via_new_fd = buffered_read(path, LEN, OFF)
    shot = m.stats().get("dio.shootdown_pages", 0)
    if bug_on:
        assert stale_pages(via_old_fd) == LEN // PAGE
        assert stale_pages(via_new_fd) == LEN // PAGE
        assert shot == 0
    else:
        assert via_old_fd == via_new_fd == NEW * LEN
        assert shot >= LEN // PAGE
    # the bytes outside the written range are untouched either way
    assert buffered_read(path, OFF, 0) == OLD * OFF
    assert direct_pread(path, LEN, OFF) == NEW * LEN  # the image itself is right either way


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "no-shootdown"])
def test_direct_write_then_existing_mmap(mount_factory: MountFactory, bug_on: bool) -> None:
    m = mount_for(mount_factory, bug_on)
    path = make_cached_file(m)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), SIZE, prot=mmap.PROT_READ) as mm:
        assert mm[:] == OLD * SIZE  # every page faulted in before the write
        assert direct_pwrite(path, NEW * LEN, OFF) == LEN
        seen = mm[OFF : OFF + LEN]
    if bug_on:
        assert stale_pages(seen) == LEN // PAGE
    else:
        assert seen == NEW * LEN


def _child_buffered_read(path: str, size: int, off: int) -> bytes:
    return buffered_read(path, size, off)


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "no-shootdown"])
def test_direct_write_then_other_process(mount_factory: MountFactory, bug_on: bool) -> None:
    m = mount_for(mount_factory, bug_on)
    path = make_cached_file(m)
    assert direct_pwrite(path, NEW * LEN, OFF) == LEN
    seen = run_in_child(_child_buffered_read, path, LEN, OFF, timeout=30, mounts=[m])
    if bug_on:
        assert stale_pages(seen) == LEN // PAGE
    else:
        assert seen == NEW * LEN


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "no-shootdown"])
def test_direct_write_then_direct_read(mount_factory: MountFactory, bug_on: bool) -> None:
    """O_DIRECT reads bypass the daemon cache: new bytes even without the shootdown."""
    m = mount_for(mount_factory, bug_on)
    path = make_cached_file(m)
    assert direct_pwrite(path, NEW * LEN, OFF) == LEN
    assert direct_pread(path, SIZE, 0) == OLD * OFF + NEW * LEN + OLD * (SIZE - OFF - LEN)


def test_buffered_write_then_direct_read(mount_factory: MountFactory) -> None:
    """Dirty daemon pages are written back before a direct read of their range."""
    m = mount_factory(opts={"writeback_age": 3600})  # no background writeback meanwhile
    path = make_cached_file(m)
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, NEW * LEN, OFF) == LEN  # dirty in the daemon cache only
    finally:
        os.close(fd)
    before = m.stats()
    assert before.get("cache.dirty_pages", 0) >= LEN // PAGE
    assert direct_pread(path, LEN, OFF) == NEW * LEN
    after = m.stats()
    assert after.get("writeback.pages", 0) - before.get("writeback.pages", 0) >= LEN // PAGE
    assert after.get("cache.dirty_pages", 0) == 0


def test_buffered_write_then_direct_read_other_fd_open_before(
    mount_factory: MountFactory,
) -> None:
    """The same through an O_DIRECT fd opened before the buffered write (no open-time
    writeback can help)."""
    m = mount_factory(opts={"writeback_age": 3600})
    path = make_cached_file(m)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with open(path, "r+b", buffering=0) as f:
            f.seek(OFF)
            assert f.write(NEW * PAGE) == PAGE
        with mmap.mmap(-1, PAGE) as buf:
            assert os.preadv(dfd, [buf], OFF) == PAGE
            assert buf[:] == NEW * PAGE
    finally:
        os.close(dfd)


# --------------------------------------------------------------------------- alignment

MISALIGNED = [  # (offset, length) against 512-byte alignment
    (1, 4096),
    (0, 1000),
    (4095, 512),
    (256, 256),
]


def _errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "no-align-check"])
def test_misaligned_direct_write(mount_factory: MountFactory, bug_on: bool) -> None:
    m = mount_for(mount_factory, bug_on, "no-align-check")
    path = make_cached_file(m)
    accepted = 0
    for off, length in MISALIGNED:
        err = _errno_of(direct_pwrite, path, NEW * length, off)
        if bug_on:
            assert err == 0, f"off={off} len={length}"
            accepted += 1
        else:
            assert err == errno.EINVAL, f"off={off} len={length}"
    content = direct_pread(path, SIZE, 0)
    if bug_on:
        assert accepted == len(MISALIGNED)
        assert m.stats().get("dio.misaligned", 0) == 0
        # each accepted write landed at its exact, unaligned byte range
        # they landed at their exact, unaligned byte ranges: together [0, 4607)
        assert content == NEW * 4607 + OLD * (SIZE - 4607)
    else:
        assert content == OLD * SIZE  # nothing changed
        assert m.stats().get("dio.misaligned", 0) == len(MISALIGNED)


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "no-align-check"])
def test_misaligned_direct_read(mount_factory: MountFactory, bug_on: bool) -> None:
    m = mount_for(mount_factory, bug_on, "no-align-check")
    path = make_cached_file(m)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, 2 * PAGE) as buf:
            for off, length in MISALIGNED:
                err = _errno_of(os.preadv, fd, [memoryview(buf)[:length]], off)
                assert err == (0 if bug_on else errno.EINVAL), f"off={off} len={length}"
            assert os.preadv(fd, [memoryview(buf)[:512]], 512) == 512  # aligned is fine
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["mount-option", "mkfs"])
def test_dio_align_4096(mount_factory: MountFactory, how: str) -> None:
    """With a 4096-byte logical block size, 512-aligned direct I/O gets EINVAL too."""
    if how == "mount-option":
        m = mount_factory(opts={"dio_align": 4096})
    else:
        m = mount_factory(mkfs_args=["--dio-align", "4096"])
    path = make_cached_file(m)
    for off, length in [(512, 4096), (0, 512), (4096, 6144), *MISALIGNED]:
        assert _errno_of(direct_pwrite, path, NEW * length, off) == errno.EINVAL
        assert _errno_of(direct_pread, path, length, off) == errno.EINVAL
    assert direct_pread(path, SIZE, 0) == OLD * SIZE
    assert direct_pwrite(path, NEW * 8192, 4096) == 8192
    assert direct_pread(path, 3 * PAGE, 0) == OLD * PAGE + NEW * 8192


def test_dio_align_4096_with_bug(mount_factory: MountFactory) -> None:
    m = mount_factory(opts={"dio_align": 4096}, bugs=["no-align-check"])
    path = make_cached_file(m)
    assert direct_pwrite(path, NEW * 512, 512) == 512
    assert direct_pread(path, PAGE, 0) == OLD * 512 + NEW * 512 + OLD * 3072


# --------------------------------------------------------------------------- statx

STATX_DIOALIGN = 0x2000
AT_FDCWD = -100


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [
        ("tv_sec", ctypes.c_int64),
        ("tv_nsec", ctypes.c_uint32),
        ("reserved", ctypes.c_int32),
    ]


class _Statx(ctypes.Structure):
    _fields_ = [
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("spare0", ctypes.c_uint16),
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _StatxTimestamp),
        ("stx_btime", _StatxTimestamp),
        ("stx_ctime", _StatxTimestamp),
        ("stx_mtime", _StatxTimestamp),
        ("stx_rdev_major", ctypes.c_uint32),
        ("stx_rdev_minor", ctypes.c_uint32),
        ("stx_dev_major", ctypes.c_uint32),
        ("stx_dev_minor", ctypes.c_uint32),
        ("stx_mnt_id", ctypes.c_uint64),
        ("stx_dio_mem_align", ctypes.c_uint32),
        ("stx_dio_offset_align", ctypes.c_uint32),
        ("spare3", ctypes.c_uint64 * 12),
    ]


def statx_dioalign(path: str) -> tuple[bool, int, int, int]:
    """(STATX_DIOALIGN in the returned mask, stx_dio_mem_align, stx_dio_offset_align,
    stx_blksize) of `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    st = _Statx()
    rc = libc.statx(AT_FDCWD, os.fsencode(path), 0, STATX_DIOALIGN | 0x7FF, ctypes.byref(st))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return (
        bool(st.stx_mask & STATX_DIOALIGN),
        st.stx_dio_mem_align,
        st.stx_dio_offset_align,
        st.stx_blksize,
    )


def test_statx_dioalign_reported(mounted: Mount) -> None:
    """What a FUSE daemon can tell callers about its alignment (measured, Linux 6.18):
    fuse_getattr does not fill STATX_DIOALIGN, so the mask lacks it and both fields are 0.
    Callers learn the rule only from EINVAL; the daemon enforces it itself."""
    path = make_cached_file(mounted)
    has, mem_align, off_align, blksize = statx_dioalign(path)
    print(
        f"statx on diofs: STATX_DIOALIGN={has} mem_align={mem_align} "
        f"offset_align={off_align} blksize={blksize}"
    )
    assert not has and mem_align == 0 and off_align == 0
    assert blksize == PAGE
