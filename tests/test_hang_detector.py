"""The hung-request detector (diofs/hang_detector.py; issue 12, "a hang detector in the daemon").

On real mounts: `-o dio_delay=S` (a demo hook: every direct WRITE holds its BLOCK lock S
seconds) keeps one WRITE outstanding for DELAY_S with `-o hang_timeout=1`. The detector must
log it exactly once, as a WARNING naming the opcode and inode, with the client's kernel stack
and the daemon's stacks; count it in `diofs stats`; and leave it alone: the write completes
with the right data. Without the delay nothing is reported; `hang_timeout=0` switches the
detector off; a bad value is one line on stderr and a non-zero exit. In the background (no
--log, no --foreground) the report goes to syslog through /dev/log.

Below those, in-process tests of the pure parts: the scan (once per request, the INFO line when
it is answered), the decoding of a table entry, and the syslog handler (one datagram per line,
never blocking).

Timing: the detector scans every hang_timeout/4 (0.25 s here), so a report is written between
1 and about 1.25 s after the request started; DELAY_S leaves the test 3 s of margin to see it
while the request is still outstanding.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from diofs import hang_detector, mountinfo
from diofs.cli.common import SyslogLines, syslog_handler
from diofs.cli.stats import read_stats
from diofs.ops import Operations
from harness import watchdog
from harness.io import wait_for
from harness.mount import Mount, MountFactory, cli, cli_env, run_in_child
from tests.test_cli_errors import FOREGROUND, assert_one_line_error, try_mount

DELAY_S = 4.0
TIMEOUT_S = 1
HEADER = re.compile(r"WARNING diofs\.hang_detector: hung request #\d+: (\S+) inode=(\d+)")
RECORD_START = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} ")


def direct_write(path: str, fill: bytes) -> tuple[int, int]:
    """One 4 KiB O_DIRECT pwrite at offset 0; returns (this thread's tid, bytes written)."""
    buf = mmap.mmap(-1, 4096)
    buf.write(fill * 4096)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        return threading.get_native_id(), os.pwrite(fd, buf, 0)
    finally:
        os.close(fd)


def records(log_text: str) -> list[str]:
    """The log's records, each with its continuation lines (a report is one record)."""
    out: list[str] = []
    for line in log_text.splitlines():
        if RECORD_START.match(line) or not out:
            out.append(line)
        else:
            out[-1] += "\n" + line
    return out


def hang_reports(m: Mount) -> list[str]:
    return [r for r in records(m.log_text()) if HEADER.search(r.splitlines()[0])]


def section(report: str, start: str, end: str) -> list[str]:
    """The lines of `report` after the line starting with `start` up to the one with `end`."""
    lines = report.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith(start))
    last = next(i for i, line in enumerate(lines) if i > first and line.strip().startswith(end))
    return [line.strip() for line in lines[first + 1 : last]]


def make_file(m: Mount, name: str) -> tuple[str, int]:
    path = m.path(name)
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    return path, os.stat(path).st_ino


# --------------------------------------------------------------------------- real mounts


def test_hung_request_reported_once(mount_factory: MountFactory) -> None:
    m = mount_factory(opts={"dio_delay": DELAY_S, "hang_timeout": TIMEOUT_S})
    m.expect_log(HEADER.pattern)
    path, ino = make_file(m, "slow")
    with ThreadPoolExecutor(1) as pool:
        write = pool.submit(run_in_child, direct_write, path, b"h", timeout=60, mounts=[m])
        wait_for(lambda: hang_reports(m), "hang report", DELAY_S - 1)
        during = m.stats()
        assert not write.done(), "the write completed before the test looked (raise DELAY_S)"
        tid, written = write.result(timeout=60)
    assert written == 4096  # not aborted: the request completed
    wait_for(
        lambda: re.search(r"INFO .*hung request #\d+ \(WRITE\) answered", m.log_text()),
        "'answered' line",
        2,
    )
    after = m.stats()
    with open(path, "rb") as f:
        assert f.read() == b"h" * 4096

    assert during["hangs.detected"] == 1 and during["hangs.outstanding"] == 1
    assert after["hangs.detected"] == 1 and after["hangs.outstanding"] == 0
    heads = [r.splitlines()[0] for r in records(m.log_text())]  # one line per log record
    naming = [line for line in heads if re.search(rf"\bWRITE inode={ino}\b", line)]
    assert len(naming) == 1, "\n".join(naming)
    (report,) = hang_reports(m)
    header = report.splitlines()[0]
    assert HEADER.search(header).groups() == ("WRITE", str(ino))  # type: ignore[union-attr]
    assert "off=0 len=4096" in header and f"requested by tid {tid}" in header
    client_stack = section(report, f"requesting thread {tid}:", "the handler awaits")
    assert client_stack and all(line.startswith("[<") for line in client_stack), client_stack
    assert any("fuse_" in line for line in client_stack), client_stack
    awaits = section(report, "the handler awaits", "daemon pid")
    assert any("diofs/dio.py" in line for line in awaits), awaits
    for part in ("daemon Python stacks", "'MainThread'", "daemon kernel stacks", "trio tasks"):
        assert part in report


def test_no_report_without_delay(mount_factory: MountFactory) -> None:
    """The same write, buffered and metadata requests for over twice the timeout, and a file
    kept open all along (an open handle is no outstanding request): nothing is reported."""
    m = mount_factory(opts={"hang_timeout": TIMEOUT_S})
    path, _ino = make_file(m, "fast")
    deadline = time.monotonic() + 2.5 * TIMEOUT_S
    with open(m.path("held-open"), "wb") as held:
        while time.monotonic() < deadline:
            assert run_in_child(direct_write, path, b"f", timeout=30, mounts=[m])[1] == 4096
            held.write(b"x" * 8192)
            os.listdir(m.mnt)
            time.sleep(0.05)
    s = m.stats()
    assert s["hangs.detected"] == 0 and s["hangs.outstanding"] == 0
    assert "hung request" not in m.log_text()


def test_hang_timeout_zero_disables(mount_factory: MountFactory) -> None:
    m = mount_factory(opts={"dio_delay": 2.5, "hang_timeout": 0})
    path, _ino = make_file(m, "slow")
    assert run_in_child(direct_write, path, b"z", timeout=60, mounts=[m])[1] == 4096
    assert "hangs.detected" not in m.stats()
    assert "hung request" not in m.log_text()
    assert "hang detector off" in m.log_text()


def test_default_hang_timeout_is_on(mount_factory: MountFactory) -> None:
    s = mount_factory().stats()
    assert s["hangs.detected"] == 0 and s["hangs.outstanding"] == 0


@FOREGROUND
@pytest.mark.parametrize("value", ["abc", "-1", "", "nan", "inf", "1s"])
def test_bad_hang_timeout(image: Path, mnt: Path, value: str, foreground: bool) -> None:
    proc = try_mount(image, mnt, "-o", f"hang_timeout={value}", foreground=foreground)
    assert_one_line_error(proc, "mount.diofs", contains="hang_timeout")


# --------------------------------------------------------------------------- syslog


@contextlib.contextmanager
def dev_log() -> Iterator[socket.socket]:
    """A syslog stand-in bound at /dev/log for the duration (only if there is none)."""
    if os.path.exists(hang_syslog_path()):
        pytest.skip("/dev/log exists (a real syslog daemon): not replacing it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(hang_syslog_path())
    except OSError as exc:
        sock.close()
        pytest.skip(f"cannot bind /dev/log: {exc}")
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(hang_syslog_path())


def hang_syslog_path() -> str:
    from diofs.cli.common import SYSLOG_SOCKET

    return SYSLOG_SOCKET


def test_background_daemon_reports_to_syslog(mount_factory: MountFactory, tmp_path: Path) -> None:
    """mount.diofs without --log daemonizes and logs to syslog: the report arrives there, one
    datagram per line, with ident diofs[PID]."""
    m = mount_factory(mount=False)  # only its image and mountpoint: this daemon is ours to run
    with dev_log() as syslog:
        syslog.settimeout(0.2)
        proc = subprocess.run(
            [
                *cli("mount.diofs"),
                str(m.image),
                str(m.mnt),
                "-o",
                f"dio_delay={DELAY_S},hang_timeout={TIMEOUT_S}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
        conn_id = watchdog.connection_id(m.mnt) if mountinfo.is_mounted(m.mnt) else None
        daemon_pid: int | None = None
        try:
            assert proc.returncode == 0, proc.stderr
            assert conn_id is not None
            lines: list[bytes] = []
            mounted = re.compile(
                rf"<30>diofs\[(\d+)\]: INFO .*: mounted {re.escape(str(m.image))} on "
                rf"{re.escape(str(m.mnt))} "
            )
            deadline = time.monotonic() + 10
            while daemon_pid is None and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    lines.append(syslog.recv(65536))
                    if found := mounted.match(lines[-1].decode()):
                        daemon_pid = int(found.group(1))
            assert daemon_pid is not None, f"no 'mounted' line in syslog: {lines}"
            ref = watchdog.MountRef(str(m.mnt), conn_id, daemon_pid)
            path, ino = make_file(m, "slow")
            with ThreadPoolExecutor(1) as pool:
                write = pool.submit(
                    watchdog.run_with_deadline, direct_write, 60, args=(path, b"s"), refs=[ref]
                )
                deadline = time.monotonic() + DELAY_S + 5
                while time.monotonic() < deadline and not any(b"answered" in x for x in lines):
                    with contextlib.suppress(TimeoutError):
                        lines.append(syslog.recv(65536))
                result = write.result(timeout=60)
            assert not result.timed_out and result.value[1] == 4096
            ours = [x.decode() for x in lines if re.match(rb"<\d+>diofs\[%d\]: " % daemon_pid, x)]
            header = [x for x in ours if HEADER.search(x)]
            assert len(header) == 1 and header[0].startswith("<28>"), header  # daemon.warning
            assert HEADER.search(header[0]).groups() == ("WRITE", str(ino))  # type: ignore[union-attr]
            assert any(re.search(r"\[<\w+>\] fuse_", x) for x in ours), "no client stack line"
            assert all("\n" not in x for x in ours)
            assert read_stats(m.mnt)["hangs.detected"] == 1
        finally:
            _unmount_background(m.mnt, conn_id, daemon_pid)
    m.fsck()


def _unmount_background(mnt: Path, conn_id: int | None, daemon_pid: int | None) -> None:
    """fusermount3 -u, then wait for the daemon to exit; rescue if anything is left."""
    if mountinfo.is_mounted(mnt):
        subprocess.run(
            ["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60, check=False
        )
    watchdog.wait_gone([daemon_pid], 30)
    if mountinfo.is_mounted(mnt):
        watchdog.rescue([watchdog.MountRef(str(mnt), conn_id, daemon_pid)], reason="cleanup")
        pytest.fail(f"{mnt} was still mounted after fusermount3 -u")
    if daemon_pid is not None and watchdog.process_alive(daemon_pid):
        pytest.fail(f"daemon {daemon_pid} did not exit after unmount")


# --------------------------------------------------------------------------- pure parts


def _entry(fn: Any, ops: Any, *args: Any, start_s: float = 0.0, binding: Any = None) -> Any:
    return (start_s, fn, None, ops, args, {}, binding)


class _Handles:
    def get(self, fh: int) -> Any:
        return SimpleNamespace(inode=SimpleNamespace(ino=fh + 100))


def test_describe_names_opcode_inode_offset_length() -> None:
    ops = SimpleNamespace(handles=_Handles())
    read = Operations.read.__wrapped__  # type: ignore[attr-defined]
    write = Operations.write.__wrapped__  # type: ignore[attr-defined]
    lookup = Operations.lookup.__wrapped__  # type: ignore[attr-defined]
    fallocate = Operations.fallocate.__wrapped__  # type: ignore[attr-defined]
    assert hang_detector.describe(_entry(read, ops, 3, 8192, 4096, binding=(77, 0))) == (
        "READ inode=103 fh=3 off=8192 size=4096",
        77,
    )
    assert hang_detector.describe(_entry(write, ops, 4, 0, b"x" * 512, binding=(0, 0))) == (
        "WRITE inode=104 fh=4 off=0 len=512",
        0,
    )
    assert hang_detector.describe(_entry(fallocate, ops, 5, 2, 0, 4096, binding=(9, 0))) == (
        "FALLOCATE inode=105 fh=5 mode=0o2 offset=0 length=4096",
        9,
    )
    ctx = SimpleNamespace(pid=4321)
    assert hang_detector.describe(_entry(lookup, ops, 1, b"name", ctx)) == (
        "LOOKUP parent_inode=1 name=b'name'",
        4321,
    )


def test_scan_reports_once_then_answered(caplog: pytest.LogCaptureFixture) -> None:
    ops = SimpleNamespace(handles=_Handles())
    read = Operations.read.__wrapped__  # type: ignore[attr-defined]
    table: dict[int, Any] = {}
    det = hang_detector.HangDetector(5.0, table=table)
    table[1] = _entry(read, ops, 1, 0, 4096, start_s=100.0, binding=(threading.get_native_id(), 0))
    table[2] = _entry(read, ops, 2, 0, 4096, start_s=104.0, binding=(0, 0))
    caplog.set_level(logging.INFO, logger="diofs.hang_detector")
    assert det.scan(104.9) == []
    (report,) = det.scan(105.0)
    assert report.startswith("hung request #1: READ inode=101 fh=1 off=0 size=4096 outstanding 5.0")
    assert "daemon Python stacks" in report and "outstanding requests (2, oldest first)" in report
    assert det.scan(106.0) == [] and det.detected == 1  # once per request
    assert det.count_outstanding(106.0) == 1
    (second,) = det.scan(109.0)
    assert "requested by the kernel itself" in second and "daemon Python stacks" in second
    del table[1]
    assert det.scan(110.0) == []
    assert any(re.search(r"hung request #1 \(READ\) answered", r.message) for r in caplog.records)
    assert det.detected == 2 and det.count_outstanding(110.0) == 1


def test_check_timeout() -> None:
    assert hang_detector.check_timeout(0.0) == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            hang_detector.check_timeout(bad)


def test_syslog_handler_one_datagram_per_line(tmp_path: Path) -> None:
    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(5)
        handler = syslog_handler(address)
        assert isinstance(handler, SyslogLines)
        try:
            record = logging.LogRecord(
                "diofs.x", logging.WARNING, __file__, 1, "one\ntwo", None, None
            )
            handler.emit(record)
            got = [server.recv(4096), server.recv(4096)]
        finally:
            handler.close()
    ident = f"<28>diofs[{os.getpid()}]: ".encode()
    assert got == [ident + b"WARNING diofs.x: one", ident + b"two"]


def test_syslog_handler_long_record_arrives_whole(tmp_path: Path) -> None:
    """A 200-line record outruns the server's queue (net.unix.max_dgram_qlen, 10 by default):
    with a server that keeps reading, every line still arrives, in order."""
    address = str(tmp_path / "log")
    got: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(2)
        handler = syslog_handler(address)

        def receive() -> None:
            with contextlib.suppress(TimeoutError):
                while len(got) < 200:
                    got.append(server.recv(4096))
                    time.sleep(0.0005)  # a server slower than the sender

        reader = threading.Thread(target=receive)
        reader.start()
        try:
            text = "\n".join(f"line {i}" for i in range(200))
            handler.emit(logging.LogRecord("x", logging.WARNING, __file__, 1, text, None, None))
        finally:
            reader.join(10)
            handler.close()
    assert [g.rsplit(b" ", 1)[-1] for g in got] == [str(i).encode() for i in range(200)]
    assert handler.dropped == 0  # type: ignore[attr-defined]


def test_syslog_handler_never_blocks(tmp_path: Path) -> None:
    """A syslog server that reads nothing: the handler waits a bounded time, then drops lines
    at once instead of waiting again for every message."""
    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        handler = syslog_handler(address)
        try:
            t0 = time.monotonic()
            for i in range(5000):
                record = logging.LogRecord("x", logging.INFO, __file__, 1, f"{i}", None, None)
                handler.emit(record)
            assert time.monotonic() - t0 < SyslogLines.RECORD_WAIT_S + 3
            assert handler.dropped > 4000  # type: ignore[attr-defined]
        finally:
            handler.close()


def test_syslog_handler_missing_socket(tmp_path: Path) -> None:
    assert isinstance(syslog_handler(str(tmp_path / "none")), logging.NullHandler)
