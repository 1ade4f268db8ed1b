"""Power cuts during writes into holes and past EOF (tests/test_holes_crash.py,
scripts/demo_size_before_data.py): the workload runs on the crash backend; the image is
rebuilt at chosen points of the crash log and each file of each cut image is read off-line,
counting the deleted file's secret bytes it exposes (0 with the protection)."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import trio

from diofs.backend import crash
from diofs.backend.raw import RawImage
from diofs.cli import fsck as fsck_mod
from diofs.format import image
from diofs.fs import Filesystem
from harness.io import FALLOC_FL_KEEP_SIZE, aligned, fallocate
from harness.mount import Mount, MountFactory
from harness.workloads.holes import (
    BUG,
    KiB,
    fill_free_space_with_secret,
    secret_bytes,
    tagged,
)

CHUNK = 64 * KiB


def crash_secret_mount(factory: MountFactory, tmp_path: Path, bug_on: bool,
                       size: str = "16M") -> tuple[Mount, str]:
    m = factory(size=size, bugs=[BUG] if bug_on else [])
    fill_free_space_with_secret(m)
    m.unmount()
    log = str(tmp_path / "crash.log")
    m.opts.update(backend="crash", crash_log=log, commit_interval=0.02, data_delay=0.03,
                  writeback_age=0.05)
    m.start()
    return m, log


def extending_writes(mnt: str, rounds: int) -> dict[str, int]:
    """Threads, each on its own file: O_DIRECT 64 KiB appends (3 files), 512-byte appends,
    shuffled hole fills of a sparse file, appends into a KEEP_SIZE preallocation."""
    errors: list[BaseException] = []

    def guarded(fn: Any, *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)

        return threading.Thread(target=run)

    def appender(name: str, tag: int, chunk: int) -> None:
        path = os.path.join(mnt, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            with aligned(chunk) as buf:
                for i in range(rounds):
                    buf[:chunk] = tagged(tag * 1000 + i, chunk)
                    assert os.pwrite(fd, memoryview(buf)[:chunk], i * chunk) == chunk
        finally:
            os.close(fd)

    def hole_filler(name: str, tag: int) -> None:
        path = os.path.join(mnt, name)
        with open(path, "wb") as f:
            f.truncate(rounds * CHUNK)
        order = list(range(rounds))
        random.Random(tag).shuffle(order)
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            with aligned(CHUNK) as buf:
                for i in order:
                    buf[:CHUNK] = tagged(tag * 1000 + i, CHUNK)
                    assert os.pwrite(fd, buf, i * CHUNK) == CHUNK
        finally:
            os.close(fd)

    def preallocated(name: str, tag: int) -> None:
        path = os.path.join(mnt, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, rounds * CHUNK)
            with aligned(CHUNK) as buf:
                for i in range(rounds):
                    buf[:CHUNK] = tagged(tag * 1000 + i, CHUNK)
                    assert os.pwrite(fd, buf, i * CHUNK) == CHUNK
        finally:
            os.close(fd)

    def buffered_appender(name: str, tag: int) -> None:
        """Buffered appends (20 KiB, not block aligned), written back by the daemon's
        background writeback (writeback_age 0.05 s): the same order applies there."""
        with open(os.path.join(mnt, name), "wb", buffering=0) as f:
            for i in range(rounds):
                f.write(tagged(tag * 1000 + i, 20 * KiB))
                time.sleep(0.03)

    threads = [guarded(appender, f"a{t}", t, CHUNK) for t in range(3)]
    threads += [guarded(appender, "sub", 7, 512), guarded(hole_filler, "holes", 8),
                guarded(preallocated, "prealloc", 9), guarded(buffered_appender, "buf", 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"files": len(threads)}


def read_cut(path: str) -> tuple[list[str], dict[str, bytes]]:
    """fsck problems and the contents (within i_size) of every regular file, by name."""
    backend = RawImage(path, writable=False)
    try:
        problems = fsck_mod.check(image.load(backend), repair=False)
        fs = Filesystem.load(backend)
        root = fs.inodes[image.ROOT_INO]
        files = {n.decode(): fs.inodes[i] for n, i in (root.entries or {}).items()
                 if fs.inodes[i].entries is None}

        async def go() -> dict[str, bytes]:
            return {n: bytes(await fs.read_data(ino, 0, ino.size)) for n, ino in files.items()}

        return problems, trio.run(go)
    finally:
        backend.close()


def pick_cuts(cl: crash.CrashLog, n_random: int, seed: int) -> list[int]:
    """Just after every FLUSH (a commit or flush became durable there), the last point,
    and random points."""
    after_flush = {r.seq + 1 for r in cl.records if r.kind is crash.Kind.FLUSH}
    rest = [c for c in range(cl.n_points) if c not in after_flush]
    rng = random.Random(seed)
    return sorted(after_flush | {cl.n_points - 1}
                  | set(rng.sample(rest, min(n_random, len(rest)))))


def check_cuts(tmp_path: Path, cl: crash.CrashLog, cuts: list[int],
               seed: int) -> dict[str, Any]:
    out = str(tmp_path / "cut.img")
    r: dict[str, Any] = {"cuts": len(cuts), "secret_bytes": 0, "cuts_exposing": 0,
                         "problems": [], "bytes_checked": 0}
    for cut in cuts:
        crash.materialize(cl, out, cut, rng=random.Random(seed * 7919 + cut), mode="random")
        problems, files = read_cut(out)
        r["problems"] += [f"cut {cut}: {p}" for p in problems]
        exposed = 0
        for name, data in files.items():
            n = secret_bytes(data)
            exposed += n
            if n:
                r.setdefault("by_file", {}).setdefault(name, 0)
                r["by_file"][name] += n
        r["bytes_checked"] += sum(len(d) for d in files.values())
        r["secret_bytes"] += exposed
        r["cuts_exposing"] += bool(exposed)
    return r
