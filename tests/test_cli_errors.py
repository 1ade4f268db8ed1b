"""Bad input gives one clear line and a non-zero exit, never a traceback or a hang (SPEC 10).

Each test runs the real command (console script or `python mount.py`) in a subprocess with a
timeout, and checks: exit code != 0, exactly one line on stderr, starting with `<prog>: `,
and no "Traceback". Mount attempts that must fail are also checked to leave no mount behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diofs import mountinfo
from harness import watchdog
from harness.mount import (
    REPO,
    MountFactory,
    cli,
    fuse_unavailable_reason,
    run_argv,
    run_cli,
)


def assert_one_line_error(
    proc: subprocess.CompletedProcess[str], prog: str, contains: str | None = None
) -> str:
    assert proc.returncode != 0, f"exit 0; stdout={proc.stdout!r} stderr={proc.stderr!r}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith(f"{prog}: "), lines[0]
    if contains is not None:
        assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]


def mount_cmd(
    image: Path | str, mnt: Path | str, *args: str, foreground: bool = False
) -> list[str]:
    """The mount command: mount.diofs (daemonizing) or `python mount.py ... --foreground`."""
    if foreground:
        return [sys.executable, str(REPO / "mount.py"), str(image), str(mnt), "--foreground", *args]
    return [*cli("mount.diofs"), str(image), str(mnt), *args]


def try_mount(
    image: Path | str, mnt: Path | str, *args: str, foreground: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a mount that is expected to fail; make sure nothing stays mounted either way."""
    was_mounted = mountinfo.is_mounted(mnt)
    try:
        return run_argv(mount_cmd(image, mnt, *args, foreground=foreground))
    finally:
        if not was_mounted and mountinfo.is_mounted(mnt):
            unmount_unexpected(mnt)
            pytest.fail(f"mount of {image} on {mnt} succeeded (it should have failed)")


def unmount_unexpected(mnt: Path | str) -> None:
    """Cleanly unmount a mount that should not exist, and wait for its daemon to exit."""
    conn_id = watchdog.connection_id(mnt)
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60, check=False)
    deadline = time.monotonic() + 30
    while mountinfo.connection_waiting(conn_id) is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # the fusectl entry disappears when the daemon has closed /dev/fuse
    if mountinfo.is_mounted(mnt) or mountinfo.connection_waiting(conn_id) is not None:
        watchdog.rescue([watchdog.MountRef(str(mnt), conn_id, None)], reason="cleanup")


@pytest.fixture
def needs_mount_runtime() -> None:
    """Mount commands that get past argument checks need pyfuse3 importable."""
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(f"real mounts unavailable: {reason}")


FOREGROUND = pytest.mark.parametrize("foreground", [False, True], ids=["mount.diofs", "mount.py"])

# --------------------------------------------------------------------------- mkfs


@pytest.mark.parametrize("size", ["12Q", "0", "-5M", "abc", "", "1K", "64KiB"])
def test_mkfs_bad_size(tmp_path: Path, size: str) -> None:
    proc = run_argv([*cli("mkfs.diofs"), str(tmp_path / "img"), "--size", size])
    assert_one_line_error(proc, "mkfs.diofs")


def test_mkfs_missing_size_for_new_image(tmp_path: Path) -> None:
    proc = run_argv([*cli("mkfs.diofs"), str(tmp_path / "img")])
    assert_one_line_error(proc, "mkfs.diofs")


def test_mkfs_image_in_missing_directory(tmp_path: Path) -> None:
    proc = run_argv([*cli("mkfs.diofs"), str(tmp_path / "no" / "img"), "--size", "64M"])
    assert_one_line_error(proc, "mkfs.diofs")


def test_mkfs_image_is_directory(tmp_path: Path) -> None:
    proc = run_argv([*cli("mkfs.diofs"), str(tmp_path), "--size", "64M"])
    assert_one_line_error(proc, "mkfs.diofs")


@pytest.mark.parametrize(
    "args",
    [
        ["--block-size", "1000"],
        ["--block-size", "0"],
        ["--dio-align", "3"],
        ["--dio-align", "8192"],
        ["--block-size", "x"],
    ],
)
def test_mkfs_bad_geometry(tmp_path: Path, args: list[str]) -> None:
    proc = run_argv([*cli("mkfs.diofs"), str(tmp_path / "img"), "--size", "64M", *args])
    assert_one_line_error(proc, "mkfs.diofs")


def test_mkfs_reuses_existing_file(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(b"\xff" * (32 << 20))
    proc = run_argv([*cli("mkfs.diofs"), str(img), "--size", "32M"])
    assert proc.returncode == 0, proc.stderr
    assert run_cli("fsck.diofs", img).returncode == 0


def test_mkfs_unknown_option(tmp_path: Path) -> None:
    proc = run_argv([*cli("mkfs.diofs"), str(tmp_path / "img"), "--size", "64M", "--frobnicate"])
    assert_one_line_error(proc, "mkfs.diofs")


# --------------------------------------------------------------------------- fsck


def test_fsck_missing_image(tmp_path: Path) -> None:
    assert_one_line_error(run_argv([*cli("fsck.diofs"), str(tmp_path / "nope")]), "fsck.diofs")


def test_fsck_truncated_image(image: Path) -> None:
    os.truncate(image, 4096)
    assert_one_line_error(run_argv([*cli("fsck.diofs"), str(image)]), "fsck.diofs")


@pytest.mark.parametrize("content", ["zeros", "random", "empty"])
def test_fsck_foreign_image(tmp_path: Path, content: str) -> None:
    img = tmp_path / "foreign"
    img.write_bytes({"zeros": bytes(8 << 20), "random": os.urandom(8 << 20), "empty": b""}[content])
    assert_one_line_error(run_argv([*cli("fsck.diofs"), str(img)]), "fsck.diofs")


def test_fsck_clean_image_exits_zero(image: Path) -> None:
    proc = run_argv([*cli("fsck.diofs"), str(image)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- mount


@FOREGROUND
def test_mount_missing_image(tmp_path: Path, mnt: Path, foreground: bool) -> None:
    proc = try_mount(tmp_path / "nope", mnt, foreground=foreground)
    assert_one_line_error(proc, "mount.diofs")


@FOREGROUND
def test_mount_truncated_image(
    image: Path, mnt: Path, foreground: bool, needs_mount_runtime: None
) -> None:
    os.truncate(image, 4096)
    assert_one_line_error(try_mount(image, mnt, foreground=foreground), "mount.diofs")


@FOREGROUND
@pytest.mark.parametrize("content", ["zeros", "random"])
def test_mount_foreign_image(
    tmp_path: Path, mnt: Path, content: str, foreground: bool, needs_mount_runtime: None
) -> None:
    img = tmp_path / "foreign"
    img.write_bytes(bytes(16 << 20) if content == "zeros" else os.urandom(16 << 20))
    assert_one_line_error(try_mount(img, mnt, foreground=foreground), "mount.diofs")


@FOREGROUND
def test_mount_corrupted_superblock(
    image: Path, mnt: Path, foreground: bool, needs_mount_runtime: None
) -> None:
    with open(image, "r+b") as f:
        f.seek(0)
        raw = bytearray(f.read(4096))
        for i in range(0, 64, 3):
            raw[i] ^= 0x5A
        f.seek(0)
        f.write(raw)
    assert_one_line_error(try_mount(image, mnt, foreground=foreground), "mount.diofs")


@FOREGROUND
def test_mount_missing_mountpoint(image: Path, tmp_path: Path, foreground: bool) -> None:
    proc = try_mount(image, tmp_path / "nodir", foreground=foreground)
    assert_one_line_error(proc, "mount.diofs")


@FOREGROUND
def test_mount_mountpoint_is_file(image: Path, tmp_path: Path, foreground: bool) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"")
    proc = try_mount(image, f, foreground=foreground)
    assert_one_line_error(proc, "mount.diofs")


@FOREGROUND
@pytest.mark.parametrize(
    "opt",
    [
        "bogus=1",
        "cache_size=lots",
        "cache_size=1K",
        "backend=tape",
        "shootdown=maybe",
        "dio_align=3",
        "backend=crash",
        "backend=fault",
        "dio_align=",
    ],
)
def test_mount_bad_option(image: Path, mnt: Path, opt: str, foreground: bool) -> None:
    proc = try_mount(image, mnt, "-o", opt, foreground=foreground)
    assert_one_line_error(proc, "mount.diofs")


@FOREGROUND
def test_mount_unknown_bug(image: Path, mnt: Path, foreground: bool) -> None:
    proc = try_mount(image, mnt, "--bug", "no-such-bug", foreground=foreground)
    assert_one_line_error(proc, "mount.diofs", contains="no-such-bug")


@FOREGROUND
def test_mount_missing_arguments(foreground: bool) -> None:
    argv = [sys.executable, str(REPO / "mount.py")] if foreground else cli("mount.diofs")
    assert_one_line_error(run_argv(argv), "mount.diofs")


@FOREGROUND
def test_mount_busy_mountpoint(
    mount_factory: MountFactory, tmp_path: Path, foreground: bool
) -> None:
    first = mount_factory()
    mount_before = mountinfo.find_mount(first.mnt)
    second_image = tmp_path / "second"
    run_cli("mkfs.diofs", second_image, "--size", "64M", check=True)
    proc = run_argv(mount_cmd(second_image, first.mnt, foreground=foreground))
    if mountinfo.find_mount(first.mnt) != mount_before:
        unmount_unexpected(first.mnt)  # the second daemon mounted on top
        pytest.fail("a second diofs was mounted on top of a busy mountpoint")
    assert_one_line_error(proc, "mount.diofs")
    # the first mount is untouched and still serving
    assert mountinfo.find_mount(first.mnt) == mount_before, "the first mount was replaced"
    with open(first.path("still-there"), "wb") as f:
        f.write(b"ok")


@pytest.mark.file_image  # the first mount locks its URI, the second mounts the file
def test_mount_same_image_twice(mount_factory: MountFactory, tmp_path: Path) -> None:
    """A second daemon on an image already in use must refuse (two writers corrupt it)."""
    first = mount_factory()
    other = tmp_path / "other-mnt"
    other.mkdir()
    proc = try_mount(first.image, other)
    assert_one_line_error(proc, "mount.diofs")


# --------------------------------------------------------------------------- stats


def test_stats_on_non_diofs_directory(tmp_path: Path) -> None:
    assert_one_line_error(run_argv([*cli("diofs"), "stats", str(tmp_path)]), "diofs")


def test_stats_on_missing_path(tmp_path: Path) -> None:
    assert_one_line_error(run_argv([*cli("diofs"), "stats", str(tmp_path / "nope")]), "diofs")


def test_stats_bad_subcommand() -> None:
    assert_one_line_error(run_argv([*cli("diofs"), "frobnicate"]), "diofs")
