"""Power cuts during extending and hole-filling direct writes never expose unwritten blocks
(SPEC 5, issue 8, seed 003: "update i_size only after the I/O"), with the crash backend.

The image's free space first holds a deleted file's recognizable bytes (the secret; see
test_holes_extend.fill_free_space_with_secret), on a plain mount; the image is then mounted
with `backend=crash`, a short commit interval (metadata commits land in the middle of the
writes) and `data_delay` (the window between allocation and data is wide). A workload of
concurrent O_DIRECT appends (64 KiB chunks, several files), sub-block (512-byte) appends,
hole fills of a sparse file, appends into KEEP_SIZE preallocation runs and buffered appends
(written back by the daemon in the background); then the image is
rebuilt as after a power cut at many points of the crash log (just after every FLUSH, where
a commit has just become durable, plus random points; mode "random": in-flight writes land,
drop or tear) and read off-line: fsck's checks find nothing, and no file of any cut image has
a secret byte inside its size.

With `--bug size-before-data` the extent turns written and i_size grows before the data is
written: a commit between the two makes a cut image whose files show the secret.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from diofs.backend import crash
from diofs.backend.raw import RawImage
from diofs.cli import fsck as fsck_mod
from diofs.format import image
from diofs.fs import Filesystem
from harness.mount import Mount, MountFactory, run_cli, run_in_child
from tests.test_holes_extend import (
    BS,
    BUG,
    KiB,
    aligned,
    fallocate,
    fill_free_space_with_secret,
    pattern,
    secret_bytes,
)

pytestmark = pytest.mark.deadline(120)

CHUNK = 64 * KiB
FALLOC_FL_KEEP_SIZE = 0x01
RANDOM_CUTS = 120


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


# ---------------------------------------------------------------------------------------------
# the workload (a child process)


def workload(mnt: str, rounds: int) -> dict[str, int]:
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
                    buf[:chunk] = pattern(tag * 1000 + i, chunk)
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
                    buf[:CHUNK] = pattern(tag * 1000 + i, CHUNK)
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
                    buf[:CHUNK] = pattern(tag * 1000 + i, CHUNK)
                    assert os.pwrite(fd, buf, i * CHUNK) == CHUNK
        finally:
            os.close(fd)

    def buffered_appender(name: str, tag: int) -> None:
        """Buffered appends (20 KiB, not block aligned), written back by the daemon's
        background writeback (writeback_age 0.05 s): the same order applies there."""
        with open(os.path.join(mnt, name), "wb", buffering=0) as f:
            for i in range(rounds):
                f.write(pattern(tag * 1000 + i, 20 * KiB))
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


# ---------------------------------------------------------------------------------------------
# checking the cut images


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


@pytest.mark.parametrize("bug_on", [False, True], ids=["protected", "bug"])
def test_power_cut_during_extending_writes_exposes_nothing(
    mount_factory: MountFactory, tmp_path: Path, bug_on: bool
) -> None:
    t0 = time.monotonic()
    m, log = crash_secret_mount(mount_factory, tmp_path, bug_on)
    run_in_child(workload, str(m.mnt), 10, timeout=90, mounts=[m])
    cl = crash.load_log(log)  # what unmount adds is not part of the crash
    m.unmount()
    t_work = time.monotonic() - t0
    cuts = pick_cuts(cl, RANDOM_CUTS, seed=11)
    r = check_cuts(tmp_path, cl, cuts, seed=11)
    print("CRASH", cl.info(), {k: v for k, v in r.items() if k != "problems"},
          f"workload {t_work:.1f}s, cuts {time.monotonic() - t0 - t_work:.1f}s")
    assert cl.flushes >= 10 and r["cuts"] >= 100, (cl.info(), r["cuts"])
    assert r["bytes_checked"] > 0
    assert not r["problems"], r["problems"][:20]
    if bug_on:
        assert r["secret_bytes"] > 0 and r["cuts_exposing"] > 0, r
    else:
        assert r["secret_bytes"] == 0, r


def test_cut_images_mount_and_read_no_secret(mount_factory: MountFactory,
                                             tmp_path: Path) -> None:
    """A few cut images (right after commits) mounted for real: fsck.diofs is clean, and
    every file read through the mount (buffered) holds no secret byte."""
    m, log = crash_secret_mount(mount_factory, tmp_path, bug_on=False)
    run_in_child(workload, str(m.mnt), 6, timeout=90, mounts=[m])
    cl = crash.load_log(log)
    m.unmount()
    flushes = [r.seq + 1 for r in cl.records if r.kind is crash.Kind.FLUSH]
    rng = random.Random(3)
    for i, cut in enumerate(sorted(rng.sample(flushes, min(4, len(flushes))))):
        img = tmp_path / f"cut{i}.img"
        crash.materialize(cl, str(img), cut, rng=random.Random(cut), mode="random")
        proc = run_cli("fsck.diofs", img)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        mc = mount_factory(image=img)
        for name in os.listdir(mc.mnt):
            with open(mc.path(name), "rb") as f:
                data = f.read()
            assert secret_bytes(data) == 0, f"cut {cut}: {name}"
            assert len(data) % 512 == 0 and len(data) <= 10 * CHUNK
        mc.unmount()
    assert BS == 4096
