"""fio direct I/O with verification against a concurrent buffered reader (SPEC 3, 4).

fio `--direct=1` jobs with the libaio and io_uring engines (queue depth 16), randwrite and
randrw, `--verify=crc32c`: every block fio wrote is read back and checked after the write phase
(and, for randrw, the reads of the mixed phase are checked against what was written). All the
while another process reads the same file through the page cache (buffered preads, dropping
the kernel's copy between passes so the READs reach the daemon): fills and direct writes race
on the same inode the whole time. No verify error may appear (fio's JSON: job `error` 0, no
"verify" message on stderr), and the reader must have made progress. Afterwards a buffered
read of the whole file (through the daemon cache) must equal an O_DIRECT read of it: with
`--bug no-shootdown` fio's own verify still passes (its reads are direct), but this does not.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from harness.mount import Mount, MountFactory

pytestmark = [
    pytest.mark.deadline(120),
    pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed"),
]

FILE_SIZE = 16 << 20
_PR_SET_PDEATHSIG = 1


def _reader(path: str, stop: Any, passes: Any, started: Any) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        fd = os.open(path, os.O_RDONLY)
        while not stop.is_set():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            off = 0
            while off < FILE_SIZE and not stop.is_set():
                os.pread(fd, 64 * 1024, off)
                off += 64 * 1024
                started.set()
            with passes.get_lock():
                passes.value += 1
        os.close(fd)
    except OSError:
        os._exit(1)


@contextlib.contextmanager
def buffered_reader(path: str) -> Iterator[Any]:
    """A process doing buffered preads over `path` until the block ends; yields a function
    returning (full passes, exit code or None)."""
    ctx = multiprocessing.get_context("fork")
    stop, started, passes = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    proc = ctx.Process(target=_reader, args=(path, stop, passes, started))
    proc.start()
    try:
        assert started.wait(10), "the buffered reader did not start"
        yield lambda: (passes.value, proc.exitcode)
    finally:
        stop.set()
        proc.join(10)
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)
        assert proc.exitcode == 0, f"buffered reader exited with {proc.exitcode}"


def fio_argv(path: str, engine: str, rw: str, out: str) -> list[str]:
    return [
        "fio",
        "--name=dio-verify",
        f"--filename={path}",
        f"--size={FILE_SIZE}",
        "--bs=4k",
        f"--rw={rw}",
        "--direct=1",
        f"--ioengine={engine}",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=0",
        "--numjobs=1",
        "--output-format=json",
        f"--output={out}",
        # one pass over the file: a block written twice would fail fio's own header check
        # (its verify log keeps one seed per block), on any filesystem
        *(["--rwmixread=50"] if rw == "randrw" else []),
    ]


def stale_pages(path: str) -> int:
    """Pages whose buffered read (kernel copy dropped first, so the daemon answers) differs
    from an O_DIRECT read of the image."""
    import mmap

    fd = os.open(path, os.O_RDONLY)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buffered = os.pread(fd, FILE_SIZE, 0)
        with mmap.mmap(-1, FILE_SIZE) as buf:
            assert os.preadv(dfd, [buf], 0) == FILE_SIZE
            direct = bytes(buf)
    finally:
        os.close(dfd)
        os.close(fd)
    return sum(
        1 for i in range(0, FILE_SIZE, 4096) if buffered[i : i + 4096] != direct[i : i + 4096]
    )


def run_fio(m: Mount, engine: str, rw: str, tmp: str) -> tuple[dict[str, Any], str, int]:
    path = m.path("fio.dat")
    with open(path, "wb") as f:  # laid out before the reader starts, so fio does not
        f.truncate(FILE_SIZE)
    out = os.path.join(tmp, f"fio-{engine}-{rw}.json")
    with buffered_reader(path) as reader:
        result = m.run(fio_argv(path, engine, rw, out), timeout=90)
        passes, _ = reader()
    assert not result.timed_out, result.report
    with open(out) as f:
        text = f.read()
    # fio may print non-JSON lines (warnings) before the document
    report = json.loads(text[text.index("{") :])
    return report, result.stderr, passes


@pytest.mark.parametrize("rw", ["randwrite", "randrw"])
@pytest.mark.parametrize("engine", ["libaio", "io_uring"])
def test_fio_direct_verify_with_buffered_reader(
    mount_factory: MountFactory, tmp_path: Any, engine: str, rw: str
) -> None:
    m = mount_factory(size="64M")
    report, stderr, passes = run_fio(m, engine, rw, str(tmp_path))
    job = report["jobs"][0]
    assert job["error"] == 0, (job["error"], stderr)
    assert "verify" not in stderr.lower(), stderr
    assert "bad magic" not in stderr and "crc32c" not in stderr, stderr
    written = job["write"]["io_bytes"]
    assert written == FILE_SIZE if rw == "randwrite" else 0 < written < FILE_SIZE
    assert job["read"]["io_bytes"] > 0  # the verify phase (and randrw's reads)
    assert passes >= 1, "the buffered reader never completed a pass"
    st = m.stats()
    assert st.get("dio.bytes_written", 0) >= job["write"]["io_bytes"]
    assert st.get("cache.fills", 0) > 0  # the reader really filled the daemon cache
    # afterwards the daemon cache agrees with the image
    assert stale_pages(m.path("fio.dat")) == 0


def test_fio_direct_with_buffered_reader_no_shootdown(
    mount_factory: MountFactory, tmp_path: Any
) -> None:
    """The same with --bug no-shootdown: fio's own verify still passes (its reads are direct
    and bypass the cache), but the pages the reader had cached stay stale."""
    m = mount_factory(size="64M", bugs=["no-shootdown"])
    report, stderr, passes = run_fio(m, "libaio", "randwrite", str(tmp_path))
    assert report["jobs"][0]["error"] == 0, stderr
    assert passes >= 1
    stale = stale_pages(m.path("fio.dat"))
    print(f"no-shootdown: {stale} stale pages of {FILE_SIZE // 4096} after fio")
    assert stale > 0
