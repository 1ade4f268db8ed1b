"""Writes into holes and past EOF racing readers, over blocks that held a deleted file's
"secret" (SPEC 5, seed 003; tests/test_holes_extend.py, tests/test_holes_crash.py,
tests/test_fallocate_coherency.py, scripts/demo_size_before_data.py).

`secret_mount` fills every free block with SECRET_UNIT, deletes that file and commits, then
remounts with `-o data_delay` (the window between allocation and data). With the
protection no reader ever sees a secret byte; with --bug size-before-data they do."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
import time
from typing import Any

from harness.io import aligned
from harness.mount import Mount, MountFactory, wait_kernel_invalidations

KiB, MiB = 1 << 10, 1 << 20
BS = 4096
SECRET_UNIT = b"SECRET-BYTES-42\n"  # 16 bytes; the deleted file is made of these
BUG = "size-before-data"
IMAGE_SIZE = "32M"
_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_STATX_FORCE_SYNC = 0x2000
STATX_SIZE = 0x200
STATX_SIZE_OFFSET = 40  # struct statx: mask, blksize, attributes, nlink, uid, gid, mode, ino


def statx_size(path: str) -> int:
    """st_size fetched from the daemon (AT_STATX_FORCE_SYNC: never the kernel's cached attrs)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(AT_FDCWD, path.encode(), AT_STATX_FORCE_SYNC, STATX_SIZE, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(struct.unpack_from("<Q", buf.raw, STATX_SIZE_OFFSET)[0])


def tagged(tag: int, size: int) -> bytes:
    """`size` bytes of 16-byte units naming `tag`: distinct from zeros and from the secret.
    Unlike harness.io.pattern it does not depend on the offset: any 512-byte slice of a chunk
    written as tagged(chunk, CHUNK) equals tagged(chunk, 512), which the race checks rely on."""
    unit = b"W%07d-writtn\n" % tag  # 16 bytes for tag < 10**7
    assert len(unit) == 16 and unit != SECRET_UNIT
    return unit * (size // 16)


def secret_bytes(data: bytes | memoryview) -> int:
    """Bytes of `data` that belong to the deleted file (whole 16-byte secret units)."""
    return bytes(data).count(SECRET_UNIT) * 16


def image_secret_bytes(image: str) -> int:
    with open(image, "rb") as f:
        return secret_bytes(f.read())


def commit_now(m: Mount) -> None:
    """fsync of the root directory: a metadata commit (frees blocks waiting for one)."""
    fd = os.open(m.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fill_free_space_with_secret(m: Mount) -> int:
    """Write SECRET_UNIT over every free block, fsync, unlink, commit; returns the bytes.

    Afterwards the blocks are free (statfs is back where it started, and a commit has made
    them allocatable: blocks freed wait for the next commit) and still hold the secret on
    the image; the allocator's next-fit rover is at the end, so new files get them next."""
    st = os.statvfs(m.mnt)
    free_before = st.f_bavail
    total = free_before * st.f_frsize
    path = m.path(".secret")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    try:
        with aligned(MiB, SECRET_UNIT * (MiB // 16)) as buf:
            off = 0
            while off < total:
                off += os.pwrite(fd, memoryview(buf)[: min(MiB, total - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.statvfs(m.mnt).f_bavail == 0
    os.unlink(path)
    commit_now(m)
    assert os.statvfs(m.mnt).f_bavail == free_before
    assert image_secret_bytes(str(m.image)) >= total  # really on the image
    return total


def secret_mount(
    factory: MountFactory, bugs: list[str] | tuple[str, ...] = (), **opts: Any
) -> Mount:
    """A fresh image whose free space holds the secret, mounted with `opts` and `bugs`
    (the fill itself runs on a plain mount: data_delay would slow it down)."""
    m = factory(size=IMAGE_SIZE, bugs=list(bugs))
    fill_free_space_with_secret(m)
    m.unmount()
    m.opts.update(opts)
    m.start()
    return m


class Counts(dict):  # type: ignore[type-arg]
    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


CHUNK = 64 * KiB


def tail_readers(path: str, stop: threading.Event, c: Counts, errors: list[BaseException],
                 written: Any = None, mmap_reader: bool = False) -> list[threading.Thread]:
    """Readers of `path` until `stop`: O_DIRECT whole file, buffered tail, stat, and (for a
    file whose size does not change) an mmap of the tail.

    Each classifies what it reads: secret bytes, and (if `written(off, data)` is given)
    bytes that are neither zeros nor what `written` says belongs there.

    No mmap reader of a growing file: concurrent GETATTR replies are applied by the kernel
    in any order, so the kernel's i_size can step back for a moment (measured: mmap() saw a
    smaller size than the fstat() just before it, and a mapped tail read took SIGBUS, both
    with fio; the mmap readers are in test_buffered_readers_over_filling_holes)."""

    def loop(kind: str) -> None:
        try:
            while not os.path.exists(path):
                if stop.is_set():
                    return
                time.sleep(0.001)
            flags = os.O_RDONLY | (os.O_DIRECT if kind == "direct" else 0)
            fd = os.open(path, flags)
            buf = aligned(16 * MiB) if kind == "direct" else None
            try:
                while not stop.is_set():
                    size = os.fstat(fd).st_size if kind != "stat" else statx_size(path)
                    c.add(f"{kind}_reads")
                    if kind == "stat" or size == 0:
                        continue
                    off = 0 if kind == "direct" else max(0, size - 256 * KiB) // BS * BS
                    if kind == "direct":
                        n = os.preadv(fd, [memoryview(buf)[: min(size, 16 * MiB)]], 0)
                        data = bytes(buf[:n])
                    elif kind == "mmap":
                        try:
                            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
                        except ValueError:  # the size went down meanwhile (see the report)
                            c.add("mmap_size_went_down")
                            continue
                        with mm:
                            data = mm[off:size]
                    else:
                        data = os.pread(fd, size - off, off)
                    c.add("secret", secret_bytes(data))
                    c.add(f"secret_{kind}", secret_bytes(data))
                    if written is not None:
                        c.add("garbage", written(off, data))
            finally:
                if buf is not None:
                    buf.close()
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    kinds = ["direct", "buffered", "stat"] + (["mmap"] if mmap_reader else [])
    threads = [threading.Thread(target=loop, args=(k,)) for k in kinds]
    for t in threads:
        t.start()
    return threads


GARBAGE_SEEN: list[tuple[int, bytes]] = []  # (file offset, first bytes) for the report


def garbage_vs_patterns(off: int, data: bytes) -> int:
    """Bytes of `data` (at file offset `off`) that are neither zero nor the byte of the
    tagged() unit of the CHUNK they lie in (the writers write tagged(chunk)). Byte by byte: a copy
    out of an mmap is not atomic, and one racing a direct write may show a sector torn between
    the old zeros and the new bytes (glibc's memcpy even loads the tail of a copy first)."""
    bad = 0
    z = bytes(512)
    for i in range(0, len(data) - 511, 512):
        sec = data[i : i + 512]
        want = tagged((off + i) // CHUNK, 512)
        if sec != z and sec != want:
            n = sum(1 for a, b in zip(sec, want, strict=True) if a and a != b)
            bad += n
            if n and len(GARBAGE_SEEN) < 8:
                GARBAGE_SEEN.append((off + i, sec[:16] + b".." + sec[-16:]))
    return bad


def race(
    writers: list[threading.Thread],
    readers: list[threading.Thread],
    stop: threading.Event,
    errors: list[BaseException],
) -> None:
    """Start the threads not started yet, wait for the writers, then stop and wait for the
    readers; raise the first error a thread recorded in `errors`."""
    for t in readers + writers:
        if t.ident is None:
            t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    if errors:
        raise errors[0]


def threaded_append_race(mnt: str, nthreads: int, nchunks: int) -> dict[str, int]:
    """Child: `nthreads` O_DIRECT appenders take chunk numbers from one counter (so their
    requests reach the daemon in any order: some extend, some fill the hole another left)."""
    path = os.path.join(mnt, "f")
    c = Counts(secret=0, garbage=0)
    errors: list[BaseException] = []
    stop = threading.Event()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    readers = tail_readers(path, stop, c, errors, garbage_vs_patterns)
    lock = threading.Lock()
    nxt = [0]

    def writer() -> None:
        try:
            with aligned(CHUNK) as buf:
                while True:
                    with lock:
                        i = nxt[0]
                        nxt[0] += 1
                    if i >= nchunks:
                        return
                    buf[:CHUNK] = tagged(i, CHUNK)
                    assert os.pwrite(fd, buf, i * CHUNK) == CHUNK
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer) for _ in range(nthreads)]
    try:
        race(writers, readers, stop, errors)
    finally:
        os.close(fd)
    want = b"".join(tagged(i, CHUNK) for i in range(nchunks))
    c["final_ok"] = int(final_check(path, want, c))
    return dict(c)


def final_check(path: str, want: bytes, c: Counts) -> bool:
    """After the race, the file holds `want`: read with O_DIRECT (the image) and buffered
    after dropping the kernel's cache (the daemon's cache).

    A plain buffered read first (`final_kernel_stale_pages`, must be 0): the kernel does not
    invalidate its page cache after an *asynchronous* O_DIRECT write (generic_file_direct_write
    skips it for -EIOCBQUEUED, and FUSE's AIO completion does not do it), so a buffered read
    racing a libaio / io_uring write could leave pages of zeros in the kernel cache after the
    write returned (measured: 3-64 pages with fio fallocate=native). diofs invalidates the
    kernel range itself after such writes (dio.py, step 10), on its invalidator thread after
    the answer: what holds is "once the invalidator is idle" (race 18)."""
    wait_kernel_invalidations(os.path.dirname(path))
    with open(path, "rb") as f:
        data = f.read()
    c["final_kernel_stale_pages"] = sum(
        1 for i in range(0, len(want), BS) if data[i : i + BS] != want[i : i + BS])
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with aligned(len(want)) as buf:
            n = os.preadv(fd, [buf], 0)
            direct_ok = bytes(buf[:n]) == want
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buffered_ok = os.pread(fd, len(want) + 1, 0) == want
    finally:
        os.close(fd)
    return direct_ok and buffered_ok


HOLE_FILE = 2 * MiB


def hole_fill_race(mnt: str, kinds: list[str], nthreads: int) -> dict[str, int]:
    """Child: a sparse HOLE_FILE file; `nthreads` direct writers fill its CHUNKs in a
    shuffled order; readers of `kinds` read the whole file meanwhile."""
    import random

    path = os.path.join(mnt, "sparse")
    with open(path, "wb") as f:
        f.truncate(HOLE_FILE)
    c = Counts(secret=0, garbage=0)
    errors: list[BaseException] = []
    stop = threading.Event()
    order = list(range(HOLE_FILE // CHUNK))
    random.Random(8).shuffle(order)
    lock = threading.Lock()

    def reader(kind: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if kind == "direct" else 0))
            buf = aligned(HOLE_FILE)
            try:
                while not stop.is_set():
                    if kind == "direct":
                        n = os.preadv(fd, [buf], 0)
                        data = bytes(buf[:n])
                    elif kind == "mmap":
                        with mmap.mmap(fd, HOLE_FILE, prot=mmap.PROT_READ) as mm:
                            data = mm[:]
                    else:
                        data = os.pread(fd, HOLE_FILE, 0)
                    c.add(f"{kind}_reads")
                    c.add("secret", secret_bytes(data))
                    c.add(f"secret_{kind}", secret_bytes(data))
                    g = garbage_vs_patterns(0, data)
                    c.add("garbage", g)
                    c.add(f"garbage_{kind}", g)
                    if kind != "direct":  # drop the kernel's copy: the next read asks again
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                buf.close()
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    def writer() -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            try:
                with aligned(CHUNK) as buf:
                    while True:
                        with lock:
                            if not order:
                                return
                            i = order.pop()
                        buf[:CHUNK] = tagged(i, CHUNK)
                        assert os.pwrite(fd, buf, i * CHUNK) == CHUNK
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader, args=(k,)) for k in kinds]
    writers = [threading.Thread(target=writer) for _ in range(nthreads)]
    race(writers, readers, stop, errors)
    with open(path, "rb") as f:
        want = b"".join(tagged(i, CHUNK) for i in range(HOLE_FILE // CHUNK))
        c["final_ok"] = int(f.read() == want)
    if GARBAGE_SEEN:
        c["garbage_seen"] = repr(GARBAGE_SEEN)  # type: ignore[assignment]
    return dict(c)
