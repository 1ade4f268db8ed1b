"""The installed pyfuse3 carries the patch series patches/pyfuse3/series, and each patch does
what diofs relies on.

Part 1 checks the API is there (no mount). Part 2 is the proof: it mounts a tiny in-memory
pyfuse3 filesystem defined in this file (run as `python tests/test_binding.py --daemon ...`
in a child process, with the Operations attributes to set given as JSON), drives it from this
process, and compares what the daemon recorded per request with what the test did. At least
one test per patch, on a mount with the switch set (`tiny`: the switches as diofs sets them)
and, where cheap, one that shows the default keeps stock behaviour (`stock`: no attribute set):
  - 0001 request-context: READ/WRITE from two threads carry each thread's native id and
    O_DIRECT in the flags; pwritev(..., RWF_DSYNC) shows O_DSYNC in that WRITE's flags (and a
    plain write does not); requests without a context (LOOKUP, GETATTR) see (0, 0);
  - 0002 fallocate: fallocate(2) reaches Operations.fallocate with mode/offset/length;
  - 0003 invalidate-inode-range: (via diofs.request) drops only the given range;
  - 0004 auto-inval-data: enable_auto_inval_data = False stops the kernel from dropping the
    cache on an mtime change; unset, it drops it;
  - 0005 async-dio: unset, one O_DIRECT read reaches the daemon as parallel READs;
    enable_async_dio = False sends them one at a time;
  - 0006 reply-from-thread: a read that returns ReplyFromThread(data) delivers data;
  - 0007 write-views: enable_write_views = True passes WRITE data as a memoryview; unset, bytes;
  - 0008 eager-receive: the fd is non-blocking with enable_eager_receive (blocking unset), and
    with checkpoint_interval a handler that waits for a later request still gets it;
  - 0009 handle-killpriv-v2: removes the GETXATTR(security.capability) before every WRITE and
    passes the kernel's kill-suid/sgid requests up as pyfuse3.KILL_SUIDGID;
  - 0010 session-fd: get_session_fd() is the daemon's /dev/fuse (diofs.request polls it).
  - 0011 sync-dispatch: Operations.read_sync / write_sync answer a request with
    request_context set, hand it to read / write when they return None, and answer
    FUSEError with its errno.
  - 0012 write-pool: PooledWrite and the pool's functions exist (part 1); that pooled writes
    are written, answered and reported is tested on a diofs mount (tests/test_dio_pool.py)
    and by the patch's own test/test_write_pool.py.
  - 0013 receive-spin: with receive_spin_us (tiny), one request at a time, some sent during
    the spin and some after it, are all answered; the default is 0.
  - 0014 native-read: arm_native_read and its companions exist and check their arguments
    (part 1); that armed handles' reads are answered natively, and disarmed before anything
    that would change the answer, is tested on a diofs mount (tests/test_native_read.py) and
    by the patch's own test/test_native_read.py.
  - 0015 page-cache-read-flags: a fault READ through an O_DIRECT open carries no O_DIRECT
    (the patch's own test/test_page_cache_read_flags.py; on a diofs mount,
    tests/test_dio_kernel_cache.py::test_direct_open_while_reading_into_a_mapping_of_a_direct_open).
  - 0016 native-dsync-write: arm_native_writes exists (part 1); that an armed handle's
    O_DSYNC writes are taken, written, reported and answered is tested on a diofs mount
    (tests/test_dio_pool.py) and by the patch's own test/test_native_read.py.

The daemon writes one JSON line per request to a report file before replying. Every mount has
a hard deadline (harness/watchdog.py): past it the FUSE connection is aborted through fusectl
and the mount lazily unmounted, then the daemon is ended by pid, so a broken binding fails the
test instead of hanging.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from diofs import mountinfo
from harness import watchdog
from harness.io import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, aligned

PAGE = mmap.PAGESIZE
FILE_SIZE = 1 << 20
MOUNT_DEADLINE_S = 60.0

# the tiny filesystem: inode numbers of the files in its root directory
INO_F = 2  # plain data file (threads, RWF_DSYNC, fallocate)
INO_G = 3  # attr_timeout=0 and a new mtime on every GETATTR (auto_inval_data)
INO_H = 4  # filled with b"A"; the control file replaces it with b"B" (range invalidation)
INO_CTL = 5  # control file: a WRITE of b"INVAL ino start end" runs invalidate_kernel_range
INO_K = 6  # mode 0666: written, truncated and opened with O_TRUNC by an unprivileged uid
INO_D = 7  # DIO_SIZE bytes; each READ records how many READs of it are in flight, then sleeps
INO_R = 8  # filled with b"R", read with ReplyFromThread
INO_W = 9  # its READ waits until the control file gets b"SET"
INO_S = 10  # direct_io: read_sync / write_sync answer its first half, decline the second
FILES = {b"f": INO_F, b"g": INO_G, b"h": INO_H, b"ctl": INO_CTL, b"k": INO_K, b"d": INO_D,
         b"r": INO_R, b"w": INO_W, b"s": INO_S}
SYNC_EIO_OFF = PAGE  # read_sync raises FUSEError(EIO) here
DIO_SIZE = 4 << 20

#: The switches as diofs sets them (diofs/ops.py, class Operations) except async_dio and
#: killpriv, which have mounts of their own; `tiny` runs with these.
DIOFS_LIKE = {"enable_auto_inval_data": False, "enable_write_views": True,
              "enable_eager_receive": True, "checkpoint_interval": 8, "receive_spin_us": 50}


# --------------------------------------------------------------------------- the daemon
class TinyFs(pyfuse3.Operations):
    """In-memory files of FILE_SIZE bytes; records every request in a JSON-lines report."""

    def __init__(self, report: Path) -> None:
        super().__init__()
        small = (INO_F, INO_G, INO_H, INO_K, INO_W, INO_S)
        self.data = {ino: bytearray(FILE_SIZE) for ino in small}
        self.data[INO_H][:] = b"A" * FILE_SIZE
        self.data[INO_D] = bytearray(b"D" * DIO_SIZE)
        self.data[INO_R] = bytearray(b"R" * FILE_SIZE)
        self.d_inflight = 0
        self.w_event: Any = None  # trio.Event, made in the trio run
        self.g_ticks = 0
        self.report = open(report, "a", buffering=1)  # noqa: SIM115 (lives as long as the fs)

    def _record(self, op: str, ino: int, **kw: Any) -> None:
        tid, flags = pyfuse3.request_context.get()
        killpriv = pyfuse3.handle_killpriv_v2_negotiated()
        self.report.write(json.dumps(
            {"op": op, "ino": ino, "tid": tid, "flags": flags, "killpriv": killpriv, **kw}
        ))
        self.report.write("\n")

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_blksize = PAGE
        a.entry_timeout = 300
        a.attr_timeout = 300
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = 0o40755, 2
        else:
            a.st_mode, a.st_nlink = (0o100666 if ino == INO_K else 0o100644), 1
            a.st_size = len(self.data.get(ino, b""))
            a.st_blocks = (a.st_size + 511) // 512
        if ino == INO_G:
            self.g_ticks += 1
            a.attr_timeout = 0
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = self.g_ticks * 1_000_000_000
        return a

    async def lookup(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        self._record("lookup", parent_inode)
        if parent_inode != pyfuse3.ROOT_INODE or name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILES[name])

    async def getattr(self, inode, ctx):  # type: ignore[no-untyped-def]
        self._record("getattr", inode)
        return self._attr(inode)

    async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
        self._record("open", inode, open_flags=flags)
        return pyfuse3.FileInfo(fh=inode, direct_io=inode == INO_S)

    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        self._record("setattr", inode, size=attr.st_size if fields.update_size else None)
        if fields.update_size:
            del self.data[inode][attr.st_size :]
        return self._attr(inode)

    async def getxattr(self, inode, name, ctx):  # type: ignore[no-untyped-def]
        self._record("getxattr", inode, name=name.decode(errors="replace"))
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
        import trio

        data = bytes(self.data[fh][off : off + size])
        if fh == INO_D:
            self.d_inflight += 1
            self._record("read", fh, off=off, size=size, inflight=self.d_inflight)
            await trio.sleep(0.05)
            self.d_inflight -= 1
            return data
        self._record("read", fh, off=off, size=size)
        if fh == INO_R:
            return pyfuse3.ReplyFromThread(data)
        if fh == INO_W:
            await self._w_event().wait()
        return data

    def _w_event(self) -> Any:
        import trio

        if self.w_event is None:
            self.w_event = trio.Event()
        return self.w_event

    def read_sync(self, fh, off, size):  # type: ignore[no-untyped-def]
        if fh != INO_S:
            return None
        self._record("read_sync", fh, off=off, size=size)
        if off == SYNC_EIO_OFF:
            raise pyfuse3.FUSEError(errno.EIO)
        if off >= FILE_SIZE // 2:
            return None
        return bytes(self.data[fh][off : off + size])

    def write_sync(self, fh, off, buf):  # type: ignore[no-untyped-def]
        if fh != INO_S:
            return None
        self._record("write_sync", fh, off=off, size=len(buf))
        if off >= FILE_SIZE // 2:
            return None
        self.data[fh][off : off + len(buf)] = buf
        return len(buf)

    async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
        self._record("write", fh, off=off, size=len(buf), buf_type=type(buf).__name__)
        if fh == INO_CTL:
            await self._control(bytes(buf))
        else:
            self.data[fh][off : off + len(buf)] = buf
        return len(buf)

    async def _control(self, cmd: bytes) -> None:
        import trio

        from diofs import request

        if cmd == b"SET":
            self._w_event().set()
            return
        if cmd == b"FD":
            fd = pyfuse3.get_session_fd()
            self._record("fd", 0, fd=fd, target=os.readlink(f"/proc/self/fd/{fd}"),
                         blocking=os.get_blocking(fd), queued=request.requests_queued())
            return
        verb, ino, start, end = cmd.split()
        assert verb == b"INVAL"
        if int(ino) == INO_H:
            self.data[INO_H][:] = b"B" * FILE_SIZE
        try:
            await trio.to_thread.run_sync(
                request.invalidate_kernel_range, int(ino), int(start), int(end)
            )
            result = "ok"
        except OSError as exc:
            result = errno.errorcode.get(exc.errno or 0, str(exc))
        self._record("inval", int(ino), start=int(start), end=int(end), result=result)

    async def fallocate(self, fh, mode, offset, length):  # type: ignore[no-untyped-def]
        self._record("fallocate", fh, mode=mode, off=offset, size=length)
        if mode & FALLOC_FL_PUNCH_HOLE:
            self.data[fh][offset : offset + length] = bytes(length)

    async def flush(self, fh):  # type: ignore[no-untyped-def]
        self._record("flush", fh)

    async def fsync(self, fh, datasync):  # type: ignore[no-untyped-def]
        self._record("fsync", fh, datasync=datasync)

    async def release(self, fh):  # type: ignore[no-untyped-def]
        self._record("release", fh)


def daemon_main(mnt: str, report: str, attrs: dict[str, Any]) -> None:
    import trio

    fs = TinyFs(Path(report))
    for name, value in attrs.items():  # on the instance, as diofs does: pyfuse3 reads it there
        assert hasattr(pyfuse3.Operations, name), name
        setattr(fs, name, value)
    opts = set(pyfuse3.default_options) | {"fsname=tinyfs", "allow_other"}
    pyfuse3.init(fs, mnt, opts)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


# --------------------------------------------------------------------------- the harness
def _fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing"
    return None


def _api_missing() -> str | None:
    if not hasattr(pyfuse3, "get_session_fd"):
        return "pyfuse3 lacks patches/pyfuse3 (run scripts/setup)"
    return None


needs_mount = pytest.mark.skipif(
    (_fuse_missing() or _api_missing()) is not None,
    reason=str(_fuse_missing() or _api_missing()),
)


class TinyMount:
    """A running TinyFs daemon: mountpoint, report file, and the records so far."""

    def __init__(self, mnt: Path, report: Path) -> None:
        self.mnt = mnt
        self.report = report

    def path(self, name: str) -> str:
        return str(self.mnt / name)

    def records(self, op: str | None = None, ino: int | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.report.read_text().splitlines():
            r = json.loads(line)
            if (op is None or r["op"] == op) and (ino is None or r["ino"] == ino):
                out.append(r)
        return out


@contextlib.contextmanager
def tiny_mount(tmp: Path, **attrs: Any) -> Iterator[TinyMount]:
    """Mount TinyFs with the given pyfuse3.Operations attributes set on its instance."""
    mnt, report, log = tmp / "mnt", tmp / "report.jsonl", tmp / "daemon.log"
    mnt.mkdir()
    report.touch()
    argv = [sys.executable, __file__, "--daemon", str(mnt), str(report), json.dumps(attrs)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    with open(log, "wb") as logf:
        child = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env)
    refs: list[watchdog.MountRef] = []
    deadline = watchdog.Deadline(MOUNT_DEADLINE_S, lambda: refs)
    try:
        t_end = time.monotonic() + 15
        while not mountinfo.is_mounted(mnt):
            if child.poll() is not None or time.monotonic() > t_end:
                raise AssertionError(f"tiny daemon did not mount:\n{log.read_text()}")
            time.sleep(0.02)
        refs.append(watchdog.MountRef(str(mnt), watchdog.connection_id(mnt), child.pid))
        yield TinyMount(mnt, report)
        res = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
        assert res.returncode == 0, f"fusermount3 -u: {res.stderr}"
        assert child.wait(timeout=15) == 0, f"daemon exit {child.returncode}:\n{log.read_text()}"
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        deadline.cancel()
        watchdog.lazy_unmount(mnt)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        assert not deadline.expired, f"deadline of {MOUNT_DEADLINE_S}s expired\n{deadline.report}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyMount]:
    """One TinyFs mount with the switches as diofs sets them, shared by this module's tests."""
    with tiny_mount(tmp_path_factory.mktemp("tiny"), **DIOFS_LIKE) as m:
        yield m


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyMount]:
    """One TinyFs mount with no switch set: the defaults must behave like stock pyfuse3."""
    with tiny_mount(tmp_path_factory.mktemp("stock")) as m:
        yield m


# --------------------------------------------------------------------------- part 1: API
def test_binding_has_the_series_api() -> None:
    assert pyfuse3.request_context.get() == (0, 0)
    assert callable(pyfuse3.invalidate_inode_range)
    assert pyfuse3.handle_killpriv_v2_negotiated() is False  # no mount in this process
    assert pyfuse3.KILL_SUIDGID == 1 << 32
    assert pyfuse3.ReplyFromThread(b"x").data == b"x"
    assert callable(pyfuse3.Operations.fallocate)
    assert pyfuse3.Operations.read_sync is None and pyfuse3.Operations.write_sync is None
    with pytest.raises(RuntimeError):
        pyfuse3.get_session_fd()  # no init() in this process
    pw = pyfuse3.PooledWrite(3, 4096, 7, os.RWF_DSYNC)
    assert (pw.fd, pw.offset, pw.token, pw.flags) == (3, 4096, 7, os.RWF_DSYNC)
    assert pyfuse3.write_pool_completions() == [] and pyfuse3.write_pool_in_flight() == 0
    assert pyfuse3.native_read_counts() == (0, 0)
    assert pyfuse3.native_write_count() == 0
    with pytest.raises(OSError):
        pyfuse3.arm_native_writes(1, 1)  # not armed for reads
    with pytest.raises(ValueError):
        pyfuse3.arm_native_read(1, 0, 3000, 512, 4096, 4096, [(0, 1, 0)])  # not a power of 2
    pyfuse3.disarm_native_read(None)


def test_operations_switches_default_to_stock_behaviour() -> None:
    ops = pyfuse3.Operations
    assert ops.enable_auto_inval_data is True and ops.enable_async_dio is True
    assert ops.enable_write_views is False and ops.enable_eager_receive is False
    assert ops.checkpoint_interval == 1 and ops.enable_handle_killpriv_v2 is False
    assert ops.receive_spin_us == 0


def test_diofs_operations_set_the_switches() -> None:
    from diofs.ops import Operations

    assert Operations.enable_auto_inval_data is False
    assert Operations.enable_eager_receive is True and Operations.checkpoint_interval == 8
    assert Operations.enable_write_views is True
    assert Operations.receive_spin_us == 50


def test_diofs_operations_set_mount_dependent_switches_per_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`-o async_dio=off` and `--bug no-killpriv-v2` land on the instance pyfuse3 reads."""
    from types import SimpleNamespace

    from diofs import bugs
    from diofs.ops import Operations

    io = SimpleNamespace(fs=None)
    ops = Operations(io, None, None, entry_timeout=1, attr_timeout=1)  # type: ignore[arg-type]
    assert ops.enable_async_dio is True and ops.enable_handle_killpriv_v2 is True
    monkeypatch.setattr(bugs, "_enabled", {bugs.Bug.NO_KILLPRIV_V2})
    ops = Operations(
        io, None, None, entry_timeout=1, attr_timeout=1, async_dio=False  # type: ignore[arg-type]
    )
    assert ops.enable_async_dio is False and ops.enable_handle_killpriv_v2 is False
    ops = Operations(
        io, None, None, entry_timeout=1, attr_timeout=1, receive_spin_us=0  # type: ignore[arg-type]
    )
    assert ops.receive_spin_us == 0


def test_check_binding_accepts_installed_pyfuse3() -> None:
    from diofs import request

    request.check_binding()
    assert request.current() == request.Request(0, 0)


async def test_default_fallocate_is_eopnotsupp() -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await pyfuse3.Operations().fallocate(0, 0, 0, PAGE)
    assert info.value.errno == errno.EOPNOTSUPP


# --------------------------------------------------------------------------- part 2: mounts
@needs_mount
def test_direct_io_from_two_threads_carries_each_tid_and_o_direct(tiny: TinyMount) -> None:
    seen: dict[int, int] = {}  # offset -> native id of the thread that used it
    errors: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=20)

    def worker(i: int) -> None:
        try:
            off = (i + 1) * 64 * 1024
            seen[off] = threading.get_native_id()
            fd = os.open(tiny.path("f"), os.O_RDWR | os.O_DIRECT)
            try:
                barrier.wait()
                buf = aligned(data=bytes([0x30 + i]) * PAGE)
                assert os.pwritev(fd, [buf], off) == PAGE
                back = aligned(PAGE)
                assert os.preadv(fd, [back], off) == PAGE
                assert back[:] == buf[:]
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(set(seen.values())) == 2
    for off, tid in seen.items():
        for op in ("write", "read"):
            recs = [r for r in tiny.records(op, INO_F) if r["off"] == off]
            assert len(recs) == 1, (op, off, recs)
            assert recs[0]["tid"] == tid, (op, off, recs[0], tid)
            assert recs[0]["flags"] & os.O_DIRECT, (op, off, oct(recs[0]["flags"]))


@needs_mount
def test_sync_handlers_answer_or_hand_over_with_request_context(tiny: TinyMount) -> None:
    tid = threading.get_native_id()
    half = FILE_SIZE // 2
    fd = os.open(tiny.path("s"), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"a" * PAGE, 0) == PAGE  # answered by write_sync
        assert os.pwrite(fd, b"b" * PAGE, half) == PAGE  # declined: write
        assert os.pread(fd, PAGE, 0) == b"a" * PAGE  # answered by read_sync
        assert os.pread(fd, PAGE, half) == b"b" * PAGE  # declined: read
        with pytest.raises(OSError) as info:
            os.pread(fd, PAGE, SYNC_EIO_OFF)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    ops = [(r["op"], r["off"]) for r in tiny.records(ino=INO_S) if "off" in r]
    assert ops == [
        ("write_sync", 0), ("write_sync", half), ("write", half),
        ("read_sync", 0), ("read_sync", half), ("read", half), ("read_sync", SYNC_EIO_OFF),
    ]
    for r in tiny.records(ino=INO_S):
        if r["op"] in ("read_sync", "write_sync", "read", "write"):
            assert r["tid"] == tid, r
            assert r["flags"] & os.O_ACCMODE == os.O_RDWR, r


@needs_mount
def test_rwf_dsync_shows_o_dsync_in_write_flags(tiny: TinyMount) -> None:
    fd = os.open(tiny.path("f"), os.O_RDWR)
    try:
        assert os.pwritev(fd, [b"p" * PAGE], 4 * PAGE) == PAGE
        assert os.pwritev(fd, [b"d" * PAGE], 5 * PAGE, os.RWF_DSYNC) == PAGE
        os.fsync(fd)
    finally:
        os.close(fd)
    me = threading.get_native_id()
    plain = [r for r in tiny.records("write", INO_F) if r["off"] == 4 * PAGE]
    dsync = [r for r in tiny.records("write", INO_F) if r["off"] == 5 * PAGE]
    assert len(plain) == 1 and len(dsync) == 1, (plain, dsync)
    assert not plain[0]["flags"] & os.O_DSYNC, oct(plain[0]["flags"])
    assert dsync[0]["flags"] & os.O_DSYNC, oct(dsync[0]["flags"])
    assert not dsync[0]["flags"] & os.O_DIRECT
    assert plain[0]["tid"] == dsync[0]["tid"] == me
    fsyncs = [r for r in tiny.records("fsync", INO_F) if r["tid"] == me]
    assert any(not r["datasync"] for r in fsyncs), fsyncs  # our os.fsync


@needs_mount
def test_fallocate_reaches_handler_with_mode_offset_length(tiny: TinyMount) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(tiny.path("f"), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"x" * (3 * PAGE), 8 * PAGE) == 3 * PAGE
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if libc.fallocate(fd, mode, 9 * PAGE, PAGE) != 0:
            raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE|KEEP_SIZE)")
        assert os.pread(fd, 3 * PAGE, 8 * PAGE) == b"x" * PAGE + bytes(PAGE) + b"x" * PAGE
        os.posix_fallocate(fd, 12 * PAGE, 2 * PAGE)
    finally:
        os.close(fd)
    me = threading.get_native_id()
    recs = [(r["mode"], r["off"], r["size"], r["tid"]) for r in tiny.records("fallocate", INO_F)]
    assert recs == [(mode, 9 * PAGE, PAGE, me), (0, 12 * PAGE, 2 * PAGE, me)]


@needs_mount
def test_requests_without_context_see_the_default(tiny: TinyMount) -> None:
    fd = os.open(tiny.path("f"), os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [aligned(PAGE)], 0)
        os.stat(tiny.path("g"))  # GETATTR after a READ handled by the same worker
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.stat(tiny.path("nonexistent"))
    others = tiny.records("lookup") + tiny.records("getattr")
    assert others
    assert all((r["tid"], r["flags"]) == (0, 0) for r in others), others


@needs_mount
def test_invalidate_kernel_range_drops_only_that_range(tiny: TinyMount) -> None:
    fd = os.open(tiny.path("h"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4 * PAGE, 0) == b"A" * (4 * PAGE)  # now cached
        ctl = os.open(tiny.path("ctl"), os.O_WRONLY)
        try:  # the daemon turns h into b"B"s and invalidates only page 1
            os.write(ctl, b"INVAL %d %d %d" % (INO_H, PAGE, 2 * PAGE))
            os.write(ctl, b"INVAL 999 0 %d" % PAGE)  # never looked up: ENOENT, ignored
        finally:
            os.close(ctl)
        got = os.pread(fd, 4 * PAGE, 0)
    finally:
        os.close(fd)
    assert [r["result"] for r in tiny.records("inval")] == ["ok", "ok"]
    assert got == b"A" * PAGE + b"B" * PAGE + b"A" * (2 * PAGE)


def _reads_after_mtime_change(m: TinyMount) -> tuple[int, int]:
    fd = os.open(m.path("g"), os.O_RDONLY)
    try:
        os.pread(fd, PAGE, 0)
        first = len(m.records("read", INO_G))
        os.pread(fd, PAGE, 0)  # attr_timeout=0: the kernel may GETATTR and see a new mtime
        second = len(m.records("read", INO_G))
    finally:
        os.close(fd)
    return first, second


@needs_mount
def test_auto_inval_data_off_keeps_cache_on_mtime_change(tiny: TinyMount) -> None:
    first, second = _reads_after_mtime_change(tiny)
    assert first >= 1 and second == first


@needs_mount
def test_auto_inval_data_unset_drops_cache_on_mtime_change(stock: TinyMount) -> None:
    """Control for the test above: with libfuse's default the same reads go to the daemon."""
    first, second = _reads_after_mtime_change(stock)
    assert first >= 1 and second > first


# --------------------------------------------------------------------------- ASYNC_DIO
def _direct_read_inflight(m: TinyMount) -> list[int]:
    """One DIO_SIZE O_DIRECT read of "d": how many READs were in flight as each arrived."""
    before = len(m.records("read", INO_D))
    fd = os.open(m.path("d"), os.O_RDONLY | os.O_DIRECT)
    try:
        buf = aligned(DIO_SIZE)
        assert os.preadv(fd, [buf], 0) == DIO_SIZE
        assert buf[:] == b"D" * DIO_SIZE
    finally:
        os.close(fd)
    recs = m.records("read", INO_D)[before:]
    assert sum(r["size"] for r in recs) == DIO_SIZE and len(recs) >= 2, recs
    return [r["inflight"] for r in recs]


@needs_mount
def test_async_dio_unset_sends_one_direct_read_as_parallel_requests(stock: TinyMount) -> None:
    assert max(_direct_read_inflight(stock)) > 1


@needs_mount
def test_async_dio_off_sends_direct_read_requests_one_by_one(tmp_path: Path) -> None:
    with tiny_mount(tmp_path, enable_async_dio=False) as m:
        inflight = _direct_read_inflight(m)
    assert set(inflight) == {1}, inflight


# --------------------------------------------------------------------------- ReplyFromThread
@needs_mount
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_reply_from_thread_delivers_the_data(tiny: TinyMount, direct: bool) -> None:
    fd = os.open(tiny.path("r"), os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        buf = aligned(4 * PAGE)
        assert os.preadv(fd, [buf], 8 * PAGE) == 4 * PAGE
    finally:
        os.close(fd)
    assert buf[:] == b"R" * (4 * PAGE)
    assert tiny.records("read", INO_R)


# --------------------------------------------------------------------------- write views
def _write_and_read_back(m: TinyMount, off: int) -> str:
    data = bytes(range(256)) * (PAGE // 256)
    fd = os.open(m.path("f"), os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [aligned(data=data)], off) == PAGE
        back = aligned(PAGE)
        assert os.preadv(fd, [back], off) == PAGE
    finally:
        os.close(fd)
    assert back[:] == data
    recs = [r for r in m.records("write", INO_F) if r["off"] == off]
    assert len(recs) == 1, recs
    return str(recs[0]["buf_type"])


@needs_mount
def test_write_views_pass_a_memoryview(tiny: TinyMount) -> None:
    assert _write_and_read_back(tiny, 40 * PAGE) == "memoryview"


@needs_mount
def test_write_views_unset_pass_bytes(stock: TinyMount) -> None:
    assert _write_and_read_back(stock, 40 * PAGE) == "bytes"


# --------------------------------------------------------------------------- eager receive
def _session_fd_record(m: TinyMount) -> dict[str, Any]:
    ctl = os.open(m.path("ctl"), os.O_WRONLY)
    try:
        os.write(ctl, b"FD")
    finally:
        os.close(ctl)
    return m.records("fd")[-1]


@needs_mount
def test_eager_receive_makes_the_session_fd_non_blocking(tiny: TinyMount, stock: TinyMount) -> None:
    assert _session_fd_record(tiny)["blocking"] is False
    assert _session_fd_record(stock)["blocking"] is True


@needs_mount
def test_eager_receive_serves_a_request_a_waiting_handler_needs(tiny: TinyMount) -> None:
    """A READ of "w" waits in its handler until a later WRITE to ctl arrives: another worker
    must read that WRITE although the first one took its request without waiting."""
    result: list[bytes] = []

    def reader() -> None:
        fd = os.open(tiny.path("w"), os.O_RDONLY | os.O_DIRECT)
        try:
            buf = aligned(PAGE)
            os.preadv(fd, [buf], 0)
            result.append(buf[:])
        finally:
            os.close(fd)

    t = threading.Thread(target=reader)
    t.start()
    t_end = time.monotonic() + 20
    while not tiny.records("read", INO_W):
        assert time.monotonic() < t_end, "READ of w never arrived"
        time.sleep(0.01)
    ctl = os.open(tiny.path("ctl"), os.O_WRONLY)
    try:
        os.write(ctl, b"SET")
    finally:
        os.close(ctl)
    t.join(timeout=20)
    assert not t.is_alive()
    assert result == [bytes(PAGE)]


@needs_mount
def test_receive_spin_answers_serial_requests(tiny: TinyMount) -> None:
    """One O_DIRECT request at a time, the next sent at once (while the worker spins) or
    after a pause (after it gave up and sleeps): each is answered with its own data."""
    fd = os.open(tiny.path("f"), os.O_RDWR | os.O_DIRECT)
    try:
        for rnd in range(100):
            off = (rnd % 8) * PAGE
            data = bytes([rnd]) * PAGE
            assert os.pwritev(fd, [aligned(data=data)], off) == PAGE
            if rnd % 25 == 0:
                time.sleep(0.05)
            back = aligned(PAGE)
            assert os.preadv(fd, [back], off) == PAGE
            assert back[:] == data, rnd
    finally:
        os.close(fd)


@needs_mount
def test_eager_receive_concurrent_direct_io_keeps_data(tiny: TinyMount) -> None:
    """Eight threads of O_DIRECT write + read on one file (requests queue up: the eager path
    with its skipped checkpoints): every thread reads back its own data."""
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            fd = os.open(tiny.path("f"), os.O_RDWR | os.O_DIRECT)
            try:
                for rnd in range(20):
                    off = (64 + i * 4 + rnd % 4) * PAGE
                    data = bytes([i * 20 + rnd]) * PAGE
                    assert os.pwritev(fd, [aligned(data=data)], off) == PAGE
                    back = aligned(PAGE)
                    assert os.preadv(fd, [back], off) == PAGE
                    assert back[:] == data, (i, rnd)
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors


# --------------------------------------------------------------------------- session fd
@needs_mount
def test_get_session_fd_is_the_daemons_dev_fuse(tiny: TinyMount) -> None:
    rec = _session_fd_record(tiny)
    assert rec["target"] == "/dev/fuse"
    assert rec["queued"] in (True, False)  # requests_queued() polled it (a RELEASE may be queued)


# --------------------------------------------------------------------------- KILLPRIV_V2
def _write_n(path: str, n: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(n):
            os.pwrite(fd, b"w" * 512, i * 512)
    finally:
        os.close(fd)


@needs_mount
@pytest.mark.parametrize("killpriv", [True, False])
def test_killpriv_v2_removes_the_getxattr_before_every_write(
    tmp_path: Path, killpriv: bool
) -> None:
    """The custom I/O adds FUSE_HANDLE_KILLPRIV_V2 to the INIT reply: the kernel stops asking
    for security.capability before each WRITE. Without it (libfuse's reply): one per WRITE."""
    attrs = {"enable_handle_killpriv_v2": True} if killpriv else {}  # unset: the default
    with tiny_mount(tmp_path, **attrs) as m:
        _write_n(m.path("f"), 100)
        writes = m.records("write", INO_F)
        getxattr = m.records("getxattr", INO_F)
    assert len(writes) == 100
    assert all(r["killpriv"] is killpriv for r in writes)
    if killpriv:
        assert len(getxattr) <= 1
    else:
        assert len(getxattr) >= 100
        assert {r["name"] for r in getxattr} == {"security.capability"}


def _unprivileged_kill_requests(mnt: str) -> None:
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    fd = os.open("k", os.O_RDWR, dir_fd=dfd)
    os.pwrite(fd, b"u", 0)
    os.ftruncate(fd, PAGE)
    os.close(fd)
    os.close(os.open("k", os.O_WRONLY | os.O_TRUNC, dir_fd=dfd))
    os._exit(0)


@needs_mount
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_kill_suidgid_flag_reaches_write_setattr_and_open(tmp_path: Path) -> None:
    """An unprivileged WRITE, truncate and open(O_TRUNC) carry pyfuse3.KILL_SUIDGID in the
    request flags (libfuse 3.14 passes none of the kernel's bits up); root's do not."""
    kill = pyfuse3.KILL_SUIDGID
    with tiny_mount(tmp_path, enable_handle_killpriv_v2=True) as m:
        pid = os.fork()
        if pid == 0:
            try:
                _unprivileged_kill_requests(str(m.mnt))
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        user = {op: m.records(op, INO_K) for op in ("write", "setattr", "open")}
        fd = os.open(m.path("k"), os.O_RDWR | os.O_TRUNC)
        os.pwrite(fd, b"r", 0)
        os.ftruncate(fd, PAGE)
        os.close(fd)
        root = {op: m.records(op, INO_K)[len(user[op]) :] for op in ("write", "setattr", "open")}
    for recs in (user, root):  # only an open with O_TRUNC may ask for the kill
        recs["open"] = [r for r in recs["open"] if r["open_flags"] & os.O_TRUNC]
    for op in ("write", "setattr", "open"):
        assert user[op] and all(r["flags"] & kill for r in user[op]), (op, user[op])
        assert root[op] and not any(r["flags"] & kill for r in root[op]), (op, root[op])
    assert user["write"][0]["flags"] & ~kill & os.O_ACCMODE == os.O_RDWR  # fi->flags kept


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--daemon":
    daemon_main(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
