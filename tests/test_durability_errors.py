"""Image write errors are never dropped (SPEC 6, issue 6), on real mounts with the
fault-injecting backend (`-o backend=fault,fault_spec=SPEC`) or a genuinely full image.

- a failed background writeback (EIO, ENOSPC) is reported by the next fsync of EVERY file
  descriptor open at the time, exactly once each (errseq), and later fsyncs succeed;
- a failing direct write, or O_DSYNC write (image write or image flush failing), fails its own
  request with the error;
- ENOSPC on a full image, for buffered and direct writes;
and in every case the mount keeps working, the daemon stays up (no failsafe, no traceback),
logs the error once, and fsck is clean after unmount (teardown).

Faults only hit the data area of the image (offset_min = data_start), so metadata commits keep
working; rules use `count` so that the fault is one event.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from diofs.backend import fault
from diofs.backend.raw import RawImage
from diofs.format import image
from harness.io import aligned, wait_for
from harness.mount import Mount, MountFactory

BS = 4096


def fault_mount(factory: MountFactory, tmp_path: Path, size: str = "32M",
                **opts: object) -> tuple[Mount, str, int]:
    """A mount on the fault backend (no rules yet); returns (mount, spec path, data offset)."""
    spec = str(tmp_path / "faults.json")
    m = factory(size=size, mount=False)
    backend = RawImage(str(m.image), writable=False)
    try:
        sb = image.read_superblock(backend)
    finally:
        backend.close()
    m.opts.update({"backend": "fault", "fault_spec": spec, **opts})
    m.start()
    return m, spec, sb.data_start * sb.block_size


def data_fault(spec: str, data_off: int, err: str = "EIO", op: str = "write",
               count: int = 1, name: str = "") -> None:
    rule = {"op": op, "errno": err, "count": count, "name": name or f"{op}-{err}"}
    if op != "flush":
        rule["offset_min"] = data_off
    fault.write_spec(spec, [rule])


def still_serving(m: Mount) -> None:
    """The daemon is alive, not failsafe, and the mount reads and writes."""
    assert m.daemon is not None and m.daemon.poll() is None
    path = m.path("after-the-error")
    with open(path, "wb") as f:
        f.write(b"still here" * 1000)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        assert f.read() == b"still here" * 1000
    assert m.stats().get("errors.internal", 0) == 0


def error_lines(m: Mount, pattern: str) -> list[str]:
    return [ln for ln in m.log_text().splitlines()
            if re.search(r"\b(WARNING|ERROR)\b", ln) and re.search(pattern, ln)]


def fsync_errno(fd: int) -> int:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc.errno or -1
    return 0


@pytest.mark.parametrize("err", ["EIO", "ENOSPC"])
def test_background_writeback_error_reported_once_per_open_fd(mount_factory, tmp_path, err):
    m, spec, data_off = fault_mount(mount_factory, tmp_path, writeback_age=0.2,
                                    commit_interval=3600)
    m.expect_log(r"writeback of inode \d+ (pages \d+\.\.\d+ )?failed")
    path = m.path("f")
    with open(path, "wb") as f:  # existing data, durable
        f.write(b"o" * 8 * BS)
        os.fsync(f.fileno())
    writer = os.open(path, os.O_RDWR)
    other = os.open(path, os.O_RDWR)
    reader = os.open(path, os.O_RDONLY)
    fds = [writer, other, reader]
    try:
        data_fault(spec, data_off, err)
        os.pwrite(writer, b"n" * 2 * BS, BS)  # dirty pages, written back in the background
        wait_for(lambda: m.stats().get("writeback.errors", 0) >= 1, "the writeback error")
        assert fault.read_fired(spec)["by_op"]["write"] == 1
        code = getattr(errno, err)
        assert [fsync_errno(fd) for fd in fds] == [code] * 3  # each fd sees it ...
        assert [fsync_errno(fd) for fd in fds] == [0] * 3  # ... exactly once
        late = os.open(path, os.O_RDWR)  # opened after the error: not its error
        fds.append(late)
        assert fsync_errno(late) == 0
        # the mount keeps working on the same file and fd
        os.pwrite(writer, b"r" * BS, BS)
        os.fsync(writer)
        assert os.pread(reader, BS, BS) == b"r" * BS
    finally:
        for fd in fds:
            os.close(fd)
    still_serving(m)
    assert m.stats()["errors.writeback"] == 1
    assert len(error_lines(m, r"writeback of inode")) == 1, error_lines(m, "writeback")


def test_unseen_writeback_error_reaches_a_later_open(mount_factory, tmp_path):
    """Open-then-fsync (PostgreSQL's checkpointer): an error nobody has reported yet is
    reported to an fd opened after it, once (errseq_sample since Linux 4.14)."""
    m, spec, data_off = fault_mount(mount_factory, tmp_path, writeback_age=0.2,
                                    commit_interval=3600)
    m.expect_log(r"writeback of inode \d+ (pages \d+\.\.\d+ )?failed")
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(b"o" * 8 * BS)
        os.fsync(f.fileno())
    data_fault(spec, data_off, "EIO")
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, b"n" * 2 * BS, BS)
    os.close(fd)  # close reports nothing
    wait_for(lambda: m.stats().get("writeback.errors", 0) >= 1, "the writeback error")
    late = os.open(path, os.O_RDWR)
    try:
        assert fsync_errno(late) == errno.EIO
        assert fsync_errno(late) == 0
    finally:
        os.close(late)
    still_serving(m)


def test_failing_direct_write_fails_its_own_request(mount_factory, tmp_path):
    m, spec, data_off = fault_mount(mount_factory, tmp_path)
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(b"o" * 4 * BS)
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = aligned(data=b"d" * BS)
    try:
        data_fault(spec, data_off)
        with pytest.raises(OSError) as exc_info:
            os.pwritev(fd, [buf], 0)
        assert exc_info.value.errno == errno.EIO
        assert fault.read_fired(spec)["by_op"]["write"] == 1
        assert os.pwritev(fd, [buf], BS) == BS  # the next request is fine
        os.fsync(fd)  # a direct write error is not a writeback error: fsync is clean
    finally:
        os.close(fd)
        buf.close()
    with open(path, "rb") as f:
        data = f.read()
    assert data[BS : 2 * BS] == b"d" * BS
    assert data[:BS] in (b"o" * BS,)  # the failed write changed nothing
    still_serving(m)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("op", ["write", "flush"])
def test_failing_dsync_write_fails_its_own_request(mount_factory, tmp_path, op, direct):
    """O_DSYNC write whose image write (or image flush) fails: the write returns EIO."""
    m, spec, data_off = fault_mount(mount_factory, tmp_path, writeback_age=3600,
                                    commit_interval=3600)
    m.expect_log(r"writeback of inode \d+ (pages \d+\.\.\d+ )?failed")
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(b"o" * 4 * BS)
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDWR | os.O_DSYNC | (os.O_DIRECT if direct else 0))
    buf = aligned(data=b"s" * BS)
    try:
        data_fault(spec, data_off, op=op)
        with pytest.raises(OSError) as exc_info:
            os.pwritev(fd, [buf], 0)
        assert exc_info.value.errno == errno.EIO
        assert fault.read_fired(spec)["by_op"][op] == 1
        assert os.pwritev(fd, [buf], BS) == BS  # the next one succeeds, durably
    finally:
        os.close(fd)
        buf.close()
    with open(path, "rb") as f:
        assert f.read()[BS : 2 * BS] == b"s" * BS
    still_serving(m)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_full_image_gives_enospc_and_recovers(mount_factory, tmp_path, direct):
    m = mount_factory(size="8M")
    path = m.path("fill")
    chunk = aligned(data=b"x" * 256 * 1024)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o644)
    written = 0
    try:
        with pytest.raises(OSError) as exc_info:
            for _ in range(1000):  # 250 MiB: far more than the image holds
                n = os.pwritev(fd, [chunk], written)
                written += n
                assert n > 0
        assert exc_info.value.errno == errno.ENOSPC
        assert written > 2 << 20  # it did fill up first
        st = os.statvfs(m.mnt)
        assert st.f_bavail * st.f_frsize < 256 * 1024
        os.fsync(fd)  # what was accepted can be made durable
    finally:
        os.close(fd)
        chunk.close()
    assert os.stat(path).st_size == written
    with open(path, "rb") as f:
        assert f.read(4096) == b"x" * 4096
    os.unlink(path)  # space comes back; the mount keeps working
    # once the kernel's RELEASE of the closed fd arrives (it sends it asynchronously, and may
    # send it after the UNLINK): the blocks are freed with the last reference
    m.wait_stats(lambda st: os.statvfs(m.mnt).f_bavail * os.statvfs(m.mnt).f_frsize > 1 << 20,
                 "blocks freed")
    still_serving(m)
    assert m.stats().get("errors.internal", 0) == 0
