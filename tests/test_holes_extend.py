"""Holes and extending writes never expose unwritten blocks (SPEC 5, issue 8, seed 003), on a
real mount whose free space holds a deleted file's recognizable bytes (the "secret").

Every test first fills all free blocks of a fresh image with SECRET_UNIT (O_DIRECT, fsync),
unlinks that file and commits (fsync of the root directory), so that the freed blocks, which
new files get next, still hold the secret on the image (`fill_free_space_with_secret` checks
statfs and the image itself). Then:

  - sequential O_DIRECT appends, with a reader that polls the size with
    statx(AT_STATX_FORCE_SYNC) (a GETATTR every time) and looks for the data of the last
    chunk below that size *in the image file*: i_size must never cover bytes not yet on the
    image (`size_before_data`); the reader also reads the tail through the mount (O_DIRECT
    and buffered): only written bytes, never zeros below a seen size (one sequential writer),
    never secret bytes;
  - AIO-style appends (threads; fio libaio / io_uring, --direct=1 --rw=write on a new file,
    fio's default fallocate=native and fallocate=none) with O_DIRECT, buffered and stat
    readers of the tail: only written bytes or zeros, never secret bytes;
  - hole filling: direct writers fill a sparse file's holes (shared rwsem: they run
    concurrently with each other and with O_DIRECT readers) while O_DIRECT and buffered /
    mmap readers read the file;
  - sub-block (512-byte) direct writes into holes and past EOF: the rest of the block reads
    zeros (also after a truncate up and a remount); concurrent sub-block writes to one block
    keep every writer's sector.

`--bug size-before-data` (+ `-o data_delay`, which makes the window between allocation and
data deterministic) publishes the extent and i_size before the data: the size poller then
sees sizes that cover data not yet on the image, and O_DIRECT readers of holes being filled
read the secret. Buffered fills are additionally kept out of that window by the pagecache
lock (BLOCK held across the whole write): they read the secret only with both
`size-before-data` and `no-pagecache-lock` (`test_buffered_readers_over_filling_holes`).
Pure extensions take the inode rwsem exclusively, so readers of the new tail wait: for them
the bug shows as a size published before the data, not as bytes.

Helpers here (secret fill, classification) are shared with test_holes_crash.py,
test_fallocate_coherency.py and scripts/demo_size_before_data.py.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest

from harness.io import aligned, direct_pwrite
from harness.mount import MountFactory, run_in_child
from harness.workloads.holes import (
    BS,
    BUG,
    CHUNK,
    Counts,
    MiB,
    final_check,
    hole_fill_race,
    secret_bytes,
    secret_mount,
    statx_size,
    tagged,
    tail_readers,
    threaded_append_race,
)

pytestmark = pytest.mark.deadline(90)

DATA_DELAY = 0.05  # seconds between allocation (and, with the bug, publication) and data


# ---------------------------------------------------------------------------------------------
# helpers (shared)


def zero_bytes_in_sectors(data: bytes) -> int:
    """Bytes of `data` in 512-byte sectors that are all zeros."""
    z = bytes(512)
    return sum(512 for i in range(0, len(data) - 511, 512) if data[i : i + 512] == z)


# ---------------------------------------------------------------------------------------------
# 1. sequential extending direct writes: i_size only after the data


def sequential_append_race(mnt: str, image: str, nchunks: int) -> dict[str, int]:
    """Child: one O_DIRECT appender; one poller: statx size S -> the image must already
    hold the data of the chunk below S; the tail [S - CHUNK, S) read through the mount
    (O_DIRECT and buffered) must be exactly that chunk's data."""
    path = os.path.join(mnt, "f")
    c = Counts(samples=0, size_before_data=0, secret=0, zeros_below_size=0, wrong=0)
    done = threading.Event()
    errors: list[BaseException] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)

    def poller() -> None:
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            bfd = os.open(path, os.O_RDONLY)
            img = open(image, "rb")  # noqa: SIM115
            rbuf = aligned(CHUNK)
            try:
                while not done.is_set():
                    size = statx_size(path)
                    if size == 0:
                        continue
                    c.add("samples")
                    k = size // CHUNK - 1  # the last chunk under the size
                    want = tagged(k, CHUNK)
                    with mmap.mmap(img.fileno(), 0, prot=mmap.PROT_READ) as im:
                        if im.find(want[:BS]) < 0:
                            c.add("size_before_data")
                    n = os.preadv(dfd, [rbuf], k * CHUNK)
                    got_d = bytes(rbuf[:n])
                    got_b = os.pread(bfd, CHUNK, k * CHUNK)
                    for got in (got_d, got_b):
                        c.add("secret", secret_bytes(got))
                        c.add("zeros_below_size", zero_bytes_in_sectors(got))
                        if got != want:
                            c.add("wrong")
            finally:
                rbuf.close()
                img.close()
                os.close(dfd)
                os.close(bfd)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=poller)
    t.start()
    try:
        for i in range(nchunks):
            with aligned(CHUNK, tagged(i, CHUNK)) as buf:
                assert os.pwrite(fd, buf, i * CHUNK) == CHUNK
            time.sleep(0.005)
    finally:
        done.set()
        t.join()
        os.close(fd)
    if errors:
        raise errors[0]
    with open(path, "rb") as f:
        final = f.read()
    c["final_ok"] = int(final == b"".join(tagged(i, CHUNK) for i in range(nchunks)))
    return dict(c)


@pytest.mark.parametrize("bug_on", [False, True], ids=["protected", "bug"])
def test_extending_direct_write_publishes_size_after_data(
    mount_factory: MountFactory, bug_on: bool
) -> None:
    m = secret_mount(mount_factory, [BUG] if bug_on else [], data_delay=DATA_DELAY)
    c = run_in_child(sequential_append_race, str(m.mnt), str(m.image), 24, timeout=60,
                     mounts=[m])
    print("COUNTS", c)
    assert c["final_ok"] == 1 and c["samples"] > 10, c
    # pure extensions hold the inode rwsem exclusively: readers of the new tail wait for
    # the data in both modes; only the size tells the bug apart
    assert c["secret"] == 0, c
    if bug_on:
        assert c["size_before_data"] > 0, c
    else:
        assert c["size_before_data"] == 0, c
        assert c["zeros_below_size"] == 0 and c["wrong"] == 0, c


# ---------------------------------------------------------------------------------------------
# 2. concurrent (AIO-like) appends: threads, fio libaio / io_uring


@pytest.mark.parametrize("bug_on", [False, True], ids=["protected", "bug"])
def test_threaded_appends_with_tail_readers(mount_factory: MountFactory, bug_on: bool) -> None:
    m = secret_mount(mount_factory, [BUG] if bug_on else [], data_delay=DATA_DELAY)
    c = run_in_child(threaded_append_race, str(m.mnt), 6, 48, timeout=60, mounts=[m])
    print("COUNTS", c)
    assert c["final_ok"] == 1 and c["direct_reads"] > 5 and c["buffered_reads"] > 5, c
    if bug_on:
        # out-of-order appends: a chunk below the new EOF is a hole fill (shared rwsem), and
        # an O_DIRECT reader can read its published, unwritten blocks
        assert c["secret"] > 0, c
    else:
        assert c["secret"] == 0 and c["garbage"] == 0, c


FIO_SIZE = 4 * MiB
FIO_PATTERN = "0x46494f21"  # b"FIO!"
FIO_UNIT = b"FIO!"


def fio_garbage(off: int, data: bytes) -> int:
    """Bytes that are neither zero nor fio's pattern byte there (byte by byte, as
    garbage_vs_patterns; off is a multiple of 4)."""
    z, p = bytes(512), FIO_UNIT * 128
    bad = 0
    for i in range(0, len(data) - 511, 512):
        sec = data[i : i + 512]
        if sec != z and sec != p:
            bad += sum(1 for a, b in zip(sec, p, strict=True) if a and a != b)
    return bad


def fio_race(mnt: str, engine: str, falloc: str) -> dict[str, Any]:
    """Child: fio --direct=1 --rw=write on a new file, with tail readers."""
    path = os.path.join(mnt, "fio.dat")
    c = Counts(secret=0, garbage=0)
    errors: list[BaseException] = []
    stop = threading.Event()
    # no mmap reader: fio creates the file empty and fallocates it, so its size changes too
    readers = tail_readers(path, stop, c, errors, fio_garbage)
    argv = ["fio", "--name=extend", f"--filename={path}", f"--ioengine={engine}", "--direct=1",
            "--rw=write", "--bs=64k", f"--size={FIO_SIZE}", "--iodepth=16",
            f"--fallocate={falloc}", f"--buffer_pattern={FIO_PATTERN}",
            "--output-format=json"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=50, check=False)
    finally:
        stop.set()
        for t in readers:
            t.join()
    if errors:
        raise errors[0]
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == FIO_SIZE, job
    c["final_ok"] = int(final_check(path, FIO_UNIT * (FIO_SIZE // 4), c))
    return dict(c)


FIO_CASES = [
    pytest.param(engine, falloc, bug_on, id=f"{engine}-{falloc}-{'bug' if bug_on else 'ok'}")
    for engine in ("libaio", "io_uring")
    for falloc in ("native", "none")
    # fallocate=none with the bug: fio's appends reach the daemon in order, each one extends
    # the file under the exclusive rwsem, so readers wait and see no secret (out-of-order
    # appends are test_threaded_appends_with_tail_readers; the size itself,
    # test_extending_direct_write_publishes_size_after_data)
    for bug_on in ((False, True) if falloc == "native" else (False,))
]


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
@pytest.mark.parametrize("engine,falloc,bug_on", FIO_CASES)
def test_fio_direct_write_new_file_with_tail_readers(
    mount_factory: MountFactory, engine: str, falloc: str, bug_on: bool
) -> None:
    """fallocate=native (fio's default): fio preallocates the file (unwritten extents, i_size
    set), then writes inside i_size; fallocate=none: every write extends the file."""
    m = secret_mount(mount_factory, [BUG] if bug_on else [], data_delay=DATA_DELAY / 5)
    c = run_in_child(fio_race, str(m.mnt), engine, falloc, timeout=70, mounts=[m])
    print("COUNTS", c)
    assert c["final_ok"] == 1 and c["direct_reads"] > 3, c
    if bug_on:  # published (written) extents over preallocated blocks, data not there yet
        assert c["secret"] > 0, c
    else:
        assert c["secret"] == 0 and c["garbage"] == 0, c
        assert c["final_kernel_stale_pages"] == 0, c


# ---------------------------------------------------------------------------------------------
# 3. hole filling: direct writers fill a sparse file while others read it


@pytest.mark.parametrize("bug_on", [False, True], ids=["protected", "bug"])
def test_direct_readers_over_filling_holes(mount_factory: MountFactory, bug_on: bool) -> None:
    m = secret_mount(mount_factory, [BUG] if bug_on else [], data_delay=DATA_DELAY)
    c = run_in_child(hole_fill_race, str(m.mnt), ["direct", "direct"], 4, timeout=60,
                     mounts=[m])
    print("COUNTS", c)
    assert c["final_ok"] == 1 and c["direct_reads"] > 5, c
    if bug_on:
        assert c["secret"] > 0, c
    else:
        assert c["secret"] == 0 and c["garbage"] == 0, c


@pytest.mark.parametrize(
    "bugs",
    [(), (BUG,), ("no-pagecache-lock",), (BUG, "no-pagecache-lock")],
    ids=["protected", "size-before-data", "no-pagecache-lock", "both"],
)
def test_buffered_readers_over_filling_holes(
    mount_factory: MountFactory, bugs: tuple[str, ...]
) -> None:
    """Buffered and mmap readers: two protections stand between them and the secret: the
    write order (unwritten until the data landed) and the pagecache lock (a fill cannot run
    while a direct write holds BLOCK). Either one alone keeps the secret out."""
    m = secret_mount(mount_factory, bugs, data_delay=DATA_DELAY)
    c = run_in_child(hole_fill_race, str(m.mnt), ["buffered", "mmap"], 4, timeout=60,
                     mounts=[m])
    print("COUNTS", c)
    assert c["final_ok"] == 1 and c["buffered_reads"] > 5 and c["mmap_reads"] > 5, c
    if set(bugs) == {BUG, "no-pagecache-lock"}:
        assert c["secret"] > 0, c
    else:
        assert c["secret"] == 0, c
    if not bugs:
        assert c["garbage"] == 0, c


# ---------------------------------------------------------------------------------------------
# 4. sub-block direct writes (512 bytes) into holes and past EOF


def read_all_ways(path: str) -> dict[str, bytes]:
    """The whole file through a buffered fd, an mmap and O_DIRECT."""
    size = os.stat(path).st_size
    out: dict[str, bytes] = {}
    with open(path, "rb") as f:
        out["buffered"] = f.read()
        if size:
            with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
                out["mmap"] = mm[:]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with aligned(size + BS) as buf:
            n = os.preadv(fd, [memoryview(buf)[: -(-size // 512) * 512 or 512]], 0)
            out["direct"] = bytes(buf[:n])
    finally:
        os.close(fd)
    return out


def test_subblock_direct_write_into_hole_zeroes_the_block(mount_factory: MountFactory) -> None:
    m = secret_mount(mount_factory)
    path = m.path("f")
    with open(path, "wb") as f:
        f.truncate(4 * BS)
    a, b = tagged(1, 512), tagged(2, 1024)
    # block 1: [0, 1024) and [1536, 4096) stay zeros
    assert direct_pwrite(path, a, BS + 1024) == len(a)
    assert direct_pwrite(path, b, 3 * BS - 1024) == len(b)  # straddles blocks 2 and 3
    want = bytearray(4 * BS)
    want[BS + 1024 : BS + 1536] = a
    want[3 * BS - 1024 : 3 * BS] = b
    for how, got in read_all_ways(path).items():
        assert secret_bytes(got) == 0, how
        assert got == want, how
    m.remount()
    for how, got in read_all_ways(path).items():
        assert got == want, f"after remount: {how}"


def test_subblock_direct_write_past_eof_then_extend(mount_factory: MountFactory) -> None:
    """Sub-block writes past EOF: the file ends inside a block; the bytes after EOF in that
    block are zeros on the image, so a truncate up (or an mmap of the last page) shows zeros."""
    m = secret_mount(mount_factory)
    path = m.path("f")
    open(path, "wb").close()
    assert direct_pwrite(path, tagged(1, 1024), 0) == 1024  # size 1024, block 0
    # a hole [1024, 8704), then 512 bytes
    assert direct_pwrite(path, tagged(2, 512), 2 * BS + 512) == 512
    size = 2 * BS + 1024
    assert os.stat(path).st_size == size
    want = bytearray(size)
    want[:1024] = tagged(1, 1024)
    want[2 * BS + 512 :] = tagged(2, 512)
    for how, got in read_all_ways(path).items():
        assert got == want, how
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        # the page past EOF is zero-filled by the kernel from the daemon's short READ
        assert secret_bytes(mm[:]) == 0
    os.truncate(path, 4 * BS)
    want += bytes(4 * BS - size)
    for how, got in read_all_ways(path).items():
        assert got == want, f"after truncate up: {how}"
    m.remount()
    for how, got in read_all_ways(path).items():
        assert got == want, f"after remount: {how}"


def concurrent_subblock_writes(mnt: str, nblocks: int, past_eof: bool) -> dict[str, int]:
    """Child: 8 threads, thread t writes sector t of every block (in its own order); at the
    end every sector must hold its writer's data (no zero-fill of one lost another's)."""
    import random

    path = os.path.join(mnt, "f")
    with open(path, "wb") as f:
        if not past_eof:
            f.truncate(nblocks * BS)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            blocks = list(range(nblocks))
            random.Random(t).shuffle(blocks)
            try:
                with aligned(512) as buf:
                    for b in blocks:
                        buf[:512] = tagged(b * 8 + t, 512)
                        assert os.pwrite(fd, memoryview(buf)[:512], b * BS + t * 512) == 512
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    want = b"".join(tagged(i, 512) for i in range(nblocks * 8))
    res = {}
    for how, got in read_all_ways(path).items():
        res[f"lost_sectors_{how}"] = sum(
            1 for i in range(0, len(want), 512) if got[i : i + 512] != want[i : i + 512]
        )
        res[f"secret_{how}"] = secret_bytes(got)
    return res


@pytest.mark.parametrize("past_eof", [False, True], ids=["hole", "past-eof"])
def test_concurrent_subblock_writes_to_one_block(
    mount_factory: MountFactory, past_eof: bool
) -> None:
    m = secret_mount(mount_factory, data_delay=0.002)
    r = run_in_child(concurrent_subblock_writes, str(m.mnt), 24, past_eof, timeout=60,
                     mounts=[m])
    assert all(v == 0 for v in r.values()), r
    m.remount()
    r2 = {how: got for how, got in read_all_ways(m.path("f")).items()}
    want = b"".join(tagged(i, 512) for i in range(24 * 8))
    assert all(got == want for got in r2.values())
