"""O_DSYNC direct overwrites in the native write pool (diofs/durable_pool.py, binding patch
0012-write-pool): answered only once written, and kept apart from every block-state operation
while in flight.

- fio, 4 KiB O_DIRECT O_DSYNC random writes at libaio QD16 over a laid-out file, goes to the
  pool (`dio.pool_writes`); fio's verify reads every block back, and again after a remount.
- The same writes (time-based) race a thread that punches holes in the file, writes the holes
  again and fsyncs (so the layout is committed and the pool keeps taking writes), and another
  that truncates the file's unwritten tail away and back. A punch or truncate must never run
  while a pool write of its inode is in flight (it could free, and a later allocation reuse,
  a block the write is about to land in): `Direct._blocking` counts `dio.pool_overlaps` when
  it finds one. With the protection (the pool write holds the inode rwsem shared until
  drained): 0. With `--bug pool-unlocked`: the punches and truncates overlap in-flight pool
  writes (> 0), which is what the test would see if the protection were lost. Teardown fscks.
- A file laid out with buffered writes leaves clean pages in the daemon cache; pool writes
  drop those of their range at `offer` (`dio.shootdown_pages`), so afterwards a buffered read
  of the whole file returns what an O_DIRECT read does.
- The file unlinked while fio's pool writes run: its blocks are freed once the last write
  is drained and the last handle released (`IncoreInode.pool_writes` defers the eviction);
  teardown's fsck finds no leaked inode or block.
- With `-o dsync_pool=off` nothing goes to the pool and fio's verify passes.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time

from harness.io import aligned, fallocate
from harness.mount import Mount, MountFactory

BS = 4096
FILE_SIZE = 4 << 20
RACE_S = 2.0
TAIL = 256 << 10  # the last TAIL bytes: truncated away and back by the race, not written
WRITTEN = FILE_SIZE - TAIL
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _lay_out(path: str, size: int, fill: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        with aligned(1 << 20) as buf:
            buf[:] = bytes([fill]) * (1 << 20)
            for off in range(0, size, 1 << 20):
                os.pwrite(fd, buf, off)
        os.fsync(fd)  # the layout committed: what the pool asks before it takes a write
    finally:
        os.close(fd)


def _fio(path: str, *extra: str) -> list[str]:
    return [
        "fio", "--name=pool", f"--filename={path}", f"--size={WRITTEN}", "--bs=4k",
        "--rw=randwrite", "--direct=1", "--sync=dsync", "--ioengine=libaio", "--iodepth=16",
        "--fallocate=none", "--output-format=terse", *extra,
    ]


def _verified_write(path: str, *extra: str) -> None:
    result = subprocess.run(
        _fio(path, "--verify=crc32c", "--verify_fatal=1", *extra),
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout


def _race(m: Mount) -> dict[str, float]:
    path = m.path("pooled")
    _lay_out(path, FILE_SIZE, 0x11)
    stop = threading.Event()
    errors: list[BaseException] = []

    def puncher() -> None:
        rnd = random.Random(7)
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            with aligned(64 << 10) as buf:
                buf[:] = b"\x33" * (64 << 10)
                while not stop.is_set():
                    off = rnd.randrange(0, WRITTEN, 64 << 10)
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, 64 << 10)
                    os.pwrite(fd, buf, off)
                    os.fsync(fd)
                    time.sleep(0.01)  # let the pool take writes again between punches
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    def truncator() -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            while not stop.is_set():
                os.ftruncate(fd, WRITTEN)
                os.ftruncate(fd, FILE_SIZE)
                os.fsync(fd)
                time.sleep(0.01)
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    fio = subprocess.Popen(
        _fio(path, "--time_based", f"--runtime={RACE_S}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    helpers = [threading.Thread(target=puncher), threading.Thread(target=truncator)]
    try:
        time.sleep(0.3)  # fio started writing
        for t in helpers:
            t.start()
        out, err = fio.communicate(timeout=60)
    finally:
        stop.set()
        for t in helpers:
            if t.is_alive() or t.ident is not None:
                t.join(30)
        if fio.poll() is None:
            fio.kill()
    assert fio.returncode == 0, err + out
    assert not errors, errors
    return m.stats()


def test_pool_writes_read_back(mount_factory: MountFactory) -> None:
    m = mount_factory(size="64M")
    path = m.path("pooled")
    _lay_out(path, FILE_SIZE, 0x11)
    _verified_write(path)
    st = m.stats()
    assert st.get("dio.pool_writes", 0) > 0, st
    assert st.get("durability.durable_writes", 0) >= st.get("dio.pool_writes", 0)
    m.remount()
    _verified_write(m.path("pooled"), "--verify_only")


def test_pool_writes_drop_clean_cached_pages(mount_factory: MountFactory) -> None:
    m = mount_factory(size="64M")
    path = m.path("pooled")
    with open(path, "wb") as f:  # buffered: the daemon cache keeps the pages, clean
        f.write(b"\x11" * FILE_SIZE)
        f.flush()
        os.fsync(f.fileno())
    _verified_write(path)
    st = m.stats()
    assert st.get("dio.pool_writes", 0) > 0, st
    assert st.get("dio.shootdown_pages", 0) > 0, st
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with aligned(FILE_SIZE) as buf:
            assert os.preadv(fd, [buf], 0) == FILE_SIZE
            direct = bytes(buf)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == direct


def test_pool_writes_keep_punch_and_truncate_out(mount_factory: MountFactory) -> None:
    st = _race(mount_factory(size="64M"))
    print(f"pool writes {st.get('dio.pool_writes', 0)}, native {st.get('dio.native_writes', 0)},"
          f" overlaps {st.get('dio.pool_overlaps', 0)}")
    assert st.get("dio.pool_writes", 0) > 0, st
    assert st.get("dio.native_writes", 0) > 0, st
    assert st.get("dio.pool_overlaps", 0) == 0


def test_pool_unlocked_lets_punch_overlap(mount_factory: MountFactory) -> None:
    """The same race with --bug pool-unlocked: the counter the test above relies on sees
    punches and truncates under pool writes in flight."""
    st = _race(mount_factory(size="64M", bugs=["pool-unlocked"]))
    print(f"pool writes {st.get('dio.pool_writes', 0)}, native {st.get('dio.native_writes', 0)},"
          f" overlaps {st.get('dio.pool_overlaps', 0)}")
    assert st.get("dio.pool_writes", 0) > 0, st
    assert st.get("dio.native_writes", 0) > 0, st
    assert st.get("dio.pool_overlaps", 0) > 0, st


def test_pool_writes_to_an_unlinked_file(mount_factory: MountFactory) -> None:
    m = mount_factory(size="64M")
    path = m.path("pooled")
    _lay_out(path, FILE_SIZE, 0x11)
    free_before = os.statvfs(m.path()).f_bfree
    fio = subprocess.Popen(
        _fio(path, "--time_based", "--runtime=1.5"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(0.5)
        os.unlink(path)
        out, err = fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
    assert fio.returncode == 0, err + out
    assert m.stats().get("dio.pool_writes", 0) > 0
    m.wait_stats(lambda st: os.statvfs(m.path()).f_bfree > free_before, "blocks freed")


def test_pool_off(mount_factory: MountFactory) -> None:
    m = mount_factory(size="64M", opts={"dsync_pool": "off"})
    path = m.path("pooled")
    _lay_out(path, FILE_SIZE, 0x11)
    _verified_write(path)
    assert m.stats().get("dio.pool_writes", 0) == 0


def test_native_writes_set_the_mtime(mount_factory: MountFactory) -> None:
    """O_DSYNC overwrites the binding takes itself once fio's handle is armed
    (diofs/native_io.py, "Writes") set the mtime as pool writes do: after a second of
    such writes, the mtime is later than half a second into them; an mtime set afterwards
    stays."""
    m = mount_factory(size="64M")
    path = m.path("pooled")
    _lay_out(path, FILE_SIZE, 0x11)
    fio = subprocess.Popen(
        _fio(path, "--time_based", "--runtime=1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(0.5)
        pool_before = m.stats().get("dio.pool_writes", 0)
        t0 = time.time_ns()
        out, err = fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
    assert fio.returncode == 0, err + out
    st = m.stats()
    assert st.get("dio.native_writes", 0) > 0, st
    assert st.get("dio.pool_writes", 0) == pool_before, st  # none went through `offer`
    assert os.stat(path).st_mtime_ns >= t0
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))  # a later drain must not undo it
    assert os.stat(path).st_mtime_ns == 2_000_000_000
