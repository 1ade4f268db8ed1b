"""Randomized mixed-workload soak on ONE mount: nothing hangs, no data is lost, fsck is clean.

Six worker processes (each with its own seed, derived from one base seed) run at once for the
soak's length over a small shared set of files and directories, so that they collide:

  ns-a, ns-b  namespace operations as fsstress does them, in a shared tree `ns/` (3 directory
              names x 2 levels, 12 entry names shared by files, directories, hard links and
              symlinks): create (O_EXCL, one write of self-checking content), mkdir, rename
              (also over existing entries, directories included), link, symlink, unlink, rmdir,
              readdir (+ lstat of every entry), stat, chmod, utimes, read (a file with the
              soak's header must be whole and match its CRC). Errnos the collisions produce
              (ENOENT, ESTALE, EEXIST, ENOTEMPTY, ENOTDIR, EISDIR, ELOOP, EPERM for link of a
              directory, EINVAL for a directory renamed into its own subtree) are tolerated,
              per operation, and counted; any other errno is an error. The shared data files
              are touched too: linked into `ns/`, stat'ed (their size never drops below FLOOR),
              chmod'ed, utime'd, and s0/s1 replaced by rename-over of a fresh file.
              Each namespace worker also owns `own/wN/`, a tree with a model (types, names,
              contents, modes, mtimes, link counts, symlink targets): every operation there
              must succeed and is checked right away, the whole tree at the end and again after
              a remount.
  fio         fio invocations of 2-3 s (`--time_based`, `--thread`) on 1-3 shared files with a
              random engine (psync, libaio, io_uring if it works here, posixaio, mmap, splice),
              direct or buffered, random/sequential read/write/rw, bs 512 B..256 KiB, iodepth
              1..16, 1-2 jobs; one in five is a write+verify (crc32c) job on a private file.
              A job error other than ENOENT fails the soak (no `--ignore_error`).
  mapper      MAP_SHARED writers (a long-lived mapping per shared file, writes + msync or not),
              O_DIRECT reads/writes from aligned (anonymous mmap) buffers of 512 B..1 MiB,
              buffered I/O, O_DSYNC opens, pwritev(RWF_DSYNC), fsync/fdatasync; and one fd of
              s1 shared by three threads: one toggles O_DIRECT with fcntl(F_SETFL) all the
              time, one submits native AIO (io_submit/io_getevents by ctypes syscalls) of
              aligned 512 B..64 KiB reads/writes, the main loop does aligned and deliberately
              misaligned I/O on it (EINVAL tolerated only for the misaligned ones).
  space       ftruncate up and down of shared files, the generic/029 sequence on a mapping
              (truncate, mwrite, truncate down, truncate up, mwrite), fallocate: default
              (os.posix_fallocate), PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE (with and without
              KEEP_SIZE), also over dirty mapped pages; fsync/fdatasync.
  private     tests/fsx.py's model checker (every path: buffered, cold, mmap, O_DIRECT,
              RWF_DSYNC, punch, zero, truncate, copy_file_range, replace, ...) on two private
              files plus the soak's own ops (O_DSYNC opens, posix_fallocate, generic/029 on a
              mapping, fcntl O_DIRECT toggling with a deliberately misaligned write), and
              tests/fsx.py's RegionWorker on bytes [512 KiB, 1 MiB) of the shared file s2,
              which every other worker leaves alone while working on the rest of that inode.

Shared files s0..s3 never get smaller than FLOOR (1 MiB): only `space` shrinks them, never
below FLOOR, and s0/s1 are replaced by files of FLOOR bytes; so MAP_SHARED accesses (ours and
fio's mmap engine) below FLOOR never SIGBUS. On s2 everybody but the owner stays out of
[512 KiB, 1 MiB) (fio uses `filesize=512k` there).

Hangs: every worker publishes a heartbeat (the oldest of its threads' progress times) in
shared memory; the test process polls them (and only /proc: it never touches the mount while
workers run). A worker without progress for STALL_S seconds, or still running STALL_S after the
end, is a hang: the watchdog reports the kernel stacks of the daemon and of every process of
the workers' process groups (fio included), SIGUSR1s the daemon (Python stacks to its log),
aborts the connection through fusectl and lazy-unmounts; then the workers' process groups are
killed by pid and the test checks that nothing is left (no mount, no live worker, no D-state
task of ours, the daemon exits) and fails with the hung workers' last operations, their seeds
and the report.

At the end: 0 hangs, 0 mismatches, 0 errors; unmount, an explicit fsck (must be clean),
remount, then the private files, the owned region and the own/ trees are checked again against
the models the workers sent back; teardown unmounts and fscks once more and requires a clean
daemon log. A summary line (minutes, operations by kind, tolerated errnos, hangs, mismatches,
fsck) is printed: run pytest with -s to see it.

Forms: `test_soak` (default suite, SOAK_SECONDS of workload, about 2 minutes in all) and
`test_soak_stress` (--stress; DIOFS_SOAK_MINUTES, default 30). Environment: DIOFS_SOAK_SEED
(base seed, default random; printed), DIOFS_SOAK_SECONDS (the default form's workload),
DIOFS_SOAK_STALL_S (hang threshold, default 75), DIOFS_SOAK_OPTS (mount options, `k=v,k=v`),
DIOFS_SOAK_BUGS (`--bug` switches, comma-separated: e.g. inval-before-reply shows the soak
catching the hangs of issue 12), DIOFS_SOAK_NO_OPS (operation names to leave out, for triage;
any worker's, e.g. dioread_into_map,shared_fd_misaligned).
Each worker logs every operation to tmp_path/soak/wN-KIND.log (rotated at 2 MiB); use
`--basetemp DIR` to keep them.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import faulthandler
import fcntl
import json
import mmap
import multiprocessing
import os
import platform
import random
import shutil
import signal
import stat
import struct
import subprocess
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import pytest

from diofs import mountinfo
from harness import watchdog
from harness.io import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    PAGE,
    cold_read,
    direct_pread,
    direct_pwrite,
    drop_kernel_cache,
    fallocate,
    read_full,
)
from harness.mount import Mount, MountFactory, process_stats, run_in_child
from tests.fsx import (
    WEIGHTS,
    Fsx,
    FsxMismatch,
    RegionWorker,
    _File,
)

KiB, MiB = 1 << 10, 1 << 20

SOAK_SECONDS = float(os.environ.get("DIOFS_SOAK_SECONDS", "100"))
STRESS_MINUTES = float(os.environ.get("DIOFS_SOAK_MINUTES", "30"))
STALL_S = float(os.environ.get("DIOFS_SOAK_STALL_S", "75"))
# operations left out (triage: keep a known bug from masking others), e.g. dioread_into_map
NO_OPS = frozenset(filter(None, os.environ.get("DIOFS_SOAK_NO_OPS", "").split(",")))
IMAGE_SIZE = "256M"

FLOOR = 1 * MiB  # shared files never get smaller
MAX_SIZE = 4 * MiB  # truncates go up to this; writes end below MAX_SIZE + 1 MiB
SHARED = ("s0", "s1", "s2", "s3")
REPLACEABLE = ("s0", "s1")  # the namespace workers rename fresh files over these
OWNED = "s2"  # bytes [REGION_LO, REGION_HI) belong to the private worker
REGION_LO, REGION_HI = 512 * KiB, 1 * MiB
TOGGLED = "s1"  # the mapper's fd shared by the fcntl toggler, the AIO thread and its loop
LOG_ROTATE = 2 * MiB
MAX_MESSAGES = 5  # messages kept per worker and kind (all are counted)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def zones(name: str, mapped: bool = False) -> list[tuple[int, int]]:
    """Where workers other than the region's owner may write `name`: [lo, hi) ranges. Mapped
    accesses stay below FLOOR (the size never drops below it: no SIGBUS)."""
    top = FLOOR if mapped else MAX_SIZE
    if name == OWNED:
        return [(0, REGION_LO)] + ([] if mapped else [(REGION_HI, top)])
    return [(0, top)]


def pick_range(rng: random.Random, zs: list[tuple[int, int]], align: int = 1,
               max_len: int = 64 * KiB) -> tuple[int, int]:
    """(off, n) inside one of the zones `zs` (lengths biased to small), aligned to `align`."""
    lo, hi = rng.choice(zs)
    x = rng.random()
    if x < 0.3:
        n = rng.randint(1, 512)
    elif x < 0.85:
        n = rng.randint(1, min(max_len, 64 * KiB))
    else:
        n = rng.randint(1, max_len)
    n = min(n, hi - lo)
    if align > 1:
        n = max(align, n // align * align)
    off = rng.randint(lo, hi - n)
    return off // align * align, n


class AlignedBuf:
    """A page-aligned anonymous mapping for O_DIRECT and AIO buffers."""

    def __init__(self, size: int) -> None:
        self.mm = mmap.mmap(-1, size)
        self.size = size
        self.cbuf = (ctypes.c_char * size).from_buffer(self.mm)
        self.addr = ctypes.addressof(self.cbuf)

    def fill(self, data: bytes) -> memoryview:
        self.mm[: len(data)] = data
        return memoryview(self.mm)[: len(data)]

    def view(self, n: int) -> memoryview:
        return memoryview(self.mm)[:n]


def dio_len(rng: random.Random, top: int = MiB) -> int:
    """An O_DIRECT length, a multiple of 512 in [512, top]: half small, some up to 1 MiB."""
    x = rng.random()
    if x < 0.5:
        n = rng.randint(1, 16) * 512
    elif x < 0.8:
        n = rng.randint(1, 256) * 512
    else:
        n = rng.randint(1, top // 512) * 512
    return min(n, top)


# --------------------------------------------------------------------------- native AIO

_AIO_SYSCALLS = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4},
}
IOCB_CMD_PREAD, IOCB_CMD_PWRITE = 0, 1


class _Iocb(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_uint32),
        ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class Aio:
    """Linux native AIO (io_setup / io_submit / io_getevents) through raw syscalls."""

    def __init__(self, depth: int = 16) -> None:
        self.nr = _AIO_SYSCALLS[platform.machine()]
        self.ctx = ctypes.c_ulong(0)
        self.depth = depth
        if _libc.syscall(ctypes.c_long(self.nr["io_setup"]), ctypes.c_long(depth),
                         ctypes.byref(self.ctx)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_setup: {os.strerror(e)}")

    def run(self, reqs: list[tuple[int, int, int, int, int]]) -> list[int]:
        """Submit (opcode, fd, buffer address, nbytes, offset) requests at once and wait for
        all; returns each one's `res` (bytes or -errno)."""
        k = len(reqs)
        iocbs = (_Iocb * k)()
        ptrs = (ctypes.POINTER(_Iocb) * k)()
        for i, (op, fd, addr, n, off) in enumerate(reqs):
            iocbs[i].data, iocbs[i].opcode, iocbs[i].fildes = i, op, fd
            iocbs[i].buf, iocbs[i].nbytes, iocbs[i].offset = addr, n, off
            ptrs[i] = ctypes.pointer(iocbs[i])
        done = 0
        while done < k:
            r = _libc.syscall(ctypes.c_long(self.nr["io_submit"]), self.ctx,
                              ctypes.c_long(k - done),
                              ctypes.c_void_p(ctypes.addressof(ptrs) + done * ctypes.sizeof(
                                  ctypes.c_void_p)))
            if r < 0:
                e = ctypes.get_errno()
                if e in (errno.EINTR, errno.EAGAIN):
                    continue
                raise OSError(e, f"io_submit: {os.strerror(e)}")
            done += r
        res = [0] * k
        got = 0
        events = (_IoEvent * k)()
        while got < k:
            r = _libc.syscall(ctypes.c_long(self.nr["io_getevents"]), self.ctx,
                              ctypes.c_long(k - got), ctypes.c_long(k - got), events, None)
            if r < 0:
                e = ctypes.get_errno()
                if e == errno.EINTR:
                    continue
                raise OSError(e, f"io_getevents: {os.strerror(e)}")
            for j in range(r):
                res[events[j].data] = events[j].res
            got += r
        return res

    def close(self) -> None:
        _libc.syscall(ctypes.c_long(self.nr["io_destroy"]), self.ctx)


# --------------------------------------------------------------------------- worker plumbing


class Worker:
    """One soak process. Subclasses implement `setup()`, `step()` and `finish()`; `step` does
    one operation, counts it, and reports problems through `error()` / `mismatch()`."""

    kind = "?"

    def __init__(self, wid: int, seed: int, root: str, logdir: str, t_end: float) -> None:
        self.wid, self.seed, self.root, self.logdir, self.t_end = wid, seed, root, logdir, t_end
        self.rng = random.Random(seed)
        self.counts: collections.Counter[str] = collections.Counter()
        self.tolerated: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.mismatches: list[str] = []
        self.nerrors = self.nmismatches = 0
        self.thread_beats: dict[str, float] = {}
        self.lock = threading.Lock()
        self.extra: dict[str, Any] = {}
        self.logpath = os.path.join(logdir, f"w{wid}-{self.kind}.log")
        self._log: Any = None
        self._log_bytes = 0
        self.op = ""

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # ---- logging, counting, problems
    def note(self, msg: str, op: bool = True) -> None:
        """Log an operation before doing it (a hang leaves it as the last line)."""
        if op:
            self.op = msg
        line = f"{time.monotonic() - self.t0:9.3f} {msg}\n"
        with self.lock:
            if self._log_bytes > LOG_ROTATE:
                self._log.close()
                os.replace(self.logpath, self.logpath + ".1")
                self._log = open(self.logpath, "a", buffering=1)  # noqa: SIM115
                self._log_bytes = 0
            self._log.write(line)
            self._log_bytes += len(line)

    def count(self, op: str, n: int = 1) -> None:
        with self.lock:
            self.counts[op] += n

    def error(self, msg: str) -> None:
        with self.lock:
            self.nerrors += 1
            if len(self.errors) < MAX_MESSAGES:
                self.errors.append(f"[w{self.wid} {self.kind} seed={self.seed}] {msg}")
        self.note(f"ERROR {msg.splitlines()[0]}", op=False)

    def mismatch(self, msg: str) -> None:
        with self.lock:
            self.nmismatches += 1
            if len(self.mismatches) < MAX_MESSAGES:
                self.mismatches.append(f"[w{self.wid} {self.kind} seed={self.seed}] {msg}")
        self.note(f"MISMATCH {msg.splitlines()[0]}", op=False)

    def oserror(self, op: str, exc: OSError, allowed: frozenset[int] | set[int] = frozenset(),
                what: str = "") -> None:
        """An errno from `op`: tolerated (and counted) if in `allowed`, else an error."""
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if exc.errno in allowed:
            with self.lock:
                self.tolerated[f"{op}:{name}"] += 1
            return
        self.error(f"{op} {what}: {name} {exc}")

    # ---- heartbeats
    def beat(self, hb: Any) -> None:
        now = time.monotonic()
        with self.lock:
            oldest = min(self.thread_beats.values(), default=now)
        hb[self.wid] = min(now, oldest)

    def thread_beat(self, name: str) -> None:
        with self.lock:
            self.thread_beats[name] = time.monotonic()

    # ---- the loop
    def main(self, hb: Any) -> dict[str, Any]:
        self.t0 = time.monotonic()
        self._log = open(self.logpath, "a", buffering=1)  # noqa: SIM115
        self.note(f"start w{self.wid} {self.kind} seed={self.seed} pid={os.getpid()}")
        hb[self.wid] = time.monotonic()
        try:
            self.setup()
            while time.monotonic() < self.t_end:
                self.step()
                self.beat(hb)
            self.note("end of the soak: final checks")
            self.finish()
        except Exception:
            self.error(f"{self.op}: unexpected exception\n{traceback.format_exc()}")
        self.note(f"done: {sum(self.counts.values())} ops, {self.nerrors} errors, "
                  f"{self.nmismatches} mismatches")
        return self.result()

    def setup(self) -> None:
        pass

    def step(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def result(self) -> dict[str, Any]:
        return {"wid": self.wid, "kind": self.kind, "seed": self.seed,
                "counts": dict(self.counts), "tolerated": dict(self.tolerated),
                "errors": self.errors, "nerrors": self.nerrors, "mismatches": self.mismatches,
                "nmismatches": self.nmismatches, "extra": self.extra}

    def choose(self, weights: dict[str, float]) -> str:
        return self.rng.choices(list(weights), weights=[
            0 if k in NO_OPS else v for k, v in weights.items()])[0]


def _worker_entry(w: Worker, conn: Any, hb: Any) -> None:
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # own process group: the fio it starts is killed with it
    _die_with_parent()
    err = open(os.path.join(w.logdir, f"w{w.wid}-{w.kind}.stderr"), "w")  # noqa: SIM115
    faulthandler.enable(file=err)  # a SIGBUS/SIGSEGV leaves the Python stack here
    try:
        result = w.main(hb)
    except BaseException:
        result = {"wid": w.wid, "kind": w.kind, "seed": w.seed, "counts": {}, "tolerated": {},
                  "errors": [traceback.format_exc()], "nerrors": 1, "mismatches": [],
                  "nmismatches": 0, "extra": {}}
    conn.send(result)
    conn.close()
    os._exit(0)


# --------------------------------------------------------------------------- namespace worker

NS_DIRS = ("d0", "d1", "d2")
NS_NAMES = ("f0", "f1", "f2", "f3", "d0", "d1", "d2", "l0", "l1", "y0", "y1", "f4")
NS_MAGIC = b"SOAKNS1\n"
RACE = frozenset({errno.ENOENT, errno.ESTALE})
E = errno
# every path walk in ns/ may meet a vanished name, a file where a directory was, or a symlink
# loop (symlinks named like directories)
WALK = RACE | {E.ENOTDIR, E.ELOOP}
NS_TOLERATED = {
    "create": WALK | {E.EEXIST, E.EISDIR},
    "mkdir": WALK | {E.EEXIST},
    # EINVAL: a directory renamed into its own subtree (concurrent renames make it
    # unpredictable from the names); EISDIR/ENOTDIR/ENOTEMPTY/EEXIST: type collisions
    "rename": WALK | {E.EISDIR, E.ENOTEMPTY, E.EEXIST, E.EINVAL},
    "link": WALK | {E.EEXIST, E.EPERM},  # EPERM: link of a directory
    "symlink": WALK | {E.EEXIST},
    "unlink": WALK | {E.EISDIR},
    "rmdir": WALK | {E.ENOTEMPTY, E.EEXIST},
    "readdir": WALK,
    "stat": WALK,
    "chmod": WALK,
    "utimes": WALK,
    "read": WALK | {E.EISDIR},
    "data_link": WALK | {E.EEXIST},
}
OWN_NAMES = ("a", "b", "c", "d", "e", "f", "g", "h")
OWN_DIRS = ("D0", "D1", "D2")


def ns_content(rng: random.Random, tag: str) -> bytes:
    payload = tag.encode() + b" " + rng.randbytes(rng.randint(0, 3000))
    return NS_MAGIC + struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def ns_content_ok(data: bytes) -> bool:
    """A soak-created file: empty (not written yet), or whole with a matching CRC."""
    if not data.startswith(NS_MAGIC):
        return True  # not ours (a data file linked into ns/)
    if len(data) < len(NS_MAGIC) + 8:
        return False
    n, crc = struct.unpack_from("<II", data, len(NS_MAGIC))
    payload = data[len(NS_MAGIC) + 8 :]
    return len(payload) == n and zlib.crc32(payload) == crc


def check_entry(base: str, rel: str, e: tuple, inodes: dict[int, dict],
                check_ino: bool = True) -> list[str]:
    """One entry of an own tree against its model: type, symlink target; for files mode,
    link count, mtime (once set by utimes), size, st_ino and content."""
    path = os.path.join(base, rel)
    try:
        st = os.lstat(path)
    except OSError as exc:
        return [f"{rel}: lstat {exc}"]
    if e[0] == "d":
        return [] if stat.S_ISDIR(st.st_mode) else [f"{rel}: not a directory ({st.st_mode:o})"]
    if e[0] == "l":
        if not stat.S_ISLNK(st.st_mode):
            return [f"{rel}: not a symlink ({st.st_mode:o})"]
        target = os.readlink(path)
        return [] if target == e[1] else [f"{rel}: symlink target {target!r} != {e[1]!r}"]
    node = inodes[e[1]]
    if not stat.S_ISREG(st.st_mode):
        return [f"{rel}: not a regular file ({st.st_mode:o})"]
    problems = []
    if st.st_mode & 0o7777 != node["mode"]:
        problems.append(f"{rel}: mode {st.st_mode & 0o7777:o} != {node['mode']:o}")
    if st.st_nlink != node["links"]:
        problems.append(f"{rel}: st_nlink {st.st_nlink} != {node['links']}")
    if node.get("mtime") is not None and st.st_mtime_ns != node["mtime"]:
        problems.append(f"{rel}: st_mtime_ns {st.st_mtime_ns} != {node['mtime']}")
    if st.st_size != len(node["data"]):
        problems.append(f"{rel}: st_size {st.st_size} != {len(node['data'])}")
    if check_ino and st.st_ino != node["ino"]:
        problems.append(f"{rel}: st_ino {st.st_ino} != {node['ino']} (hard links differ?)")
    with open(path, "rb") as f:
        data = f.read()
    if data != node["data"]:
        problems.append(f"{rel}: content differs from the model ({len(data)} vs "
                        f"{len(node['data'])} bytes)")
    return problems


def check_listing(base: str, d: str, want: set[str]) -> list[str]:
    try:
        names = set(os.listdir(os.path.join(base, d)))
    except OSError as exc:
        return [f"{d or '.'}: listdir {exc}"]
    if names != want:
        return [f"{d or '.'}: listdir {sorted(names)} != model {sorted(want)}"]
    return []


def own_children(entries: dict[str, tuple], d: str) -> set[str]:
    pre = d + "/" if d else ""
    return {k[len(pre):] for k in entries if k.startswith(pre) and "/" not in k[len(pre):]}


def check_own_tree(base: str, entries: dict[str, tuple], inodes: dict[int, dict],
                   check_ino: bool = True) -> list[str]:
    """Every entry of the model exists as modelled and every directory lists exactly its
    model children; returns the problems."""
    problems: list[str] = []
    for rel, e in sorted(entries.items()):
        problems += check_entry(base, rel, e, inodes, check_ino)
    for d in [""] + sorted(rel for rel, e in entries.items() if e[0] == "d"):
        problems += check_listing(base, d, own_children(entries, d))
    return problems


class NamespaceWorker(Worker):
    kind = "ns"

    OPS = {"create": 10, "mkdir": 6, "rename": 10, "link": 5, "symlink": 4, "unlink": 8,
           "rmdir": 5, "readdir": 6, "stat": 8, "chmod": 3, "utimes": 3, "read": 5,
           "data_link": 2, "data_stat": 3, "data_replace": 1, "prune": 1, "own": 30}
    OWN_OPS = {"create": 6, "mkdir": 2, "rename": 5, "link": 2, "symlink": 2, "unlink": 4,
               "rmdir": 2, "chmod": 2, "utimes": 2, "check": 4}

    def setup(self) -> None:
        self.own = self.p("own", f"w{self.wid}")
        os.makedirs(self.own, exist_ok=True)
        self.entries: dict[str, tuple] = {}  # rel -> ("d",) | ("f", iid) | ("l", target)
        self.inodes: dict[int, dict] = {}
        self.next_iid = 0

    # ---- the shared tree
    def ns_dir(self) -> str:
        depth = self.rng.choice((0, 1, 1, 2))
        return os.path.join("ns", *(self.rng.choice(NS_DIRS) for _ in range(depth)))

    def ns_path(self) -> str:
        return os.path.join(self.ns_dir(), self.rng.choice(NS_NAMES))

    def step(self) -> None:
        name = self.choose(self.OPS)
        if name == "own":
            self.own_step()
            return
        try:
            getattr(self, f"op_{name}")()
        except OSError as exc:
            self.oserror(name, exc, NS_TOLERATED.get(name, frozenset()), self.op)
        self.count(f"ns.{name}")

    def op_create(self) -> None:
        path = self.ns_path()
        self.note(f"create {path}")
        fd = os.open(self.p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            data = ns_content(self.rng, f"w{self.wid} {path}")
            if os.write(fd, data) != len(data):
                self.error(f"create {path}: short write")
            if self.rng.random() < 0.1:
                os.fsync(fd)
        finally:
            os.close(fd)

    def op_mkdir(self) -> None:
        path = os.path.join(self.ns_dir(), self.rng.choice(NS_DIRS))
        self.note(f"mkdir {path}")
        os.mkdir(self.p(path))

    def op_rename(self) -> None:
        a, b = self.ns_path(), self.ns_path()
        if self.rng.random() < 0.3:  # directories too
            b = os.path.join(self.ns_dir(), self.rng.choice(NS_DIRS))
        self.note(f"rename {a} -> {b}")
        os.rename(self.p(a), self.p(b))

    def op_link(self) -> None:
        a, b = self.ns_path(), self.ns_path()
        self.note(f"link {a} -> {b}")
        os.link(self.p(a), self.p(b), follow_symlinks=False)

    def op_symlink(self) -> None:
        b = self.ns_path()
        up = "../" * b.count("/")  # from b's directory to the mount's root
        target = self.rng.choice((self.rng.choice(NS_NAMES), "../" + self.rng.choice(NS_NAMES),
                                  "nowhere", f"{up}data/{self.rng.choice(SHARED)}"))
        self.note(f"symlink {b} -> {target}")
        os.symlink(target, self.p(b))

    def op_unlink(self) -> None:
        path = self.ns_path()
        self.note(f"unlink {path}")
        os.unlink(self.p(path))

    def op_rmdir(self) -> None:
        path = os.path.join(self.ns_dir(), self.rng.choice(NS_DIRS))
        self.note(f"rmdir {path}")
        os.rmdir(self.p(path))

    def op_readdir(self) -> None:
        d = self.ns_dir()
        self.note(f"readdir {d}")
        with os.scandir(self.p(d)) as it:
            names = [e.name for e in it]
        for n in names:
            try:
                os.lstat(self.p(d, n))
            except OSError as exc:
                self.oserror("readdir.lstat", exc, WALK, f"{d}/{n}")

    def op_stat(self) -> None:
        path = self.ns_path()
        self.note(f"stat {path}")
        if self.rng.random() < 0.5:
            os.stat(self.p(path))
        else:
            os.lstat(self.p(path))

    def op_chmod(self) -> None:
        path = self.ns_path()
        mode = self.rng.choice((0o644, 0o600, 0o755, 0o640))
        self.note(f"chmod {path} {mode:o}")
        os.chmod(self.p(path), mode)

    def op_utimes(self) -> None:
        path = self.ns_path()
        t = self.rng.randint(10**17, 2 * 10**18)
        self.note(f"utimes {path} {t}")
        os.utime(self.p(path), ns=(t, t))

    def op_read(self) -> None:
        path = self.ns_path()
        self.note(f"read {path}")
        fd = os.open(self.p(path), os.O_RDONLY)
        try:
            data = os.read(fd, 64 * KiB)
        finally:
            os.close(fd)
        if not ns_content_ok(data):
            # one write() of < 4 KiB after an O_EXCL create: a reader sees nothing or all
            self.mismatch(f"read {path}: a soak file of {len(data)} bytes is torn or corrupt "
                          f"(head {data[:24].hex()})")

    def op_prune(self) -> None:
        """rm -r of what renames moved below ns/x/y/z (no other op reaches it any more),
        so that the tree stays bounded in long runs."""
        self.note("prune ns/ below depth 3")
        for top, dirs, _ in os.walk(self.p("ns")):
            depth = os.path.relpath(top, self.p("ns")).count("/") + (top != self.p("ns"))
            if depth >= 2:
                for d in dirs:
                    if not os.path.islink(os.path.join(top, d)):
                        shutil.rmtree(os.path.join(top, d), onerror=self._prune_error)
                dirs[:] = []

    def _prune_error(self, fn: Any, path: str, info: Any) -> None:
        exc = info[1]
        if fn is os.path.islink:  # became a symlink since the walk: leave it
            self.tolerated["prune:symlink"] += 1
        elif isinstance(exc, OSError):
            self.oserror("prune", exc, WALK | {E.ENOTEMPTY}, path)
        else:
            self.error(f"prune {path}: {exc!r}")

    def op_data_link(self) -> None:
        # not s0/s1: a link would keep each replaced file (MiBs) alive, the image fills up
        src = self.rng.choice([n for n in SHARED if n not in REPLACEABLE])
        b = self.ns_path()
        self.note(f"link data/{src} -> {b}")
        os.link(self.p("data", src), self.p(b))

    def op_data_stat(self) -> None:
        name = self.rng.choice(SHARED)
        path = self.p("data", name)
        self.note(f"stat/chmod/utimes data/{name}")
        st = os.stat(path)
        if st.st_size < FLOOR:
            self.mismatch(f"data/{name}: st_size {st.st_size} below the floor {FLOOR}")
        x = self.rng.random()
        if x < 0.3:
            os.chmod(path, self.rng.choice((0o644, 0o666, 0o600)))
        elif x < 0.6:
            os.utime(path)

    def op_data_replace(self) -> None:
        name = self.rng.choice(REPLACEABLE)
        tmp = self.p("data", f".new-w{self.wid}")
        self.note(f"replace data/{name} by a new file of {FLOOR} bytes")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, FLOOR)
            os.pwrite(fd, self.rng.randbytes(8 * KiB), self.rng.randrange(0, FLOOR - 8 * KiB))
            if self.rng.random() < 0.3:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.p("data", name))

    # ---- the own tree (a model; every operation must succeed)
    def _op(self, rel: str) -> str:
        return os.path.join(self.own, rel)

    def _free_name(self, dirs_only: bool = False) -> str | None:
        dirs = [""] + [k for k, e in self.entries.items() if e[0] == "d" and k.count("/") < 2]
        for _ in range(10):
            d = self.rng.choice(dirs)
            name = self.rng.choice(OWN_DIRS if dirs_only else OWN_NAMES)
            rel = f"{d}/{name}" if d else name
            if rel not in self.entries:
                return rel
        return None

    def _drop_link(self, rel: str) -> None:
        e = self.entries.pop(rel)
        if e[0] == "f":
            node = self.inodes[e[1]]
            node["links"] -= 1
            if node["links"] == 0:
                del self.inodes[e[1]]

    def _verify(self, rels: list[str], gone: tuple[str, ...] = ()) -> None:
        """Right after an own-tree operation: the touched entries as modelled, the removed
        names gone, the touched directories listing exactly their model children."""
        problems = []
        for r in rels:
            if r in self.entries:
                problems += check_entry(self.own, r, self.entries[r], self.inodes)
        for r in gone:
            with contextlib.suppress(FileNotFoundError):
                os.lstat(self._op(r))
                problems.append(f"{r}: exists, the model says it is gone")
        for d in sorted({r.rpartition("/")[0] for r in [*rels, *gone]}):
            problems += check_listing(self.own, d, own_children(self.entries, d))
        if problems:
            self.mismatch(f"own tree after {self.op}:\n  " + "\n  ".join(problems[:10]))
            self.resync()

    def resync(self) -> None:
        """After a mismatch: empty the own tree and the model, so that later checks are
        meaningful again."""
        shutil.rmtree(self.own, ignore_errors=True)
        os.makedirs(self.own, exist_ok=True)
        self.entries.clear()
        self.inodes.clear()

    def own_step(self) -> None:
        name = self.choose(self.OWN_OPS)
        if len(self.entries) > 40 and name in ("create", "mkdir", "link", "symlink"):
            name = "unlink"
        try:
            done = getattr(self, f"own_{name}")()
        except OSError as exc:
            self.error(f"own {self.op}: {errno.errorcode.get(exc.errno or 0, '?')} {exc}")
            self.resync()
            return
        self.count(f"own.{name}" if done is not False else "own.skipped")

    def own_create(self) -> bool:
        rel = self._free_name()
        if rel is None:
            return False
        data = ns_content(self.rng, f"own w{self.wid} {rel}")
        self.note(f"own create {rel} ({len(data)} bytes)")
        fd = os.open(self._op(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            st = os.fstat(fd)
            if self.rng.random() < 0.1:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.inodes[self.next_iid] = {"data": data, "mode": 0o644, "links": 1, "mtime": None,
                                      "ino": st.st_ino}
        self.entries[rel] = ("f", self.next_iid)
        self.next_iid += 1
        self._verify([rel])
        return True

    def own_mkdir(self) -> bool:
        rel = self._free_name(dirs_only=True)
        if rel is None:
            return False
        self.note(f"own mkdir {rel}")
        os.mkdir(self._op(rel), 0o755)
        self.entries[rel] = ("d",)
        self._verify([rel])
        return True

    def own_rename(self) -> bool:
        if not self.entries:
            return False
        src = self.rng.choice(sorted(self.entries))
        e = self.entries[src]
        if e[0] == "d":
            dst = self._free_name(dirs_only=True)
            if dst is None or dst == src or dst.startswith(src + "/"):
                return False
        else:
            dirs = [""] + [k for k, x in self.entries.items() if x[0] == "d"]
            d = self.rng.choice(dirs)
            dst = f"{d}/{self.rng.choice(OWN_NAMES)}" if d else self.rng.choice(OWN_NAMES)
            if dst == src or (dst in self.entries and self.entries[dst][0] == "d"):
                return False
        self.note(f"own rename {src} -> {dst}{' (over)' if dst in self.entries else ''}")
        os.rename(self._op(src), self._op(dst))
        if dst in self.entries and self.entries[dst] == e and e[0] == "f":
            self._verify([src, dst])  # two links of one file: rename does nothing
            return True
        if dst in self.entries:
            self._drop_link(dst)
        moved = {k: v for k, v in self.entries.items() if k == src or k.startswith(src + "/")}
        for k in moved:
            del self.entries[k]
        for k, v in moved.items():
            self.entries[dst + k[len(src):]] = v
        self._verify([dst], gone=(src,))
        return True

    def own_link(self) -> bool:
        files = sorted(k for k, e in self.entries.items() if e[0] == "f")
        dst = self._free_name()
        if not files or dst is None:
            return False
        src = self.rng.choice(files)
        self.note(f"own link {src} -> {dst}")
        os.link(self._op(src), self._op(dst))
        self.entries[dst] = self.entries[src]
        self.inodes[self.entries[src][1]]["links"] += 1
        self._verify([src, dst])
        return True

    def own_symlink(self) -> bool:
        dst = self._free_name()
        if dst is None:
            return False
        target = self.rng.choice((self.rng.choice(OWN_NAMES), "../" + self.rng.choice(OWN_NAMES),
                                  "x" * self.rng.randint(1, 300)))
        self.note(f"own symlink {dst} -> {target[:40]}")
        os.symlink(target, self._op(dst))
        self.entries[dst] = ("l", target)
        self._verify([dst])
        return True

    def own_unlink(self) -> bool:
        cands = sorted(k for k, e in self.entries.items() if e[0] != "d")
        if not cands:
            return False
        rel = self.rng.choice(cands)
        self.note(f"own unlink {rel}")
        os.unlink(self._op(rel))
        others = [k for k, e in self.entries.items() if e == self.entries[rel] and k != rel]
        self._drop_link(rel)
        self._verify(others, gone=(rel,))
        return True

    def own_rmdir(self) -> bool:
        cands = sorted(k for k, e in self.entries.items()
                       if e[0] == "d" and not own_children(self.entries, k))
        if not cands:
            return False
        rel = self.rng.choice(cands)
        self.note(f"own rmdir {rel}")
        os.rmdir(self._op(rel))
        del self.entries[rel]
        self._verify([], gone=(rel,))
        return True

    def own_chmod(self) -> bool:
        files = sorted(k for k, e in self.entries.items() if e[0] == "f")
        if not files:
            return False
        rel = self.rng.choice(files)
        mode = self.rng.choice((0o600, 0o640, 0o644, 0o755, 0o400, 0o664))
        self.note(f"own chmod {rel} {mode:o}")
        os.chmod(self._op(rel), mode)
        self.inodes[self.entries[rel][1]]["mode"] = mode
        self._verify([rel])
        return True

    def own_utimes(self) -> bool:
        files = sorted(k for k, e in self.entries.items() if e[0] == "f")
        if not files:
            return False
        rel = self.rng.choice(files)
        at, mt = self.rng.randint(10**17, 2 * 10**18), self.rng.randint(10**17, 2 * 10**18)
        self.note(f"own utimes {rel} {mt}")
        os.utime(self._op(rel), ns=(at, mt))
        self.inodes[self.entries[rel][1]]["mtime"] = mt
        self._verify([rel])
        return True

    def own_check(self) -> bool:
        self.note(f"own check ({len(self.entries)} entries)")
        problems = check_own_tree(self.own, self.entries, self.inodes)
        if problems:
            self.mismatch("own tree check:\n  " + "\n  ".join(problems[:10]))
            self.resync()
        return True

    def finish(self) -> None:
        self.op = "final own tree check"
        self.own_check()
        self.extra["own"] = {"base": self.own, "entries": self.entries, "inodes": self.inodes}


# --------------------------------------------------------------------------- fio worker

FIO_ENGINES = ("psync", "libaio", "io_uring", "posixaio", "mmap", "splice")


def fio_engines(tmp: Path) -> list[str]:
    """The engines of FIO_ENGINES that work here (a one-I/O job on a local file each)."""
    ok = []
    path = tmp / "fio-probe"
    path.write_bytes(bytes(64 * KiB))
    for engine in FIO_ENGINES:
        proc = subprocess.run(
            ["fio", "--name=probe", f"--filename={path}", "--size=64k", "--bs=4k",
             "--rw=randwrite", f"--ioengine={engine}", "--io_size=4k", "--thread"],
            capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode == 0:
            ok.append(engine)
    path.unlink()
    return ok


class FioWorker(Worker):
    kind = "fio"

    def __init__(self, *args: Any, engines: list[str], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.engines = engines

    def setup(self) -> None:
        self.priv = self.p("fiopriv", f"w{self.wid}")
        os.makedirs(self.priv, exist_ok=True)
        self.n = 0

    def step(self) -> None:
        self.n += 1
        r = self.rng
        out = os.path.join(self.logdir, f"w{self.wid}-fio-last.json")
        verify = r.random() < 0.2
        if verify:
            engine = r.choice([e for e in self.engines if e not in ("mmap", "splice")])
            direct = r.random() < 0.7
            bs = r.choice(("4k", "8k", "16k"))
            args = [f"--filename={os.path.join(self.priv, 'verify.dat')}", "--size=1m",
                    "--rw=randwrite", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                    f"--iodepth={r.choice((1, 4, 16))}"]
            kind = f"fio.verify.{engine}.{'direct' if direct else 'buffered'}"
        else:
            engine = r.choice(self.engines)
            direct = r.random() < 0.5
            files = r.sample(SHARED, r.randint(1, 3))
            filesize = "512k" if OWNED in files else "1m"
            bs = r.choice(("512", "1k", "4k", "4k", "8k", "64k", "256k"))
            if engine == "mmap" and direct and bs in ("512", "1k"):
                bs = "4k"  # fio: "mmap options dictate a minimum block size of 4096 bytes"
            rw = r.choice(("randwrite", "randwrite", "randread", "randrw", "write", "read",
                           "rw"))
            depth = r.choice((1, 4, 16)) if engine in ("libaio", "io_uring", "posixaio") else 1
            args = ["--filename=" + ":".join(self.p("data", f) for f in files),
                    f"--filesize={filesize}", f"--rw={rw}", "--time_based",
                    f"--runtime={r.choice((2, 3))}", f"--iodepth={depth}",
                    f"--iodepth_batch_submit={min(depth, 8)}",
                    f"--numjobs={r.choice((1, 1, 2))}", "--allow_file_create=0",
                    "--fallocate=none"]
            kind = f"fio.{engine}.{'direct' if direct else 'buffered'}"
        argv = ["fio", f"--name=soak{self.n}", f"--ioengine={engine}", f"--direct={int(direct)}",
                f"--bs={bs}", f"--randseed={r.randrange(1, 2**31)}", "--thread",
                "--output-format=json", f"--output={out}", *args]
        self.note(" ".join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                              preexec_fn=_die_with_parent)
        self.count(kind)
        try:
            with open(out) as f:
                text = f.read()
            report = json.loads(text[text.index("{"):])
        except (OSError, ValueError) as exc:
            self.error(f"fio (rc {proc.returncode}) wrote no JSON report ({exc}):\n"
                       f"{proc.stderr[-2000:]}\n$ {' '.join(argv)}")
            return
        jerrs = [j.get("error", 0) for j in report.get("jobs", [])]
        ios = sum(j[d]["total_ios"] for j in report.get("jobs", []) for d in ("read", "write"))
        self.count("fio.ios", ios)
        bad = [e for e in jerrs if e not in (0, errno.ENOENT)]
        if bad or (proc.returncode != 0 and not any(jerrs)):
            what = "verify failed" if verify and "verify" in proc.stderr.lower() else "failed"
            msg = (f"fio {what} (rc {proc.returncode}, job errors "
                   f"{[errno.errorcode.get(e, e) for e in jerrs]}):\n{proc.stderr[-2000:]}\n"
                   f"$ {' '.join(argv)}")
            if verify and "verify" in proc.stderr.lower():
                self.mismatch(msg)
            else:
                self.error(msg)
        elif any(jerrs):
            self.tolerated["fio:ENOENT"] += 1


# --------------------------------------------------------------------------- mapper worker


class MapperWorker(Worker):
    kind = "mapper"

    OPS = {"mmap_write": 12, "mmap_read": 4, "dio_write": 10, "dio_read": 8, "buf_write": 6,
           "buf_read": 4, "odsync_write": 4, "rwf_dsync": 4, "fsync": 3, "fdatasync": 3,
           "shared_fd_io": 8, "shared_fd_misaligned": 3, "remap": 1}

    def setup(self) -> None:
        self.buf = AlignedBuf(MiB)
        self.maps: dict[str, tuple[int, mmap.mmap]] = {}
        self.fds: dict[str, int] = {}
        self.stop = threading.Event()
        self.tfd = os.open(self.p("data", TOGGLED), os.O_RDWR)
        self.threads = [threading.Thread(target=self._guard, args=(fn,), name=fn.__name__)
                        for fn in (self.toggler, self.aio_loop)]
        for t in self.threads:
            self.thread_beat(t.name)
            t.start()

    # ---- threads sharing self.tfd
    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception:
            self.error(f"thread {fn.__name__}: {traceback.format_exc()}")
        finally:
            with self.lock:
                self.thread_beats.pop(fn.__name__, None)

    def toggler(self) -> None:
        rng = random.Random(self.seed + 1)
        n = 0
        while not self.stop.is_set():
            fl = fcntl.fcntl(self.tfd, fcntl.F_GETFL)
            fcntl.fcntl(self.tfd, fcntl.F_SETFL, fl ^ os.O_DIRECT)
            n += 1
            if n % 64 == 0:
                self.thread_beat("toggler")
            time.sleep(rng.random() * 0.002)
        fl = fcntl.fcntl(self.tfd, fcntl.F_GETFL)
        fcntl.fcntl(self.tfd, fcntl.F_SETFL, fl & ~os.O_DIRECT)
        self.count("mapper.fcntl_toggle", n)

    def aio_loop(self) -> None:
        rng = random.Random(self.seed + 2)
        aio = Aio(16)
        bufs = [AlignedBuf(64 * KiB) for _ in range(4)]
        n = 0
        try:
            while not self.stop.is_set():
                k = rng.randint(1, 4)
                reqs = []
                for i in range(k):
                    nb = rng.randint(1, 128) * 512
                    off = rng.randrange(0, MAX_SIZE - nb) // 512 * 512
                    op = IOCB_CMD_PWRITE if rng.random() < 0.6 else IOCB_CMD_PREAD
                    if op == IOCB_CMD_PWRITE:
                        bufs[i].fill(rng.randbytes(nb))
                    reqs.append((op, self.tfd, bufs[i].addr, nb, off))
                res = aio.run(reqs)
                n += k
                self.thread_beat("aio_loop")
                for (op, _, _, nb, off), r in zip(reqs, res, strict=True):
                    if r < 0:
                        self.error(f"AIO {'write' if op else 'read'} {off:#x}+{nb:#x} on the "
                                   f"toggled fd: {errno.errorcode.get(-r, -r)}")
                    elif op == IOCB_CMD_PWRITE and r != nb:
                        self.error(f"AIO write {off:#x}+{nb:#x}: {r} bytes")
                    elif op == IOCB_CMD_PREAD and off + nb <= FLOOR and r != nb:
                        self.mismatch(f"AIO read {off:#x}+{nb:#x} below the floor: {r} bytes")
        finally:
            aio.close()
            self.count("mapper.aio", n)

    # ---- helpers
    def fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.p("data", name), os.O_RDWR)
        return self.fds[name]

    def mapping(self, name: str) -> mmap.mmap:
        if name not in self.maps:
            fd = os.open(self.p("data", name), os.O_RDWR)
            self.maps[name] = (fd, mmap.mmap(fd, FLOOR, mmap.MAP_SHARED,
                                             mmap.PROT_READ | mmap.PROT_WRITE))
        return self.maps[name][1]

    def step(self) -> None:
        op = self.choose(self.OPS)
        name = self.rng.choice(SHARED)
        try:
            getattr(self, f"op_{op}")(name)
        except OSError as exc:
            self.oserror(op, exc, frozenset(), self.op)
        self.count(f"mapper.{op}")

    def op_mmap_write(self, name: str) -> None:
        m = self.mapping(name)
        off, n = pick_range(self.rng, zones(name, mapped=True))
        sync = self.rng.random() < 0.6
        self.note(f"mmap_write {name} {off:#x}+{n:#x}{' msync' if sync else ''}")
        m[off : off + n] = self.rng.randbytes(n)
        if sync:
            first = off // PAGE * PAGE
            m.flush(first, off + n - first)

    def op_mmap_read(self, name: str) -> None:
        m = self.mapping(name)
        off, n = pick_range(self.rng, zones(name, mapped=True))
        self.note(f"mmap_read {name} {off:#x}+{n:#x}")
        if len(m[off : off + n]) != n:
            self.mismatch(f"mmap read {name} {off:#x}+{n:#x}: short")

    def op_remap(self, name: str) -> None:
        self.note(f"remap {name} (follows a rename-over)")
        if name in self.maps:
            fd, m = self.maps.pop(name)
            m.close()
            os.close(fd)
        if name in self.fds:
            os.close(self.fds.pop(name))
        if name == TOGGLED:  # the threads' fd follows too: dup2 is atomic for them
            nfd = os.open(self.p("data", name), os.O_RDWR)
            os.dup2(nfd, self.tfd)
            os.close(nfd)

    def _dio(self, name: str, write: bool, flags: int = 0) -> None:
        n = dio_len(self.rng)
        lo, hi = self.rng.choice(zones(name))
        n = min(n, (hi - lo) // 512 * 512)
        off = self.rng.randrange(lo, hi - n + 1) // 512 * 512
        what = "dio_write" if write else "dio_read"
        self.note(f"{what} {name} {off:#x}+{n:#x}{' O_DSYNC' if flags else ''}")
        fd = os.open(self.p("data", name), os.O_RDWR | os.O_DIRECT | flags)
        try:
            if write:
                got = os.pwritev(fd, [self.buf.fill(self.rng.randbytes(n))], off)
                if got != n:
                    self.error(f"{what} {name} {off:#x}+{n:#x}: {got} bytes")
            else:
                got = os.preadv(fd, [self.buf.view(n)], off)
                if off + n <= FLOOR and got != n:
                    self.mismatch(f"{what} {name} {off:#x}+{n:#x} below the floor: {got} bytes")
        finally:
            os.close(fd)

    def op_dio_write(self, name: str) -> None:
        self._dio(name, True)

    def op_dio_read(self, name: str) -> None:
        self._dio(name, False)

    def op_buf_write(self, name: str) -> None:
        off, n = pick_range(self.rng, zones(name), max_len=256 * KiB)
        self.note(f"buf_write {name} {off:#x}+{n:#x}")
        if os.pwrite(self.fd(name), self.rng.randbytes(n), off) != n:
            self.error(f"buf_write {name} {off:#x}+{n:#x}: short")

    def op_buf_read(self, name: str) -> None:
        off, n = pick_range(self.rng, zones(name), max_len=256 * KiB)
        self.note(f"buf_read {name} {off:#x}+{n:#x}")
        got = read_full(self.fd(name), n, off)
        if off + n <= FLOOR and len(got) != n:
            self.mismatch(f"buf_read {name} {off:#x}+{n:#x} below the floor: {len(got)} bytes")

    def op_odsync_write(self, name: str) -> None:
        if self.rng.random() < 0.4:
            self._dio(name, True, os.O_DSYNC)
            return
        off, n = pick_range(self.rng, zones(name))
        self.note(f"odsync_write {name} {off:#x}+{n:#x}")
        fd = os.open(self.p("data", name), os.O_WRONLY | os.O_DSYNC)
        try:
            if os.pwrite(fd, self.rng.randbytes(n), off) != n:
                self.error(f"odsync_write {name}: short")
        finally:
            os.close(fd)

    def op_rwf_dsync(self, name: str) -> None:
        off, n = pick_range(self.rng, zones(name))
        self.note(f"pwritev RWF_DSYNC {name} {off:#x}+{n:#x}")
        if os.pwritev(self.fd(name), [self.rng.randbytes(n)], off, os.RWF_DSYNC) != n:
            self.error(f"pwritev RWF_DSYNC {name}: short")

    def op_fsync(self, name: str) -> None:
        self.note(f"fsync {name}")
        os.fsync(self.fd(name))

    def op_fdatasync(self, name: str) -> None:
        self.note(f"fdatasync {name}")
        os.fdatasync(self.fd(name))

    def op_shared_fd_io(self, name: str) -> None:
        """Aligned I/O on the fd whose O_DIRECT flag the toggler flips: valid either way."""
        n = dio_len(self.rng, 256 * KiB)
        off = self.rng.randrange(0, MAX_SIZE - n) // 512 * 512
        write = self.rng.random() < 0.6
        self.note(f"shared fd {'write' if write else 'read'} {TOGGLED} {off:#x}+{n:#x}")
        if write:
            got = os.pwritev(self.tfd, [self.buf.fill(self.rng.randbytes(n))], off)
            if got != n:
                self.error(f"shared fd write {off:#x}+{n:#x}: {got} bytes")
        else:
            got = os.preadv(self.tfd, [self.buf.view(n)], off)
            if off + n <= FLOOR and got != n:
                self.mismatch(f"shared fd read {off:#x}+{n:#x} below the floor: {got} bytes")

    def op_shared_fd_misaligned(self, name: str) -> None:
        """A deliberately misaligned write on the toggled fd: buffered at that instant it
        succeeds, direct it fails with EINVAL (the only place EINVAL is tolerated)."""
        off = self.rng.randrange(0, MAX_SIZE) | 1
        n = self.rng.randint(1, 700)
        self.note(f"shared fd misaligned write {TOGGLED} {off:#x}+{n:#x}")
        try:
            got = os.pwrite(self.tfd, self.rng.randbytes(n), off)
            if got != n:
                fl = fcntl.fcntl(self.tfd, fcntl.F_GETFL)
                self.error(f"misaligned write {off:#x}+{n:#x} on the toggled fd: {got} bytes "
                           f"written (O_DIRECT now {'on' if fl & os.O_DIRECT else 'off'})")
            else:
                self.count("mapper.misaligned_accepted")
        except OSError as exc:
            self.oserror("misaligned_odirect", exc, {errno.EINVAL}, self.op)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        for fd, m in self.maps.values():
            m.flush()
            m.close()
            os.close(fd)
        for fd in self.fds.values():
            os.close(fd)
        os.close(self.tfd)


# --------------------------------------------------------------------------- space worker


TRUNCATES = frozenset({"truncate", "truncate_mapped"})
NOT_OWNED = tuple(n for n in SHARED if n != OWNED)


class SpaceWorker(Worker):
    kind = "space"

    OPS = {"truncate": 10, "truncate_mapped": 5, "falloc": 5, "punch": 6, "zero": 6,
           "punch_mapped": 4, "fsync": 2, "fdatasync": 2}

    def step(self) -> None:
        op = self.choose(self.OPS)
        # Not the owned region's file: FUSE drops a file's whole page cache after every
        # size-changing SETATTR, pages pinned by an O_DIRECT read into a mapping of it
        # included, and that read's bytes are lost (fuse-facts-more row 24; the private
        # worker does such reads in the region).
        name = self.rng.choice(SHARED if op not in TRUNCATES else NOT_OWNED)
        try:
            fd = os.open(self.p("data", name), os.O_RDWR)
        except OSError as exc:
            self.oserror(op, exc, RACE, f"open data/{name}")
            return
        try:
            getattr(self, f"op_{op}")(name, fd)
        except OSError as exc:
            self.oserror(op, exc, frozenset(), self.op)
        try:
            os.close(fd)  # reports a failed writeback of the mapping's pages
        except OSError as exc:
            self.oserror("close", exc, frozenset(), f"{name} after {self.op}")

    def _size(self) -> int:
        n = self.rng.randint(FLOOR, MAX_SIZE)
        return n // PAGE * PAGE if self.rng.random() < 0.3 else n

    def op_truncate(self, name: str, fd: int) -> None:
        cur, new = os.fstat(fd).st_size, self._size()
        kind = "up" if new > cur else "down"
        self.note(f"ftruncate {name} {cur:#x} -> {new:#x}")
        os.ftruncate(fd, new)
        self.count(f"space.truncate_{kind}")

    def _mwrite(self, m: mmap.mmap, name: str, limit: int) -> None:
        """Write a random range of the mapping below `limit`, outside the owned region."""
        zs = [(lo, min(hi, limit)) for lo, hi in
              ([(0, REGION_LO), (REGION_HI, limit)] if name == OWNED else [(0, limit)])
              if min(hi, limit) > lo]
        off, n = pick_range(self.rng, zs)
        m[off : off + n] = self.rng.randbytes(n)

    def op_truncate_mapped(self, name: str, fd: int) -> None:
        """generic/029 on a shared file: truncate, map, mwrite (tail pages too), truncate down,
        truncate up, mwrite again, maybe msync. Only this worker shrinks shared files, so the
        size stays >= the last truncate and the pages touched are inside the file."""
        a = self._size()
        b = self.rng.randint(FLOOR, a)
        c = self.rng.randint(b, MAX_SIZE)
        self.note(f"truncate_mapped {name}: {a:#x}, mwrite, {b:#x}, {c:#x}, mwrite")
        os.ftruncate(fd, a)
        with mmap.mmap(fd, a, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            self._mwrite(m, name, a)
            if self.rng.random() < 0.3:
                m.flush()
            os.ftruncate(fd, b)
            os.ftruncate(fd, c)
            self._mwrite(m, name, min(a, c))
            if self.rng.random() < 0.6:
                m.flush()
        self.count("space.truncate_mapped")

    def _frange(self, name: str) -> tuple[int, int]:
        zs = zones(name)
        if name != OWNED:
            zs = [(0, MAX_SIZE + MiB)]
        return pick_range(self.rng, zs, max_len=512 * KiB)

    def op_falloc(self, name: str, fd: int) -> None:
        off, n = self._frange(name)
        self.note(f"posix_fallocate {name} {off:#x}+{n:#x}")
        os.posix_fallocate(fd, off, n)
        self.count("space.falloc")

    def op_punch(self, name: str, fd: int) -> None:
        off, n = self._frange(name)
        self.note(f"punch {name} {off:#x}+{n:#x}")
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
        self.count("space.punch")

    def op_zero(self, name: str, fd: int) -> None:
        off, n = self._frange(name)
        keep = self.rng.random() < 0.5
        self.note(f"zero_range{'(keep)' if keep else ''} {name} {off:#x}+{n:#x}")
        fallocate(fd, FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep else 0), off, n)
        self.count("space.zero_keep" if keep else "space.zero")

    def op_punch_mapped(self, name: str, fd: int) -> None:
        """Dirty mapped pages below the floor, then punch or zero a range over them."""
        off, n = pick_range(self.rng, zones(name, mapped=True), max_len=256 * KiB)
        punch = self.rng.random() < 0.5
        self.note(f"{'punch' if punch else 'zero'}_mapped {name} {off:#x}+{n:#x}")
        with mmap.mmap(fd, FLOOR, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            lo = max(0, off - 8 * KiB)
            hi = min(off + n + 8 * KiB, zones(name, mapped=True)[-1][1])
            if name == OWNED:
                hi = min(hi, REGION_LO)
            m[lo:hi] = self.rng.randbytes(hi - lo)
            mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch else FALLOC_FL_ZERO_RANGE)
            fallocate(fd, mode, off, n)
            if self.rng.random() < 0.5:
                m.flush()
        self.count("space.punch_mapped" if punch else "space.zero_mapped")

    def op_fsync(self, name: str, fd: int) -> None:
        self.note(f"fsync {name}")
        os.fsync(fd)
        self.count("space.fsync")

    def op_fdatasync(self, name: str, fd: int) -> None:
        self.note(f"fdatasync {name}")
        os.fdatasync(fd)
        self.count("space.fdatasync")


# --------------------------------------------------------------------------- private worker


class SoakFsx(Fsx):
    """tests/fsx.py's exerciser plus the soak's own checked ops on private files."""

    EXTRA = {"dsyncopen": 3, "falloc": 3, "map_truncate": 3, "toggle_direct": 3}

    def __init__(self, *args: Any, **kw: Any) -> None:
        weights = {k: v for k, v in {**WEIGHTS, **self.EXTRA}.items() if k not in NO_OPS}
        super().__init__(*args, weights=weights, **kw)
        self.misaligned = collections.Counter()

    def op_dsyncopen(self, f: _File) -> str:
        direct = self.rng.random() < 0.3
        a = self.dio_align if direct else 1
        off, size = self._range(self.max_size, align=a, min_len=a)
        data = self._rand_bytes(size)
        desc = f"O_DSYNC{'|O_DIRECT' if direct else ''} open+write {off:#x}+{size:#x}"
        self._note(f, desc)
        fd = os.open(f.path, os.O_WRONLY | os.O_DSYNC | (os.O_DIRECT if direct else 0))
        try:
            n = direct_pwrite(fd, data, off) if direct else os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        if n != size:
            self._fail(f, f"short write {n} of {size}")
        self._model_write(f, off, data)
        return desc

    def op_falloc(self, f: _File) -> str:
        off, size = self._range(self.max_size)
        self._note(f, f"posix_fallocate {off:#x}+{size:#x}")
        os.posix_fallocate(f.fd, off, size)
        if off + size > len(f.model):
            f.model.extend(bytes(off + size - len(f.model)))
        return f"posix_fallocate {off:#x}+{size:#x}"

    def op_map_truncate(self, f: _File) -> str:
        """generic/029: truncate, map, mwrite, truncate down, truncate up, mwrite, (msync),
        then read the range around the cut through the fd."""
        r = self.rng
        a = r.randint(1, self.max_size)
        b = r.randint(0, a - 1)
        c = r.randint(b, self.max_size)
        sync = r.random() < 0.6
        desc = f"map_truncate {a:#x} mwrite {b:#x} {c:#x} mwrite{' msync' if sync else ''}"
        self._note(f, desc)

        def resize(n: int) -> None:
            os.ftruncate(f.fd, n)
            if n < len(f.model):
                del f.model[n:]
            else:
                f.model.extend(bytes(n - len(f.model)))

        def mwrite(m: mmap.mmap, limit: int) -> None:
            off = r.randrange(0, limit)
            n = min(r.randint(1, self.max_len), limit - off)
            data = self._rand_bytes(n)
            m[off : off + n] = data
            self._model_write(f, off, data)

        resize(a)
        with mmap.mmap(f.fd, a, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            mwrite(m, a)
            resize(b)
            resize(c)
            if min(a, c) > 0:
                mwrite(m, min(a, c))
            if sync:
                m.flush()
        lo, hi = max(0, b - 8 * KiB), min(len(f.model) + PAGE, b + 64 * KiB)
        self._check_read(f, lo, hi - lo, read_full(f.fd, hi - lo, lo), "read after " + desc)
        return desc

    def op_toggle_direct(self, f: _File) -> str:
        """fcntl(F_SETFL, O_DIRECT) on the buffered fd: an aligned direct write and read
        through it (checked), a deliberately misaligned write (EINVAL expected), then back."""
        a = self.dio_align
        off, size = self._range(self.max_size, align=a, min_len=a)
        data = self._rand_bytes(size)
        self._note(f, f"toggle O_DIRECT: write {off:#x}+{size:#x}, misaligned write, read")
        fl = fcntl.fcntl(f.fd, fcntl.F_GETFL)
        fcntl.fcntl(f.fd, fcntl.F_SETFL, fl | os.O_DIRECT)
        try:
            if direct_pwrite(f.fd, data, off) != size:
                self._fail(f, "short direct write through the toggled fd")
            self._model_write(f, off, data)
            moff, mdata = off + 1, self._rand_bytes(self.rng.randint(1, 100))
            try:
                os.pwrite(f.fd, mdata, moff)
                self._model_write(f, moff, mdata)
                self.misaligned["accepted"] += 1
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.misaligned["EINVAL"] += 1
            roff, rsize = self._range(len(f.model) + 8192, align=a, min_len=a)
            self._check_read(f, roff, rsize, direct_pread(f.fd, rsize, roff),
                             "direct read through the toggled fd")
        finally:
            fcntl.fcntl(f.fd, fcntl.F_SETFL, fl)
        return f"toggle O_DIRECT: write {off:#x}+{size:#x}"


class PrivateWorker(Worker):
    kind = "private"

    def __init__(self, *args: Any, region_model: bytes, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.region_model = region_model

    def setup(self) -> None:
        d = self.p("priv", f"w{self.wid}")
        os.makedirs(d, exist_ok=True)
        self.fsx = SoakFsx(d, seed=self.seed, nfiles=2, max_size=2 * MiB, max_len=128 * KiB)
        self.fsx.open_all()
        ops = {k: 0 if k in NO_OPS else v
               for k, v in dict(RegionWorker.OPS, dioread_into_map=2).items()}
        self.region = RegionWorker(self.p("data", OWNED), REGION_LO, REGION_HI,
                                   self.region_model, seed=self.seed, wid=9, ops=ops)
        self.region.fd = os.open(self.region.path, os.O_RDWR)
        self.region.dfd = os.open(self.region.path, os.O_RDWR | os.O_DIRECT)
        self.region.size = REGION_HI  # it maps [0, REGION_HI): always inside the file

    def _problem(self, exc: FsxMismatch) -> None:
        msg = str(exc)
        if " failed: " in msg.splitlines()[0]:
            self.error(msg)
        else:
            self.mismatch(msg)

    def step(self) -> None:
        if self.rng.random() < 0.25:
            rw = self.region
            last = rw.log[-1] if rw.log else None
            try:
                rw.step()
            except FsxMismatch as exc:
                self._problem(exc)
                self.region_resync()
            if rw.log and rw.log[-1] is not last:
                self.note(f"region {rw.log[-1]}")
                self.count("region." + rw.log[-1].split()[1])
            return
        fsx = self.fsx
        try:
            fsx.step()
            self.note(f"fsx {fsx.log[-1]}")
        except FsxMismatch as exc:
            self.note(f"fsx {fsx.log[-1] if fsx.log else '?'}")
            self._problem(exc)
            self.fsx_resync()

    def fsx_resync(self) -> None:
        """After a problem: take the files as they are as the new model."""
        self.fsx.close_all()
        self.fsx.open_all()
        for f in self.fsx.files:
            f.model = bytearray(cold_read(f.path, os.fstat(f.fd).st_size, 0))

    def region_resync(self) -> None:
        rw = self.region
        rw.model = bytearray(cold_read(rw.path, rw.hi - rw.lo, rw.lo))

    def finish(self) -> None:
        self.op = "final checks"
        # After a problem the files as they are become the model, as during the run: the
        # remount check then asks only that the unmount kept what the mount last showed.
        try:
            self.fsx.check_all("final check")
        except FsxMismatch as exc:
            self._problem(exc)
            self.fsx_resync()
        rw = self.region
        try:
            drop_kernel_cache(rw.fd)
            rw._check(rw.lo, read_full(rw.fd, rw.hi - rw.lo, rw.lo), "final check",
                      rw.hi - rw.lo)
        except FsxMismatch as exc:
            self._problem(exc)
            self.region_resync()
        self.fsx.close_all()
        os.close(rw.fd)
        os.close(rw.dfd)
        self.counts.update({f"priv.{k}": v for k, v in self.fsx.counts.items()})
        for k, v in self.fsx.misaligned.items():
            self.tolerated[f"priv.misaligned_odirect:{k}"] += v
        self.extra["files"] = {f.path: bytes(f.model) for f in self.fsx.files}
        self.extra["region"] = bytes(rw.model)


# --------------------------------------------------------------------------- the soak


def _setup_tree(root: str, seed: int) -> bytes:
    """data/s0..s3 (FLOOR bytes of random data, fsynced), ns/, own/, priv/, fiopriv/;
    returns s2's owned region."""
    rng = random.Random(seed)
    for d in ("data", "ns", "own", "priv", "fiopriv"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    region = b""
    for name in SHARED:
        content = rng.randbytes(FLOOR)
        fd = os.open(os.path.join(root, "data", name), os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                     0o644)
        try:
            os.pwrite(fd, content, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        if name == OWNED:
            region = content[REGION_LO:REGION_HI]
    return region


def _verify_after_remount(root: str, results: list[dict[str, Any]]) -> list[str]:
    """The workers' models against the remounted filesystem."""
    problems = []
    for r in results:
        extra = r.get("extra") or {}
        for path, model in (extra.get("files") or {}).items():
            got = cold_read(path, len(model) + PAGE, 0)
            if got != model:
                first = next((i for i in range(min(len(got), len(model)))
                              if got[i] != model[i]), min(len(got), len(model)))
                problems.append(f"{path}: differs from the model after remount ({len(got)} vs "
                                f"{len(model)} bytes, first difference at {first})")
        if "region" in extra:
            got = cold_read(os.path.join(root, "data", OWNED), REGION_HI - REGION_LO, REGION_LO)
            if got != extra["region"]:
                problems.append(f"data/{OWNED} owned region differs from the model after remount")
        if "own" in extra:
            o = extra["own"]
            problems += [f"{o['base']}: {p}" for p in
                         check_own_tree(o["base"], o["entries"], o["inodes"])]
    for name in SHARED:
        size = os.stat(os.path.join(root, "data", name)).st_size
        if size < FLOOR:
            problems.append(f"data/{name}: st_size {size} below the floor after remount")
    return problems


def _usage(root: str) -> str:
    st = os.statvfs(root)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return (f"{used / MiB:.0f} of {st.f_blocks * st.f_frsize / MiB:.0f} MiB used, "
            f"{st.f_files - st.f_ffree} inodes")


def _group_pids(pgids: set[int]) -> list[int]:
    """Every process whose process group is one of `pgids` (reads /proc only)."""
    return sorted(pid for pid, fields in process_stats() if int(fields[2]) in pgids)


def _tail(path: str, n: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "<no log>\n"


def _mount_opts() -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in filter(None, os.environ.get("DIOFS_SOAK_OPTS", "").split(",")):
        k, _, v = item.partition("=")
        opts[k] = v if v else True
    return opts


def soak(mount_factory: MountFactory, tmp_path: Path, seconds: float) -> dict[str, Any]:
    base_seed = int(os.environ.get("DIOFS_SOAK_SEED", "0")) or random.SystemRandom().randrange(
        1, 10**9)
    engines = fio_engines(tmp_path) if shutil.which("fio") else []
    bugs = [b for b in os.environ.get("DIOFS_SOAK_BUGS", "").split(",") if b]
    m = mount_factory(size=IMAGE_SIZE, opts=_mount_opts(), bugs=bugs)
    root = str(m.mnt)
    logdir = tmp_path / "soak"
    logdir.mkdir()
    region = run_in_child(_setup_tree, root, base_seed, timeout=120, mounts=[m])

    t0 = time.monotonic()
    t_end = t0 + seconds
    common = {"root": root, "logdir": str(logdir), "t_end": t_end}
    specs: list[Worker] = [
        NamespaceWorker(0, base_seed * 10 + 0, **common),
        NamespaceWorker(1, base_seed * 10 + 1, **common),
        MapperWorker(3, base_seed * 10 + 3, **common),
        SpaceWorker(4, base_seed * 10 + 4, **common),
        PrivateWorker(5, base_seed * 10 + 5, region_model=region, **common),
    ]
    if engines:
        specs.insert(2, FioWorker(2, base_seed * 10 + 2, engines=engines, **common))
    seeds = ", ".join(f"w{w.wid} {w.kind} seed={w.seed}" for w in specs)
    print(f"\nsoak: {seconds / 60:.1f} min, base seed {base_seed} (DIOFS_SOAK_SEED), "
          f"stall limit {STALL_S:.0f}s, fio engines {engines}, mount opts {m.opts}, bugs {bugs}, "
          f"left out {sorted(NO_OPS)}; "
          f"{seeds}; "
          f"logs in {logdir}", flush=True)

    ctx = multiprocessing.get_context("fork")
    hb = ctx.Array("d", 10, lock=False)
    procs: dict[int, tuple[Any, Any, Worker]] = {}
    for w in specs:
        hb[w.wid] = time.monotonic()
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker_entry, args=(w, child, hb), name=f"soak-{w.kind}")
        proc.start()
        child.close()
        with contextlib.suppress(OSError):
            os.setpgid(proc.pid, proc.pid)
        procs[w.wid] = (proc, parent, w)

    results: dict[int, dict[str, Any]] = {}
    hung: list[Worker] = []
    reason = ""
    try:
        while len(results) < len(procs):
            for wid, (proc, conn, w) in procs.items():
                if wid in results:
                    continue
                if conn.poll():
                    try:
                        results[wid] = conn.recv()
                    except (EOFError, OSError):
                        results[wid] = {"wid": wid, "kind": w.kind, "seed": w.seed,
                                        "nerrors": 1, "errors": ["result lost"], "counts": {}}
                    proc.join(30)
                elif not proc.is_alive() and not conn.poll():
                    proc.join()
                    results[wid] = {
                        "wid": wid, "kind": w.kind, "seed": w.seed, "counts": {}, "tolerated": {},
                        "nerrors": 1, "nmismatches": 0, "mismatches": [], "extra": {},
                        "errors": [f"[w{wid} {w.kind} seed={w.seed}] worker died with exit code "
                                   f"{proc.exitcode} (-7 is SIGBUS)\n--- stderr ---\n"
                                   + _tail(os.path.join(logdir, f"w{wid}-{w.kind}.stderr"), 40)
                                   + "--- last ops ---\n" + _tail(w.logpath, 10)]}
            if len(results) == len(procs):
                break
            now = time.monotonic()
            running = [w for wid, (_, _, w) in procs.items() if wid not in results]
            stalled = [w for w in running if now - hb[w.wid] > STALL_S]
            if stalled:
                reason = (f"no progress for {STALL_S:.0f}s: "
                          + ", ".join(f"w{w.wid} {w.kind} (last beat {now - hb[w.wid]:.0f}s ago)"
                                      for w in stalled))
            elif now > t_end + STALL_S:
                stalled = running
                reason = f"still running {STALL_S:.0f}s after the end: " + ", ".join(
                    f"w{w.wid} {w.kind}" for w in running)
            if stalled:
                hung = stalled
                break
            time.sleep(0.5)
    except BaseException:  # interrupted (^C, a bug here): leave no worker behind
        for wid, (proc, _, _) in procs.items():
            if wid not in results:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.join(15)
        raise

    elapsed = time.monotonic() - t0
    if hung:
        _fail_hang(m, procs, results, hung, reason, elapsed, base_seed, logdir)

    summary = _summarize(results, elapsed, base_seed)
    # final: unmount, explicit fsck, remount, the models once more
    m.unmount()
    fsck = m.fsck()
    summary["fsck"] = fsck.stdout.strip().splitlines()[-1] if fsck.stdout.strip() else "rc 0"
    m.start()
    problems = run_in_child(_verify_after_remount, root, list(results.values()), timeout=300,
                            mounts=[m])
    summary["after_remount"] = problems
    summary["usage"] = run_in_child(_usage, root, timeout=60, mounts=[m])
    return summary


def _summarize(results: dict[int, dict[str, Any]], elapsed: float, seed: int) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    tolerated: collections.Counter[str] = collections.Counter()
    errors, mismatches = [], []
    nerrors = nmismatches = 0
    for r in results.values():
        counts.update(r.get("counts") or {})
        tolerated.update(r.get("tolerated") or {})
        errors += r.get("errors") or []
        mismatches += r.get("mismatches") or []
        nerrors += r.get("nerrors", 0)
        nmismatches += r.get("nmismatches", 0)
    return {"minutes": round(elapsed / 60, 2), "seed": seed, "workers": len(results),
            "ops": dict(sorted(counts.items())),
            "total": sum(v for k, v in counts.items() if k != "fio.ios"),
            "tolerated": dict(sorted(tolerated.items())), "hangs": 0, "errors": errors,
            "nerrors": nerrors, "mismatches": mismatches, "nmismatches": nmismatches}


def _fail_hang(m: Mount, procs: dict[int, tuple[Any, Any, Worker]],
               results: dict[int, dict[str, Any]], hung: list[Worker], reason: str,
               elapsed: float, seed: int, logdir: Path) -> None:
    """Rescue (report, SIGUSR1, abort, lazy unmount), kill our workers' process groups by
    pid, check that nothing is left behind, fail with the evidence."""
    pgids = {proc.pid for wid, (proc, _, _) in procs.items() if wid not in results}
    clients = _group_pids(pgids)
    # the logs before the abort: afterwards the workers' calls fail with ENOTCONN
    lastops = "\n".join(
        f"--- w{w.wid} {w.kind} seed={w.seed}: last operations ({w.logpath}) ---\n"
        + _tail(w.logpath, 8) for w in hung)
    others = "\n".join(f"w{w.wid} {w.kind}: " + _tail(w.logpath, 1).strip()
                       for _, _, w in procs.values() if w not in hung)
    daemon_pid = m.daemon.pid if m.daemon else None
    report = watchdog.rescue([m.ref], clients, reason=f"soak hang after {elapsed:.0f}s: {reason}")
    m.rescued.append(report)
    for pgid in pgids:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    for proc, _, _ in procs.values():
        proc.join(15)
    left = []
    deadline = time.monotonic() + 15
    while daemon_pid is not None and watchdog.process_alive(daemon_pid) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    if daemon_pid is not None and watchdog.process_alive(daemon_pid):
        left.append(f"daemon {daemon_pid} still running 15s after the abort")
    left += [f"client {pid} alive" for pid in clients if watchdog.process_alive(pid)]
    stuck = [t for t in watchdog.stuck_tasks() if t.pid in clients or t.pid == daemon_pid]
    left += [f"D-state {t.pid}/{t.tid} {t.comm} ({t.wchan})" for t in stuck]
    if mountinfo.is_mounted(m.mnt):
        left.append("still mounted")
    (logdir / "hang-report.txt").write_text(report)
    pytest.fail(
        f"soak HANG after {elapsed / 60:.1f} min (base seed {seed}): {reason}\n"
        f"left behind after the rescue: {left or 'nothing'}\n{lastops}\n"
        f"--- the other workers' last lines ---\n{others}\n"
        f"--- watchdog report (also in {logdir / 'hang-report.txt'}) ---\n{report}\n"
        f"--- daemon log ---\n{m.log_tails(80)}", pytrace=False)


def _report(summary: dict[str, Any]) -> None:
    ops = " ".join(f"{k}={v}" for k, v in summary["ops"].items())
    tol = " ".join(f"{k}={v}" for k, v in summary["tolerated"].items())
    print(f"SOAK SUMMARY: {summary['minutes']} min, seed {summary['seed']}, "
          f"{summary['workers']} workers, {summary['total']} ops, hangs 0, "
          f"mismatches {summary['nmismatches']}, errors {summary['nerrors']}, "
          f"fsck: {summary['fsck']}, after remount: "
          f"{'clean' if not summary['after_remount'] else summary['after_remount']}, "
          f"image: {summary['usage']}\n"
          f"  ops by kind: {ops}\n  tolerated: {tol}", flush=True)


# Data mismatches and worker errors the soak still finds (0 hangs since 2b5a4e6), both
# diagnosed, both open:
#  - dioread_into_map (the owned region of s2): an O_DIRECT read into a MAP_SHARED mapping of
#    the same file is lost when the kernel drops the file's whole page cache while the READ
#    has the mapping's pages pinned: the READ's bytes land in orphaned pages. The daemon's own
#    invalidator no longer does this (kernel_cache.py "Which pages"; measured with it off:
#    the mismatches stay). What still does: an O_DIRECT open of s2 by another worker (fio,
#    mapper), answered without keep_cache (ops._file_info); and any size-changing truncate
#    (FUSE fuse_do_setattr), which is why the space worker leaves s2's size alone.
#  - shared_fd_misaligned: a buffered write() crossing a page, on an fd whose O_DIRECT another
#    thread toggles, returns a short count: the kernel builds each WRITE request with the
#    file's f_flags at that moment, so the second page's request says O_DIRECT and diofs
#    (ops.write: "the request's flags are the whole truth") rejects it as misaligned (EINVAL).
# Until they are fixed the test reports them as an expected failure, while hangs, fsck and the
# remount check stay strict. DIOFS_SOAK_STRICT=1 fails on them;
# DIOFS_SOAK_NO_OPS=dioread_into_map,shared_fd_misaligned leaves them out (then clean).
STRICT = os.environ.get("DIOFS_SOAK_STRICT") == "1"


def _assert_clean(summary: dict[str, Any]) -> None:
    _report(summary)
    known = []
    if summary["nmismatches"]:
        known.append(f"{summary['nmismatches']} data mismatches (first "
                     f"{len(summary['mismatches'])}):\n" + "\n\n".join(summary["mismatches"]))
    if summary["nerrors"]:
        known.append(f"{summary['nerrors']} errors (first {len(summary['errors'])} per "
                     f"worker):\n" + "\n\n".join(summary["errors"]))
    where = f"soak of {summary['minutes']} min, base seed {summary['seed']} (DIOFS_SOAK_SEED)"
    also = "".join(f"\n\nalso: {k}" for k in known)  # hard failures show the rest too
    assert not summary["after_remount"], f"{where}: after remount:\n" + "\n".join(
        summary["after_remount"]) + also
    assert "clean" in summary["fsck"], summary["fsck"] + also
    ops = summary["ops"]
    for kind in ("ns.rename", "ns.create", "own.rename", "mapper.mmap_write",
                 "mapper.dio_write", "mapper.fcntl_toggle", "mapper.aio",
                 "space.truncate_mapped", "space.punch", "space.zero", "space.falloc"):
        assert ops.get(kind, 0) > 0, f"{where}: no {kind} operation ran: {ops}{also}"
    if shutil.which("fio"):
        assert any(k.startswith("fio.") and ops[k] > 0 for k in ops), f"{ops}{also}"
    if known:
        message = f"{where}:\n" + "\n\n".join(known)
        if STRICT:
            raise AssertionError(message)
        pytest.xfail(message)


pytestmark = [pytest.mark.skipif(platform.machine() not in _AIO_SYSCALLS,
                                 reason="native AIO syscall numbers unknown here")]


@pytest.mark.deadline(SOAK_SECONDS + STALL_S + 600)
def test_soak(mount_factory: MountFactory, tmp_path: Path) -> None:
    """The default form: SOAK_SECONDS (100) of mixed work, about 2 minutes in all."""
    _assert_clean(soak(mount_factory, tmp_path, SOAK_SECONDS))


@pytest.mark.stress
@pytest.mark.deadline(STRESS_MINUTES * 60 + STALL_S + 900)
def test_soak_stress(mount_factory: MountFactory, tmp_path: Path) -> None:
    """The --stress form: DIOFS_SOAK_MINUTES (30) of mixed work on one mount."""
    _assert_clean(soak(mount_factory, tmp_path, STRESS_MINUTES * 60))
