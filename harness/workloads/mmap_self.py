"""mmap + O_DIRECT self-I/O: a direct write whose source buffer is a mapping of the same file,
under -o shootdown=locked (tests/test_dio_mmap_self.py, scripts/demo_no_fault_marker.py).

With the fault marker the writer's own faults take the faults-disabled path and the write
completes; with --bug no-fault-marker (or a second process faulting the file) it deadlocks."""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import mmap
import multiprocessing
import os
import signal
import time
from typing import Any

from harness.io import direct_pread, direct_pwrite, drop_kernel_cache, pattern
from harness.mount import Mount, MountFactory

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4096
REGION = 8 * MiB  # [0, 8M) and [8M, 16M): source / destination of the single-thread runs
FAULT_OFF, FAULT_LEN = 24 * MiB, 4 * MiB  # the second process faults only this range
FILE_SIZE = FAULT_OFF + FAULT_LEN
FILE_NAME = "self"


def prepared_mount(
    factory: MountFactory, opts: dict[str, Any] | None = None, bugs: tuple[str, ...] = ()
) -> Mount:
    """A mount holding FILE_NAME (FILE_SIZE bytes of pattern), remounted with `opts`: the file
    is written before the delay hooks apply, and no cache holds it afterwards."""
    m = factory(size="96M", bugs=bugs)
    make_file(m.path(FILE_NAME))
    m.remount(opts)
    return m


def make_file(path: str, seed: int = 1) -> None:
    """FILE_SIZE bytes of pattern, written with O_DIRECT (no cache holds them afterwards)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        for off in range(0, FILE_SIZE, 4 * MiB):
            assert direct_pwrite(fd, pattern(4 * MiB, seed, off), off) == 4 * MiB
    finally:
        os.close(fd)


_PR_SET_PDEATHSIG = 1


def _faulter(path: str, stop: Any, started: Any, counter: Any) -> None:
    """Fault [FAULT_OFF, +FAULT_LEN) of `path` through a fresh mapping, again and again, each
    time after dropping the kernel's pages of it, until `stop` is set."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the workload
    faulthandler.disable()  # after a watchdog abort its mapping raises SIGBUS: no dump
    try:
        fd = os.open(path, os.O_RDONLY)
        while not stop.is_set():
            drop_kernel_cache(fd, FAULT_OFF, FAULT_LEN)
            with mmap.mmap(fd, FAULT_LEN, prot=mmap.PROT_READ, offset=FAULT_OFF) as mm:
                for off in range(0, FAULT_LEN, PAGE):
                    mm[off]
                    if off % (32 * PAGE) == 0:  # progress in units of 128 KiB faulted
                        started.set()
                        with counter.get_lock():
                            counter.value += 1
        os.close(fd)
    except OSError:
        os._exit(1)


@contextlib.contextmanager
def second_process(path: str, enabled: bool = True) -> Any:
    """A forked process faulting another range of `path` for the duration of the block;
    yields a function returning its progress (128 KiB steps faulted so far)."""
    if not enabled:
        yield lambda: 0
        return
    ctx = multiprocessing.get_context("fork")
    stop, started, counter = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    proc = ctx.Process(target=_faulter, args=(path, stop, started, counter))
    proc.start()
    try:
        assert started.wait(10), "the second process did not start faulting"
        yield lambda: counter.value
    finally:
        stop.set()
        proc.join(10)
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)


def self_write(fd: int, mm: mmap.mmap, src: int, dst: int, n: int) -> None:
    """pwritev from the mapping of [src, src + n) to file offset dst."""
    assert os.pwritev(fd, [memoryview(mm)[src : src + n]], dst) == n


def self_read(fd: int, mm: mmap.mmap, src: int, dst: int, n: int) -> None:
    """preadv of file [src, src + n) into the mapping of [dst, dst + n)."""
    assert os.preadv(fd, [memoryview(mm)[dst : dst + n]], src) == n


def layout(n: int, overlap: bool) -> tuple[int, int]:
    """(src, dst) file offsets of one transfer of n bytes."""
    if overlap:
        return n // 2, 0  # dst below src, overlapping by n/2
    return 0, REGION


def single_thread_run(
    mnt: str, kind: str, n: int, overlap: bool, with_faulter: bool, check_mapping: bool = True
) -> dict:
    path = os.path.join(mnt, FILE_NAME)
    src, dst = layout(n, overlap)
    expected = pattern(FILE_SIZE, 1)[src : src + n]
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    mfd = os.open(path, os.O_RDWR)
    try:
        drop_kernel_cache(mfd)
        with mmap.mmap(mfd, FILE_SIZE) as mm, second_process(path, with_faulter) as progress:
            steps_before = progress()
            t0 = time.monotonic()
            if kind == "write":
                self_write(fd, mm, src, dst, n)
            else:
                self_read(fd, mm, src, dst, n)
            elapsed = time.monotonic() - t0
            steps_during = progress() - steps_before
            # (reading the mapping faults every page again: slow with -o fill_delay)
            in_mapping = mm[dst : dst + n] == expected if check_mapping else True
            mm.flush()
            faulter_steps = progress()
        on_image = direct_pread(fd, n, dst) == expected
        # everything else of the file is untouched
        rest_ok = (direct_pread(fd, dst, 0) == pattern(dst, 1) if dst else True) and (
            direct_pread(fd, FILE_SIZE - dst - n, dst + n) == pattern(FILE_SIZE, 1)[dst + n :]
        )
    finally:
        os.close(mfd)
        os.close(fd)
    return {
        "in_mapping": in_mapping,
        "on_image": on_image,
        "rest_ok": rest_ok,
        "elapsed": elapsed,
        "faulter_steps": faulter_steps,
        "faulter_steps_during": steps_during,
    }


LOCKED = {"shootdown": "locked", "dio_delay": 0.2}


def locked_self_write(mnt: str) -> dict:
    return single_thread_run(mnt, "write", 4 * MiB, False, False)


def locked_self_write_with_faulter(mnt: str) -> dict:
    return single_thread_run(mnt, "write", 4 * MiB, False, True)
