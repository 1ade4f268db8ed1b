"""O_DIRECT reads into a MAP_SHARED mapping of the same file (tests/test_dio_kernel_cache.py,
scripts/demo_inval_always.py, scripts/demo_open_drop_at_answer.py).

Each workload runs in a child process: with the protection on it completes; with --bug
inval-always reads lose their bytes, with --bug open-drop-at-answer the mount hangs."""

from __future__ import annotations

import mmap
import os
import threading

PAGE = 4096  # = the default block size


def direct_open_close(path: str) -> None:
    """An O_DIRECT open (the kernel drops the file's page cache) and nothing else."""
    os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))


def direct_reads_into_own_mapping(path: str, rounds: int) -> int:
    """Child: `rounds` times, a 512-byte direct write at offset 0, then an O_DIRECT read of
    page 2 into a MAP_SHARED mapping of page 0 of the same file. Returns how many reads'
    bytes the mapping did not show afterwards."""
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    mfd = os.open(path, os.O_RDWR)
    m = mmap.mmap(mfd, 3 * PAGE)
    want = bytes(m[2 * PAGE :])
    lost = 0
    try:
        with mmap.mmap(-1, PAGE) as buf:
            for i in range(rounds):
                buf[:8] = i.to_bytes(8, "little")
                os.pwritev(fd, [memoryview(buf)[:512]], 0)
                with memoryview(m)[:PAGE] as dest:
                    assert os.preadv(fd, [dest], 2 * PAGE) == PAGE
                lost += m[:PAGE] != want
    finally:
        m.close()
        os.close(mfd)
        os.close(fd)
    return lost


def direct_reads_into_mapping_vs_direct_opens(
    path: str, rounds: int, mapping_flags: int = 0
) -> tuple[int, int]:
    """Child: one thread `rounds` times writes page 2 directly and reads it back with
    O_DIRECT into a MAP_SHARED mapping of page 0 (which each read's completion dirties; the
    mapping made through an open with `mapping_flags`), while another thread opens and
    closes the file with O_DIRECT in a loop. Returns (reads, opens) done."""
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    mfd = os.open(path, os.O_RDWR | mapping_flags)
    m = mmap.mmap(mfd, 3 * PAGE)
    stop = threading.Event()
    opens = 0
    failed: list[OSError] = []  # raised by the reader once it is done (after an abort: never)

    def opener() -> None:
        nonlocal opens
        try:
            while not stop.is_set():
                direct_open_close(path)
                opens += 1
        except OSError as exc:
            failed.append(exc)

    t = threading.Thread(target=opener)
    t.start()
    try:
        with mmap.mmap(-1, PAGE) as buf:
            for i in range(rounds):
                buf[:8] = i.to_bytes(8, "little")
                os.pwritev(fd, [buf], 2 * PAGE)
                with memoryview(m)[:PAGE] as dest:
                    assert os.preadv(fd, [dest], 2 * PAGE) == PAGE
    finally:
        stop.set()
        t.join()
        m.close()
        os.close(mfd)
        os.close(fd)
    if failed:
        raise failed[0]
    return rounds, opens
