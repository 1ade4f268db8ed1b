"""Metadata format 2 (issue 13): journal commits and checkpoints on a real mount, format-1
images, torn journal appends, and what a commit costs as the namespace grows.

- The crash test on format 2: a create/write/rename/unlink/truncate/punch/fsync workload on a
  crash-logged mount whose journal is tiny (so it wraps into many checkpoints), then 1000+
  random cut points; every cut image loads, fsck's clean and holds every fsync'ed byte
  (tests/test_crash_namespace.py has the tooling).
- A format-1 image (tests/data/v1-image.gz, written by diofs at bb49366) is refused at mount
  with one line naming `fsck.diofs --upgrade`; the upgrade keeps every file.
- A torn journal append is not replayed (`--bug trust-torn-journal` replays it).
- A commit writes O(what changed): the journal bytes per fsync do not grow with the files.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from diofs.backend.raw import RawImage
from diofs.errors import EXIT_CORRUPT, FsError
from diofs.format import image
from diofs.fs import Filesystem
from harness.crafting import one_transaction_then_kill, tear_first_append
from harness.mount import MountError, MountFactory, run_cli
from tests.test_cli_errors import assert_one_line_error, try_mount
from tests.test_crash_namespace import crash_check, expectations, pick_cuts, run_workload

V1_IMAGE = Path(__file__).parent / "data" / "v1-image.gz"
CUTS = 1000


@pytest.mark.deadline(600)
def test_random_cuts_across_checkpoints(mount_factory: MountFactory, tmp_path: Path) -> None:
    seed = 20261206
    stats: dict[str, float] = {}
    _m, cl, result = run_workload(mount_factory, tmp_path, seed, steps=900, punch=5,
                                  mkfs_args=("--journal-size", "64K"), stats=stats)
    assert stats.get("meta.checkpoints", 0) >= 5, stats  # the journal wrapped many times
    assert stats.get("meta.journal_bytes", 0) > 0, stats
    exp = expectations(result, cl)
    assert len(exp) >= 60
    cuts = pick_cuts(cl, exp, CUTS, seed)
    assert len(cuts) >= CUTS
    failures, checked = crash_check(tmp_path, cl, exp, cuts, seed)
    assert not failures, f"{len(failures)} problems over {len(cuts)} cuts:\n" + "\n".join(
        failures[:30])
    assert checked > 2000
    print(f"{cl.info()}, {len(exp)} fsyncs, {len(cuts)} cuts, {checked} fsync checks, "
          f"{stats.get('meta.checkpoints')} checkpoints")


def _v1_image(tmp_path: Path) -> Path:
    img = tmp_path / "v1.img"
    with gzip.open(V1_IMAGE, "rb") as src, open(img, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return img


def test_format_1_image_is_refused_with_one_line(tmp_path: Path) -> None:
    img = _v1_image(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    proc = try_mount(img, mnt, foreground=True)
    line = assert_one_line_error(proc, "mount.diofs", contains="fsck.diofs --upgrade")
    assert proc.returncode == EXIT_CORRUPT, line
    assert "version 1" in line
    fsck = run_cli("fsck.diofs", img)
    assert fsck.returncode == EXIT_CORRUPT
    assert_one_line_error(fsck, "fsck.diofs", contains="--upgrade")
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


def test_upgrade_keeps_every_file(tmp_path: Path, mount_factory: MountFactory) -> None:
    img = _v1_image(tmp_path)
    proc = run_cli("fsck.diofs", img, "--upgrade")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "upgraded to format 2" in proc.stdout and "clean (5 inodes" in proc.stdout
    again = run_cli("fsck.diofs", img, "--upgrade")  # format 2 already: only checks
    assert again.returncode == 0 and "upgraded" not in again.stdout, again.stdout
    m = mount_factory(image=img)
    with open(m.path("a"), "rb") as f:
        assert f.read() == bytes(range(256)) * 40
    with open(m.path("d", "b"), "rb") as f:
        assert f.read() == b"hello v1\n"
    assert os.readlink(m.path("l")) == "d/b"
    assert os.getxattr(m.path("a"), "user.k") == b"v"
    with open(m.path("d", "new"), "wb") as f:  # the free space came from the extents
        f.write(os.urandom(100_000))
        os.fsync(f.fileno())
    m.remount()
    assert os.path.getsize(m.path("d", "new")) == 100_000
    with open(m.path("a"), "rb") as f:
        assert f.read() == bytes(range(256)) * 40


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "trust-torn-journal"])
def test_torn_append_is_not_replayed(mount_factory: MountFactory, bug_on: bool) -> None:
    """The transaction's header sector landed, the rest of its block did not (a power cut
    in the middle of the append): the mount shows the commit before it. With the bug the
    torn records are replayed, and the mount fails on the garbage."""
    bugs = ["trust-torn-journal"] if bug_on else []
    img = one_transaction_then_kill(mount_factory, bugs)
    backend = RawImage(str(img), writable=False)
    try:
        assert len(image.load(backend).md.inodes) == 14
    finally:
        backend.close()
    assert tear_first_append(img) > 2048
    m = mount_factory(image=img, bugs=bugs, mount=False)
    m.expect_dirty()
    if bug_on:
        with pytest.raises(MountError, match="journal"):
            m.start()
        return
    m.start()
    assert sorted(os.listdir(m.mnt)) == ["f"]
    with open(m.path("f"), "rb") as f:
        assert f.read() == b"f" * 5000


def _journal_bytes(m) -> float:  # type: ignore[no-untyped-def]
    return m.stats().get("meta.journal_bytes", 0.0)


def test_commit_cost_does_not_grow_with_files(mount_factory: MountFactory) -> None:
    """fsync after a 4 KiB write writes one journal block at 200 files and at 5000 files, and
    no checkpoint; its latency stays within 2x."""
    m = mount_factory(size="256M", opts={"commit_interval": 600})

    def fsync_cost() -> tuple[float, float]:
        path = m.path("probe")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            before = _journal_bytes(m)
            times = []
            for _ in range(15):
                t0 = time.perf_counter()
                os.pwrite(fd, b"p" * 4096, 0)
                os.fsync(fd)
                times.append(time.perf_counter() - t0)
            per_fsync = (_journal_bytes(m) - before) / 15
        finally:
            os.close(fd)
        return sorted(times)[7], per_fsync

    def create(n: int) -> None:
        for i in range(n):
            d = m.path(f"d{i // 1000}")
            if i % 1000 == 0 and not os.path.isdir(d):
                os.mkdir(d)
            with open(os.path.join(d, f"x{i}"), "wb") as f:
                f.write(b"m" * 100)

    create(200)
    fsync_cost()  # the first commit after the creates journals them all
    t_small, bytes_small = fsync_cost()
    create(5000)
    fsync_cost()  # the first commit after the creates journals them all
    checkpoints = m.stats().get("meta.checkpoints", 0)
    t_big, bytes_big = fsync_cost()
    assert bytes_small <= 4096 and bytes_big <= 4096, (bytes_small, bytes_big)
    assert m.stats().get("meta.checkpoints", 0) == checkpoints
    assert t_big < 2 * t_small + 0.002, (t_small, t_big)


def _list_while_changing(directory: str, n: int) -> tuple[list[str], set[str]]:
    """List `directory` one small getdents page at a time while unlinking and creating other
    names between pages; returns (names listed, names present all along)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    listed: list[str] = []
    removed: set[str] = set()
    try:
        with os.scandir(fd) as it:
            for i, entry in enumerate(it):
                listed.append(entry.name)
                if i % 50 == 0 and i < n // 2:
                    victim = f"f{(i * 7919) % n}"
                    if victim not in removed:
                        os.unlink(os.path.join(directory, victim))
                        removed.add(victim)
                    open(os.path.join(directory, f"new{i}"), "wb").close()
    finally:
        os.close(fd)
    kept = {f"f{i}" for i in range(n)} - removed
    return listed, kept


def test_readdir_is_stable_under_creates_and_unlinks(mount_factory: MountFactory) -> None:
    """A listing of a 3000-entry directory, with names unlinked and created between its
    pages: no name listed twice, none that stayed is skipped (Entries.listing's cookies)."""
    m = mount_factory(opts={"commit_interval": 600})
    d = m.path("big")
    os.mkdir(d)
    n = 3000
    for i in range(n):
        open(os.path.join(d, f"f{i}"), "wb").close()
    listed, kept = _list_while_changing(d, n)
    assert len(listed) == len(set(listed)), "a name was listed twice"
    assert kept <= set(listed), f"skipped: {sorted(kept - set(listed))[:5]}"
    m.remount()
    assert len(os.listdir(d)) == len(kept) + len([x for x in os.listdir(d) if x.startswith("new")])


@contextlib.contextmanager
def _offline_fs(img: Path) -> Iterator[Filesystem]:
    """A fresh 64 MiB image, made and loaded off-line through Filesystem (no mount: fast)."""
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    backend = RawImage(str(img), writable=True)
    try:
        image.mkfs(backend, 64 << 20, 4096, 512)
        yield Filesystem.load(backend)
    finally:
        backend.close()


def _image_with_files(img: Path, n: int) -> None:
    """An image of `n` empty files."""
    with _offline_fs(img) as fs:
        for i in range(n):
            fs.make_inode(image.ROOT_INO, f"f{i}".encode(), stat.S_IFREG | 0o644, 0, 0)
        trio.run(fs.commit)


def test_fsck_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    import pty
    import subprocess

    from harness.mount import cli, cli_env

    img = tmp_path / "img"
    _image_with_files(img, 3000)
    quiet = run_cli("fsck.diofs", img)
    assert quiet.returncode == 0 and "%" not in quiet.stdout + quiet.stderr, quiet
    assert quiet.stderr == ""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([*cli("fsck.diofs"), str(img)], stderr=follower,
                              stdout=subprocess.PIPE, text=True, env=cli_env(), timeout=60,
                              check=False)
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0, proc.stdout
    assert "clean (3001 inodes" in proc.stdout
    assert b"fsck.diofs: inodes:" in shown and b"%" in shown, shown


def test_dotdot_and_rename_loops_follow_parent_pointers(tmp_path: Path) -> None:
    """".." and rename's loop check use the parents the mount found (verify.survey) and that
    mkdir and rename keep: no scan of the inodes, which would decode every record of the
    checkpoint (metadata.InodeTable)."""
    with _offline_fs(tmp_path / "image") as fs:
        mkdir = stat.S_IFDIR | 0o755
        a = fs.make_inode(image.ROOT_INO, b"a", mkdir, 0, 0)
        b = fs.make_inode(a.ino, b"b", mkdir, 0, 0)
        c = fs.make_inode(image.ROOT_INO, b"c", mkdir, 0, 0)
        for i in range(100):
            fs.make_inode(b.ino, f"f{i}".encode(), stat.S_IFREG | 0o644, 0, 0)
        fs.unmount_cleanup()
        trio.run(fs.commit)  # a checkpoint: the next load decodes nothing up front
        fs = Filesystem.load(fs.backend)
        assert fs.lookup(b.ino, b"..").ino == a.ino
        assert fs.lookup(a.ino, b"..").ino == image.ROOT_INO
        fs.rename(image.ROOT_INO, b"a", c.ino, b"a2")
        assert fs.lookup(a.ino, b"..").ino == c.ino
        with pytest.raises(FsError) as exc:
            fs.rename(image.ROOT_INO, b"c", b.ino, b"loop")  # c is now above b
        assert exc.value.errno == errno.EINVAL
        assert fs.inodes.raw_count == 100  # the files under b were never decoded
