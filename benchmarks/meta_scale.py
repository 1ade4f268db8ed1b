"""Metadata scaling benchmark (issue 13): what a commit costs as the namespace and the image grow.

Rows by file count (fresh image of --image-size, files of 100 B in directories of 1000):
    creates_per_s     the bulk creation of the files (create + write 100 B + close each)
    daemon_cpu_us_per_create   the daemon's CPU time over that creation, per file
    fsync_ms          p50 / max of REPS x (4 KiB pwrite at offset 0 of an existing small
                      file + fsync)
    create_fsync_ms   p50 / max of REPS x (create + write 100 B + fsync of a new file)
    mount_s, unmount_s, fsck_s, rss_mb (the daemon's VmRSS after the row's work)
    rss_after_mount_mb / _bytes_per_file   VmRSS right after a fresh mount of the image
    fsync_after_mount_ms   the fsync loop on a file in the middle of the tree, right after
                      that mount (its record is decoded on first use: lazy loading)
Rows by image size (an empty sparse image): mkfs_s, mount_s, fsync_ms (one small file),
rss_mb, unmount_s.

Beside each diofs row an ext4 row on the same disk (skip with --no-ext4): the file rows in a
directory of the host filesystem under --dir (ext4 on /dev/vda on the test VM; creates/s,
fsync, create+fsync, rm -rf), the image rows as mkfs.ext4 of a sparse image of that size,
loop-mounted (mkfs, mount, fsync, umount). `"fs"` names which.

Prints one JSON document (and writes it to --out); --plot FILE.png draws the file rows, cost
against size, diofs beside ext4 (when matplotlib is importable, as scripts/bench). The images
go to --dir (sparse files; the host's ext4 caps a file just short of 16 TiB). From a checkout:
    .venv/bin/python scripts/bench_meta [--files 1000,10000,100000] [--images 1T,15T]
        [--no-ext4] [--plot docs/bench-meta/plot.png]
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


class _Row:
    """One row's work directory, image and mounts (context manager): on the way out a mount
    still up is cleaned up (unmount, else kill the daemon) and the directory is removed."""

    def __init__(self, base: Path, prefix: str) -> None:
        self.work = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        self.img = self.work / "image"
        self.m: Mount | None = None

    def __enter__(self) -> _Row:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.m is not None:
                self.m.cleanup()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def mount(self) -> tuple[Mount, float]:
        """Mount the image; (the mount, seconds until it was up)."""
        mnt = self.work / "mnt"
        mnt.mkdir(exist_ok=True)
        self.m = Mount(self.img, mnt, self.work, opts={}, bugs=[])
        return self.m, _timed(self.m.start)

    def unmount(self) -> float:
        assert self.m is not None
        seconds = _timed(self.m.unmount)
        self.m = None
        return seconds


def files_row(base: Path, n: int, image_size: str, reps: int) -> dict[str, Any]:
    """The file-count row of diofs (module docstring); the second mount's fsync touches a file
    that mount has not decoded yet (lazy loading)."""
    row: dict[str, Any] = {"fs": "diofs", "files": n}
    with _Row(base, f"files{n}-") as r:
        row["mkfs_s"] = round(_mkfs(r.img, image_size), 3)
        m, _ = r.mount()
        cpu0 = _cpu_s(m)
        row["creates_per_s"] = round(_populate(m.mnt, n))
        row["daemon_cpu_us_per_create"] = round((_cpu_s(m) - cpu0) / n * 1e6)
        _probe(row, m.mnt, n, reps)
        row["rss_mb"] = round(_rss_mb(m), 1)
        row["unmount_s"] = round(r.unmount(), 3)
        row["fsck_s"] = round(_fsck(r.img), 3)
        m, mount_s = r.mount()
        row["mount_s"] = round(mount_s, 3)
        row["rss_after_mount_mb"] = round(_rss_mb(m), 1)
        row["rss_after_mount_bytes_per_file"] = round(_rss_mb(m) * (1 << 20) / n)
        middle = m.path(f"d{n // 2 // PER_DIR:04d}", f"f{n // 2:07d}")
        row["fsync_after_mount_ms"] = _ms(_fsync_loop(middle, reps))
        row["unmount_after_mount_s"] = round(r.unmount(), 3)
    return row


def _probe(row: dict[str, Any], top: Path, n: int, reps: int) -> None:
    """The fsync and create+fsync figures of a populated tree (diofs or ext4 alike)."""
    os.sync()
    row["fsync_ms"] = _ms(_fsync_loop(str(top / "d0000" / "f0000000"), reps))
    row["create_fsync_ms"] = _ms(_create_fsync_loop(str(top / "d0000"), reps))


def ext4_files_row(base: Path, n: int, reps: int) -> dict[str, Any]:
    """The same file-count row on the host filesystem under `base` (ext4 on this VM):
    creation rate, fsync and create+fsync, then the removal of the tree."""
    row: dict[str, Any] = {"fs": _fs_type(base), "files": n}
    top = Path(tempfile.mkdtemp(prefix=f"ext4-files{n}-", dir=base))
    try:
        row["creates_per_s"] = round(_populate(top, n))
        _probe(row, top, n, reps)
        row["rm_s"] = round(_timed(lambda: shutil.rmtree(top)), 3)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return row


def image_row(base: Path, size: str, reps: int) -> dict[str, Any]:
    row: dict[str, Any] = {"fs": "diofs", "image": size}
    with _Row(base, f"img{size}-") as r:
        row["mkfs_s"] = round(_mkfs(r.img, size), 3)
        m, mount_s = r.mount()
        row["mount_s"] = round(mount_s, 3)
        with open(m.path("f"), "wb") as f:
            f.write(DATA)
        row["fsync_ms"] = _ms(_fsync_loop(m.path("f"), reps))
        row["rss_mb"] = round(_rss_mb(m), 1)
        row["unmount_s"] = round(r.unmount(), 3)
        row["fsck_s"] = round(_fsck(r.img), 3)
        row["image_bytes_on_disk"] = os.stat(r.img).st_blocks * 512
    return row


def ext4_image_row(base: Path, size: str, reps: int) -> dict[str, Any]:
    """mkfs.ext4 of an empty sparse image of `size` on the host fs, a loop mount, the fsync
    loop, umount. {"skipped": why} when mkfs.ext4 or the loop mount is not available."""
    row: dict[str, Any] = {"fs": "ext4 (loop)", "image": size}
    with _Row(base, f"ext4-img{size}-") as r:
        with open(r.img, "wb") as f:
            f.truncate(_bytes(size))
        mnt = r.work / "mnt"
        mnt.mkdir()
        try:
            row["mkfs_s"] = round(_timed(lambda: subprocess.run(
                ["mkfs.ext4", "-F", "-q", str(r.img)], check=True, capture_output=True)), 3)
            row["mount_s"] = round(_timed(lambda: subprocess.run(
                ["mount", "-o", "loop", str(r.img), str(mnt)], check=True,
                capture_output=True)), 3)
        except (OSError, subprocess.CalledProcessError) as exc:
            row["skipped"] = str(exc)
            return row
        try:
            (mnt / "f").write_bytes(DATA)
            row["fsync_ms"] = _ms(_fsync_loop(str(mnt / "f"), reps))
        finally:
            row["unmount_s"] = round(_timed(lambda: subprocess.run(
                ["umount", str(mnt)], check=True, capture_output=True)), 3)
        row["image_bytes_on_disk"] = os.stat(r.img).st_blocks * 512
    return row


def _bytes(size: str) -> int:
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    return int(size[:-1]) << units[size[-1].upper()] if size[-1].upper() in units else int(size)


def _fs_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (longest mount point)."""
    best, kind = "", "host fs"
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            real = os.path.realpath(path)
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, f"{fstype} ({dev})"
    return kind


def plot(out: dict[str, Any], path: Path) -> str:
    """A PNG of cost against size, diofs beside ext4 (as scripts/bench: only if matplotlib is
    importable). Returns a one-line status."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not importable (.venv/bin/pip install matplotlib)"
    panels = [
        ("creates_per_s", None, "creates/s"),
        ("fsync_ms", "p50", "fsync p50 (ms)"),
        ("create_fsync_ms", "p50", "create+fsync p50 (ms)"),
        ("mount_s", None, "mount (s)"),
        ("rss_after_mount_mb", None, "daemon RSS after mount (MB)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2))
    for ax, (key, sub, title) in zip(axes, panels, strict=True):
        for fs_name, style in (("diofs", "o-"), (None, "s--")):
            rows = [r for r in out["files"] if (r["fs"] == "diofs") == (fs_name == "diofs")
                    and key in r]
            if rows:
                ys = [r[key][sub] if sub else r[key] for r in rows]
                ax.plot([r["files"] for r in rows], ys, style, label=rows[0]["fs"])
        ax.set_xscale("log")
        ax.set_xlabel("files", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"diofs metadata cost against size ({out.get('label', '')} {out['date']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


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
    p.add_argument("--no-ext4", action="store_true", help="diofs rows only")
    p.add_argument("--plot", default=None, help="PNG of the file rows (needs matplotlib)")
    a = p.parse_args(argv)
    base = Path(a.dir)
    out: dict[str, Any] = {"label": a.label, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime()),
                           "files": [], "images": []}
    for n in [int(x) for x in a.files.split(",") if x]:
        out["files"].append(files_row(base, n, a.image_size, a.reps))
        print(json.dumps(out["files"][-1]), flush=True)
        if not a.no_ext4:
            out["files"].append(ext4_files_row(base, n, a.reps))
            print(json.dumps(out["files"][-1]), flush=True)
    for size in [x for x in a.images.split(",") if x]:
        out["images"].append(image_row(base, size, a.image_reps))
        print(json.dumps(out["images"][-1]), flush=True)
        if not a.no_ext4:
            out["images"].append(ext4_image_row(base, size, a.image_reps))
            print(json.dumps(out["images"][-1]), flush=True)
    text = json.dumps(out, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    if a.plot:
        print(plot(out, Path(a.plot)))
    return 0
