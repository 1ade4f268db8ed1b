"""The fresh ext4 of the tree jobs (benchmarks/freshfs.py): the pure parts, and one real
make/remove on a loop device (root only) that must leave no mount and no loop device behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import freshfs
from benchmarks.jobs import JOBS

MIB = 1 << 20


def _info(files: int, size: int, dirs: int = 10, links: int = 0) -> dict:
    return {"files": files, "dirs": dirs, "symlinks": links, "other": 0, "bytes": size}


def test_image_size_has_room_for_four_copies() -> None:
    # /usr/include-like: 8k files, 115 MB
    size = freshfs.image_size(_info(7973, 115_000_000, 300, 7))
    entries = 7973 + 300 + 7
    assert size >= 4 * (115_000_000 + 4096 * entries) + 256 * MIB
    assert size % MIB == 0
    # tiny tree: the 256 MiB floor
    assert freshfs.image_size(_info(40, 20_000)) == 256 * MIB + freshfs.MIB
    # many empty files: the inodes decide (one per 16 KiB, 4 per entry)
    many = freshfs.image_size(_info(100_000, 0, 0))
    assert many // 16384 >= 4 * 100_000


def test_journal_size_is_bounded() -> None:
    assert freshfs.journal_mib(64 * MIB) == 16
    assert freshfs.journal_mib(800 * MIB) == 200
    assert freshfs.journal_mib(100 << 30) == 1024


def test_mkfs_argv_pins_the_large_fs_defaults() -> None:
    argv = freshfs.mkfs_argv(Path("/w/img"), 800 * MIB)
    assert argv[0] == "mkfs.ext4" and argv[-1] == "/w/img"
    assert argv[argv.index("-T") + 1] == "default"  # not "small": 4 KiB blocks below 512 MiB
    assert argv[argv.index("-J") + 1] == "size=200"
    assert "lazy_itable_init=0" in argv[argv.index("-E") + 1]


def test_mount_options_keep_what_costs() -> None:
    host = "rw,relatime,discard,resv_strict,resuid=65534,resgid=65534,commit=5,errors=continue"
    assert freshfs.mount_options(host) == "relatime,discard,commit=5"
    assert freshfs.mount_options("") == ""


def test_tree_jobs_are_contiguous_in_the_job_table() -> None:
    """The runner mounts a fresh ext4 before a peer's first tree job and removes it after its
    last one; no other job may run in between (it would find the fio data file missing)."""
    kinds = [j.kind for j in JOBS]
    first, last = kinds.index("tree"), len(kinds) - 1 - kinds[::-1].index("tree")
    assert set(kinds[first : last + 1]) == {"tree"}


def _mounts_and_loops(image: Path, mnt: Path) -> tuple[bool, str]:
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == str(mnt) for line in f)
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return mounted, "\n".join(ln for ln in loops.splitlines() if str(image) in ln)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None,
    reason="needs root, losetup and mkfs.ext4",
)
def test_make_and_remove_leave_nothing_behind(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    image = tmp_path / freshfs.IMAGE_NAME
    fs = freshfs.FreshExt4(image, mnt, 300 * MIB)
    try:
        fs.make()
        assert _mounts_and_loops(image, mnt)[0]
        assert list(mnt.iterdir()) == []  # lost+found removed
        (mnt / "f").write_bytes(b"x" * 10_000)
        r = subprocess.run(["findmnt", "-no", "FSTYPE", str(mnt)], capture_output=True, text=True)
        assert r.stdout.strip() == "ext4"
        with pytest.raises(freshfs.FreshFsError, match="already a mount point"):
            freshfs.FreshExt4(tmp_path / "other.img", mnt, 300 * MIB).make()
        assert not (tmp_path / "other.img").exists()
    finally:
        problems = fs.remove()
    assert problems == []
    assert _mounts_and_loops(image, mnt) == (False, "")
    assert not image.exists()
    assert fs.remove() == []  # idempotent
