"""Namespace on a real mount, directories and rename (SPEC 1): mkdir/rmdir, readdir of a large
directory, rename in all its forms, RENAME_NOREPLACE / RENAME_EXCHANGE (renameat2)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

import pytest

from harness.io import read_file, write_file
from harness.mount import Mount

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> None:
    """renameat2(2) through libc; raises OSError with the errno."""
    fn = _libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


def renameat2_or_xfail(old: str, new: str, flags: int) -> None:
    try:
        renameat2(old, new, flags)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            pytest.xfail(f"renameat2 flags {flags} not passed through by kernel/pyfuse3: {exc}")
        raise


def test_mkdir_rmdir(mounted: Mount) -> None:
    d = mounted.path("d")
    os.mkdir(d)
    assert stat.S_ISDIR(os.stat(d).st_mode)
    assert os.listdir(d) == []
    os.rmdir(d)
    assert not os.path.exists(d)


def test_mkdir_existing_is_eexist(mounted: Mount) -> None:
    os.mkdir(mounted.path("d"))
    with pytest.raises(FileExistsError):
        os.mkdir(mounted.path("d"))


def test_rmdir_nonempty_is_enotempty(mounted: Mount) -> None:
    os.mkdir(mounted.path("d"))
    write_file(mounted.path("d", "f"), b"x")
    with pytest.raises(OSError) as exc:
        os.rmdir(mounted.path("d"))
    assert exc.value.errno == errno.ENOTEMPTY
    os.unlink(mounted.path("d", "f"))
    os.rmdir(mounted.path("d"))


def test_rmdir_on_file_is_enotdir(mounted: Mount) -> None:
    write_file(mounted.path("f"), b"x")
    with pytest.raises(NotADirectoryError):
        os.rmdir(mounted.path("f"))


def test_nested_directories(mounted: Mount) -> None:
    deep = mounted.path(*[f"d{i}" for i in range(20)])
    os.makedirs(deep)
    write_file(os.path.join(deep, "leaf"), b"leaf")
    assert read_file(os.path.join(deep, "leaf")) == b"leaf"


def test_directory_nlink_counts_subdirectories(mounted: Mount) -> None:
    d = mounted.path("d")
    os.mkdir(d)
    assert os.stat(d).st_nlink == 2
    root_links = os.stat(mounted.mnt).st_nlink
    os.mkdir(os.path.join(d, "a"))
    os.mkdir(os.path.join(d, "b"))
    write_file(os.path.join(d, "f"), b"")
    assert os.stat(d).st_nlink == 4
    os.rmdir(os.path.join(d, "a"))
    assert os.stat(d).st_nlink == 3
    assert os.stat(mounted.mnt).st_nlink == root_links


def test_readdir_large_directory_lists_each_entry_once(mounted: Mount) -> None:
    d = mounted.path("big")
    os.mkdir(d)
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(2000)}
    for name in names:
        os.close(os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT, 0o644))
    listed = os.listdir(d)
    assert len(listed) == len(names), "duplicates or missing entries"
    assert set(listed) == names
    with os.scandir(d) as it:
        entries = {e.name: e for e in it}
    assert set(entries) == names
    assert all(e.is_file(follow_symlinks=False) for e in entries.values())


def test_readdir_after_deleting_half(mounted: Mount) -> None:
    d = mounted.path("big")
    os.mkdir(d)
    for i in range(600):
        os.close(os.open(os.path.join(d, f"f{i}"), os.O_WRONLY | os.O_CREAT, 0o644))
    for i in range(0, 600, 2):
        os.unlink(os.path.join(d, f"f{i}"))
    assert sorted(os.listdir(d)) == sorted(f"f{i}" for i in range(1, 600, 2))


def test_readdir_reports_types_and_inodes(mounted: Mount) -> None:
    os.mkdir(mounted.path("d"))
    write_file(mounted.path("f"), b"")
    os.symlink("f", mounted.path("l"))
    with os.scandir(mounted.mnt) as it:
        entries = {e.name: e for e in it}
    assert entries["d"].is_dir(follow_symlinks=False)
    assert entries["f"].is_file(follow_symlinks=False)
    assert entries["l"].is_symlink()
    for name, e in entries.items():
        assert e.inode() == os.lstat(mounted.path(name)).st_ino


def test_rename_file(mounted: Mount) -> None:
    write_file(mounted.path("a"), b"data")
    ino = os.stat(mounted.path("a")).st_ino
    os.rename(mounted.path("a"), mounted.path("b"))
    assert not os.path.exists(mounted.path("a"))
    assert read_file(mounted.path("b")) == b"data"
    assert os.stat(mounted.path("b")).st_ino == ino


def test_rename_over_existing_file(mounted: Mount) -> None:
    write_file(mounted.path("a"), b"new")
    write_file(mounted.path("b"), b"old-old-old")
    os.rename(mounted.path("a"), mounted.path("b"))
    assert read_file(mounted.path("b")) == b"new"
    assert sorted(os.listdir(mounted.mnt)) == ["b"]


def test_rename_over_open_file_keeps_it_readable(mounted: Mount) -> None:
    write_file(mounted.path("a"), b"new")
    write_file(mounted.path("b"), b"old")
    fd = os.open(mounted.path("b"), os.O_RDONLY)
    try:
        os.rename(mounted.path("a"), mounted.path("b"))
        assert os.pread(fd, 10, 0) == b"old"
    finally:
        os.close(fd)
    assert read_file(mounted.path("b")) == b"new"


def test_rename_into_other_directory(mounted: Mount) -> None:
    os.mkdir(mounted.path("d1"))
    os.mkdir(mounted.path("d2"))
    write_file(mounted.path("d1", "f"), b"moved")
    os.rename(mounted.path("d1", "f"), mounted.path("d2", "g"))
    assert os.listdir(mounted.path("d1")) == []
    assert os.listdir(mounted.path("d2")) == ["g"]
    assert read_file(mounted.path("d2", "g")) == b"moved"


def test_rename_directory_with_children(mounted: Mount) -> None:
    os.makedirs(mounted.path("a", "sub"))
    write_file(mounted.path("a", "sub", "f"), b"child")
    os.mkdir(mounted.path("other"))
    os.rename(mounted.path("a"), mounted.path("other", "b"))
    assert read_file(mounted.path("other", "b", "sub", "f")) == b"child"
    # '..' of the moved directory is its new parent
    assert os.stat(mounted.path("other", "b", "..")).st_ino == os.stat(mounted.path("other")).st_ino
    assert not os.path.exists(mounted.path("a"))


def test_rename_directory_over_empty_directory(mounted: Mount) -> None:
    os.mkdir(mounted.path("a"))
    write_file(mounted.path("a", "f"), b"x")
    os.mkdir(mounted.path("b"))
    os.rename(mounted.path("a"), mounted.path("b"))
    assert os.listdir(mounted.path("b")) == ["f"]


def test_rename_directory_over_nonempty_is_enotempty(mounted: Mount) -> None:
    os.mkdir(mounted.path("a"))
    os.mkdir(mounted.path("b"))
    write_file(mounted.path("b", "f"), b"x")
    with pytest.raises(OSError) as exc:
        os.rename(mounted.path("a"), mounted.path("b"))
    assert exc.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert os.listdir(mounted.path("b")) == ["f"]
    assert os.path.isdir(mounted.path("a"))


def test_rename_file_over_directory_is_eisdir(mounted: Mount) -> None:
    write_file(mounted.path("f"), b"x")
    os.mkdir(mounted.path("d"))
    with pytest.raises(IsADirectoryError):
        os.rename(mounted.path("f"), mounted.path("d"))


def test_rename_directory_over_file_is_enotdir(mounted: Mount) -> None:
    write_file(mounted.path("f"), b"x")
    os.mkdir(mounted.path("d"))
    with pytest.raises(NotADirectoryError):
        os.rename(mounted.path("d"), mounted.path("f"))


def test_rename_directory_into_itself_is_einval(mounted: Mount) -> None:
    os.makedirs(mounted.path("a", "b"))
    with pytest.raises(OSError) as exc:
        os.rename(mounted.path("a"), mounted.path("a", "b", "c"))
    assert exc.value.errno == errno.EINVAL


def test_rename_hard_link_onto_itself_is_noop(mounted: Mount) -> None:
    write_file(mounted.path("a"), b"x")
    os.link(mounted.path("a"), mounted.path("b"))
    os.rename(mounted.path("a"), mounted.path("b"))  # same inode: POSIX says do nothing
    assert sorted(os.listdir(mounted.mnt)) == ["a", "b"]
    assert os.stat(mounted.path("b")).st_nlink == 2


def test_rename_noreplace_fails_on_existing(mounted: Mount) -> None:
    write_file(mounted.path("a"), b"a")
    write_file(mounted.path("b"), b"b")
    try:
        renameat2(mounted.path("a"), mounted.path("b"), RENAME_NOREPLACE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            pytest.xfail(f"RENAME_NOREPLACE not passed through: {exc}")
        assert exc.errno == errno.EEXIST
    else:
        pytest.fail("RENAME_NOREPLACE replaced an existing file")
    assert read_file(mounted.path("a")) == b"a"
    assert read_file(mounted.path("b")) == b"b"


def test_rename_noreplace_to_new_name(mounted: Mount) -> None:
    write_file(mounted.path("a"), b"a")
    renameat2_or_xfail(mounted.path("a"), mounted.path("c"), RENAME_NOREPLACE)
    assert os.listdir(mounted.mnt) == ["c"]
    assert read_file(mounted.path("c")) == b"a"


def test_rename_exchange_files(mounted: Mount) -> None:
    write_file(mounted.path("a"), b"aaa")
    write_file(mounted.path("b"), b"bb")
    ino_a = os.stat(mounted.path("a")).st_ino
    renameat2_or_xfail(mounted.path("a"), mounted.path("b"), RENAME_EXCHANGE)
    assert read_file(mounted.path("a")) == b"bb"
    assert read_file(mounted.path("b")) == b"aaa"
    assert os.stat(mounted.path("b")).st_ino == ino_a


def test_rename_exchange_file_and_directory_across_dirs(mounted: Mount) -> None:
    os.mkdir(mounted.path("d1"))
    os.makedirs(mounted.path("d2", "sub"))
    write_file(mounted.path("d1", "f"), b"file")
    write_file(mounted.path("d2", "sub", "inner"), b"inner")
    renameat2_or_xfail(mounted.path("d1", "f"), mounted.path("d2", "sub"), RENAME_EXCHANGE)
    assert os.path.isdir(mounted.path("d1", "f"))
    assert read_file(mounted.path("d1", "f", "inner")) == b"inner"
    assert read_file(mounted.path("d2", "sub")) == b"file"
    assert os.stat(mounted.path("d1", "f", "..")).st_ino == os.stat(mounted.path("d1")).st_ino


def test_rename_exchange_with_missing_target_is_enoent(mounted: Mount) -> None:
    write_file(mounted.path("a"), b"a")
    try:
        renameat2(mounted.path("a"), mounted.path("missing"), RENAME_EXCHANGE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            pytest.xfail(f"RENAME_EXCHANGE not passed through: {exc}")
        assert exc.errno == errno.ENOENT
    else:
        pytest.fail("RENAME_EXCHANGE with a missing target succeeded")
    assert read_file(mounted.path("a")) == b"a"
