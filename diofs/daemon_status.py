"""The daemon's status record: how umount.diofs, which is not the daemon's parent, learns
which process serves a mount, waits for it to end, and learns how it ended.

Why a record: `fusermount3 -u` and umount(2) return as soon as the kernel has detached the
mount; the daemon then still writes its cache back and makes the final commit (issue 17:
fsck right after `fusermount3 -u` saw the commit before `rm -rf`). Only the daemon knows
when that is done and whether it worked, and only a parent can read an exit status.

One JSON file per daemon, in `run_dir(uid)` of the mounting user (/run/diofs for root,
/run/user/UID/diofs if that exists, else /tmp/diofs-UID, mode 0700), named after the mount's
device number as /proc/self/mountinfo shows it and the daemon's pid (`0:52.1234.json`).
umount.diofs finds the device and the user (`user_id=`) in mountinfo, so it never stat()s a
mountpoint that may hang, and the image path does not need to be in the mount options
(pyfuse3 only passes ASCII options).

Why the pid is in the name, and which record is the mount's (`find`): the kernel frees the
device number when the mount is detached, before that daemon has finished, so a new mount
may get the same number while the old daemon still writes back (seen in tests running side
by side: the old daemon's final status overwrote the new mount's record). Each daemon writes
only its own file; the mount's daemon is the one that published last for the number
(`published_ns`, CLOCK_BOOTTIME): it published after its mount existed, which was after the
previous mount with that number was gone. A record also names its mount's id (mountinfo's
first field), and only a record of the mount being unmounted counts: a daemon killed before
it published must not be reported by an earlier daemon's record for the same number (seen
once in CI: umount.diofs exited 0 for a killed daemon).

Fields: `pid` and `start_ticks` (field 22 of /proc/PID/stat: with the pid it names one
process, so a reused pid is recognised), `published_ns`, `image`, `mountpoint`; `status`
(None while the daemon serves, then the daemon's exit code: 0 = final writeback and commit
durable) and `message` (one line when status != 0).

Life cycle:
  1. the daemon writes the record once the kernel shows its mount, before mount.diofs
     reports success (`Publisher.publish`);
  2. at its very end -- after the final commit returned (it fdatasyncs) and the image is
     closed -- it rewrites the record with its status (`Publisher.finish`), and only then
     releases the image lock (diofs.image_lock) and exits;
  3. umount.diofs reads the record, opens a pidfd, unmounts, waits for the pid to exit,
     reads the record again and removes it.
A daemon killed before step 2 leaves status None: its reader says the status cannot be known.
Records nobody removed (unmounted with fusermount3, daemon killed) are pruned at step 1 of a
later daemon once their process is gone and they are PRUNE_AFTER_S old (long past the moment
an umount.diofs waiting for that daemon reads it).
Writes are atomic (temporary file + rename) and not fsynced: the record says how a process
ended, which a reboot makes moot. A record that cannot be written costs umount.diofs its
answer, never the mount: the daemon logs it at INFO and carries on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from diofs import mountinfo

log = logging.getLogger(__name__)

FSTYPE = "fuse.diofs"
PRUNE_AFTER_S = 600


def run_dir(uid: int) -> Path:
    """Where records of mounts made by `uid` live."""
    if uid == 0:
        return Path("/run/diofs")
    user_run = Path(f"/run/user/{uid}")
    with contextlib.suppress(OSError):
        if user_run.is_dir() and user_run.stat().st_uid == uid:
            return user_run / "diofs"
    return Path(f"/tmp/diofs-{uid}")


def record_path(major: int, minor: int, pid: int, uid: int) -> Path:
    return run_dir(uid) / f"{major}:{minor}.{pid}.json"


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: fields after the last ')'
    fields = text[text.rindex(b")") + 2 :].split()
    return int(fields[19])  # field 22 overall


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    pid: int
    start_ticks: int
    published_ns: int
    image: str
    mountpoint: str
    status: int | None = None
    message: str = ""
    mount_id: int = 0  # the mount's id in /proc/self/mountinfo (0: a record without one)

    def process_alive(self) -> bool:
        """The recorded process still exists (not a new process that reused its pid)."""
        return process_start_ticks(self.pid) == self.start_ticks


def read(path: Path) -> Record | None:
    """The record at `path`, or None if there is none (or it is not one of ours)."""
    try:
        data = json.loads(path.read_text())
        return Record(**data)
    except (OSError, ValueError, TypeError):
        return None


def find(m: mountinfo.MountInfo, uid: int) -> tuple[Path, Record] | None:
    """The record of the daemon serving the mount `m` (the newest for its device number and
    mount id, see the module docstring), with its path; None if there is none."""
    best: tuple[Path, Record] | None = None
    for path in run_dir(uid).glob(f"{m.major}:{m.minor}.*.json"):
        rec = read(path)
        if rec is None or rec.mount_id != m.mount_id:
            continue
        if best is None or rec.published_ns > best[1].published_ns:
            best = (path, rec)
    return best


def prune(directory: Path) -> None:
    """Remove records of processes that are gone and were written PRUNE_AFTER_S ago."""
    now = time.time()
    for path in directory.glob("*.json"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > PRUNE_AFTER_S:
                rec = read(path)
                if rec is None or not rec.process_alive():
                    path.unlink()


def own_mount(mountpoint: str) -> mountinfo.MountInfo | None:
    """The topmost diofs mount on `mountpoint` (the canonical path, as the kernel shows it)."""
    m = mountinfo.find_mount(mountpoint)
    return m if m is not None and m.fstype == FSTYPE else None


class Publisher:
    """The daemon's side: `publish()` once mounted, `finish()` at the end. Single-threaded
    use by the daemon's main thread (before and after trio.run)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.record: Record | None = None

    def publish(self, image: str, mountpoint: str) -> None:
        """Write the record for our mount on `mountpoint` (its canonical path, computed
        before the mount existed: resolving it now would stat our own, not yet served,
        mount root)."""
        m = own_mount(mountpoint)
        ticks = process_start_ticks(os.getpid())
        if m is None or ticks is None:
            log.info("no status record: mount %s not found in /proc/self/mountinfo", mountpoint)
            return
        self.path = record_path(m.major, m.minor, os.getpid(), os.getuid())
        published = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.record = Record(os.getpid(), ticks, published, image, mountpoint, mount_id=m.mount_id)
        self._write()
        with contextlib.suppress(OSError):
            prune(self.path.parent)

    def finish(self, status: int, message: str = "") -> None:
        """Record the daemon's exit status (call it after the final commit and close)."""
        if self.record is not None:
            self.record = dataclasses.replace(self.record, status=status, message=message)
            self._write()

    def _write(self) -> None:
        assert self.path is not None and self.record is not None
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            self.path.parent.mkdir(mode=0o700 if os.getuid() else 0o755, exist_ok=True)
            if self.path.parent.stat().st_uid != os.getuid():
                raise PermissionError(f"{self.path.parent} belongs to someone else")
            tmp.write_text(json.dumps(dataclasses.asdict(self.record)) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.info("cannot write status record %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.path = self.record = None
