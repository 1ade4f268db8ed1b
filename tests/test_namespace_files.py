"""Namespace on a real mount, regular files (SPEC 1): create, read/write, unlink, links,
symlinks, attributes, truncate, sparse files. One behaviour per test."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from harness.io import pattern, read_file, wait_for, write_file
from harness.mount import Mount


def free_bytes(mnt: Mount) -> int:
    st = os.statvfs(mnt.mnt)
    return st.f_bavail * st.f_frsize


def test_create_write_read_close(mounted: Mount) -> None:
    p = mounted.path("f")
    data = pattern(10000)
    write_file(p, data)
    assert read_file(p) == data
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == len(data)
    assert st.st_nlink == 1


def test_create_exclusive_on_existing_fails(mounted: Mount) -> None:
    p = mounted.path("f")
    write_file(p, b"x")
    with pytest.raises(FileExistsError):
        os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


def test_open_missing_is_enoent(mounted: Mount) -> None:
    with pytest.raises(FileNotFoundError):
        os.open(mounted.path("missing"), os.O_RDONLY)
    with pytest.raises(FileNotFoundError):
        os.open(mounted.path("nodir", "f"), os.O_WRONLY | os.O_CREAT, 0o644)


def test_pwrite_pread_at_offsets(mounted: Mount) -> None:
    p = mounted.path("f")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"A" * 5000, 0)
        os.pwrite(fd, b"B" * 3, 4095)  # straddles a page boundary
        os.pwrite(fd, b"C" * 10, 8192)
        assert os.fstat(fd).st_size == 8202
        assert os.pread(fd, 5, 4093) == b"AABBB"
        assert os.pread(fd, 8202, 0) == b"A" * 4095 + b"BBB" + b"A" * 902 + bytes(3192) + b"C" * 10
    finally:
        os.close(fd)


def test_append_mode(mounted: Mount) -> None:
    p = mounted.path("f")
    write_file(p, b"head")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"-tail")
    finally:
        os.close(fd)
    assert read_file(p) == b"head-tail"


def test_overwrite_with_truncate_flag(mounted: Mount) -> None:
    p = mounted.path("f")
    write_file(p, pattern(20000))
    write_file(p, b"short")
    assert read_file(p) == b"short"
    assert os.stat(p).st_size == 5


def test_unlink(mounted: Mount) -> None:
    p = mounted.path("f")
    write_file(p, b"data")
    os.unlink(p)
    assert not os.path.exists(p)
    assert "f" not in os.listdir(mounted.mnt)
    with pytest.raises(FileNotFoundError):
        os.unlink(p)


def test_unlink_directory_is_eisdir(mounted: Mount) -> None:
    os.mkdir(mounted.path("d"))
    with pytest.raises(OSError) as exc:
        os.unlink(mounted.path("d"))
    assert exc.value.errno in (errno.EISDIR, errno.EPERM)


def test_open_unlinked_file_stays_usable_until_last_close(mounted: Mount) -> None:
    p = mounted.path("f")
    size = 4 << 20
    data = pattern(size)
    write_file(p, data)
    fd = os.open(p, os.O_RDWR)
    try:
        os.fsync(fd)
        before_unlink = free_bytes(mounted)
        os.unlink(p)
        assert not os.path.exists(p)
        assert os.pread(fd, size, 0) == data
        os.pwrite(fd, b"more", size)
        assert os.pread(fd, 4, size) == b"more"
        assert os.fstat(fd).st_size == size + 4
        assert os.fstat(fd).st_nlink == 0
        # the blocks are still in use while the file is open
        assert free_bytes(mounted) <= before_unlink + (64 << 10)
    finally:
        os.close(fd)
    # RELEASE is asynchronous: the space comes back shortly after the last close
    wait_for(
        lambda: free_bytes(mounted) >= before_unlink + size - (64 << 10),
        f"the space to come back after the last close ({before_unlink + size} free)",
    )


def test_hard_link_counts_and_shared_data(mounted: Mount) -> None:
    a, b = mounted.path("a"), mounted.path("b")
    write_file(a, b"one")
    os.link(a, b)
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    write_file(b, b"two")
    assert read_file(a) == b"two"
    os.unlink(a)
    assert os.stat(b).st_nlink == 1
    assert read_file(b) == b"two"


def test_hard_link_in_other_directory(mounted: Mount) -> None:
    os.mkdir(mounted.path("d"))
    write_file(mounted.path("a"), b"x")
    os.link(mounted.path("a"), mounted.path("d", "a2"))
    assert os.stat(mounted.path("d", "a2")).st_nlink == 2
    assert read_file(mounted.path("d", "a2")) == b"x"


def test_hard_link_to_existing_name_fails(mounted: Mount) -> None:
    write_file(mounted.path("a"), b"x")
    write_file(mounted.path("b"), b"y")
    with pytest.raises(FileExistsError):
        os.link(mounted.path("a"), mounted.path("b"))


def test_symlink_readlink(mounted: Mount) -> None:
    p = mounted.path("l")
    os.symlink("some/target", p)
    assert os.readlink(p) == "some/target"
    st = os.lstat(p)
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("some/target")


def test_symlink_is_followed(mounted: Mount) -> None:
    write_file(mounted.path("target"), b"via link")
    os.symlink("target", mounted.path("l"))
    assert read_file(mounted.path("l")) == b"via link"
    os.unlink(mounted.path("l"))
    assert read_file(mounted.path("target")) == b"via link"


def test_symlink_long_target(mounted: Mount) -> None:
    target = "x/" * 500 + "end"
    os.symlink(target, mounted.path("l"))
    assert os.readlink(mounted.path("l")) == target


def test_readlink_on_regular_file_is_einval(mounted: Mount) -> None:
    write_file(mounted.path("f"), b"")
    with pytest.raises(OSError) as exc:
        os.readlink(mounted.path("f"))
    assert exc.value.errno == errno.EINVAL


def test_chmod(mounted: Mount) -> None:
    p = mounted.path("f")
    write_file(p, b"x")
    os.chmod(p, 0o640)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    os.chmod(p, 0o4755)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4755


def test_create_mode_is_kept(mounted: Mount) -> None:
    old = os.umask(0)
    try:
        write_file(mounted.path("f"), b"", mode=0o604)
        os.mkdir(mounted.path("d"), 0o751)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(mounted.path("f")).st_mode) == 0o604
    assert stat.S_IMODE(os.stat(mounted.path("d")).st_mode) == 0o751


def test_chown(mounted: Mount) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to other ids needs root")
    p = mounted.path("f")
    write_file(p, b"x")
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 42)


def test_utimens_nanoseconds(mounted: Mount) -> None:
    p = mounted.path("f")
    write_file(p, b"x")
    atime_ns = 1_600_000_000_123_456_789
    mtime_ns = 1_500_000_000_987_654_321
    os.utime(p, ns=(atime_ns, mtime_ns))
    st = os.stat(p)
    assert st.st_mtime_ns == mtime_ns
    assert st.st_atime_ns == atime_ns


def test_utime_now_and_ctime_changes(mounted: Mount) -> None:
    p = mounted.path("f")
    write_file(p, b"x")
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    before = time.time_ns()
    os.utime(p)  # UTIME_NOW
    st = os.stat(p)
    assert st.st_mtime_ns >= before - 2_000_000_000
    assert st.st_ctime_ns >= before - 2_000_000_000


def test_write_updates_mtime(mounted: Mount) -> None:
    p = mounted.path("f")
    write_file(p, b"x")
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    fd = os.open(p, os.O_WRONLY)
    try:
        os.write(fd, b"y")
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(p).st_mtime_ns > 1_000_000_000


def test_truncate_up_reads_zeros(mounted: Mount) -> None:
    p = mounted.path("f")
    write_file(p, b"abc")
    os.truncate(p, 1 << 20)
    assert os.stat(p).st_size == 1 << 20
    data = read_file(p)
    assert data[:3] == b"abc"
    assert data[3:] == bytes((1 << 20) - 3)


def test_truncate_down(mounted: Mount) -> None:
    p = mounted.path("f")
    data = pattern(100_000)
    write_file(p, data)
    os.truncate(p, 5000)
    assert os.stat(p).st_size == 5000
    assert read_file(p) == data[:5000]


def test_truncate_down_then_up_does_not_resurrect_old_bytes(mounted: Mount) -> None:
    p = mounted.path("f")
    write_file(p, b"\xaa" * 20000)
    fd = os.open(p, os.O_RDWR)
    try:
        os.fsync(fd)
        os.ftruncate(fd, 100)
        os.ftruncate(fd, 20000)
        assert os.pread(fd, 20000, 0) == b"\xaa" * 100 + bytes(19900)
    finally:
        os.close(fd)


def test_ftruncate_on_open_handle(mounted: Mount) -> None:
    p = mounted.path("f")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, pattern(9000))
        os.ftruncate(fd, 4096)
        assert os.fstat(fd).st_size == 4096
        assert os.pread(fd, 10000, 0) == pattern(4096)
    finally:
        os.close(fd)


def test_sparse_file_gap_reads_zeros(mounted: Mount) -> None:
    p = mounted.path("sparse")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.lseek(fd, 32 << 20, os.SEEK_SET)
        os.write(fd, b"tail" * 1024)
        os.fsync(fd)
        st = os.fstat(fd)
        assert st.st_size == (32 << 20) + 4096
        assert st.st_blocks * 512 <= 256 << 10, f"gap was allocated: {st.st_blocks} blocks"
        assert os.pread(fd, 1 << 20, 16 << 20) == bytes(1 << 20)
        assert os.pread(fd, 8, (32 << 20) - 4) == bytes(4) + b"tail"
    finally:
        os.close(fd)


def test_sparse_file_larger_than_image(mounted: Mount) -> None:
    p = mounted.path("huge")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"end", 1 << 30)
        assert os.fstat(fd).st_size == (1 << 30) + 3
        assert os.pread(fd, 6, (1 << 30) - 3) == bytes(3) + b"end"
    finally:
        os.close(fd)


def test_many_small_files(mounted: Mount) -> None:
    for i in range(200):
        write_file(mounted.path(f"f{i}"), pattern(i * 37, seed=i))
    for i in range(200):
        assert read_file(mounted.path(f"f{i}")) == pattern(i * 37, seed=i)


def test_name_of_255_bytes(mounted: Mount) -> None:
    name = "n" * 255
    write_file(mounted.path(name), b"x")
    assert name in os.listdir(mounted.mnt)


def test_overlong_name_is_rejected_cleanly(mounted: Mount) -> None:
    name = "n" * 300
    try:
        write_file(mounted.path(name), b"x")
    except OSError as exc:
        assert exc.errno == errno.ENAMETOOLONG
    else:
        assert name in os.listdir(mounted.mnt)
