"""Unmount is complete when the command returns; a busy image is refused; st_blocks counts
delayed allocation (issue 17, items 1-3), on real mounts.

1. `umount.diofs MNT` returns only once the daemon has written back, committed (durably) and
   exited, with its status: 0; 9 when the final writeback failed; 10 when the status cannot
   be known (daemon killed, --timeout); 8 when nothing was unmounted. `fusermount3 -u`
   returns before the final commit (measured: 3 ms, while the daemon still held the image for
   0.2 s after an `rm -rf` of 8,000 files). To make that window wide and the tests
   deterministic, the final commit is slowed down with the fault backend's flush delay
   (FLUSH_DELAY_MS per fdatasync; a commit does two), and the periodic commit is off.
   As root with the helpers of scripts/setup, plain `umount MNT` runs umount.diofs too:
   util-linux 2.38 runs /sbin/umount.fuse.diofs when it reads the type from mountinfo
   (relative path, -l, -f) and /sbin/umount.fuse (our dispatcher) when it takes it from
   statfs() (an absolute mountpoint); other FUSE mounts go on to `umount -i`.
2. The daemon holds the image's flock until its final commit is durable: from the moment
   `fusermount3 -u` returns, fsck.diofs refuses the image (exit 7, one line) until it can only
   see the final state. mount.diofs and mkfs.diofs refuse a locked image (7), `fsck --force`
   looks read-only, `--repair` never runs on it.
3. st_blocks counts blocks reserved for dirty cached pages (delayed allocation): `stat` right
   after a write shows them, the kernel's attribute cache does not hide them (each test stats
   the file first, so a cached answer would be the old one), writeback does not change the
   count, and `du` agrees with `du` after a remount. writeback_age is an hour, so the data is
   still delayed when the test looks (checked through the dirty-page counter).
   Not covered, because FUSE cannot: stores through a shared mapping count from the moment
   the kernel writes them back (msync, its own writeback), since the daemon learns of them
   only then.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from diofs import daemon_status, mountinfo
from diofs.backend import fault
from diofs.backend.raw import RawImage
from diofs.errors import (
    EXIT_DAEMON_FAILED,
    EXIT_IN_USE,
    EXIT_STATUS_UNKNOWN,
    EXIT_UNMOUNT_FAILED,
)
from diofs.format import image as image_fmt
from harness import watchdog
from harness.io import wait_for
from harness.mount import REPO, Mount, MountFactory, cli, cli_env, run_cli, run_tool

MiB = 1 << 20
FLUSH_DELAY_MS = 300
NO_PERIODIC = {"commit_interval": 3600, "writeback_age": 3600}
UMOUNT_HELPERS = (Path("/sbin/umount.fuse.diofs"), Path("/sbin/umount.fuse"))


# --------------------------------------------------------------------------- helpers


def assert_one_line(
    proc: subprocess.CompletedProcess[str], prog: str, code: int, contains: str
) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one line on stderr, got {proc.stderr!r}"
    assert lines[0].startswith(f"{prog}: "), lines[0]
    assert contains in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def fault_mount(factory: MountFactory, tmp_path: Path, **opts: object) -> tuple[Mount, str, int]:
    """A mount on the fault backend (no rules yet), no periodic commit or writeback;
    returns (mount, spec path, byte offset of the data area)."""
    spec = str(tmp_path / "faults.json")
    m = factory(mount=False)
    backend = RawImage(str(m.image), writable=False)
    try:
        sb = image_fmt.read_superblock(backend)
    finally:
        backend.close()
    m.opts.update({"backend": "fault", "fault_spec": spec, **NO_PERIODIC, **opts})
    m.start()
    return m, spec, sb.data_start * sb.block_size


def slow_commits(spec: str) -> None:
    fault.write_spec(
        spec, [{"op": "flush", "errno": None, "delay_ms": FLUSH_DELAY_MS, "name": "slow-flush"}]
    )


def committed_tree_then_rm(m: Mount, n: int = 200) -> None:
    """n files made durable (fsync commits the metadata), then removed: only the final commit
    records the removal."""
    d = m.mnt / "d"
    d.mkdir()
    for i in range(n):
        (d / f"f{i}").write_bytes(b"x")
    fd = os.open(d / "f0", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert committed_inodes(m.image) == n + 2
    shutil.rmtree(d)


def committed_inodes(path: Path) -> int:
    """Inodes in the image's last commit, read directly (no lock, no fsck)."""
    backend = RawImage(str(path), writable=False)
    try:
        return len(image_fmt.load(backend).md.inodes)
    finally:
        backend.close()


def umount_diofs(m: Mount, *args: str) -> tuple[subprocess.CompletedProcess[str], int | None, int]:
    return m.unmount_with([*cli("umount.diofs"), *args, str(m.mnt)])


def image_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- 1. umount.diofs


def test_umount_diofs_returns_after_final_commit(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    m, spec, _ = fault_mount(mount_factory, tmp_path)
    committed_tree_then_rm(m)
    slow_commits(spec)
    t0 = time.monotonic()
    proc, at_return, rc = umount_diofs(m)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert at_return == 0, "umount.diofs returned while the daemon was still running"
    assert took >= 2 * FLUSH_DELAY_MS / 1000, f"returned after {took:.3f}s: before the commit"
    # right after: the image is free and shows the final commit
    after = run_tool("fsck.diofs", m.image)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "clean (1 inodes" in after.stdout, after.stdout


def test_fusermount3_returns_before_final_commit(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    """Why umount.diofs exists: the kernel's unmount does not wait for the daemon."""
    m, spec, _ = fault_mount(mount_factory, tmp_path)
    committed_tree_then_rm(m)
    slow_commits(spec)
    proc, at_return, rc = m.unmount_with(["fusermount3", "-u", str(m.mnt)])
    assert proc.returncode == 0 and rc == 0
    assert at_return is None, "the daemon had exited when fusermount3 returned"


def test_umount_diofs_by_image_path(mount_factory: MountFactory) -> None:
    """The mount's source is the image path (what `mount` and `df` show): usable as target."""
    m = mount_factory()
    info = mountinfo.find_mount(m.mnt)
    assert info is not None and info.source == str(m.image), info
    proc, at_return, _ = m.unmount_with([*cli("umount.diofs"), str(m.image)])
    assert proc.returncode == 0, proc.stderr
    assert at_return == 0


def test_umount_diofs_reports_failed_final_writeback(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    m, spec, data_off = fault_mount(mount_factory, tmp_path)
    m.expect_log(r"writeback of inode \d+ (pages \d+\.\.\d+ )?failed")
    m.expect_log(r"final writeback failed")
    (m.mnt / "f").write_bytes(b"lost" * 4096)  # dirty in the cache for an hour
    fault.write_spec(
        spec, [{"op": "write", "errno": "EIO", "offset_min": data_off, "name": "data-eio"}]
    )
    proc, at_return, rc = umount_diofs(m)
    assert_one_line(proc, "umount.diofs", EXIT_DAEMON_FAILED, "final writeback failed")
    assert at_return == rc == 1


def test_umount_diofs_daemon_killed(mount_factory: MountFactory) -> None:
    m = mount_factory()
    assert m.daemon is not None
    # the harness waits for the mount only; the daemon publishes its record just after
    mount = mountinfo.find_mount(m.mnt)
    assert mount is not None
    wait_for(lambda: daemon_status.find(mount, os.getuid()), "the daemon's status record")
    m.daemon.kill()
    m.daemon.wait(10)
    proc = run_cli("umount.diofs", m.mnt)
    line = assert_one_line(proc, "umount.diofs", EXIT_STATUS_UNKNOWN, "died without a final")
    assert str(m.image) in line  # names the image to check
    assert not mountinfo.is_mounted(m.mnt)
    m.daemon = None


def test_umount_diofs_timeout(mount_factory: MountFactory, tmp_path: Path) -> None:
    m, spec, _ = fault_mount(mount_factory, tmp_path)
    (m.mnt / "f").write_bytes(b"x")
    fault.write_spec(spec, [{"op": "flush", "errno": None, "delay_ms": 1500, "name": "slow"}])
    proc, at_return, rc = umount_diofs(m, "--timeout", "0.2")
    assert_one_line(proc, "umount.diofs", EXIT_STATUS_UNKNOWN, "still writing back")
    assert at_return is None and rc == 0  # it finished afterwards, cleanly


def test_umount_diofs_busy(mounted: Mount) -> None:
    fd = os.open(mounted.path("busy"), os.O_CREAT | os.O_WRONLY)
    try:
        proc = run_cli("umount.diofs", mounted.mnt)
        assert_one_line(proc, "umount.diofs", EXIT_UNMOUNT_FAILED, "busy")
        assert mounted.mounted and mounted.daemon is not None and mounted.daemon.poll() is None
        os.write(fd, b"still serving")
    finally:
        os.close(fd)


def test_umount_diofs_not_a_diofs_mount(tmp_path: Path) -> None:
    assert_one_line(
        run_cli("umount.diofs", tmp_path), "umount.diofs", EXIT_UNMOUNT_FAILED, "not mounted"
    )
    assert_one_line(
        run_cli("umount.diofs", "/"), "umount.diofs", EXIT_UNMOUNT_FAILED, "not a diofs mount"
    )


# --------------------------------------------------------------------------- umount(8)


@pytest.fixture
def helpers() -> None:
    if os.geteuid() != 0:
        pytest.skip("umount(8) helpers run for root only")
    if shutil.which("umount") is None:
        pytest.skip("umount(8) is missing")
    for h in UMOUNT_HELPERS:
        if not h.exists():
            pytest.skip(f"{h} is not installed (scripts/setup installs it)")
    if "diofs" not in Path("/sbin/umount.fuse").read_text(errors="replace"):
        pytest.skip("/sbin/umount.fuse is not the diofs dispatcher")


@pytest.mark.parametrize("form", ["absolute", "relative"])
def test_plain_umount_waits(
    mount_factory: MountFactory, tmp_path: Path, helpers: None, form: str
) -> None:
    """absolute: umount(8) asks statfs ("fuse") -> /sbin/umount.fuse -> umount.diofs;
    relative: it reads mountinfo ("fuse.diofs") -> /sbin/umount.fuse.diofs."""
    m, spec, _ = fault_mount(mount_factory, tmp_path)
    committed_tree_then_rm(m)
    slow_commits(spec)
    target = str(m.mnt) if form == "absolute" else os.path.relpath(m.mnt, REPO)
    proc, at_return, rc = m.unmount_with(["umount", target])
    assert proc.returncode == 0, proc.stderr
    assert at_return == 0, "umount returned while the daemon was still running"
    assert "clean (1 inodes" in run_tool("fsck.diofs", m.image).stdout


def test_plain_umount_passes_the_daemon_status(
    mount_factory: MountFactory, tmp_path: Path, helpers: None
) -> None:
    m, spec, data_off = fault_mount(mount_factory, tmp_path)
    m.expect_log(r"writeback of inode \d+ (pages \d+\.\.\d+ )?failed")
    m.expect_log(r"final writeback failed")
    (m.mnt / "f").write_bytes(b"lost" * 4096)
    fault.write_spec(
        spec, [{"op": "write", "errno": "EIO", "offset_min": data_off, "name": "data-eio"}]
    )
    proc, at_return, rc = m.unmount_with(["umount", str(m.mnt)])
    assert proc.returncode == EXIT_DAEMON_FAILED, proc.stderr
    assert "final writeback failed" in proc.stderr
    assert at_return == rc == 1


OTHER_FS = textwrap.dedent("""
    import sys, pyfuse3, trio
    class Empty(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):
            a = pyfuse3.EntryAttributes()
            a.st_ino, a.st_mode, a.st_nlink = inode, 0o40755, 2
            return a
    pyfuse3.init(Empty(), sys.argv[1], {"fsname=otherfs", "subtype=other"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
""")


def test_plain_umount_of_another_fuse_fs(
    tmp_path: Path, helpers: None, fuse_required: None
) -> None:
    """The /sbin/umount.fuse dispatcher hands every mount that is not diofs to `umount -i`."""
    mnt = tmp_path / "other"
    mnt.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-c", OTHER_FS, str(mnt)],
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not mountinfo.is_mounted(mnt):
            assert daemon.poll() is None and time.monotonic() < deadline, "otherfs did not mount"
            time.sleep(0.02)
        assert mountinfo.find_mount(mnt).fstype == "fuse.other"  # type: ignore[union-attr]
        proc = subprocess.run(
            ["umount", str(mnt)], capture_output=True, text=True, timeout=30, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert not mountinfo.is_mounted(mnt)
        assert daemon.wait(15) == 0
    finally:
        if mountinfo.is_mounted(mnt):
            watchdog.lazy_unmount(mnt)
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)


# --------------------------------------------------------------------------- 2. the lock


def test_lock_held_until_final_commit(mount_factory: MountFactory, tmp_path: Path) -> None:
    """From the moment fusermount3 returns, fsck either refuses the image or sees the final
    commit: never the commit before it."""
    m, spec, _ = fault_mount(mount_factory, tmp_path)
    committed_tree_then_rm(m)
    slow_commits(spec)
    subprocess.run(["fusermount3", "-u", str(m.mnt)], check=True, timeout=30)
    refused = 0
    deadline = time.monotonic() + 30
    while True:
        proc = run_tool("fsck.diofs", m.image)
        if proc.returncode != EXIT_IN_USE:
            break
        refused += 1
        assert time.monotonic() < deadline, "the image stayed locked"
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "clean (1 inodes" in proc.stdout, proc.stdout
    assert refused > 0, "fsck never saw the lock (the final commit was not slow enough?)"
    assert m.daemon is not None
    assert m.daemon.wait(30) == 0
    m.daemon = None


def test_fsck_refuses_locked_image(mounted: Mount) -> None:
    proc = run_cli("fsck.diofs", mounted.image)
    line = assert_one_line(proc, "fsck.diofs", EXIT_IN_USE, "in use")
    assert str(mounted.mnt) in line and "--force" in line


def test_fsck_force_checks_locked_image_read_only(mounted: Mount) -> None:
    before = image_digest(mounted.image)
    proc = run_cli("fsck.diofs", mounted.image, "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert "in use" in proc.stdout and "clean (1 inodes, generation 1)" in proc.stdout
    assert image_digest(mounted.image) == before


@pytest.mark.parametrize("extra", [[], ["--force"]])
def test_fsck_repair_refused_on_locked_image(mounted: Mount, extra: list[str]) -> None:
    before = image_digest(mounted.image)
    proc = run_cli("fsck.diofs", mounted.image, "--repair", *extra)
    assert_one_line(proc, "fsck.diofs", EXIT_IN_USE, "--repair never runs")
    assert image_digest(mounted.image) == before


def test_mount_refuses_locked_image(mounted: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other-mnt"
    other.mkdir()
    try:
        proc = run_cli("mount.diofs", mounted.image, other)
        line = assert_one_line(proc, "mount.diofs", EXIT_IN_USE, "in use")
        assert f"mounted on {mounted.mnt}" in line
        assert not mountinfo.is_mounted(other)
    finally:
        if mountinfo.is_mounted(other):  # a second daemon got in: unmount it, and its image
            run_cli("umount.diofs", other)
            mounted.expect_dirty()


def test_mkfs_refuses_locked_image(mounted: Mount) -> None:
    (mounted.mnt / "keep").write_bytes(b"kept")
    proc = run_cli("mkfs.diofs", mounted.image, "--size", "64M")
    assert_one_line(proc, "mkfs.diofs", EXIT_IN_USE, "in use")
    mounted.remount()
    assert (mounted.mnt / "keep").read_bytes() == b"kept"


def test_fsck_after_unmount_is_allowed(mounted: Mount) -> None:
    """The lock ends with the daemon: a check after the unmount runs (and takes the lock
    itself, so the next mount still works)."""
    mounted.unmount()
    assert run_tool("fsck.diofs", mounted.image).returncode == 0
    mounted.start()
    (mounted.mnt / "again").write_bytes(b"ok")


# --------------------------------------------------------------------------- 3. st_blocks


@pytest.fixture
def delayed(mount_factory: MountFactory) -> Mount:
    """A mount whose buffered writes stay in the cache (delayed allocation) for an hour."""
    return mount_factory(size="256M", opts={"writeback_age": 3600, "cache_size": "64M"})


def blocks(path: str | os.PathLike[str]) -> int:
    return os.stat(path).st_blocks


def dirty_pages(m: Mount) -> float:
    return m.stats().get("cache.dirty_pages", 0)


def du(path: Path) -> int:
    out = subprocess.run(
        ["du", "-s", "--block-size=512", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return int(out.split()[0])


def create_and_stat(path: str) -> None:
    """Create an empty file and stat it, so the kernel caches its attributes (blocks 0): a
    later stat that the kernel answered from that cache would show 0."""
    with open(path, "wb"):
        pass
    assert blocks(path) == 0


def test_blocks_right_after_buffered_write(delayed: Mount) -> None:
    p = delayed.path("f")
    create_and_stat(p)
    with open(p, "r+b", buffering=0) as f:
        for _ in range(4):
            f.write(b"\xab" * MiB)  # dd bs=1M count=4
        assert os.fstat(f.fileno()).st_blocks == 8192
    assert blocks(p) == 8192
    assert dirty_pages(delayed) >= 1024, "the data was written back: nothing was delayed"
    delayed.remount()
    assert blocks(p) == 8192


def test_blocks_buffered_and_direct(delayed: Mount) -> None:
    p = delayed.path("f")
    create_and_stat(p)
    with open(p, "r+b", buffering=0) as f:
        f.write(b"b" * MiB)  # buffered, [0, 1M): delayed
    fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, MiB)
        buf.write(b"d" * MiB)
        assert os.pwrite(fd, buf, 2 * MiB) == MiB  # direct, [2M, 3M): allocated now
    finally:
        os.close(fd)
    assert blocks(p) == 2 * 2048
    assert dirty_pages(delayed) >= 256
    delayed.remount()
    assert blocks(p) == 2 * 2048


def test_blocks_sparse_file(delayed: Mount) -> None:
    p = delayed.path("sparse")
    create_and_stat(p)
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, b"t" * 100, 100 * MiB)  # one partial block far out
        os.pwrite(fd, b"h" * 4096, 0)  # and the first block
    finally:
        os.close(fd)
    st = os.stat(p)
    assert st.st_size == 100 * MiB + 100
    assert st.st_blocks == 16
    delayed.remount()
    assert blocks(p) == 16


def test_blocks_after_truncate(delayed: Mount) -> None:
    p = delayed.path("t")
    create_and_stat(p)
    with open(p, "r+b", buffering=0) as f:
        f.write(b"x" * 4 * MiB)
        assert blocks(p) == 8192
        os.ftruncate(f.fileno(), MiB + 1)  # keeps 257 blocks
        assert blocks(p) == 257 * 8
        os.ftruncate(f.fileno(), 8 * MiB)  # a hole: no blocks
        assert blocks(p) == 257 * 8
    delayed.remount()
    assert blocks(p) == 257 * 8


def test_blocks_unchanged_by_writeback(delayed: Mount) -> None:
    p = delayed.path("w")
    create_and_stat(p)
    with open(p, "r+b", buffering=0) as f:
        f.write(b"w" * 3 * MiB)
        before = os.fstat(f.fileno()).st_blocks
        assert dirty_pages(delayed) >= 768
        os.fsync(f.fileno())  # writeback: reservations become extents
        assert dirty_pages(delayed) == 0
        assert os.fstat(f.fileno()).st_blocks == before == 6144


def test_du_right_after_writes_agrees_with_remount(delayed: Mount) -> None:
    root = delayed.mnt / "tree"
    root.mkdir()
    du(root)  # the kernel now caches the attributes of the empty tree
    for i in range(20):
        (root / f"small{i}").write_bytes(b"s" * (1000 * i + 1))
    (root / "big").write_bytes(b"B" * 5 * MiB)
    with open(root / "holey", "wb") as f:
        f.seek(50 * MiB)
        f.write(b"end")
    now = du(root)
    assert dirty_pages(delayed) > 0
    delayed.remount()
    assert du(root) == now
    assert now >= (5 * MiB) // 512


def test_blocks_count_reservations_on_enospc_retry(mount_factory: MountFactory) -> None:
    """A write cut short by ENOSPC counts only the blocks it reserved (no leak into
    st_blocks), and the count survives the remount."""
    m = mount_factory(size="8M", opts={"writeback_age": 3600})
    p = m.path("fill")
    create_and_stat(p)
    fd = os.open(p, os.O_WRONLY)
    try:
        written = 0
        with pytest.raises(OSError) as exc:  # the loop ends in the error
            while True:
                written += os.write(fd, b"f" * MiB)
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    want = -(-written // 4096) * 8
    assert blocks(p) == want
    m.remount()
    assert blocks(p) == want


def test_status_record_of_an_earlier_mount_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device number is reused by the next mount: a record names its mount's id, and only a
    record of the mount being unmounted counts (a daemon killed before it published its own
    must not be reported by an earlier daemon's final status 0)."""
    import dataclasses
    import json

    monkeypatch.setattr(daemon_status, "run_dir", lambda uid: tmp_path)
    earlier = daemon_status.Record(1, 1, 1, "img", "/mnt", status=0, mount_id=7)
    (tmp_path / "0:99.1.json").write_text(json.dumps(dataclasses.asdict(earlier)))
    now = mountinfo.MountInfo(8, 0, 99, "/mnt", "fuse.diofs", "img")
    assert daemon_status.find(now, 0) is None
    found = daemon_status.find(dataclasses.replace(now, mount_id=7), 0)
    assert found is not None and found[1] == earlier
