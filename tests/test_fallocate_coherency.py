"""fallocate and unwritten extents (SPEC 5, issue 8) on a real mount whose free space holds a
deleted file's recognizable bytes (the secret; test_holes_extend.fill_free_space_with_secret):

  - preallocation (mode 0 and KEEP_SIZE) allocates unwritten extents: they read as zeros by
    every path (buffered, mmap, O_DIRECT), before and after a remount, after a truncate up,
    and around the data a later direct write puts into them;
  - punch hole and zero range are coherent with both caches: data written buffered, read
    into the daemon cache and into the kernel's (an fd and a MAP_SHARED mapping opened
    before), then punched / zeroed: every path reads zeros there and the data elsewhere;
    dirty daemon pages of the range are discarded, never written back over the hole;
  - fsck knows unwritten extents: preallocated extents past EOF are clean; a *written*
    extent past EOF (which would show its old bytes after a truncate up: shown on a mount
    of the damaged image) is reported, and --repair makes it unwritten.

These protections have no --bug switch (the size-before-data side of unwritten extents is
test_holes_extend.py and test_holes_crash.py).
"""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path

import pytest

from diofs.backend.raw import RawImage
from diofs.format import image
from harness.io import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    aligned,
    fallocate,
)
from harness.mount import Mount, MountFactory, run_cli
from harness.workloads.holes import (
    BS,
    IMAGE_SIZE,
    KiB,
    MiB,
    fill_free_space_with_secret,
    secret_bytes,
    secret_mount,
    tagged,
)
from tests.test_holes_extend import (
    read_all_ways,
)

pytestmark = pytest.mark.deadline(60)

SIZE = 1 * MiB


def check_all_ways(path: str, want: bytes, what: str) -> None:
    for how, got in read_all_ways(path).items():
        assert secret_bytes(got) == 0, f"{what}: {how} read {secret_bytes(got)} secret bytes"
        assert got == want, f"{what}: {how} differs"


def offline_extents(img: str | Path, name: str) -> list[tuple[int, int, int, bool]]:
    """(start, phys, count, unwritten) of the file `name` in the root of an unmounted image."""
    backend = RawImage(str(img), writable=False)
    try:
        md = image.load(backend).md
        ino = md.inodes[image.ROOT_INO].entries[name.encode()]  # type: ignore[index]
        return [(e.start, e.phys, e.count, e.unwritten) for e in md.inodes[ino].extents]
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------
# preallocation


@pytest.mark.parametrize("keep_size", [False, True], ids=["mode0", "keep-size"])
def test_preallocation_reads_zeros(mount_factory: MountFactory, keep_size: bool) -> None:
    m = secret_mount(mount_factory)
    path = m.path("f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE if keep_size else 0, 0, SIZE)
        st = os.fstat(fd)
        assert st.st_size == (0 if keep_size else SIZE)
        assert st.st_blocks * 512 >= SIZE  # allocated
        if keep_size:
            os.ftruncate(fd, SIZE)  # extends over the unwritten blocks: zeros, not the secret
    finally:
        os.close(fd)
    check_all_ways(path, bytes(SIZE), "preallocated")
    m.unmount()
    ext = offline_extents(m.image, "f")
    assert ext and all(unwritten for *_, unwritten in ext), ext
    m.start()
    check_all_ways(path, bytes(SIZE), "preallocated, after remount")


def test_direct_write_into_keep_size_preallocation(mount_factory: MountFactory) -> None:
    """Appends into a KEEP_SIZE run: the size follows the data; the written blocks turn
    written, the rest stays unwritten past EOF (and reads zeros after a truncate up)."""
    m = secret_mount(mount_factory)
    path = m.path("f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, SIZE)
        with aligned(64 * KiB, tagged(1, 64 * KiB)) as buf:
            assert os.pwrite(fd, buf, 0) == 64 * KiB
        with aligned(512, tagged(2, 512)) as buf:  # sub-block, past EOF, into the run
            assert os.pwrite(fd, memoryview(buf)[:512], 64 * KiB) == 512
        assert os.fstat(fd).st_size == 64 * KiB + 512
    finally:
        os.close(fd)
    want = tagged(1, 64 * KiB) + tagged(2, 512)
    check_all_ways(path, want, "after appends")
    m.unmount()
    ext = offline_extents(m.image, "f")
    written = sum(c for _, _, c, u in ext if not u)
    unwritten = sum(c for _, _, c, u in ext if u)
    assert written == 64 * KiB // BS + 1 and unwritten == SIZE // BS - written, ext
    m.start()
    os.truncate(path, SIZE)
    check_all_ways(path, want + bytes(SIZE - len(want)), "after truncate up")


# ---------------------------------------------------------------------------------------------
# punch hole and zero range, coherent with the daemon cache and the kernel cache


def data_file_cached_everywhere(m: Mount) -> tuple[str, int, mmap.mmap]:
    """A SIZE-byte file written buffered (and written back), read into the daemon cache and
    the kernel cache; returns (path, an fd opened before, a MAP_SHARED mapping faulted in)."""
    path = m.path("f")
    data = b"".join(tagged(i, 64 * KiB) for i in range(SIZE // (64 * KiB)))
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDWR)
    assert os.pread(fd, SIZE, 0) == data  # daemon cache + kernel cache
    mm = mmap.mmap(fd, SIZE)
    assert mm[:] == data  # mapped pages
    return path, fd, mm


@pytest.mark.parametrize("mode", ["punch", "zero", "zero-keep"])
def test_punch_and_zero_range_coherent_with_caches(mount_factory: MountFactory,
                                                   mode: str) -> None:
    m = secret_mount(mount_factory)
    path, fd, mm = data_file_cached_everywhere(m)
    try:
        want = bytearray(mm[:])
        flags = {"punch": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 "zero": FALLOC_FL_ZERO_RANGE,
                 "zero-keep": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE}[mode]
        for start, length in ((256 * KiB, 256 * KiB), (100 * KiB + 123, 5000), (SIZE - 700, 700)):
            fallocate(fd, flags, start, length)
            want[start : start + length] = bytes(length)
        want = bytes(want)
        assert mm[:] == want, "the existing mapping"
        assert os.pread(fd, SIZE, 0) == want, "the fd opened before"
        check_all_ways(path, want, mode)
        assert secret_bytes(mm[:]) == 0
    finally:
        mm.close()
        os.close(fd)
    m.remount()
    check_all_ways(path, want, f"{mode}, after remount")


@pytest.mark.parametrize("mode", ["punch", "zero"])
def test_punch_discards_dirty_cached_pages(mount_factory: MountFactory, mode: str) -> None:
    """Buffered data still dirty in the daemon cache, then punched: reads show zeros at
    once, and the discarded pages are never written back over the hole (remount)."""
    m = secret_mount(mount_factory, writeback_age=0.2)
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(tagged(1, SIZE))  # no fsync: dirty daemon pages, written back in ~0.2 s
        fd = os.open(path, os.O_RDWR)
        try:
            flags = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if mode == "punch"
                     else FALLOC_FL_ZERO_RANGE)
            fallocate(fd, flags, 64 * KiB, 512 * KiB)
        finally:
            os.close(fd)
    want = bytearray(tagged(1, SIZE))
    want[64 * KiB : 576 * KiB] = bytes(512 * KiB)
    check_all_ways(path, bytes(want), mode)
    m.remount()
    check_all_ways(path, bytes(want), f"{mode}, after remount")


# ---------------------------------------------------------------------------------------------
# fsck and unwritten extents


def test_fsck_clean_with_unwritten_extents_past_eof(mount_factory: MountFactory) -> None:
    m = mount_factory(size=IMAGE_SIZE)
    fd = os.open(m.path("f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 5000, 0)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 256 * KiB)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 1 * MiB, 64 * KiB)  # a run after a hole
    finally:
        os.close(fd)
    m.unmount()
    ext = offline_extents(m.image, "f")
    assert any(u for *_, u in ext) and any(not u for *_, u in ext), ext
    proc = run_cli("fsck.diofs", m.image)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fsck_reports_and_repairs_written_extent_past_eof(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    """Damage an image by hand: the KEEP_SIZE run past EOF marked written (over blocks that
    hold the secret). A mount of it shows the secret after a truncate up, which is why fsck
    reports it; --repair makes the blocks unwritten and the truncate up reads zeros."""
    m = mount_factory(size=IMAGE_SIZE)
    fill_free_space_with_secret(m)
    fd = os.open(m.path("f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, tagged(1, 8 * KiB), 0)
        os.fsync(fd)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 64 * KiB)
    finally:
        os.close(fd)
    m.unmount()
    backend = RawImage(str(m.image), writable=True)
    try:
        loaded = image.load(backend)
        ino = loaded.md.inodes[image.ROOT_INO].entries[b"f"]  # type: ignore[index]
        inode = loaded.md.inodes[ino]
        for e in inode.extents:
            e.unwritten = False  # the damage: written blocks past EOF
        inode.record = None
        from diofs.format import metadata

        image.write_commit(backend, loaded.sb, loaded.generation + 1, metadata.encode(loaded.md))
    finally:
        backend.close()
    damaged = tmp_path / "damaged.img"
    shutil.copyfile(m.image, damaged)

    proc = run_cli("fsck.diofs", m.image)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "written block(s) past EOF" in proc.stdout, proc.stdout

    md = mount_factory(image=damaged)  # what the damage means: the secret after truncate up
    md.expect_dirty()
    os.truncate(md.path("f"), 64 * KiB)
    with open(md.path("f"), "rb") as f:
        assert secret_bytes(f.read()) > 0
    md.unmount()

    proc = run_cli("fsck.diofs", m.image, "--repair")
    assert proc.returncode == 0 and "repaired" in proc.stdout, proc.stdout + proc.stderr
    proc = run_cli("fsck.diofs", m.image)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m.start()
    os.truncate(m.path("f"), 64 * KiB)
    check_all_ways(m.path("f"), tagged(1, 8 * KiB) + bytes(56 * KiB), "repaired")
