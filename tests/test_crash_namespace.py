"""Crash consistency of the namespace and of fsync'ed data (issue 3, SPEC 6), on a real mount
with the crash-simulating backend.

A workload of creates, buffered and direct writes, truncates, renames, unlinks, mkdirs and
fsync/fdatasync runs on `-o backend=crash` with a short commit interval (so metadata commits
happen in the middle of it). For each fsync we note the crash-log size when it returned: from
the first cut point past it, the fsync is acknowledged. Then the image is materialized at 200+
random cut points (mode "random": in-flight writes land, drop or tear in any order), and for
EVERY cut:
  - the image loads and fsck finds nothing (diofs.cli.fsck.check, the same code as fsck.diofs);
  - every inode fsync'ed before the cut and not modified since (before the cut) has exactly its
    fsync'ed contents; for fsync (not fdatasync) its path also still names it. Files renamed
    or unlinked after their fsync may be in either state: they are only checked by inode until
    the first change.
Images are read off-line (diofs.format + Filesystem.read_data): ~10 ms a cut, where a mount
costs ~0.5 s. A few cuts are also mounted for real and checked through the mount, and one with
the fsck.diofs command.
"""

from __future__ import annotations

import dataclasses
import os
import random
import stat
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
from harness.io import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, aligned, fallocate
from harness.mount import MountFactory, run_cli, run_in_child

KiB = 1 << 10
CUTS = 220
STRESS_CUTS = 2000


# ---------------------------------------------------------------------------------------------
# Off-line view of a materialized image (shared with test_durability_sync.py)


@dataclasses.dataclass
class Offline:
    """A loaded image: `problems` from fsck's checks, `fs` to read files by inode or path."""

    problems: list[str]
    fs: Filesystem

    def read(self, ino: int) -> bytes | None:
        """The contents of inode `ino`, or None if it does not exist."""
        inode = self.fs.inodes.get(ino)
        if inode is None:
            return None

        async def go() -> bytes:
            return bytes(await self.fs.read_data(inode, 0, inode.size))

        return trio.run(go)

    def resolve(self, path: str) -> int | None:
        """The inode number that `path` (relative to the root) names, or None."""
        ino = image.ROOT_INO
        for part in filter(None, path.split("/")):
            entries = self.fs.inodes[ino].entries
            if entries is None or part.encode() not in entries:
                return None
            ino = entries[part.encode()]
        return ino


def load_offline(path: str) -> Offline:
    """Load the image at `path` read-only; fsck's checks run on a separate load (fsck's
    `check` may look at what Filesystem.load changes)."""
    backend = RawImage(path, writable=False)
    problems = fsck_mod.check(image.load(backend), repair=False)
    fs = Filesystem.load(backend)
    return Offline(problems, fs)


# ---------------------------------------------------------------------------------------------
# The workload (runs in a child process against the mount)


def workload(mnt: str, log: str, seed: int, steps: int, punch: int = 0) -> dict[str, Any]:
    """Random namespace + data operations; returns the fsync events and the change events.
    `punch`: the weight of hole punches (0 keeps the sequence of the tests written before
    punches were added).

    Every event carries `pos`, the crash-log size just before the operation began (changes)
    or just after it returned (fsyncs). Inode numbers are the daemon's (st_ino).
    """
    rng = random.Random(seed)
    logsize = lambda: os.stat(log).st_size  # noqa: E731
    files: dict[str, int] = {}  # path -> ino, live files
    dirs = ["", "d0", "d1"]
    for d in dirs[1:]:
        os.mkdir(os.path.join(mnt, d))
    changes: list[dict[str, Any]] = []  # {"pos", "inos", "paths"}
    fsyncs: list[dict[str, Any]] = []
    counter = 0
    orphans: list[int] = []  # fds of unlinked files kept open

    def p(rel: str) -> str:
        return os.path.join(mnt, rel)

    def change(inos: list[int], paths: list[str]) -> None:
        changes.append({"pos": logsize(), "inos": inos, "paths": paths})

    def rand_data(n: int) -> bytes:
        return rng.randbytes(n)

    for _ in range(steps):
        ops = ["create", "write", "dwrite", "append", "truncate", "rename", "unlink", "fsync",
               "mkdir", "orphan"]
        weights = [12, 14, 5, 6, 4, 7, 5, 22, 1, 2]
        if punch:
            ops.append("punch")
            weights.append(punch)
        op = rng.choices(ops, weights=weights)[0]
        if orphans and rng.random() < 0.1:  # last close of an unlinked file frees it
            os.close(orphans.pop(0))
        live = sorted(files)
        if op == "mkdir" or (op == "create" and len(files) > 30):
            counter += 1
            d = f"{rng.choice(dirs)}/sub{counter}".lstrip("/")
            change([], [d])
            os.mkdir(p(d))
            dirs.append(d)
            continue
        if op == "create" or not live:
            counter += 1
            rel = f"{rng.choice(dirs)}/f{counter}".lstrip("/")
            n = rng.choice([0, 1, 100, 4096, 5000, 12288, 40000, 70000])
            change([], [rel])
            fd = os.open(p(rel), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                files[rel] = os.fstat(fd).st_ino
                changes[-1]["inos"] = [files[rel]]
                if n:
                    os.pwrite(fd, rand_data(n), 0)
            finally:
                os.close(fd)
            continue
        rel = rng.choice(live)
        ino = files[rel]
        if op == "write":
            size = os.stat(p(rel)).st_size
            off = rng.randrange(0, size + 8192)
            change([ino], [])
            fd = os.open(p(rel), os.O_RDWR)
            try:
                os.pwrite(fd, rand_data(rng.choice([1, 512, 3000, 4096, 9000])), off)
            finally:
                os.close(fd)
        elif op == "dwrite":
            size = os.stat(p(rel)).st_size
            off = rng.randrange(0, size // 4096 + 2) * 4096
            data = rand_data(rng.choice([4096, 8192, 65536]))
            change([ino], [])
            fd = os.open(p(rel), os.O_RDWR | os.O_DIRECT)
            try:
                buf = aligned(data=data)
                try:
                    os.pwritev(fd, [memoryview(buf)[: len(data)]], off)
                finally:
                    buf.close()
            finally:
                os.close(fd)
        elif op == "append":
            change([ino], [])
            with open(p(rel), "ab") as f:
                f.write(rand_data(rng.choice([10, 4096, 6000])))
        elif op == "truncate":
            size = os.stat(p(rel)).st_size
            change([ino], [])
            os.truncate(p(rel), rng.choice([0, size // 2, size + 5000]))
        elif op == "punch":
            size = os.stat(p(rel)).st_size
            start = rng.randrange(0, size + 1)
            length = rng.choice([1, 4096, 10000, 65536])
            change([ino], [])
            fd = os.open(p(rel), os.O_RDWR)
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, length)
            finally:
                os.close(fd)
        elif op == "rename":
            counter += 1
            if rng.random() < 0.3 and len(live) > 1:
                dst = rng.choice([x for x in live if x != rel])  # replaces a file
            else:
                dst = f"{rng.choice(dirs)}/r{counter}".lstrip("/")
            victims = [files[dst]] if dst in files else []
            change([ino, *victims], [rel, dst])
            os.rename(p(rel), p(dst))
            files.pop(dst, None)
            files[dst] = files.pop(rel)
        elif op == "orphan":  # unlinked while open: stays readable until the last close
            change([ino], [rel])
            fd = os.open(p(rel), os.O_RDWR)
            os.unlink(p(rel))
            del files[rel]
            os.pwrite(fd, rand_data(5000), 0)
            os.fsync(fd)  # commits metadata in which the inode has no name
            orphans.append(fd)
        elif op == "unlink":
            change([ino], [rel])
            os.unlink(p(rel))
            del files[rel]
        elif op == "fsync":
            datasync = rng.random() < 0.4
            fd = os.open(p(rel), os.O_RDWR)
            try:
                if rng.random() < 0.5:  # dirty some data right before the sync
                    change([ino], [])
                    off = rng.randrange(0, os.fstat(fd).st_size + 1)
                    os.pwrite(fd, rand_data(rng.choice([100, 4096, 20000])), off)
                (os.fdatasync if datasync else os.fsync)(fd)
                pos = logsize()
                size = os.fstat(fd).st_size
                content = os.pread(fd, size + 1, 0)
            finally:
                os.close(fd)
            assert len(content) == size
            fsyncs.append({"pos": pos, "ino": ino, "path": rel, "data": content,
                           "datasync": datasync})
    for fd in orphans:
        os.close(fd)
    return {"fsyncs": fsyncs, "changes": changes, "end": logsize()}


# ---------------------------------------------------------------------------------------------
# Checking one cut


def expectations(result: dict[str, Any], cl: crash.CrashLog) -> list[dict[str, Any]]:
    """Each fsync with `ack` (first cut at which it counts) and `until` (last cut at which it
    must still hold: before the first later change of its inode, or of its path for fsync)."""
    out = []
    changes = result["changes"]
    for f in result["fsyncs"]:
        ack = cl.records_before(f["pos"])
        until_ino = until_path = cl.n_points - 1
        for c in changes:
            if c["pos"] < f["pos"]:
                continue
            cut = cl.records_before(c["pos"])  # no record of the change before this cut
            if f["ino"] in c["inos"]:
                until_ino = min(until_ino, cut)
            if f["path"] in c["paths"] or f["ino"] in c["inos"]:
                until_path = min(until_path, cut)
        out.append({**f, "ack": ack, "until_ino": until_ino, "until_path": until_path})
    return out


def check_cut(off: Offline, cut: int, exp: list[dict[str, Any]]) -> list[str]:
    bad = [f"cut {cut}: fsck: {p}" for p in off.problems]
    # the newest acknowledged fsync of each inode is the one that must hold
    latest: dict[int, dict[str, Any]] = {}
    for e in exp:
        if e["ack"] <= cut:
            latest[e["ino"]] = e
    for e in latest.values():
        if cut > e["until_ino"]:
            continue
        got = off.read(e["ino"])
        if got is None:
            bad.append(f"cut {cut}: inode {e['ino']} ({e['path']}) fsync'ed but missing")
        elif got != e["data"]:
            diff = next((i for i, (a, b) in enumerate(zip(got, e["data"], strict=False)) if a != b),
                        min(len(got), len(e["data"])))
            bad.append(f"cut {cut}: inode {e['ino']} ({e['path']}) has {len(got)} bytes, "
                       f"fsync'ed {len(e['data'])}; first difference at {diff}")
        if not e["datasync"] and cut <= e["until_path"]:
            named = off.resolve(e["path"])
            if named != e["ino"]:
                bad.append(f"cut {cut}: {e['path']} names inode {named}, fsync'ed {e['ino']}")
    return bad


def run_workload(factory: MountFactory, tmp_path: Path, seed: int, steps: int, *,
                 punch: int = 0, mkfs_args: tuple[str, ...] = (),
                 stats: dict[str, float] | None = None):
    """Run the workload on a crash-logged mount; `stats` (if given) gets the daemon's
    counters from before the unmount."""
    log = str(tmp_path / "crash.log")
    m = factory(size="48M", opts={"backend": "crash", "crash_log": log,
                                  "commit_interval": 0.05, "writeback_age": 0.3},
                mkfs_args=mkfs_args)
    result = run_in_child(workload, str(m.mnt), log, seed, steps, punch, timeout=120,
                          mounts=[m])
    # the log as it is at the end of the workload: what unmount adds is not a crash
    cl = crash.load_log(log)
    if stats is not None:
        stats.update(m.stats())
    m.unmount()
    return m, cl, result


def pick_cuts(cl: crash.CrashLog, exp: list[dict[str, Any]], n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    must = {cl.n_points - 1, 0}
    must |= {e["ack"] for e in exp if e["ack"] < cl.n_points}
    must |= {e["ack"] - 1 for e in exp if e["ack"] > 0}  # just before the FLUSH record: too
    rest = [c for c in range(cl.n_points) if c not in must]
    extra = rng.sample(rest, min(len(rest), max(0, n - len(must))))
    return sorted(must | set(extra))


def crash_check(tmp_path: Path, cl: crash.CrashLog, exp, cuts: list[int], seed: int):
    out = str(tmp_path / "cut.img")
    failures: list[str] = []
    checked = 0
    for cut in cuts:
        crash.materialize(cl, out, cut, rng=random.Random(seed * 100003 + cut), mode="random")
        try:
            off = load_offline(out)
        except Exception as exc:  # a cut image that does not load is a failure, not an error
            failures.append(f"cut {cut}: does not load: {type(exc).__name__}: {exc}")
            continue
        failures += check_cut(off, cut, exp)
        checked += sum(1 for e in exp if e["ack"] <= cut)
    return failures, checked


@pytest.mark.deadline(150)
def test_every_random_cut_is_consistent_and_keeps_fsynced_data(mount_factory, tmp_path):
    t0 = time.monotonic()
    seed = 20261123
    _m, cl, result = run_workload(mount_factory, tmp_path, seed, steps=260)
    t_work = time.monotonic() - t0
    exp = expectations(result, cl)
    assert len(exp) >= 40, "the workload should fsync often"
    assert cl.flushes >= 40 and cl.writes >= 200, cl.info()
    cuts = pick_cuts(cl, exp, CUTS, seed)
    assert len(cuts) >= 200
    failures, checked = crash_check(tmp_path, cl, exp, cuts, seed)
    t_cuts = time.monotonic() - t0 - t_work
    assert not failures, f"{len(failures)} problems over {len(cuts)} cuts:\n" + "\n".join(
        failures[:30])
    assert checked > 500  # (fsync, cut) pairs actually verified
    print(f"workload {t_work:.1f}s, {cl.info()}, {len(exp)} fsyncs, {len(cuts)} cuts in "
          f"{t_cuts:.1f}s, {checked} fsync checks")


@pytest.mark.deadline(120)
def test_cut_images_mount_and_fsck_clean(mount_factory, tmp_path):
    """A few cut images mounted for real: fsck.diofs is clean, the mount serves the fsync'ed
    files through the kernel, and the daemon unmounts cleanly (teardown fscks again)."""
    seed = 7
    _m, cl, result = run_workload(mount_factory, tmp_path, seed, steps=120)
    exp = expectations(result, cl)
    rng = random.Random(seed)
    acks = sorted({e["ack"] for e in exp})
    cuts = sorted(set(rng.sample(range(cl.n_points), 4)) | {acks[len(acks) // 2],
                                                            cl.n_points - 1})
    for i, cut in enumerate(cuts):
        img = tmp_path / f"cut{i}.img"
        crash.materialize(cl, str(img), cut, rng=random.Random(cut), mode="random")
        proc = run_cli("fsck.diofs", img)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        m = mount_factory(image=img)
        latest = {e["ino"]: e for e in exp if e["ack"] <= cut}
        for e in latest.values():
            if e["datasync"] or cut > e["until_path"]:
                continue
            st = os.stat(m.path(e["path"]))
            assert stat.S_ISREG(st.st_mode) and st.st_ino == e["ino"]
            with open(m.path(e["path"]), "rb") as f:
                assert f.read() == e["data"], f"cut {cut}: {e['path']}"
        m.unmount()


@pytest.mark.stress
@pytest.mark.deadline(1800)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stress_many_cuts(mount_factory, tmp_path, seed):
    _m, cl, result = run_workload(mount_factory, tmp_path, seed, steps=800)
    exp = expectations(result, cl)
    cuts = pick_cuts(cl, exp, STRESS_CUTS, seed)
    failures, _ = crash_check(tmp_path, cl, exp, cuts, seed)
    assert not failures, f"{len(failures)} problems:\n" + "\n".join(failures[:30])
