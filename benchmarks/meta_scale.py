"""Metadata scaling benchmark (issue 13): what a commit costs as the namespace and the image grow.

Rows by file count (fresh image of --image-size, files of 100 B in directories of 1000):
    creates_per_s     the bulk creation of the files (create + write 100 B + close each)
    daemon_cpu_us_per_create   the daemon's CPU time over that creation, per file
    fsync_ms          p50 / max of REPS x (4 KiB pwrite at offset 0 of an existing small
                      file + fsync)
    create_fsync_ms   p50 / max of REPS x (create + write 100 B + fsync of a new file)
    mount_s, unmount_s, fsck_s, rss_mb (the daemon's VmRSS after the row's work)
Rows by image size (an empty sparse image): mkfs_s, mount_s, fsync_ms (one small file),
rss_mb, unmount_s.

Prints one JSON document (and writes it to --out). The images go to --dir (sparse files; the
host's ext4 caps a file just short of 16 TiB). Run from a checkout:
    .venv/bin/python scripts/bench_meta [--files 1000,10000,100000] [--images 1T,15T]
Mounts through harness.mount (the test harness): a failure unmounts and kills the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness.mount
from harness.mount import Mount, cli, cli_env

harness.mount.MOUNT_TIMEOUT_S = 900.0  # format 1 took ~1 min to mount 15 TiB

PER_DIR = 1000
DATA = b"m" * 100


def _rss_mb(m: Mount) -> float:
    assert m.daemon is not None
    with open(f"/proc/{m.daemon.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(m: Mount) -> float:
    """The daemon's CPU time so far (user + system): a figure that contention on a shared
    machine disturbs much less than wall time."""
    assert m.daemon is not None
    with open(f"/proc/{m.daemon.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _mkfs(img: Path, size: str) -> float:
    if img.exists():
        img.unlink()
    argv = [*cli("mkfs.diofs"), str(img), "--size", size]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=cli_env())
    return time.perf_counter() - t0


def _fsck(img: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([*cli("fsck.diofs"), str(img)], capture_output=True, text=True,
                          env=cli_env(), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"fsck failed: {proc.stdout}{proc.stderr}")
    return time.perf_counter() - t0


def _ms(xs: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(xs) * 1e3, 2), "max": round(max(xs) * 1e3, 2)}


def _fsync_loop(path: str, reps: int) -> list[float]:
    buf = b"f" * 4096
    out = []
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            os.pwrite(fd, buf, 0)
            os.fsync(fd)
            out.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return out


def _create_fsync_loop(directory: str, reps: int) -> list[float]:
    out = []
    for i in range(reps):
        t0 = time.perf_counter()
        fd = os.open(os.path.join(directory, f"new{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                     0o644)
        try:
            os.write(fd, DATA)
            os.fsync(fd)
        finally:
            os.close(fd)
        out.append(time.perf_counter() - t0)
    return out


def _populate(mnt: Path, n: int) -> float:
    """Create n files of 100 B in directories of PER_DIR; returns files per second."""
    t0 = time.perf_counter()
    for i in range(n):
        d = mnt / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            os.mkdir(d)
        fd = os.open(d / f"f{i:07d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, DATA)
        os.close(fd)
    return n / (time.perf_counter() - t0)


def _mount(img: Path, work: Path, opts: dict[str, Any]) -> tuple[Mount, float]:
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    m = Mount(img, mnt, work, opts=opts, bugs=[])
    return m, _timed(m.start)


def files_row(base: Path, n: int, image_size: str, reps: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"files{n}-", dir=base))
    img = work / "image"
    row: dict[str, Any] = {"files": n}
    m = None
    try:
        row["mkfs_s"] = round(_mkfs(img, image_size), 3)
        m, _ = _mount(img, work, {})
        cpu0 = _cpu_s(m)
        row["creates_per_s"] = round(_populate(m.mnt, n))
        row["daemon_cpu_us_per_create"] = round((_cpu_s(m) - cpu0) / n * 1e6)
        os.sync()
        row["fsync_ms"] = _ms(_fsync_loop(m.path("d0000", "f0000000"), reps))
        row["create_fsync_ms"] = _ms(_create_fsync_loop(m.path("d0000"), reps))
        row["rss_mb"] = round(_rss_mb(m), 1)
        row["unmount_s"] = round(_timed(m.unmount), 3)
        row["fsck_s"] = round(_fsck(img), 3)
        m, mount_s = _mount(img, work, {})
        row["mount_s"] = round(mount_s, 3)
        row["rss_after_mount_mb"] = round(_rss_mb(m), 1)
        m.unmount()
        m = None
    finally:
        if m is not None:
            m.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return row


def image_row(base: Path, size: str, reps: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"img{size}-", dir=base))
    img = work / "image"
    row: dict[str, Any] = {"image": size}
    m = None
    try:
        row["mkfs_s"] = round(_mkfs(img, size), 3)
        m, mount_s = _mount(img, work, {})
        row["mount_s"] = round(mount_s, 3)
        with open(m.path("f"), "wb") as f:
            f.write(DATA)
        row["fsync_ms"] = _ms(_fsync_loop(m.path("f"), reps))
        row["rss_mb"] = round(_rss_mb(m), 1)
        row["unmount_s"] = round(_timed(m.unmount), 3)
        m = None
        row["fsck_s"] = round(_fsck(img), 3)
        row["image_bytes_on_disk"] = os.stat(img).st_blocks * 512
    finally:
        if m is not None:
            m.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", default="1000,10000,100000")
    p.add_argument("--images", default="1T,15T")
    p.add_argument("--image-size", default="8G", help="image of the file-count rows")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--image-reps", type=int, default=20)
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--out", default=None)
    p.add_argument("--label", default="")
    a = p.parse_args(argv)
    base = Path(a.dir)
    out: dict[str, Any] = {"label": a.label, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime()),
                           "files": [], "images": []}
    for n in [int(x) for x in a.files.split(",") if x]:
        out["files"].append(files_row(base, n, a.image_size, a.reps))
        print(json.dumps(out["files"][-1]), flush=True)
    for size in [x for x in a.images.split(",") if x]:
        out["images"].append(image_row(base, size, a.image_reps))
        print(json.dumps(out["images"][-1]), flush=True)
    text = json.dumps(out, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0
