"""The watchdog and the mount harness rescue real hangs (harness/watchdog.py, harness/mount.py).

A hang is made for real by stopping the daemon (SIGSTOP): every request then waits in the
kernel, as in a daemon deadlock. Each test checks that the client comes back, that nothing
stays mounted, and that the report names the stuck task.
"""

from __future__ import annotations

import os
import signal

import pytest

from diofs import mountinfo
from harness import watchdog
from harness.mount import Mount, MountFactory, run_in_child


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _stopped(m: Mount) -> None:
    assert m.daemon is not None
    os.kill(m.daemon.pid, signal.SIGSTOP)


def _resume(m: Mount) -> None:
    if m.daemon is not None and m.daemon.poll() is None:
        os.kill(m.daemon.pid, signal.SIGCONT)


def test_connection_id_matches_stat(mounted: Mount) -> None:
    assert mounted.conn_id == os.minor(os.stat(mounted.mnt).st_dev)
    assert os.path.isdir(f"{mountinfo.FUSECTL}/{mounted.conn_id}")


def test_stack_report_names_threads(mounted: Mount) -> None:
    assert mounted.daemon is not None
    report = watchdog.stack_report([mounted.daemon.pid])
    assert f"pid {mounted.daemon.pid}" in report
    assert "state=" in report


def test_run_with_deadline_argv_rescues_hung_client(mounted: Mount) -> None:
    mounted.expect_rescue()
    with open(mounted.path("f"), "wb") as f:
        f.write(b"x")
    _stopped(mounted)
    try:
        result = mounted.run(["cat", mounted.path("f")], timeout=2)
    finally:
        _resume(mounted)
    assert result.timed_out
    assert result.returncode is not None, "the client was not reaped"
    assert "request_wait_answer" in result.report or "fuse" in result.report
    assert not mountinfo.is_mounted(mounted.mnt)


def test_run_in_child_raises_with_report(mounted: Mount) -> None:
    mounted.expect_rescue()
    with open(mounted.path("f"), "wb") as f:
        f.write(b"x")
    assert run_in_child(_read, mounted.path("f"), timeout=10, mounts=[mounted]) == b"x"
    _stopped(mounted)
    try:
        with pytest.raises(AssertionError, match="hung"):
            run_in_child(_read, mounted.path("f"), timeout=2, mounts=[mounted])
    finally:
        _resume(mounted)
    assert not mountinfo.is_mounted(mounted.mnt)


def test_run_in_child_reports_exceptions(mounted: Mount) -> None:
    with pytest.raises(AssertionError, match="FileNotFoundError"):
        run_in_child(_read, mounted.path("missing"), timeout=10)


def test_deadline_unblocks_the_test_itself(mounted: Mount) -> None:
    mounted.expect_rescue()
    _stopped(mounted)
    try:
        with mounted.deadline(2) as deadline, pytest.raises(OSError):
            os.stat(mounted.path("anything"))
    finally:
        _resume(mounted)
    assert deadline.expired
    assert "abort conn" in deadline.report
    assert not mountinfo.is_mounted(mounted.mnt)


def test_unexpected_log_line_is_caught(mounted: Mount) -> None:
    with open(mounted.log, "a") as f:
        f.write("00:00:00.000 WARNING diofs.test: injected by the test\n")
    assert any("injected" in line for line in mounted.unexpected_log_lines())
    mounted.expect_log("injected by the test")
    assert mounted.unexpected_log_lines() == []


def test_factory_leaves_nothing_behind(mount_factory: MountFactory) -> None:
    ms = [mount_factory(size="32M") for _ in range(3)]
    pids = [m.daemon.pid for m in ms if m.daemon is not None]
    assert mount_factory.cleanup() == []
    assert not any(mountinfo.is_mounted(m.mnt) for m in ms)
    assert not any(watchdog.process_alive(p) for p in pids)


def test_vanished_mount_is_reported(mounted: Mount) -> None:
    assert mounted.conn_id is not None
    watchdog.abort_connection(mounted.conn_id)
    watchdog.lazy_unmount(mounted.mnt)
    problems = mounted.cleanup()
    assert any("vanished" in p for p in problems), problems
    assert mounted.daemon is None


def test_lazy_unmount_detaches_only_the_mount_it_is_given(mount_factory: MountFactory) -> None:
    """lazy_unmount(A) detaches A (its daemon then exits), is a no-op on a path that is not
    mounted, and leaves every other mount serving."""
    a, b = mount_factory(size="16M"), mount_factory(size="16M")
    a.expect_rescue()  # a's mount vanishes under its Mount object: that is the test
    assert a.daemon is not None
    daemon = a.daemon
    watchdog.lazy_unmount(b.workdir)  # not a mountpoint (b's mount is below it)
    watchdog.lazy_unmount(a.mnt)
    assert not mountinfo.is_mounted(a.mnt)
    assert daemon.wait(timeout=30) == 0, "the daemon did not exit after its mount was detached"
    assert mountinfo.is_mounted(b.mnt)
    with open(b.path("f"), "wb") as f:
        f.write(b"still serving")
    with open(b.path("f"), "rb") as f:
        assert f.read() == b"still serving"
