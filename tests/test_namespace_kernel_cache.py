"""How long the kernel caches names and attributes (diofs/ops.py, "Kernel caching of names and
attributes"): stat of a tree made a while ago sends no request, a missing name is looked up
once, and what the cache holds is always right: names made, removed or renamed through the
mount, sizes and times changed by writes, truncate, chmod and fallocate are seen at once.

Each count test runs with the defaults (entry/attr timeout an hour) and with `-o
entry_timeout=1,attr_timeout=1` (libfuse's default, what diofs had): there the same stat
loop sends a LOOKUP per file again.
"""

from __future__ import annotations

import os
import stat
import time

import pytest

from harness.mount import Mount, MountFactory

SHORT = {"entry_timeout": "1", "attr_timeout": "1"}
NO_NEGATIVE = {"entry_timeout": "0"}


def _make_tree(root: str, n: int) -> list[str]:
    paths = []
    for d in range(4):
        os.mkdir(os.path.join(root, f"d{d}"))
        for i in range(n // 4):
            p = os.path.join(root, f"d{d}", f"f{i}")
            with open(p, "wb") as f:
                f.write(b"x" * (100 + i))
            os.chmod(p, 0o640)
            paths.append(p)
    return paths


def _requests(m: Mount, before: dict[str, float], *names: str) -> int:
    after = m.stats()
    return int(sum(after.get(f"ops.{n}", 0) - before.get(f"ops.{n}", 0) for n in names))


@pytest.mark.parametrize("opts", [None, SHORT], ids=["default", "timeout-1s"])
def test_stat_of_an_older_tree_sends_no_request(
    mount_factory: MountFactory, opts: dict[str, str] | None
) -> None:
    m = mount_factory(opts=opts)
    paths = _make_tree(m.mnt, 40)
    time.sleep(1.5)  # past libfuse's default 1 s timeouts
    before = m.stats()
    for p in paths:
        st = os.lstat(p)
        assert stat.S_IMODE(st.st_mode) == 0o640
    lookups = _requests(m, before, "lookup")
    if opts is None:
        assert lookups == 0
    else:
        assert lookups >= len(paths)


@pytest.mark.parametrize("opts", [None, NO_NEGATIVE], ids=["default", "entry_timeout-0"])
def test_a_missing_name_is_looked_up_once(
    mount_factory: MountFactory, opts: dict[str, str] | None
) -> None:
    m = mount_factory(opts=opts)
    missing = m.path("missing")
    before = m.stats()
    for _ in range(5):
        assert not os.path.lexists(missing)
    lookups = _requests(m, before, "lookup")
    assert lookups == (1 if opts is None else 5)


def test_names_made_after_a_negative_lookup_are_seen(mounted: Mount) -> None:
    names = {n: mounted.path(n) for n in ("file", "dir", "sym", "hard", "moved", "node")}
    for p in names.values():
        assert not os.path.lexists(p)  # now cached as absent
    with open(names["file"], "wb") as f:
        f.write(b"abc")
    os.mkdir(names["dir"])
    os.symlink("file", names["sym"])
    os.link(names["file"], names["hard"])
    os.mknod(names["node"], stat.S_IFIFO | 0o600)
    os.rename(names["dir"], names["moved"])
    assert os.path.isfile(names["file"]) and os.path.isdir(names["moved"])
    assert os.readlink(names["sym"]) == "file" and os.stat(names["hard"]).st_nlink == 2
    assert stat.S_ISFIFO(os.lstat(names["node"]).st_mode)
    assert not os.path.lexists(names["dir"])
    os.unlink(names["hard"])
    assert not os.path.lexists(names["hard"]) and os.stat(names["file"]).st_nlink == 1


def test_attributes_follow_every_change(mounted: Mount) -> None:
    p = mounted.path("f")
    with open(p, "wb") as f:
        f.write(b"a" * 5000)
    st0 = os.stat(p)
    fd = os.open(p, os.O_RDWR)
    try:
        time.sleep(0.01)
        os.pwrite(fd, b"b" * 10000, 8192)
        st = os.stat(p)  # another path than the fd that wrote
        assert st.st_size == 18192 and st.st_mtime_ns > st0.st_mtime_ns
        assert st.st_blocks * 512 >= 12288
        os.posix_fallocate(fd, 0, 1 << 20)
        assert os.stat(p).st_size == 1 << 20
        os.ftruncate(fd, 100)
        assert os.stat(p).st_size == 100
    finally:
        os.close(fd)
    os.chmod(p, 0o600)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(p).st_mtime_ns == 2_000_000_000
    with open(p, "wb"):  # O_TRUNC
        pass
    assert os.stat(p).st_size == 0 and os.stat(p).st_blocks == 0
    os.link(p, mounted.path("g"))
    assert os.stat(p).st_nlink == 2
    os.unlink(mounted.path("g"))
    assert os.stat(p).st_nlink == 1
