"""Space on a real mount (SPEC 1): statfs reports real free space, ENOSPC when full and
recovery after deleting, fallocate modes (allocate, keep size, punch hole, zero range)."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from harness.io import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
    wait_for,
)
from harness.mount import Mount, MountFactory

MiB = 1 << 20

def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(fd: int, off: int, size: int, byte: int) -> None:
    chunk = bytes([byte]) * min(size, MiB)
    done = 0
    while done < size:
        n = min(len(chunk), size - done)
        os.pwrite(fd, chunk[:n], off + done)
        done += n


# --------------------------------------------------------------------------- statfs


def test_statfs_is_sane(mounted: Mount) -> None:
    st = os.statvfs(mounted.mnt)
    assert st.f_frsize > 0 and st.f_bsize > 0
    total = st.f_blocks * st.f_frsize
    assert 32 * MiB < total <= 64 * MiB
    assert 0 < st.f_bavail <= st.f_bfree <= st.f_blocks
    assert st.f_namemax >= 255


def test_statfs_free_space_drops_and_rises(mounted: Mount) -> None:
    p = mounted.path("f")
    before = free_bytes(mounted.path())
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fill(fd, 0, 8 * MiB, 0x5A)
        os.fsync(fd)
    finally:
        os.close(fd)
    after_write = free_bytes(mounted.path())
    assert before - after_write >= 8 * MiB, (before, after_write)
    assert before - after_write <= 9 * MiB, (before, after_write)
    os.unlink(p)
    wait_for(
        lambda: free_bytes(mounted.path()) >= before - 256 * 1024,
        f"free space did not come back after unlink ({before} before)",
    )


def test_statfs_counts_unflushed_buffered_writes(mounted: Mount) -> None:
    """Dirty cached data is space promised: statfs shows it used before any writeback (as
    ext4 counts delayed-allocation reservations), otherwise ENOSPC can only come too late."""
    before = free_bytes(mounted.path())
    fd = os.open(mounted.path("f"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fill(fd, 0, 8 * MiB, 0x5A)
        assert before - free_bytes(mounted.path()) >= 8 * MiB
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- ENOSPC


def _write_until_enospc(path: str, limit: int, flags: int = 0) -> int:
    """Write 1 MiB chunks until ENOSPC (from write, fsync or close); return bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    written = 0
    buf = mmap.mmap(-1, MiB)  # page-aligned, for O_DIRECT
    buf.write(b"\xee" * MiB)
    try:
        try:
            while written < limit:
                written += os.pwrite(fd, buf, written)
            os.fsync(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, f"expected ENOSPC, got {exc!r}"
            return written
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, f"close failed with {exc!r}"
    finally:
        buf.close()
    pytest.fail(f"wrote {written} bytes into a 16M image without ENOSPC")


def test_enospc_when_full_then_delete_and_write_again(mount_factory: MountFactory) -> None:
    m = mount_factory(size="16M")
    m.expect_log(r"(?i)no space|ENOSPC")
    written = _write_until_enospc(m.path("big"), 64 * MiB)
    assert 0 < written <= 16 * MiB, (
        f"{written >> 20} MiB of buffered writes were acknowledged on a 16M image "
        "(ENOSPC came only later, from fsync/close)"
    )
    # what was acknowledged before ENOSPC reads back intact
    with open(m.path("big"), "rb") as f:
        head = f.read(min(written, MiB))
    assert head == b"\xee" * len(head)
    os.unlink(m.path("big"))
    wait_for(lambda: free_bytes(m.path()) >= 4 * MiB, "space not freed after unlink")
    with open(m.path("again"), "wb") as f:
        f.write(b"\x11" * (4 * MiB))
        f.flush()
        os.fsync(f.fileno())
    with open(m.path("again"), "rb") as f:
        assert f.read() == b"\x11" * (4 * MiB)


def test_enospc_with_o_direct(mount_factory: MountFactory) -> None:
    m = mount_factory(size="16M")
    m.expect_log(r"(?i)no space|ENOSPC")
    written = _write_until_enospc(m.path("big"), 64 * MiB, os.O_DIRECT)
    assert 0 < written <= 16 * MiB
    os.unlink(m.path("big"))
    wait_for(lambda: free_bytes(m.path()) >= 4 * MiB, "space not freed after unlink")
    with open(m.path("again"), "wb") as f:
        f.write(b"\x22" * MiB)


def test_enospc_on_mkdir_when_full_is_clean(mount_factory: MountFactory) -> None:
    m = mount_factory(size="16M")
    m.expect_log(r"(?i)no space|ENOSPC")
    _write_until_enospc(m.path("big"), 64 * MiB)
    # metadata operations on a full data area either work or fail with ENOSPC; never EIO
    for i in range(50):
        try:
            os.mkdir(m.path(f"d{i}"))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            break


# --------------------------------------------------------------------------- fallocate


def _open_new(m: Mount, name: str = "f") -> int:
    return os.open(m.path(name), os.O_RDWR | os.O_CREAT, 0o644)


def test_fallocate_default_grows_size(mounted: Mount) -> None:
    fd = _open_new(mounted)
    try:
        fallocate(fd, 0, 0, 4 * MiB)
        st = os.fstat(fd)
        assert st.st_size == 4 * MiB
        assert st.st_blocks * 512 >= 4 * MiB
        assert os.pread(fd, MiB, MiB) == bytes(MiB)
    finally:
        os.close(fd)


def test_fallocate_reserves_space(mounted: Mount) -> None:
    before = free_bytes(mounted.path())
    fd = _open_new(mounted)
    try:
        fallocate(fd, 0, 0, 8 * MiB)
    finally:
        os.close(fd)
    assert before - free_bytes(mounted.path()) >= 8 * MiB


def test_fallocate_keep_size(mounted: Mount) -> None:
    fd = _open_new(mounted)
    try:
        os.write(fd, b"x" * 100)
        blocks = os.fstat(fd).st_blocks
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 2 * MiB)
        st = os.fstat(fd)
        assert st.st_size == 100
        assert st.st_blocks > blocks
        assert st.st_blocks * 512 >= 2 * MiB
        assert os.pread(fd, 200, 0) == b"x" * 100
    finally:
        os.close(fd)


def test_fallocate_punch_hole(mounted: Mount) -> None:
    fd = _open_new(mounted)
    try:
        fill(fd, 0, 4 * MiB, 0x77)
        os.fsync(fd)
        blocks = os.fstat(fd).st_blocks
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, 2 * MiB)
        st = os.fstat(fd)
        assert st.st_size == 4 * MiB
        assert st.st_blocks < blocks, (st.st_blocks, blocks)
        assert blocks - st.st_blocks >= (2 * MiB - 8192) // 512
        assert os.pread(fd, 2 * MiB, MiB) == bytes(2 * MiB)
        assert os.pread(fd, MiB, 0) == b"\x77" * MiB
        assert os.pread(fd, MiB, 3 * MiB) == b"\x77" * MiB
    finally:
        os.close(fd)


def test_fallocate_punch_hole_unaligned_edges(mounted: Mount) -> None:
    fd = _open_new(mounted)
    try:
        fill(fd, 0, 64 * 1024, 0x33)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1000, 10000)
        data = os.pread(fd, 64 * 1024, 0)
        assert data[:1000] == b"\x33" * 1000
        assert data[1000:11000] == bytes(10000)
        assert data[11000:] == b"\x33" * (64 * 1024 - 11000)
    finally:
        os.close(fd)


def test_fallocate_punch_hole_without_keep_size_is_rejected(mounted: Mount) -> None:
    fd = _open_new(mounted)
    try:
        os.write(fd, b"x" * 8192)
        with pytest.raises(OSError) as exc:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)
        assert exc.value.errno in (errno.EINVAL, errno.EOPNOTSUPP)
        assert os.pread(fd, 8192, 0) == b"x" * 8192
    finally:
        os.close(fd)


def test_fallocate_zero_range(mounted: Mount) -> None:
    fd = _open_new(mounted)
    try:
        fill(fd, 0, 3 * MiB, 0x99)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, MiB + 123, MiB)
        assert os.fstat(fd).st_size == 3 * MiB
        data = os.pread(fd, 3 * MiB, 0)
        assert data[: MiB + 123] == b"\x99" * (MiB + 123)
        assert data[MiB + 123 : 2 * MiB + 123] == bytes(MiB)
        assert data[2 * MiB + 123 :] == b"\x99" * (MiB - 123)
    finally:
        os.close(fd)


def test_fallocate_zero_range_past_eof_grows_size(mounted: Mount) -> None:
    fd = _open_new(mounted)
    try:
        os.write(fd, b"y" * 10)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, MiB)
        assert os.fstat(fd).st_size == MiB
        assert os.pread(fd, MiB, 0) == bytes(MiB)
    finally:
        os.close(fd)


def test_fallocate_then_write_reads_back(mounted: Mount) -> None:
    fd = _open_new(mounted)
    try:
        fallocate(fd, 0, 0, 2 * MiB)
        os.pwrite(fd, b"data", MiB)
        assert os.pread(fd, 8, MiB - 4) == bytes(4) + b"data"
    finally:
        os.close(fd)
