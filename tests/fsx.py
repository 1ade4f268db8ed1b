"""fsx-like randomized exerciser of the buffered path, checked against an in-memory model.

Every operation is applied to the real file(s) on a diofs mount and to a `bytearray` model;
every read (buffered through a long-lived fd, "cold" buffered after dropping the kernel's page
cache so that the daemon cache serves it, MAP_SHARED, O_DIRECT) is compared with the model,
and so is st_size after every operation. On the first mismatch `FsxMismatch` is raised with
the last 30 operations and the first differing offset.

Operations (weights in `WEIGHTS`): buffered pwrite (possibly past EOF, leaving a hole; 4 % of
sizes are 64-256 KiB, past the daemon's inline I/O limit), RWF_DSYNC/RWF_SYNC pwritev, O_APPEND
write, copy_file_range from another file, pread, cold pread (posix_fadvise(POSIX_FADV_DONTNEED)
first: the kernel's clean pages of the file are dropped, so the READ reaches the daemon's page
cache), ftruncate up/down, mmap(MAP_SHARED) read, mmap write + msync(MS_SYNC) (20 % without
msync: the kernel writes back later), O_DIRECT pread/pwrite (offsets and lengths multiples of
`dio_align`, page-aligned buffers), fallocate PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE (with and
without KEEP_SIZE), fsync/fdatasync, close and reopen, rename of a new file over the file
(reading the orphan through the old fd first), unlink + close + create, a whole-file cold
check, and remount (unmount + mount; every file checked whole afterwards).

Single process (`Fsx`): in tests use `run_with_remounts(m, Fsx(m.mnt, seed=S), N)`: segments
of ops run in a forked child with a deadline (hang-safe) and the parent remounts between them.
`Fsx(..., remount=m.remount).run(N)` remounts in-process instead (the CLI does that).

Concurrent (`setup_concurrent` / `run_round` / `run_concurrent`): K processes on one file of
fixed size, each owning a random *unaligned* byte region (neighbours share pages and blocks)
and checking its own bytes against its own model; ops as above minus size changes, plus
`seqread` (cold sequential reads up to the region's end, so that the daemon's readahead fills
pages of the neighbour's region, pages no kernel folio lock covers). Writes through a mapping
stay on pages wholly inside the region (the kernel writes a mapped page back whole: a shared
page would carry a neighbour's old bytes). `dioread_into_map` is off by default in this mode:
it deadlocks the daemon against a neighbour's direct write (see RegionWorker.OPS).

Command line:
    .venv/bin/python -m tests.fsx MNT --ops N --seed S      # an existing diofs mount
    .venv/bin/python -m tests.fsx --ops N --seed S [-o cache_size=1M] [--bug B] [--keep]
                                                            # own temporary mount, remounts on
    add --workers K [--rounds R] for the concurrent mode (N ops per worker per round)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import errno
import mmap
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.io import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    cold_read,
    direct_pread,
    direct_pwrite,
    drop_kernel_cache,
    fallocate,
    read_full,
)

if TYPE_CHECKING:
    from harness.mount import Mount

PAGE = 4096


class FsxMismatch(AssertionError):
    """The file disagrees with the model (or an op failed unexpectedly)."""


WEIGHTS = {
    "write": 20,
    "read": 12,
    "coldread": 10,
    "truncate": 6,
    "mapread": 6,
    "mapwrite": 6,
    "dioread": 8,
    "diowrite": 8,
    "punch": 4,
    "zero": 3,
    "fsync": 3,
    "reopen": 2,
    "check": 2,
    "syncwrite": 3,
    "append": 2,
    "copy": 2,
    "replace": 1,
    "recreate": 1,
    "diowrite_from_map": 3,
    "dioread_into_map": 3,
}
REMOUNT_WEIGHT = 0.3


class _File:
    def __init__(self, path: str) -> None:
        self.path = path
        self.model = bytearray()
        self.fd = -1  # buffered O_RDWR
        self.dfd = -1  # O_DIRECT O_RDWR


class Fsx:
    """One randomized run. `remount()` (optional) unmounts and mounts the same image again at
    the same mountpoint; the exerciser closes its fds before and reopens them after."""

    def __init__(
        self,
        mnt: str | os.PathLike[str],
        *,
        seed: int,
        nfiles: int = 2,
        max_size: int = 1 << 20,
        max_len: int = 64 << 10,
        dio_align: int = 512,
        remount: Callable[[], None] | None = None,
        weights: dict[str, float] | None = None,
        log_ops: int = 30,
    ) -> None:
        self.mnt = os.fspath(mnt)
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_size = max_size
        self.max_len = max_len
        self.dio_align = dio_align
        self.remount_fn = remount
        w = dict(weights or WEIGHTS)
        if remount is not None:
            w.setdefault("remount", REMOUNT_WEIGHT)
        else:
            w.pop("remount", None)
        self.ops = list(w)
        self.cum = list(w.values())
        self.files = [_File(os.path.join(self.mnt, f"fsx-{seed}-{i}")) for i in range(nfiles)]
        self.log: collections.deque[str] = collections.deque(maxlen=log_ops)
        self.counts: collections.Counter[str] = collections.Counter()
        self.n = 0
        self.elapsed = 0.0

    # ------------------------------------------------------------------ plumbing
    def _open(self, f: _File) -> None:
        f.fd = os.open(f.path, os.O_RDWR | os.O_CREAT, 0o644)
        f.dfd = os.open(f.path, os.O_RDWR | os.O_DIRECT)

    def _close(self, f: _File) -> None:
        for fd in (f.fd, f.dfd):
            if fd >= 0:
                os.close(fd)
        f.fd = f.dfd = -1

    def open_all(self) -> None:
        for f in self.files:
            self._open(f)

    def close_all(self) -> None:
        for f in self.files:
            self._close(f)

    def _fail(self, f: _File, what: str, got: bytes | None = None, want: bytes | None = None,
              base: int = 0) -> None:
        lines = [f"fsx seed={self.seed} op #{self.n} on {os.path.basename(f.path)}: {what}"]
        if got is not None and want is not None:
            n = min(len(got), len(want))
            first = next((i for i in range(n) if got[i] != want[i]), n)
            lines.append(
                f"  first differing offset {base + first} (got {len(got)} bytes, want "
                f"{len(want)}); got {got[first:first + 16].hex()} want "
                f"{want[first:first + 16].hex()}"
            )
            last = max((i for i in range(n) if got[i] != want[i]), default=first)
            lines.append(f"  last differing offset in the range {base + last}")
        lines.append(f"  model size {len(f.model)}; last {len(self.log)} ops:")
        lines.extend(f"    {entry}" for entry in self.log)
        raise FsxMismatch("\n".join(lines))

    def _note(self, f: _File, desc: str) -> None:
        """Record the op with its arguments before doing it (so a failing op is logged)."""
        self.log[-1] = f"#{self.n} {os.path.basename(f.path)}: {desc}"

    def _check_read(self, f: _File, off: int, size: int, got: bytes, what: str) -> None:
        want = bytes(f.model[off : off + size])
        if got != want:
            self._fail(f, f"{what}: data differs from the model", got, want, off)

    def _check_size(self, f: _File, what: str) -> None:
        st = os.fstat(f.fd).st_size
        if st != len(f.model):
            self._fail(f, f"{what}: st_size {st} != model size {len(f.model)}")

    def _range(self, limit: int, align: int = 1, min_len: int = 1) -> tuple[int, int]:
        """(off, len) with off + len <= limit (if possible), aligned to `align`."""
        r = self.rng
        x = r.random()
        if x < 0.3:
            size = r.randint(1, 64)  # small writes/reads: sub-page RMW
        elif x < 0.34:
            size = r.randint(self.max_len, 4 * self.max_len)  # large: past the inline limit
        else:
            size = r.randint(1, self.max_len)
        size = max(min_len, size // align * align) if align > 1 else size
        hi = max(0, limit - size)
        off = r.randint(0, hi) // align * align
        return off, size

    def _rand_bytes(self, n: int) -> bytes:
        # a recognizable pattern: op number in every 8-byte word, then random tail
        head = self.n.to_bytes(4, "little")
        return (head + self.rng.randbytes(4)) * (n // 8) + self.rng.randbytes(n % 8)

    # ------------------------------------------------------------------ ops
    def op_write(self, f: _File) -> str:
        off, size = self._range(self.max_size)
        data = self._rand_bytes(size)
        self._note(f, f"write {off:#x}+{size:#x}")
        n = os.pwrite(f.fd, data, off)
        if n != size:
            self._fail(f, f"short write {n} of {size}")
        self._model_write(f, off, data)
        return f"write {off:#x}+{size:#x}"

    def op_syncwrite(self, f: _File) -> str:
        off, size = self._range(self.max_size)
        data = self._rand_bytes(size)
        flag, name = self.rng.choice([(os.RWF_DSYNC, "RWF_DSYNC"), (os.RWF_SYNC, "RWF_SYNC")])
        self._note(f, f"syncwrite({name}) {off:#x}+{size:#x}")
        n = os.pwritev(f.fd, [data], off, flag)
        if n != size:
            self._fail(f, f"short write {n} of {size}")
        self._model_write(f, off, data)
        return f"syncwrite({name}) {off:#x}+{size:#x}"

    def op_append(self, f: _File) -> str:
        size = self.rng.randint(1, self.max_len // 4)
        if len(f.model) + size > self.max_size:
            return "append (file full, skipped)"
        data = self._rand_bytes(size)
        self._note(f, f"append {len(f.model):#x}+{size:#x}")
        fd = os.open(f.path, os.O_WRONLY | os.O_APPEND)
        try:
            n = os.write(fd, data)
        finally:
            os.close(fd)
        if n != size:
            self._fail(f, f"short append {n} of {size}")
        self._model_write(f, len(f.model), data)
        return f"append +{size:#x}"

    def op_copy(self, f: _File) -> str:
        others = [g for g in self.files if g is not f]
        if not others:
            return "copy (one file, skipped)"
        src = self.rng.choice(others)
        soff, size = self._range(len(src.model) + 4096)
        doff = self.rng.randint(0, max(0, self.max_size - size))
        self._note(f, f"copy_file_range {os.path.basename(src.path)} {soff:#x}+{size:#x} "
                      f"-> {doff:#x}")
        done = 0
        while done < size:
            n = os.copy_file_range(src.fd, f.fd, size - done, soff + done, doff + done)
            if n == 0:
                break
            done += n
        want = bytes(src.model[soff : soff + size])
        if done != len(want):
            self._fail(f, f"copy_file_range copied {done}, model has {len(want)} bytes")
        if want:
            self._model_write(f, doff, want)
        return f"copy_file_range {os.path.basename(src.path)} {soff:#x}+{size:#x} -> {doff:#x}"

    def _model_write(self, f: _File, off: int, data: bytes) -> None:
        end = off + len(data)
        if end > len(f.model):
            f.model.extend(bytes(end - len(f.model)))
        f.model[off:end] = data

    def op_read(self, f: _File) -> str:
        off, size = self._range(len(f.model) + 8192)
        self._note(f, f"read {off:#x}+{size:#x}")
        got = read_full(f.fd, size, off)
        self._check_read(f, off, size, got, "read")
        return f"read {off:#x}+{size:#x}"

    def op_coldread(self, f: _File) -> str:
        off, size = self._range(len(f.model) + 8192)
        self._note(f, f"coldread {off:#x}+{size:#x}")
        drop_kernel_cache(f.fd)
        got = read_full(f.fd, size, off)
        self._check_read(f, off, size, got, "coldread")
        return f"coldread {off:#x}+{size:#x}"

    def op_truncate(self, f: _File) -> str:
        r = self.rng
        cur = len(f.model)
        if r.random() < 0.5 and cur:
            size = r.randint(0, cur)
        else:
            size = r.randint(cur, min(self.max_size, cur + 4 * self.max_len))
        if r.random() < 0.3:
            size = size // PAGE * PAGE
        self._note(f, f"truncate {cur:#x} -> {size:#x}")
        os.ftruncate(f.fd, size)
        if size < cur:
            del f.model[size:]
        else:
            f.model.extend(bytes(size - cur))
        return f"truncate {cur:#x} -> {size:#x}"

    def op_mapread(self, f: _File) -> str:
        size = len(f.model)
        if size == 0:
            return "mapread (empty, skipped)"
        off, n = self._range(size)
        n = min(n, size - off)
        self._note(f, f"mapread {off:#x}+{n:#x}")
        with mmap.mmap(f.fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            got = m[off : off + n]
        self._check_read(f, off, n, got, "mapread")
        return f"mapread {off:#x}+{n:#x}"

    def op_mapwrite(self, f: _File) -> str:
        size = len(f.model)
        if size == 0:
            return "mapwrite (empty, skipped)"
        off, n = self._range(size)
        n = min(n, size - off)
        data = self._rand_bytes(n)
        sync = self.rng.random() < 0.8
        self._note(f, f"mapwrite{'' if sync else '(nosync)'} {off:#x}+{n:#x}")
        with mmap.mmap(f.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[off : off + n] = data
            if sync:
                m.flush()  # msync(MS_SYNC)
        self._model_write(f, off, data)
        return f"mapwrite{'' if sync else '(nosync)'} {off:#x}+{n:#x}"

    def op_dioread(self, f: _File) -> str:
        a = self.dio_align
        off, size = self._range(len(f.model) + 8192, align=a, min_len=a)
        self._note(f, f"dioread {off:#x}+{size:#x}")
        got = direct_pread(f.dfd, size, off)
        self._check_read(f, off, size, got, "dioread")
        return f"dioread {off:#x}+{size:#x}"

    def op_diowrite(self, f: _File) -> str:
        a = self.dio_align
        off, size = self._range(self.max_size, align=a, min_len=a)
        data = self._rand_bytes(size)
        self._note(f, f"diowrite {off:#x}+{size:#x}")
        n = direct_pwrite(f.dfd, data, off)
        if n != size:
            self._fail(f, f"short direct write {n} of {size}")
        self._model_write(f, off, data)
        return f"diowrite {off:#x}+{size:#x}"

    def _disjoint(self, size: int, align: int) -> tuple[int, int, int] | None:
        """(src, dst, n): two non-overlapping ranges of n bytes inside [0, size), at least a
        page apart, all multiples of `align`."""
        hi = self.max_len
        if self.rng.random() < 0.2:  # past 1 MiB: the kernel splits it into overlapping chunks
            hi = max(hi, min(size // 2 - PAGE, 3 << 20))
        n = self.rng.randint(1, hi) // align * align
        if n == 0 or 2 * n + 2 * PAGE > size:
            return None
        src = self.rng.randint(0, size - n) // align * align
        lo_free = [(0, src - PAGE - n), (src + n + PAGE, size - n)]
        choices = [(a, b) for a, b in lo_free if b >= a]
        if not choices:
            return None
        a, b = self.rng.choice(choices)
        # the mapped side is aligned too: the kernel cuts a direct transfer into requests
        # at page boundaries of the user buffer (1 MiB = 256 pages each), so a buffer that is
        # not `align`-aligned makes requests of misaligned length past 1 MiB (EINVAL)
        dst = -(-a // align) * align
        if dst > b:
            return None
        return src, self.rng.randint(dst // align, b // align) * align, n

    def op_diowrite_from_map(self, f: _File) -> str:
        """O_DIRECT write whose source buffer is a MAP_SHARED mapping of the same file: the
        kernel faults the source pages in while this task's direct write is in the daemon
        (the fault-marker path, SPEC 4)."""
        size = len(f.model)
        r = self._disjoint(size, self.dio_align)
        if r is None:
            return "diowrite_from_map (file too small, skipped)"
        dst, src, n = r  # the aligned one is the file offset written
        self._note(f, f"diowrite_from_map map[{src:#x}+{n:#x}] -> {dst:#x}")
        drop_kernel_cache(f.fd)  # make the source faults reach the daemon
        with mmap.mmap(f.fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            view = memoryview(m)[src : src + n]
            try:
                w = os.pwritev(f.dfd, [view], dst)
            finally:
                view.release()
        if w != n:
            self._fail(f, f"short direct write {w} of {n}")
        self._model_write(f, dst, bytes(f.model[src : src + n]))
        return f"diowrite_from_map map[{src:#x}+{n:#x}] -> {dst:#x}"

    def op_dioread_into_map(self, f: _File) -> str:
        """O_DIRECT read into a MAP_SHARED mapping of the same file (fuse-facts Q2)."""
        size = len(f.model)
        r = self._disjoint(size, self.dio_align)
        if r is None:
            return "dioread_into_map (file too small, skipped)"
        src, dst, n = r
        self._note(f, f"dioread_into_map {src:#x}+{n:#x} -> map[{dst:#x}]")
        drop_kernel_cache(f.fd)
        with mmap.mmap(f.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            view = memoryview(m)[dst : dst + n]
            try:
                got = os.preadv(f.dfd, [view], src)
            finally:
                view.release()
            if self.rng.random() < 0.7:
                m.flush()
        if got != n:
            self._fail(f, f"short direct read {got} of {n}")
        self._model_write(f, dst, bytes(f.model[src : src + n]))
        return f"dioread_into_map {src:#x}+{n:#x} -> map[{dst:#x}]"

    def op_punch(self, f: _File) -> str:
        cur = len(f.model)
        off, size = self._range(cur + 8192)
        self._note(f, f"punch {off:#x}+{size:#x}")
        fallocate(f.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, size)
        end = min(off + size, cur)
        if off < end:
            f.model[off:end] = bytes(end - off)
        return f"punch {off:#x}+{size:#x}"

    def op_zero(self, f: _File) -> str:
        cur = len(f.model)
        off, size = self._range(min(self.max_size, cur + 8192))
        keep = self.rng.random() < 0.5
        self._note(f, f"zero{'(keep)' if keep else ''} {off:#x}+{size:#x}")
        fallocate(f.fd, FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep else 0), off, size)
        end = off + size if not keep else min(off + size, cur)
        if end > cur:
            f.model.extend(bytes(end - cur))
        if off < end:
            f.model[off:end] = bytes(end - off)
        return f"zero{'(keep)' if keep else ''} {off:#x}+{size:#x}"

    def op_fsync(self, f: _File) -> str:
        if self.rng.random() < 0.5:
            os.fsync(f.fd)
            return "fsync"
        os.fdatasync(f.fd)
        return "fdatasync"

    def op_reopen(self, f: _File) -> str:
        self._close(f)
        self._open(f)
        return "close+reopen"

    def op_check(self, f: _File) -> str:
        size = len(f.model)
        got = cold_read(f.path, size + 4096, 0)
        self._check_read(f, 0, size + 4096, got, "check (whole file, cold)")
        return f"check 0+{size:#x}"

    def op_replace(self, f: _File) -> str:
        """Write a new file and rename it over this one (the old inode becomes an orphan
        while our fds are open, and is freed when they close)."""
        size = self.rng.randint(0, self.max_size // 2)
        data = self._rand_bytes(size)
        tmp = f.path + ".new"
        sync = self.rng.random() < 0.3
        self._note(f, f"replace by a new file of {size:#x} bytes{' (fsync)' if sync else ''}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off in range(0, size, 256 << 10):
                os.pwrite(fd, data[off : off + (256 << 10)], off)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, f.path)
        old = bytes(f.model)
        got = read_full(f.fd, len(old) + 4096, 0)  # the orphan still reads its own data
        self._check_read(f, 0, len(old) + 4096, got, "orphan read after rename-over")
        self._close(f)
        f.model = bytearray(data)
        self._open(f)
        return f"replace {size:#x}"

    def op_recreate(self, f: _File) -> str:
        """Unlink with fds open, close them (the inode is freed), create an empty file."""
        self._note(f, "unlink + close + create")
        os.unlink(f.path)
        self._close(f)
        f.model = bytearray()
        self._open(f)
        return "recreate"

    def op_remount(self, f: _File) -> str:
        assert self.remount_fn is not None
        self.close_all()
        self.remount_fn()
        self.open_all()
        self.check_all("after remount")
        return "remount (+ whole-file check of every file)"

    def check_all(self, what: str) -> None:
        """Cold whole-file check of every file (after a remount: everything survived)."""
        for g in self.files:
            got = cold_read(g.path, len(g.model) + 4096, 0)
            self._check_read(g, 0, len(g.model) + 4096, got, what)

    # ------------------------------------------------------------------ the loop
    def step(self) -> None:
        self.n += 1
        name = self.rng.choices(self.ops, weights=self.cum)[0]
        f = self.rng.choice(self.files)
        self.log.append(f"#{self.n} {os.path.basename(f.path)}: {name} ...")
        try:
            desc = getattr(self, f"op_{name}")(f)
        except FsxMismatch:
            raise
        except OSError as exc:
            self.log[-1] = f"#{self.n} {os.path.basename(f.path)}: {name} -> {exc}"
            self._fail(f, f"{name} failed: {errno.errorcode.get(exc.errno or 0, '?')} {exc}")
            raise  # not reached
        self.log[-1] = f"#{self.n} {os.path.basename(f.path)}: {desc}"
        self.counts[name] += 1
        self._check_size(f, name)

    def run(self, nops: int, *, after_remount: bool = False) -> dict[str, object]:
        """Run `nops` operations (first a whole-file check of every file if `after_remount`),
        then a final whole-file check; returns a summary."""
        t0 = time.monotonic()
        self.open_all()
        try:
            if after_remount:
                self.check_all("after remount")
            for _ in range(nops):
                self.step()
            for f in self.files:
                self.op_check(f)
        finally:
            self.close_all()
            self.elapsed += time.monotonic() - t0
        return self.summary()

    def summary(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "ops": self.n,
            "seconds": round(self.elapsed, 2),
            "ops_per_s": round(self.n / self.elapsed, 1) if self.elapsed else 0.0,
            "counts": dict(sorted(self.counts.items())),
        }

    def cleanup(self) -> None:
        for f in self.files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f.path)


# ---------------------------------------------------------------------------------------------
# Concurrent mode: several processes, one file, disjoint byte regions


class RegionWorker:
    """One process of a concurrent run: owns bytes [lo, hi) of a shared file of fixed size and
    checks every read of them against its own model. Region edges are not aligned, so
    neighbours share pages and blocks: a lost update, a stale page or a zeroed neighbour shows
    up as a mismatch in the victim's region. The file size never changes (no truncate, KEEP_SIZE
    fallocate only)."""

    OPS = {"write": 20, "syncwrite": 3, "read": 10, "coldread": 10, "seqread": 4, "mapread": 6,
           "mapwrite": 6, "dioread": 8, "diowrite": 8, "punch": 3, "zero": 3, "fsync": 3,
           "diowrite_from_map": 3, "dioread_into_map": 0}
    # dioread_into_map is off by default: with other processes doing direct writes to the
    # same file it deadlocks the daemon (the reply to an async direct READ marks the mapped
    # destination pages dirty under their folio locks, inside the daemon's write(2) to
    # /dev/fuse; see the report and test_fsx.py::test_dio_read_into_mapping_deadlock).

    def __init__(self, path: str, lo: int, hi: int, model: bytes, *, seed: int, wid: int,
                 dio_align: int = 512, max_len: int = 64 << 10,
                 ops: dict[str, float] | None = None) -> None:
        self.path, self.lo, self.hi = path, lo, hi
        self.ops = dict(ops or self.OPS)
        self.model = bytearray(model)
        self.rng = random.Random(seed * 1000 + wid)
        self.wid, self.seed = wid, seed
        self.dio_align, self.max_len = dio_align, max_len
        self.log: collections.deque[str] = collections.deque(maxlen=30)
        self.n = 0
        self.fd = self.dfd = -1
        self.size = 0

    def _fail(self, what: str, got: bytes | None = None, off: int = 0) -> None:
        lines = [f"fsx seed={self.seed} worker {self.wid} [{self.lo:#x}, {self.hi:#x}) "
                 f"op #{self.n}: {what}"]
        if got is not None:
            want = self._want(off, len(got))
            first = next((i for i in range(len(got)) if got[i] != want[i]), len(got))
            # (first == len(got): a short read, the data read so far matched)
            lines.append(f"  first differing offset {off + first}; got "
                         f"{got[first:first + 16].hex()} want {want[first:first + 16].hex()}")
        lines.append(f"  last {len(self.log)} ops of this worker:")
        lines.extend(f"    {e}" for e in self.log)
        raise FsxMismatch("\n".join(lines))

    def _want(self, off: int, n: int) -> bytes:
        return bytes(self.model[off - self.lo : off - self.lo + n])

    def _check(self, off: int, got: bytes, what: str, n: int | None = None) -> None:
        """`got` (read at `off`, `n` bytes asked; default len(got)) against the model."""
        want = self._want(off, len(got) if n is None else n)
        if got != want:
            self._fail(f"{what}: data differs from the model (got {len(got)} bytes, want "
                       f"{len(want)})", got, off)

    def _put(self, off: int, data: bytes) -> None:
        self.model[off - self.lo : off - self.lo + len(data)] = data

    def _span(self, align: int = 1) -> tuple[int, int] | None:
        lo, hi = self.lo, self.hi
        if align > 1:
            lo, hi = -(-lo // align) * align, hi // align * align
        if hi - lo < max(align, 1):
            return None
        r = self.rng
        n = r.randint(1, 64) if r.random() < 0.3 else r.randint(1, self.max_len)
        n = min(n, hi - lo)
        if align > 1:
            n = max(align, n // align * align)
        off = r.randint(lo, hi - n)
        if align > 1:
            off = off // align * align
        return off, n

    def _data(self, n: int) -> bytes:
        """8-byte words naming the worker and the op: a misplaced write says whose it was."""
        tag = bytes([0xA0 + self.wid]) * 2 + b"op" + (self.n & 0xFFFFFFFF).to_bytes(4, "little")
        return (tag * (n // 8 + 1))[:n]

    def _self_io(self, name: str) -> None:
        """O_DIRECT between two disjoint aligned ranges of the region, one side being a
        MAP_SHARED mapping of the file (the fault-marker path while neighbours fault too)."""
        a = self.dio_align
        lo, hi = -(-self.lo // a) * a, self.hi // a * a
        n = self.rng.randint(1, min(self.max_len, (hi - lo) // 2)) // a * a if hi - lo >= 2 * a \
            else 0
        if n == 0:
            return
        x = self.rng.randint(lo // a, (hi - 2 * n) // a) * a
        y = self.rng.randint((x + n) // a, (hi - n) // a) * a
        src, dst = (x, y) if self.rng.random() < 0.5 else (y, x)
        self.log.append(f"#{self.n} {name} {src:#x}+{n:#x} -> {dst:#x}")
        try:
            drop_kernel_cache(self.fd)
            with mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE) as m:
                if name == "diowrite_from_map":
                    view = memoryview(m)[src : src + n]
                    try:
                        done = os.pwritev(self.dfd, [view], dst)
                    finally:
                        view.release()
                else:
                    view = memoryview(m)[dst : dst + n]
                    try:
                        done = os.preadv(self.dfd, [view], src)
                    finally:
                        view.release()
                    m.flush()
        except OSError as exc:
            self._fail(f"{name} failed: {exc}")
        if done != n:
            self._fail(f"{name}: {done} of {n} bytes")
        self._put(dst, self._want(src, n))

    def step(self) -> None:
        self.n += 1
        name = self.rng.choices(list(self.ops), weights=list(self.ops.values()))[0]
        if name in ("diowrite_from_map", "dioread_into_map"):
            self._self_io(name)
            return
        align = self.dio_align if name.startswith("dio") else 1
        span = self._span(align)
        if span is None:
            return
        off, n = span
        self.log.append(f"#{self.n} {name} {off:#x}+{n:#x}")
        try:
            self._do(name, off, n)
        except OSError as exc:
            self._fail(f"{name} failed: {exc}")

    def _do(self, name: str, off: int, n: int) -> None:
        if name in ("write", "syncwrite"):
            data = self._data(n)
            flags = os.RWF_DSYNC if name == "syncwrite" else 0
            if os.pwritev(self.fd, [data], off, flags) != n:
                self._fail("short write")
            self._put(off, data)
        elif name == "read":
            self._check(off, read_full(self.fd, n, off), name, n)
        elif name == "coldread":
            drop_kernel_cache(self.fd)
            self._check(off, read_full(self.fd, n, off), name, n)
        elif name == "seqread":
            # cold sequential reads to the end of the region: the daemon's readahead window
            # grows and fills pages past `hi`, in the neighbour's region, which no kernel
            # folio lock covers (tests/test_dio_locks.py explains why that matters)
            drop_kernel_cache(self.fd)
            chunk = 16 << 10
            for pos in range(off, self.hi, chunk):
                k = min(chunk, self.hi - pos)
                self._check(pos, read_full(self.fd, k, pos), name, k)
        elif name == "mapread":
            with mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                self._check(off, m[off : off + n], name, n)
        elif name == "mapwrite":
            # only pages wholly inside the region: the kernel writes a mapped page back
            # whole, so a page shared with a neighbour would carry the neighbour's bytes as
            # they were when we dirtied it, and can land after the neighbour's punch or
            # direct write (page-granular false sharing: not a coherence Linux promises)
            plo, phi = -(-self.lo // PAGE) * PAGE, self.hi // PAGE * PAGE
            if phi - plo < 1:
                return
            off = max(off, plo)
            n = min(off + n, phi) - off
            if n <= 0:
                return
            self.log[-1] = f"#{self.n} {name} {off:#x}+{n:#x}"
            data = self._data(n)
            with mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[off : off + n] = data
                if self.rng.random() < 0.8:
                    first = off // PAGE * PAGE
                    m.flush(first, off + n - first)
            self._put(off, data)
        elif name == "dioread":
            self._check(off, direct_pread(self.dfd, n, off), name, n)
        elif name == "diowrite":
            data = self._data(n)
            if direct_pwrite(self.dfd, data, off) != n:
                self._fail("short direct write")
            self._put(off, data)
        elif name in ("punch", "zero"):
            mode = FALLOC_FL_KEEP_SIZE | (
                FALLOC_FL_PUNCH_HOLE if name == "punch" else FALLOC_FL_ZERO_RANGE)
            fallocate(self.fd, mode, off, n)
            self._put(off, bytes(n))
        elif name == "fsync":
            os.fsync(self.fd)

    def run(self, nops: int) -> int:
        self.fd = os.open(self.path, os.O_RDWR)
        self.dfd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        self.size = os.fstat(self.fd).st_size
        try:
            for _ in range(nops):
                self.step()
            drop_kernel_cache(self.fd)
            n = self.hi - self.lo
            self._check(self.lo, read_full(self.fd, n, self.lo), "final check", n)
        finally:
            os.close(self.fd)
            os.close(self.dfd)
        return self.n


def _worker_main(conn: object, w: RegionWorker, nops: int) -> None:
    import multiprocessing.connection

    assert isinstance(conn, multiprocessing.connection.Connection)
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: die with the driver
    try:
        w.run(nops)
        conn.send(("ok", w))
    except BaseException as exc:  # reported to the driver
        conn.send(("error", str(exc) if isinstance(exc, FsxMismatch) else repr(exc)))


def setup_concurrent(mnt: str | os.PathLike[str], *, seed: int, workers: int = 4,
                     size: int = 2 << 20, dio_align: int = 512,
                     ops: dict[str, float] | None = None) -> list[RegionWorker]:
    """Create the shared file (random content, fsync'ed) and one RegionWorker per region;
    region edges are random, unaligned offsets."""
    rng = random.Random(seed)
    path = os.path.join(os.fspath(mnt), f"fsx-conc-{seed}")
    content = rng.randbytes(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, content, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    cuts = sorted(rng.sample(range(1, size), workers - 1))
    bounds = list(zip([0, *cuts], [*cuts, size], strict=True))
    return [RegionWorker(path, lo, hi, content[lo:hi], seed=seed, wid=i, dio_align=dio_align,
                         ops=ops)
            for i, (lo, hi) in enumerate(bounds)]


def run_round(ws: list[RegionWorker], nops: int) -> list[RegionWorker]:
    """All workers run `nops` ops at once (one forked process each); returns their updated
    state. Raises FsxMismatch with every failing worker's report."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = []
    for w in ws:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker_main, args=(child, w, nops))
        p.start()
        child.close()
        procs.append((p, parent))
    errors, new = [], []
    for (p, conn), w in zip(procs, ws, strict=True):
        try:
            kind, value = conn.recv()
        except EOFError:
            kind, value = "error", f"worker {w.wid} died ({p.exitcode})"
        p.join()
        if kind == "ok":
            new.append(value)
        else:
            errors.append(value)
            new.append(w)
    if errors:
        raise FsxMismatch("\n\n".join(errors))
    return new


def check_regions(ws: list[RegionWorker], what: str = "after remount") -> None:
    """Cold read of every region against its worker's model (e.g. after a remount)."""
    for w in ws:
        w.log.append(what)
        w._check(w.lo, cold_read(w.path, w.hi - w.lo, w.lo), what, w.hi - w.lo)


def run_concurrent(mnt: str | os.PathLike[str], *, seed: int, workers: int = 4,
                   nops: int = 500, rounds: int = 1, size: int = 2 << 20,
                   dio_align: int = 512, between: Callable[[], None] | None = None,
                   ) -> dict[str, object]:
    """`workers` processes on one file of `size` bytes, each owning a random unaligned
    region; `rounds` rounds of `nops` ops per worker, `between()` (e.g. a remount) after every
    round but the last, then a check of every region. Raises FsxMismatch on any mismatch."""
    ws = setup_concurrent(mnt, seed=seed, workers=workers, size=size, dio_align=dio_align)
    t0 = time.monotonic()
    for rnd in range(rounds):
        ws = run_round(ws, nops)
        if between is not None and rnd < rounds - 1:
            between()
            check_regions(ws)
    elapsed = time.monotonic() - t0
    check_regions(ws, "final check")
    os.unlink(ws[0].path)
    total = sum(w.n for w in ws)
    return {"seed": seed, "workers": workers, "ops": total, "seconds": round(elapsed, 2),
            "ops_per_s": round(total / elapsed, 1)}


def _segment(fsx: Fsx, nops: int, after_remount: bool) -> Fsx:
    fsx.run(nops, after_remount=after_remount)
    return fsx  # pickled back to the parent: models, rng state, log, counts


def run_with_remounts(m: Mount, fsx: Fsx, nops: int, *, segment: tuple[int, int] = (150, 600),
                      timeout: float = 60.0) -> dict[str, object]:
    """Hang-safe run for tests: segments of random length (drawn from fsx's rng) each run in a
    forked child with a deadline (`run_in_child`, the watchdog aborts `m` on a hang); between
    segments the parent remounts `m`, and the next segment starts with a whole-file check.
    A mismatch in a child fails with its message (op log and offset) in the AssertionError."""
    from harness.mount import run_in_child

    fsx.remount_fn = None  # remounts happen here, in the parent that owns the daemon
    done, remounted = 0, False
    while done < nops:
        k = min(nops - done, fsx.rng.randint(*segment))
        fsx = run_in_child(_segment, fsx, k, remounted, timeout=timeout, mounts=[m])
        done += k
        if done < nops:
            m.remount()
            fsx.counts["remount"] += 1
            remounted = True
    return fsx.summary()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fsx", description=__doc__.split("\n")[0])
    p.add_argument("mnt", nargs="?", help="a mounted diofs (default: own temporary mount)")
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--max-size", type=int, default=1 << 20)
    p.add_argument("--dio-align", type=int, default=512)
    p.add_argument("-o", dest="opts", action="append", default=[],
                   help="mount option k=v for the own mount (e.g. cache_size=2M)")
    p.add_argument("--bug", action="append", default=[], help="--bug switch for the own mount")
    p.add_argument("--workers", type=int, default=0,
                   help="concurrent mode: K processes on one file, disjoint regions")
    p.add_argument("--keep", action="store_true", help="keep the own mount's work directory")
    p.add_argument("--rounds", type=int, default=3, help="concurrent mode: rounds (remounts)")
    a = p.parse_args(argv)
    kw = dict(seed=a.seed, nfiles=a.files, max_size=a.max_size, dio_align=a.dio_align)
    if a.mnt and a.workers:
        try:
            print(run_concurrent(a.mnt, seed=a.seed, workers=a.workers, nops=a.ops,
                                 rounds=a.rounds, dio_align=a.dio_align))
        except FsxMismatch as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    if a.mnt:
        fsx = Fsx(a.mnt, **kw)  # type: ignore[arg-type]
        try:
            summary = fsx.run(a.ops)
        except FsxMismatch as exc:
            print(exc, file=sys.stderr)
            return 1
        fsx.cleanup()
        print(summary)
        return 0
    from harness.mount import MountFactory, fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason:
        print(f"cannot mount: {reason}", file=sys.stderr)
        return 2
    opts = dict(o.split("=", 1) for o in a.opts)
    keep = tempfile.mkdtemp(prefix="fsx-") if a.keep else None
    if keep:
        print(f"work directory (kept): {keep}", file=sys.stderr)
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(
            prefix="fsx-") as tmp:
        factory = MountFactory(Path(tmp))
        rc = 0
        try:
            m = factory(size="64M", opts=opts, bugs=a.bug)
            fsx = Fsx(m.mnt, remount=m.remount, **kw)  # type: ignore[arg-type]
            try:
                if a.workers:
                    print(run_concurrent(m.mnt, seed=a.seed, workers=a.workers, nops=a.ops,
                                         rounds=a.rounds, dio_align=a.dio_align,
                                         between=m.remount))
                else:
                    print(fsx.run(a.ops))
            except FsxMismatch as exc:
                print(exc, file=sys.stderr)
                rc = 1
        finally:
            problems = factory.cleanup()
            if problems:
                print("\n".join(problems), file=sys.stderr)
                rc = rc or 3
    return rc


if __name__ == "__main__":
    sys.exit(main())
