"""umount.diofs MOUNTPOINT|IMAGE [-l] [-f] [-n] [-r] [-v] [-t TYPE] [--timeout S]

Unmount a diofs mount and return only once its daemon has written everything back, made its
final commit durable and exited; exit with its status. This is the command for scripts:
`fusermount3 -u` (and umount(2)) return as soon as the kernel has detached the mount, before
the daemon's final commit, so a script that then copies, checks or mounts the image may see
an old commit.

umount(8) runs it too, through two helpers that scripts/setup installs (measured with
util-linux 2.38.1; `umount -i` runs no helper):
  - /sbin/umount.fuse.diofs -> umount.diofs: run as `umount.fuse.diofs MNT [-l|-f|-n|-r|-v]`
    when umount(8) finds the mount's type in mountinfo: a relative path, the image path,
    -l or -f, a utab entry;
  - /sbin/umount.fuse, a shell script running `umount.diofs --fuse-helper ARGS`: for an
    absolute mountpoint umount(8) takes the type from statfs(), which says only `fuse`, and
    runs `umount.fuse MNT -n [...]`. With --fuse-helper, a mount that is not diofs gets
    `umount -i ARGS`, what umount(8) would have done without the helper.

How (never stat()s the mountpoint, which may hang): the mount comes from
/proc/self/mountinfo (by mountpoint, or by source = the image path); the daemon's pid from its
status record (diofs.daemon_status), found by the mount's device number; then
`fusermount3 -u`, a wait on a pidfd of the daemon, and its final status from the record.

  -l   lazy: detach now (fusermount3 -u -z); the daemon finishes when the last user has gone,
       so this does not wait for it (exit 0 once detached)
  -f   force (root): abort the FUSE connection and unmount (umount2 MNT_FORCE); requests in
       flight fail, the daemon still writes back what it holds, and this waits for it
  -n, -r, -v, -t TYPE   accepted from umount(8); -v prints what was done, -t must be fuse.diofs
  --timeout S   give up waiting for the daemon after S seconds (exit 10; default: wait)

Exit codes: 0 unmounted, the daemon committed cleanly and exited; 8 not a diofs mount, or
the unmount failed (busy: the one-line message is fusermount3's); 9 the daemon reported a
failed final writeback or commit (its message follows); 10 unmounted, but the daemon's status
cannot be known (it died without reporting one, there is no record, or --timeout expired).
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import subprocess
import time

from diofs import daemon_status, mountinfo
from diofs.cli.common import ArgumentParser, run_main
from diofs.errors import (
    EXIT_DAEMON_FAILED,
    EXIT_STATUS_UNKNOWN,
    EXIT_UNMOUNT_FAILED,
    DiofsError,
)

MNT_FORCE = 1
# umount(8) runs helpers with PATH reset; fusermount3 lives in one of these
FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def find_target(arg: str) -> mountinfo.MountInfo | None:
    """The topmost mount whose mountpoint is `arg`, else the one whose source is `arg` (the
    image path). Only the parent directory is resolved (realpath of the mountpoint itself
    would stat the mount's root, which may hang)."""
    path = os.path.abspath(arg)
    candidates = [
        path,
        os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)),
    ]
    infos = mountinfo.mounts()
    for p in candidates:
        found = [m for m in infos if m.mountpoint == p]
        if found:
            return found[-1]  # later lines are mounted on top of earlier ones
    by_source = [m for m in infos if m.source in candidates and m.fstype.startswith("fuse")]
    return by_source[-1] if by_source else None


def mount_uid(m: mountinfo.MountInfo) -> int:
    """The user who mounted (FUSE's `user_id=` super option)."""
    for opt in m.super_options.split(","):
        if opt.startswith("user_id="):
            return int(opt.partition("=")[2])
    return os.getuid()


def fusermount3() -> str:
    path = os.environ.get("PATH") or ""
    found = shutil.which("fusermount3", path=f"{path}:{FALLBACK_PATH}" if path else FALLBACK_PATH)
    if found is None:
        raise DiofsError("fusermount3 not found (install fuse3)", EXIT_UNMOUNT_FAILED)
    return found


def detach(mnt: str, *, lazy: bool, force: bool) -> None:
    """Unmount `mnt` (the kernel side only; the daemon then finishes by itself)."""
    if force:
        if os.geteuid() != 0:
            raise DiofsError("-f needs root", EXIT_UNMOUNT_FAILED)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mnt), MNT_FORCE) != 0:
            err = ctypes.get_errno()
            raise DiofsError(f"cannot unmount {mnt}: {os.strerror(err)}", EXIT_UNMOUNT_FAILED)
        return
    argv = [fusermount3(), "-u", *(["-z"] if lazy else []), mnt]
    proc = subprocess.run(
        argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        why = lines[-1] if lines else f"fusermount3 exited {proc.returncode}"
        raise DiofsError(why.split("fusermount3: ", 1)[-1], EXIT_UNMOUNT_FAILED)


def open_daemon(rec: daemon_status.Record | None) -> int | None:
    """A pidfd of the recorded daemon, or None if it is not running any more."""
    if rec is None:
        return None
    try:
        fd = os.pidfd_open(rec.pid)
    except ProcessLookupError:
        return None
    if not rec.process_alive():  # checked after opening: the pidfd pins this process
        os.close(fd)
        return None
    return fd


def wait_exit(pidfd: int, timeout: float | None) -> bool:
    """Wait until the process of `pidfd` has exited; False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if poller.poll(None if left is None else int(left * 1000) + 1):
            return True
        if left == 0.0:
            return False


def delegate_unless_diofs(argv: list[str]) -> None:
    """--fuse-helper: if the target of umount(8)'s helper arguments is not a diofs mount,
    replace this process by `umount -i ARGS` (umount(8) without helpers)."""
    rest = iter(argv)
    target = None
    for arg in rest:
        if arg in ("-t", "-N"):
            next(rest, None)
        elif not arg.startswith("-"):
            target = arg
            break
    m = find_target(target) if target else None
    if m is None or m.fstype != daemon_status.FSTYPE:
        path = os.environ.get("PATH") or FALLBACK_PATH
        umount8 = shutil.which("umount", path=path) or "/bin/umount"
        os.execv(umount8, [umount8, "-i", *argv])


def umount(argv: list[str]) -> int:
    if argv[:1] == ["--fuse-helper"]:
        argv = argv[1:]
        delegate_unless_diofs(argv)
    p = ArgumentParser(prog="umount.diofs", description=__doc__)
    p.add_argument("target", help="mountpoint (or the image path)")
    p.add_argument("-l", dest="lazy", action="store_true", help="lazy: detach, do not wait")
    p.add_argument("-f", dest="force", action="store_true", help="force (abort the connection)")
    p.add_argument("-n", action="store_true", help="ignored (no mtab)")
    p.add_argument("-r", action="store_true", help="ignored")
    p.add_argument("-v", dest="verbose", action="store_true", help="say what was done")
    p.add_argument("-t", dest="fstype", help="filesystem type (must be fuse.diofs)")
    p.add_argument("--timeout", type=float, help="seconds to wait for the daemon (default: wait)")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    if a.fstype not in (None, daemon_status.FSTYPE):
        raise DiofsError(f"-t {a.fstype}: umount.diofs unmounts fuse.diofs", EXIT_UNMOUNT_FAILED)
    m = find_target(a.target)
    if m is None:
        raise DiofsError(f"{a.target}: not mounted", EXIT_UNMOUNT_FAILED)
    mnt = m.mountpoint
    if m.fstype != daemon_status.FSTYPE:
        raise DiofsError(f"{mnt} is not a diofs mount (type {m.fstype})", EXIT_UNMOUNT_FAILED)
    uid = mount_uid(m)
    found = daemon_status.find(m, uid)
    path, rec = found if found else (None, None)
    pidfd = open_daemon(rec)
    try:
        detach(mnt, lazy=a.lazy, force=a.force)
        if a.lazy:
            if a.verbose:
                print(f"umount.diofs: {mnt} detached (lazy: its daemon was not waited for)")
            return 0
        if path is None or rec is None:
            where = daemon_status.run_dir(uid) / f"{m.major}:{m.minor}.*.json"
            raise DiofsError(
                f"unmounted {mnt}, but its daemon's status cannot be known (no record {where})",
                EXIT_STATUS_UNKNOWN,
            )
        if pidfd is None and rec.status is None:
            raise DiofsError(
                f"unmounted {mnt}, but its daemon (pid {rec.pid}) had died without a final "
                f"commit; check the image with fsck.diofs {rec.image}",
                EXIT_STATUS_UNKNOWN,
            )
        if pidfd is not None and not wait_exit(pidfd, a.timeout):
            raise DiofsError(
                f"unmounted {mnt}, but its daemon (pid {rec.pid}) is still writing back after "
                f"{a.timeout:g} s: its final status is not known yet",
                EXIT_STATUS_UNKNOWN,
            )
    finally:
        if pidfd is not None:
            os.close(pidfd)
    final = daemon_status.read(path)  # this daemon's own file: nobody else writes it
    path.unlink(missing_ok=True)
    if final is not None and final.start_ticks != rec.start_ticks:
        final = None
    if final is None or final.status is None:
        raise DiofsError(
            f"unmounted {mnt}, but its daemon (pid {rec.pid}) exited without reporting a final "
            f"status (killed?); check the image with fsck.diofs {rec.image}",
            EXIT_STATUS_UNKNOWN,
        )
    if final.status != 0:
        raise DiofsError(
            f"daemon of {mnt} (pid {rec.pid}) exited {final.status}: {final.message}",
            EXIT_DAEMON_FAILED,
        )
    if a.verbose:
        print(f"umount.diofs: {mnt} unmounted; {rec.image} committed and closed")
    return 0


def main(argv: list[str] | None = None) -> None:
    run_main("umount.diofs", umount, argv)
