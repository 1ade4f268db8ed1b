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
import time
from pathlib import Path

import pytest

from diofs.backend import crash
from harness.mount import MountFactory, run_cli, run_in_child
from harness.workloads.holes import (
    BS,
    secret_bytes,
)
from harness.workloads.holes_power_cut import (
    CHUNK,
    check_cuts,
    crash_secret_mount,
    extending_writes,
    pick_cuts,
)

pytestmark = pytest.mark.deadline(120)

RANDOM_CUTS = 120


# ---------------------------------------------------------------------------------------------
# the workload (a child process)


# ---------------------------------------------------------------------------------------------
# checking the cut images


@pytest.mark.parametrize("bug_on", [False, True], ids=["protected", "bug"])
def test_power_cut_during_extending_writes_exposes_nothing(
    mount_factory: MountFactory, tmp_path: Path, bug_on: bool
) -> None:
    t0 = time.monotonic()
    m, log = crash_secret_mount(mount_factory, tmp_path, bug_on)
    run_in_child(extending_writes, str(m.mnt), 10, timeout=90, mounts=[m])
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
    run_in_child(extending_writes, str(m.mnt), 6, timeout=90, mounts=[m])
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
