"""`mount -t fuse.diofs IMAGE MNT` and fstab lines work (docs/fstab.md).

How mount(8) reaches diofs on this Debian (util-linux 2.38, fuse3 3.14), measured:
  - `mount -t fuse.diofs IMG MNT -o OPTS` runs `/sbin/mount.fuse.diofs IMG MNT -o rw,OPTS`
    if that helper exists (fstab-only options such as noauto are removed; nofail and _netdev
    are passed on). Otherwise it runs `/sbin/mount.fuse` (= mount.fuse3), which runs
    `/bin/sh -c 'diofs IMG MNT -o rw,OPTS,dev,suid'` with PATH unset (so /usr/local/bin,
    /usr/bin, ...) -- and our `diofs` command is the stats tool, so that route is not used.
  - `mount -t fuse -o OPTS '/path/to/mount.diofs#IMG' MNT` runs
    `/path/to/mount.diofs IMG MNT -o rw,OPTS,dev,suid` through mount.fuse3: no system file
    needed.
The helper route needs the symlink `/sbin/mount.fuse.diofs -> <venv>/bin/mount.diofs`, which
scripts/setup should install; the test installs it temporarily if it is missing (and removes
only what it installed). Every mount here is made by mount(8) (the daemon is a grandchild we
started); it is unmounted with fusermount3 and its daemon must exit by itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from diofs import mountinfo
from diofs.cli.stats import read_stats
from harness import watchdog
from harness.mount import REPO, cli, cli_env, fuse_unavailable_reason, run_cli

HELPER = Path("/sbin/mount.fuse.diofs")

pytestmark = pytest.mark.skipif(shutil.which("mount") is None, reason="mount(8) is missing")


def _mount_diofs_script() -> str:
    argv = cli("mount.diofs")
    if len(argv) != 1:
        pytest.skip("mount.diofs console script is not installed (pip install -e .)")
    return argv[0]


def _daemon_pids(mnt: Path) -> list[int]:
    """Pids of processes whose command line names our (unique, temporary) mountpoint."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(str(mnt)) in args and any(b"mount" in a for a in args[:3]):
            pids.append(int(entry))
    return pids


@contextlib.contextmanager
def mounted_by_mount8(
    argv: list[str], mnt: Path, *, checkout_on_path: bool = True
) -> Iterator[None]:
    """Run a mount(8) command, require success, yield, then unmount and check the daemon.
    `checkout_on_path=False` runs it as a user would: without the checkout on PYTHONPATH."""
    env = cli_env()
    if not checkout_on_path:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.pop("PATH", None)  # mount(8) drops PATH for its helpers anyway
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    conn_id = watchdog.connection_id(mnt) if mountinfo.is_mounted(mnt) else None
    pids = _daemon_pids(mnt)
    try:
        assert proc.returncode == 0, f"{argv} failed ({proc.returncode}): {proc.stderr}"
        assert mountinfo.is_mounted(mnt), f"{argv} returned 0 but nothing is mounted"
        yield
        um = subprocess.run(
            ["fusermount3", "-u", str(mnt)], capture_output=True, text=True, timeout=60, check=False
        )
        assert um.returncode == 0, um.stderr
        assert watchdog.wait_gone(pids, 30), "daemon did not exit after unmount"
    finally:
        if mountinfo.is_mounted(mnt):
            ref = watchdog.MountRef(str(mnt), conn_id, pids[0] if pids else None)
            watchdog.rescue([ref], reason="fstab test cleanup")
        watchdog.wait_gone(pids, 10)
        for pid in pids:  # our grandchild daemon, identified by our unique mountpoint
            if watchdog.process_alive(pid):
                os.kill(pid, 9)


@pytest.fixture(autouse=True)
def _mount8_can_run() -> None:
    """Every test here mounts with mount(8) and a FUSE helper: skip where that cannot run."""
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(f"real mounts unavailable: {reason}")
    if os.geteuid() != 0:
        pytest.skip("mount(8) with a FUSE helper needs root here")


@pytest.fixture
def helper() -> Iterator[Path]:
    """/sbin/mount.fuse.diofs, installed for the test if setup did not install it."""
    script = _mount_diofs_script()
    if HELPER.exists() or HELPER.is_symlink():
        yield HELPER
        return
    try:
        HELPER.symlink_to(script)
    except OSError as exc:
        pytest.skip(f"cannot install {HELPER}: {exc}")
    try:
        yield HELPER
    finally:
        with contextlib.suppress(OSError):
            if HELPER.is_symlink() and os.readlink(HELPER) == script:
                HELPER.unlink()


def _use(mnt: Path) -> None:
    with open(mnt / "hello", "wb") as f:
        f.write(b"hello fstab")
    with open(mnt / "hello", "rb") as f:
        assert f.read() == b"hello fstab"
    assert json_ok(mnt)


def json_ok(mnt: Path) -> bool:
    return isinstance(read_stats(mnt), dict)


def test_mount_t_fuse_diofs(image: Path, mnt: Path, helper: Path) -> None:
    argv = ["mount", "-t", "fuse.diofs", "-o", "cache_size=16M", str(image), str(mnt)]
    with mounted_by_mount8(argv, mnt):
        m = mountinfo.find_mount(mnt)
        assert m is not None and m.fstype == "fuse.diofs", m
        _use(mnt)
    assert run_cli("fsck.diofs", image).returncode == 0


def test_fstab_line(image: Path, mnt: Path, helper: Path, tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{image} {mnt} fuse.diofs defaults,noauto,nofail,cache_size=16M 0 0\n")
    with mounted_by_mount8(["mount", "-T", str(fstab), str(mnt)], mnt):
        _use(mnt)
    # the data is on the image: mount it again through the same line
    with (
        mounted_by_mount8(["mount", "-T", str(fstab), str(mnt)], mnt),
        open(mnt / "hello", "rb") as f,
    ):
        assert f.read() == b"hello fstab"


def test_mount_fuse3_hash_syntax(image: Path, mnt: Path) -> None:
    """`mount -t fuse 'MOUNT.DIOFS#IMG' MNT` (via mount.fuse3, no helper file needed)."""
    script = _mount_diofs_script()
    argv = ["mount", "-t", "fuse", "-o", "cache_size=16M", f"{script}#{image}", str(mnt)]
    with mounted_by_mount8(argv, mnt):
        _use(mnt)


def test_repo_root_is_not_needed_as_cwd(image: Path, mnt: Path, helper: Path) -> None:
    """mount(8) runs the helper from the caller's cwd and environment; it must not depend on
    the checkout: run from / without the checkout on PYTHONPATH, the installed helper mounts,
    and the daemon's cwd is not the checkout."""
    argv = ["mount", "-t", "fuse.diofs", str(image), str(mnt)]
    old = os.getcwd()
    os.chdir("/")
    try:
        with mounted_by_mount8(argv, mnt, checkout_on_path=False):
            _use(mnt)
            cwds = {os.readlink(f"/proc/{pid}/cwd") for pid in _daemon_pids(mnt)}
            assert cwds and str(REPO) not in cwds, cwds
    finally:
        os.chdir(old)
