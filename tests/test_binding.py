"""The installed pyfuse3 carries the diofs patch, and the patch does what diofs relies on.

Part 1 checks the API is there (no mount). Part 2 is the proof: it mounts a tiny in-memory
pyfuse3 filesystem defined in this file (run as `python tests/test_binding.py --daemon ...`
in a child process), drives it from this process, and compares what the daemon recorded per
request with what the test did:
  - READ/WRITE from two threads carry each thread's native id and O_DIRECT in the flags;
  - pwritev(..., RWF_DSYNC) shows O_DSYNC in that WRITE's flags (and a plain write does not);
  - fallocate(2) reaches Operations.fallocate with the caller's mode/offset/length;
  - requests without a context (LOOKUP, GETATTR) see the default (0, 0), never a stale value;
  - invalidate_inode_range (via diofs.request) drops only the given range from the kernel cache;
  - set_auto_inval_data(False) stops the kernel from dropping the cache on an mtime change;
  - set_handle_killpriv_v2(True) removes the GETXATTR(security.capability) before every WRITE
    and passes the kernel's kill-suid/sgid requests up as pyfuse3.KILL_SUIDGID;
  - Operations.read_sync / write_sync (patches/pyfuse3-3.5.0-sync-dispatch.patch) answer a
    request with request_context set, hand it to read / write when they return None, and
    answer FUSEError with its errno.

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
INO_S = 7  # direct_io: read_sync / write_sync answer its first half, decline the second
FILES = {b"f": INO_F, b"g": INO_G, b"h": INO_H, b"ctl": INO_CTL, b"k": INO_K, b"s": INO_S}
SYNC_EIO_OFF = PAGE  # read_sync raises FUSEError(EIO) here


# --------------------------------------------------------------------------- the daemon
class TinyFs(pyfuse3.Operations):
    """In-memory files of FILE_SIZE bytes; records every request in a JSON-lines report."""

    def __init__(self, report: Path) -> None:
        super().__init__()
        self.data = {ino: bytearray(FILE_SIZE) for ino in (INO_F, INO_G, INO_H, INO_K, INO_S)}
        self.data[INO_H][:] = b"A" * FILE_SIZE
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
        self._record("read", fh, off=off, size=size)
        return bytes(self.data[fh][off : off + size])

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
        self._record("write", fh, off=off, size=len(buf))
        if fh == INO_CTL:
            await self._control(buf)
        else:
            self.data[fh][off : off + len(buf)] = buf
        return len(buf)

    async def _control(self, cmd: bytes) -> None:
        import trio

        from diofs import request

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


def daemon_main(mnt: str, report: str, auto_inval: bool, killpriv: bool) -> None:
    import trio

    pyfuse3.set_auto_inval_data(auto_inval)
    pyfuse3.set_handle_killpriv_v2(killpriv)
    opts = set(pyfuse3.default_options) | {"fsname=tinyfs", "allow_other"}
    pyfuse3.init(TinyFs(Path(report)), mnt, opts)
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
    if getattr(pyfuse3, "DIOFS_PATCH_VERSION", None) is None:
        return "pyfuse3 is stock (run scripts/setup)"
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
def tiny_mount(tmp: Path, auto_inval: bool, killpriv: bool = False) -> Iterator[TinyMount]:
    mnt, report, log = tmp / "mnt", tmp / "report.jsonl", tmp / "daemon.log"
    mnt.mkdir()
    report.touch()
    argv = [sys.executable, __file__, "--daemon", str(mnt), str(report), str(int(auto_inval)),
            str(int(killpriv))]
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
    """One TinyFs mount with auto_inval_data off, shared by the tests of this module."""
    with tiny_mount(tmp_path_factory.mktemp("tiny"), auto_inval=False) as m:
        yield m


# --------------------------------------------------------------------------- part 1: API
def test_binding_has_diofs_api() -> None:
    assert pyfuse3.DIOFS_PATCH_VERSION == 5
    assert pyfuse3.request_context.get() == (0, 0)
    assert callable(pyfuse3.invalidate_inode_range)
    assert callable(pyfuse3.set_auto_inval_data)
    assert callable(pyfuse3.set_async_dio)
    assert callable(pyfuse3.set_eager_receive)
    assert callable(pyfuse3.set_write_views)
    assert callable(pyfuse3.set_checkpoint_interval)
    with pytest.raises(ValueError):
        pyfuse3.set_checkpoint_interval(0)
    assert callable(pyfuse3.set_handle_killpriv_v2)
    assert pyfuse3.handle_killpriv_v2_negotiated() is False  # no mount in this process
    assert pyfuse3.KILL_SUIDGID == 1 << 32
    assert pyfuse3.ReplyFromThread(b"x").data == b"x"
    assert callable(pyfuse3.Operations.fallocate)
    assert pyfuse3.SYNC_DISPATCH_VERSION == 1
    assert pyfuse3.Operations.read_sync is None and pyfuse3.Operations.write_sync is None


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
def test_auto_inval_data_on_drops_cache_on_mtime_change(tmp_path: Path) -> None:
    """Control for the test above: with libfuse's default the same reads go to the daemon."""
    with tiny_mount(tmp_path, auto_inval=True) as m:
        first, second = _reads_after_mtime_change(m)
    assert first >= 1 and second > first


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
    with tiny_mount(tmp_path, auto_inval=False, killpriv=killpriv) as m:
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
    with tiny_mount(tmp_path, auto_inval=False, killpriv=True) as m:
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


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--daemon":
    daemon_main(sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5] == "1")
