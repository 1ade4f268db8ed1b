"""The image on a block device (loop) or an NBD export (issue 16), with a real nbdkit.

Every server is an nbdkit on a unix socket in the test's tmp dir (harness/nbdserver.py), killed
by pid at teardown; every loop device is detached at teardown.

- the backend: round trips, FUA, concurrent callers, URI errors, a server that cannot flush
  (refused; `nbd_unsafe` accepts it), server errors (error filter) as EIO;
- faults: a stalled server gives EIO within nbd_timeout; a restarted server is reconnected
  transparently; writes a crashed server acknowledged but never flushed fail the next flush
  (`--bug nbd-trust-reconnect`: the loss goes unreported);
- the trio loop: a slow server (delay filter) does not stall requests that need no image I/O
  (`--bug nbd-inline-io`: it does);
- mounts: mkfs / mount / fsck on a URI; the server killed mid-fio: callers get EIO within the
  timeout, no hang, restart, remount, fsck clean, every acknowledged fsync present;
- a loop device as IMAGE: size from BLKGETSIZE64, mkfs, mount, fsck.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diofs import bugs
from diofs.backend import Backend, open_backend
from diofs.backend.nbd import NbdOptions, is_uri, parse_uri
from diofs.backend.raw import RawImage
from diofs.errors import DiofsError
from harness.mount import MountFactory, run_cli, run_tool
from harness.nbdserver import NbdServer, nbdkit_missing

pytestmark = pytest.mark.skipif(nbdkit_missing() is not None, reason=str(nbdkit_missing()))

MiB = 1 << 20
BS = 4096


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[NbdServer]]:
    """Servers a test starts; all are killed by pid at teardown."""
    started: list[NbdServer] = []
    yield started
    for s in started:
        s.stop(kill=True)


def serve(servers: list[NbdServer], tmp_path: Path, *plugin: str, filters: tuple = (),
          name: str = "nbd") -> NbdServer:
    s = NbdServer(tmp_path, list(plugin), filters=filters, name=name)
    servers.append(s)
    return s.start()


@contextlib.contextmanager
def bug(name: str) -> Iterator[None]:
    bugs.enable([name])
    try:
        yield
    finally:
        bugs._enabled.discard(bugs.Bug(name))


# ---------------------------------------------------------------------- the backend


def test_round_trip_fua_and_ranges(servers, tmp_path):
    s = serve(servers, tmp_path, "memory", "8M")
    b = open_backend(s.uri)
    try:
        assert isinstance(b, Backend) and b.size() == 8 * MiB
        assert b.can_flush and b.can_fua and b.multi_conn
        payload = os.urandom(12345)
        b.write(1000, payload)
        assert b.read(1000, len(payload)) == payload
        buf = bytearray(len(payload) + 10)
        b.readinto(995, memoryview(buf))
        assert bytes(buf) == b"\0" * 5 + payload + b"\0" * 5
        b.write_durable(8 * MiB - BS, b"d" * BS)
        b.flush()
        assert b.read(8 * MiB - BS, BS) == b"d" * BS
        with pytest.raises(ValueError):
            b.read(8 * MiB - 1, 2)
        with pytest.raises(ValueError):
            b.write(-1, b"x")
    finally:
        b.close()
        b.close()  # idempotent


def test_concurrent_callers_share_the_pool(servers, tmp_path):
    s = serve(servers, tmp_path, "memory", "16M", "delay-write=20ms", filters=("delay",))
    b = open_backend(s.uri)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(5):
                b.write((i * 5 + j) * BS, bytes([i + 1]) * BS)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        t0 = time.monotonic()
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        assert not errors
        for i in range(8):
            assert b.read(i * 5 * BS, 5 * BS) == bytes([i + 1]) * 5 * BS
        # 40 writes of 20 ms: serial would be 0.8 s; 4 connections in flight make it ~0.2 s
        assert elapsed < 0.6, elapsed
    finally:
        b.close()


@pytest.mark.parametrize("uri, why", [
    ("nbd:///export", "no host"),
    ("nbd+unix:///export", "no socket"),
    ("nbds://host/export", "unsupported NBD URI scheme"),
    ("nbd://host:port/x", "bad port"),
])
def test_bad_uris_give_one_line(uri, why, tmp_path):
    assert is_uri(uri)
    with pytest.raises(DiofsError, match=why):
        parse_uri(uri)
    for tool in ("mkfs.diofs", "fsck.diofs"):
        proc = run_cli(tool, uri)
        assert proc.returncode != 0
        assert why in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_cli("mount.diofs", uri, mnt)
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not is_uri("/path/to/image") and not is_uri("nbd-image")


def test_unreachable_server_fails_within_the_timeout(tmp_path):
    uri = f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}"
    t0 = time.monotonic()
    with pytest.raises(DiofsError, match="cannot connect to NBD server"):
        open_backend(uri, nbd_options=NbdOptions(timeout=1.0, retry=0.2))
    assert time.monotonic() - t0 < 3.0
    proc = run_cli("fsck.diofs", uri)
    assert proc.returncode != 0 and "cannot connect" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


NO_FLUSH_PLUGIN = ("eval", "get_size=echo 4194304",
                   "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
                   "pwrite=cat >/dev/null")


def test_server_that_cannot_flush_is_refused_unless_unsafe(servers, tmp_path):
    s = serve(servers, tmp_path, *NO_FLUSH_PLUGIN)
    with pytest.raises(DiofsError, match="cannot flush: crash consistency needs"):
        open_backend(s.uri)
    proc = run_cli("mkfs.diofs", s.uri)
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "nbd_unsafe" in proc.stderr
    b = open_backend(s.uri, nbd_options=NbdOptions(unsafe=True))  # the documented way out
    try:
        assert not b.can_flush
        b.write(0, b"x" * BS)
        b.flush()  # nothing to ask for
    finally:
        b.close()
    ro = open_backend(s.uri, writable=False)  # a read-only check needs no flush
    ro.close()


def test_server_errors_are_eio_and_the_connection_survives(servers, tmp_path):
    inject = tmp_path / "inject"
    s = serve(servers, tmp_path, "memory", "8M", "error=EIO", "error-pread-rate=100%",
              f"error-pread-file={inject}", "error-pwrite-rate=100%",
              f"error-pwrite-file={inject}", filters=("error",))
    b = open_backend(s.uri)
    try:
        b.write(0, b"a" * BS)
        inject.touch()
        for op in (lambda: b.read(0, BS), lambda: b.write(0, b"b" * BS),
                   lambda: b.write_durable(0, b"c" * BS)):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.EIO
        inject.unlink()
        assert b.read(0, BS) == b"a" * BS
        b.flush()  # the connection survived the errors: no reconnect, nothing lost
    finally:
        b.close()


def test_stalled_server_gives_eio_within_nbd_timeout(servers, tmp_path):
    # a server that does not answer reads
    s = serve(servers, tmp_path, "memory", "8M", "delay-read=30", filters=("delay",))
    b = open_backend(s.uri, nbd_options=NbdOptions(timeout=0.5, retry=0.1))
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            b.read(0, BS)
        took = time.monotonic() - t0
        assert ei.value.errno == errno.EIO and "nbd_timeout" in str(ei.value)
        assert 0.4 < took < 1.5, took
        b.write(0, b"w" * BS)  # writes are not delayed: the pool still serves them
        b.flush()
    finally:
        b.close()


def test_restarted_server_is_reconnected_transparently(servers, tmp_path):
    img = tmp_path / "disk"
    img.write_bytes(bytes(8 * MiB))
    s = serve(servers, tmp_path, "file", f"file={img}")
    b = open_backend(s.uri, nbd_options=NbdOptions(timeout=10, retry=0.1))
    try:
        b.write(BS, b"k" * BS)
        b.flush()
        s.stop(kill=True)
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(b.read(BS, BS)))
        t.start()
        time.sleep(0.5)  # the read waits for the server, retrying every 0.1 s
        assert t.is_alive()
        s.start()
        t.join(10)
        assert got == [b"k" * BS]
        b.write(2 * BS, b"n" * BS)
        b.flush()  # writes after the reconnect are covered: no error
    finally:
        b.close()


def test_server_down_gives_eio_within_nbd_timeout(servers, tmp_path):
    s = serve(servers, tmp_path, "memory", "8M")
    b = open_backend(s.uri, nbd_options=NbdOptions(timeout=1.0, retry=0.2))
    try:
        s.stop(kill=True)
        for op in (lambda: b.read(0, BS), lambda: b.write(0, b"x" * BS), b.flush):
            t0 = time.monotonic()
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.EIO
            assert time.monotonic() - t0 < 2.0
    finally:
        b.close()


@pytest.mark.parametrize("trust", [False, True], ids=["default", "bug-nbd-trust-reconnect"])
def test_writes_a_crashed_server_lost_fail_the_next_flush(servers, tmp_path, trust):
    s = serve(servers, tmp_path, "memory", "8M")  # a restart loses everything: a crash
    b = open_backend(s.uri, nbd_options=NbdOptions(timeout=5, retry=0.1))
    try:
        b.write(0, b"f" * BS)
        b.flush()
        b.write(BS, b"u" * BS)  # acknowledged, never flushed
        s.stop(kill=True)
        s.start()
        with bug("nbd-trust-reconnect") if trust else contextlib.nullcontext():
            if trust:
                b.flush()  # claims durability ...
                assert b.read(BS, BS) == bytes(BS)  # ... for a write that is gone
                return
            with pytest.raises(OSError) as ei:
                b.flush()
            assert ei.value.errno == errno.EIO and "may be lost" in str(ei.value)
            b.flush()  # reported once
    finally:
        b.close()


# ---------------------------------------------------------------------- mounts on NBD


def nbd_mount(factory: MountFactory, *, filters: tuple = (), args: tuple = (),
              opts: dict | None = None, size: str = "64M"):
    """A mount of a fresh image served by nbdkit's file plugin (with `filters`)."""
    m = factory(size=size, mount=False, opts=opts)
    m.nbd = NbdServer(m.workdir, ["file", f"file={m.image}", *args], filters=filters)
    m.start()
    return m


def test_mkfs_mount_fsck_on_a_uri(servers, mount_factory, tmp_path):
    img = tmp_path / "export"
    img.write_bytes(b"")
    os.truncate(img, 32 * MiB)
    s = serve(servers, tmp_path, "file", f"file={img}", name="export")
    run_tool("mkfs.diofs", s.uri, check=True)
    proc = run_tool("mkfs.diofs", s.uri, "--size", "64M")
    assert proc.returncode != 0 and "exceeds" in proc.stderr
    run_tool("mkfs.diofs", s.uri, "--size", "16M", check=True)
    m = mount_factory(image=img, mount=False)
    m.nbd = s
    m.start()
    src = [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
           if f" {m.mnt} " in ln][0]
    assert f" {s.uri} " in src  # the mount's source is the URI
    with open(m.path("f"), "wb") as f:
        f.write(b"x" * 100000)
        os.fsync(f.fileno())
    assert run_tool("fsck.diofs", s.uri).returncode == 7  # locked while mounted
    (tmp_path / "mnt2").mkdir()
    proc = run_cli("mount.diofs", s.uri, tmp_path / "mnt2", "--foreground")
    assert proc.returncode == 7, proc.stderr  # one mount per URI
    m.unmount()
    out = run_tool("fsck.diofs", s.uri, check=True).stdout
    assert "clean (2 inodes" in out
    m.start()
    assert Path(m.path("f")).read_bytes() == b"x" * 100000


def test_server_errors_reach_callers_and_fsync_via_errseq(mount_factory, tmp_path):
    inject = tmp_path / "inject"
    m = nbd_mount(mount_factory, filters=("error",),
                  args=("error=EIO", "error-pwrite-rate=100%", f"error-pwrite-file={inject}",
                        "error-pread-rate=100%", f"error-pread-file={inject}.r"),
                  opts={"writeback_age": 0.2, "commit_interval": 3600})
    m.expect_log(r"writeback of inode \d+ (pages \d+\.\.\d+ )?failed|NBD (write|read)")
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(b"o" * 8 * BS)
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDWR)
    other = os.open(path, os.O_RDONLY)
    try:
        inject.touch()
        os.pwrite(fd, b"n" * 2 * BS, BS)  # dirty pages, written back in the background
        deadline = time.monotonic() + 10
        while m.stats().get("writeback.errors", 0) < 1:
            assert time.monotonic() < deadline, "no writeback error"
            time.sleep(0.05)
        inject.unlink()
        for f in (fd, other):  # each open fd sees the error once (errseq) ...
            with pytest.raises(OSError) as ei:
                os.fsync(f)
            assert ei.value.errno == errno.EIO
            os.fsync(f)  # ... and only once
        Path(f"{inject}.r").touch()  # a direct read the server fails: EIO to the caller
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        import mmap

        rb = mmap.mmap(-1, BS)
        try:
            with pytest.raises(OSError) as ei:
                os.preadv(dfd, [rb], 0)
            assert ei.value.errno == errno.EIO
            Path(f"{inject}.r").unlink()
            assert os.preadv(dfd, [rb], 0) == BS and rb[:] == b"o" * BS
        finally:
            os.close(dfd)
    finally:
        os.close(fd)
        os.close(other)
    assert m.daemon is not None and m.daemon.poll() is None


def test_freed_blocks_are_trimmed_after_the_commit(mount_factory):
    m = nbd_mount(mount_factory, opts={"commit_interval": 3600, "discard": True})
    with open(m.path("big"), "wb") as f:
        f.write(os.urandom(16 * MiB))
        os.fsync(f.fileno())
    m.remount()  # a commit that references the blocks
    allocated = os.stat(m.image).st_blocks * 512
    os.unlink(m.path("big"))
    m.unmount()  # the final commit frees the blocks, then trims them (file plugin: punch hole)
    freed = allocated - os.stat(m.image).st_blocks * 512
    assert freed >= 15 * MiB, (allocated, freed)
    m.start({"discard": False})  # the default (as ext4: nodiscard): freed blocks stay
    with open(m.path("big2"), "wb") as f:
        f.write(os.urandom(16 * MiB))
        os.fsync(f.fileno())
    m.remount({"discard": False})
    allocated = os.stat(m.image).st_blocks * 512
    os.unlink(m.path("big2"))
    m.unmount()
    assert os.stat(m.image).st_blocks * 512 >= allocated


DELAY_MS = int(os.environ.get("DIOFS_NBD_DELAY_MS", "40"))  # the server delay per read


def open_latencies(path: str, seconds: float) -> list[float]:
    """open+close of `path` in a loop (OPEN, FLUSH, RELEASE: no image I/O); latencies in s."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        os.close(os.open(path, os.O_RDONLY))
        out.append(time.perf_counter() - t0)
        time.sleep(0.002)
    return out


@pytest.mark.parametrize("inline", [False, True], ids=["default", "bug-nbd-inline-io"])
def test_slow_server_does_not_stall_other_requests(mount_factory, inline):
    m = nbd_mount(mount_factory, filters=("delay",), args=(f"delay-read={DELAY_MS}ms",),
                  opts={"cache_size": "4M"})
    if inline:
        m.unmount()
        m.bugs.append("nbd-inline-io")
        m.start()
    big = m.path("big")
    fd = os.open(big, os.O_RDWR | os.O_CREAT | os.O_DIRECT)
    import mmap

    buf = mmap.mmap(-1, MiB)
    buf.write(os.urandom(MiB))
    for i in range(8):
        os.pwrite(fd, buf, i * MiB)
    os.fsync(fd)
    Path(m.path("small")).write_bytes(b"s")
    quiet = open_latencies(m.path("small"), 0.5)
    stop = threading.Event()

    def reader() -> None:  # uncached 64 KiB direct reads, each waits DELAY_MS at the server
        rb = mmap.mmap(-1, 65536)
        i = 0
        while not stop.is_set():
            os.preadv(fd, [rb], (i * 65536) % (8 * MiB))
            i += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        busy = open_latencies(m.path("small"), 2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        os.close(fd)
    q50, b50 = statistics.median(quiet) * 1e3, statistics.median(busy) * 1e3
    print(f"open+close median: quiet {q50:.2f} ms, with {DELAY_MS} ms reads in flight "
          f"{b50:.2f} ms (inline={inline})")
    # measured with 40 ms: 0.5 ms vs 123 ms; with 10 ms: 0.8-4.4 ms vs 30-32 ms (loaded box)
    if inline:
        assert b50 > DELAY_MS, (q50, b50)  # the loop waits for the server's reads
    else:
        assert b50 < DELAY_MS / 4, (q50, b50)


WRITER = r"""
import json, os, sys, time
mnt, acks, stop_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
log = open(acks, "a")
n = 0
while time.time() < stop_at:
    path = os.path.join(mnt, f"rec{n % 8}")
    data = (f"{n:08d}" * 512).encode()
    t0 = time.monotonic()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        try:
            os.pwrite(fd, data, (n // 8) * len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        print(json.dumps({"errno": exc.errno, "took": time.monotonic() - t0}), flush=True)
        sys.exit(0)
    log.write(json.dumps([path, (n // 8) * len(data), n]) + "\n")
    log.flush()
    n += 1
print(json.dumps({"errno": 0, "records": n}), flush=True)
"""


def check_acked(acks: Path) -> int:
    n = 0
    for line in acks.read_text().splitlines():
        path, off, rec = json.loads(line)
        with open(path, "rb") as f:
            f.seek(off)
            assert f.read(4096) == (f"{rec:08d}" * 512).encode(), (path, off, rec)
        n += 1
    return n


@pytest.mark.deadline(180)
@pytest.mark.parametrize("restart", ["while-mounted", "after-unmount"])
def test_server_killed_mid_fio(mount_factory, tmp_path, restart):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    timeout = 3.0
    m = nbd_mount(mount_factory, opts={"nbd_timeout": timeout, "nbd_retry": 0.2,
                                       "writeback_age": 0.5, "commit_interval": 1})
    m.expect_log(r"NBD|failed|EIO|Input/output error|may be lost")
    acks = tmp_path / "acks.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.mnt), str(acks),
                               str(time.time() + 60)], stdout=subprocess.PIPE, text=True)
    fio = subprocess.Popen(
        ["fio", "--name=load", f"--directory={m.mnt}", "--rw=randwrite", "--bs=4k",
         "--direct=1", "--ioengine=psync", "--size=16M", "--time_based", "--runtime=60",
         "--numjobs=2", "--fsync=32", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert writer.poll() is None and fio.poll() is None
        t_kill = time.monotonic()
        m.nbd.stop(kill=True)
        if restart == "while-mounted":
            time.sleep(timeout + 1)  # every caller in flight has had its EIO by now
            m.nbd.start()
        w_out, _ = writer.communicate(timeout=timeout + 30)
        fio_out, fio_err = fio.communicate(timeout=timeout + 30)
        t_done = time.monotonic() - t_kill
    finally:
        for p in (writer, fio):
            if p.poll() is None:
                p.kill()
                p.wait()
    result = json.loads(w_out.strip().splitlines()[-1])
    assert result["errno"] in (errno.EIO, errno.ENOTCONN), result
    assert result["took"] < timeout + 2, result  # the failing fsync/write: bounded
    assert fio.returncode != 0  # fio saw the errors too and stopped
    print(f"[{restart}] writer error {result}, writer and fio done {t_done:.1f}s after kill")
    if restart == "after-unmount":
        t0 = time.monotonic()
        proc, _, rc = m.unmount_with(["fusermount3", "-u", str(m.mnt)])
        assert rc != 0  # the final commit could not be made durable: the daemon says so
        assert time.monotonic() - t0 < 60
        m.nbd.start()
    else:
        m.unmount_with(["fusermount3", "-u", str(m.mnt)])
    fsck = run_tool("fsck.diofs", m.nbd.uri)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    m.start()
    n = check_acked(acks)
    assert n > 10, n  # every acknowledged fsync is there
    print(f"[{restart}] {n} acknowledged fsyncs present after remount")


# ---------------------------------------------------------------------- a loop device


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "loop-backing"
    with open(backing, "wb") as f:
        f.truncate(48 * MiB)
    proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_loop_device_as_image(loop_device, mount_factory):
    assert os.stat(loop_device).st_size == 0  # the size must come from the device
    raw = RawImage(loop_device, writable=False)
    try:
        assert raw.block_device and raw.size() == 48 * MiB
    finally:
        raw.close()
    out = run_tool("mkfs.diofs", loop_device, check=True).stdout
    assert "48 MiB" in out
    proc = run_tool("mkfs.diofs", loop_device, "--size", "1G")
    assert proc.returncode != 0 and "exceeds" in proc.stderr
    m = mount_factory(image=loop_device)
    data = os.urandom(3 * MiB)
    with open(m.path("f"), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    m.remount()
    assert Path(m.path("f")).read_bytes() == data
    m.unmount()
    assert "clean" in run_tool("fsck.diofs", loop_device, check=True).stdout
