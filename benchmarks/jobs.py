"""The benchmark job table: what each job runs and how its figures are read back.

A :class:`Job` is an fio job (``kind == "fio"``) run on the one data file of a peer, the
metadata job (``kind == "meta"``), a Python loop in a child process, or a tree-copy step
(``kind == "tree"``, benchmarks/treecopy.py: cp -a, tar -x, git commit, rm -rf of a source
tree). Every job has one *primary metric* (``MB/s`` for 1 MiB jobs, ``IOPS`` for 4 KiB jobs,
``ops/s`` for metadata, ``s`` (seconds, lower is better) for tree steps) that the report
tables show; all figures are recorded in results.json.

Invariants:
- Direct jobs run with ``--invalidate=1`` (fio's default); cached jobs run with
  ``--invalidate=0`` after the runner has read the whole file once (``Job.prime``), so they
  measure the kernel page cache of the mount, not the peer's storage.
- Sizes are bytes; latencies are microseconds (fio reports ns; converted once, here).
  ``lat`` is fio's total latency (submission to completion): for libaio, an O_DSYNC write may
  finish inside io_submit, so ``clat`` alone would show ~2 µs; the report shows ``lat``.
- The data file is laid out once per peer (:func:`layout_argv`) before any job runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DATA_FILE = "bench.dat"


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One workload. ``fio`` holds the job-specific fio options (without leading dashes)."""

    name: str
    title: str
    metric: str  # "MB/s" | "IOPS" | "ops/s" | "s"
    kind: str = "fio"  # "fio" | "meta" | "tree"
    fio: tuple[tuple[str, str], ...] = ()
    prime: bool = False  # read the file once, buffered, before the job (cached jobs)
    tree_step: str = ""  # kind "tree": one of treecopy.STEPS

    @property
    def is_write(self) -> bool:
        return any(k == "rw" and "write" in v for k, v in self.fio)


def _fio(**opts: str | int) -> tuple[tuple[str, str], ...]:
    return tuple((k, str(v)) for k, v in opts.items())


JOBS: tuple[Job, ...] = (
    Job(
        "seqread-1m-psync",
        "1 MiB seq read, O_DIRECT, psync",
        "MB/s",
        fio=_fio(rw="read", bs="1M", direct=1, ioengine="psync", iodepth=1),
    ),
    Job(
        "seqwrite-1m-psync",
        "1 MiB seq write, O_DIRECT, psync",
        "MB/s",
        fio=_fio(rw="write", bs="1M", direct=1, ioengine="psync", iodepth=1),
    ),
    Job(
        "seqread-1m-aio16",
        "1 MiB seq read, O_DIRECT, libaio QD16",
        "MB/s",
        fio=_fio(rw="read", bs="1M", direct=1, ioengine="libaio", iodepth=16),
    ),
    Job(
        "seqwrite-1m-aio16",
        "1 MiB seq write, O_DIRECT, libaio QD16",
        "MB/s",
        fio=_fio(rw="write", bs="1M", direct=1, ioengine="libaio", iodepth=16),
    ),
    Job(
        "randread-4k-aio16",
        "4 KiB rand read, O_DIRECT, libaio QD16",
        "IOPS",
        fio=_fio(rw="randread", bs="4k", direct=1, ioengine="libaio", iodepth=16),
    ),
    Job(
        "randwrite-4k-aio16",
        "4 KiB rand write, O_DIRECT, libaio QD16",
        "IOPS",
        fio=_fio(rw="randwrite", bs="4k", direct=1, ioengine="libaio", iodepth=16),
    ),
    Job(
        "randread-4k-psync",
        "4 KiB rand read, O_DIRECT, psync QD1",
        "IOPS",
        fio=_fio(rw="randread", bs="4k", direct=1, ioengine="psync", iodepth=1),
    ),
    Job(
        "randwrite-4k-psync",
        "4 KiB rand write, O_DIRECT, psync QD1",
        "IOPS",
        fio=_fio(rw="randwrite", bs="4k", direct=1, ioengine="psync", iodepth=1),
    ),
    Job(
        "randwrite-4k-dsync-qd1",
        "4 KiB rand write, O_DIRECT+O_DSYNC, libaio QD1",
        "IOPS",
        fio=_fio(rw="randwrite", bs="4k", direct=1, sync="dsync", ioengine="libaio", iodepth=1),
    ),
    Job(
        "randwrite-4k-dsync-aio16",
        "4 KiB rand write, O_DIRECT+O_DSYNC, libaio QD16",
        "IOPS",
        fio=_fio(rw="randwrite", bs="4k", direct=1, sync="dsync", ioengine="libaio", iodepth=16),
    ),
    Job(
        "reread-1m-cached",
        "1 MiB seq re-read, buffered, cached file",
        "MB/s",
        prime=True,
        fio=_fio(rw="read", bs="1M", direct=0, ioengine="psync", iodepth=1, invalidate=0),
    ),
    Job(
        "randread-4k-cached",
        "4 KiB rand read, buffered, cached file",
        "IOPS",
        prime=True,
        fio=_fio(rw="randread", bs="4k", direct=0, ioengine="psync", iodepth=1, invalidate=0),
    ),
    Job(
        "mmap-read-cached",
        "1 MiB seq read via mmap, cached file",
        "MB/s",
        prime=True,
        fio=_fio(rw="read", bs="1M", ioengine="mmap", iodepth=1, invalidate=0),
    ),
    Job(
        "meta-create-stat-unlink",
        "create+stat+unlink of small files (Python loop)",
        "ops/s",
        kind="meta",
    ),
    Job("tree-cp-a", "tree copy: cp -a SRC", "s", kind="tree", tree_step="cp-a"),
    Job(
        "tree-git-commit",
        "tree copy: git init + add -A + commit",
        "s",
        kind="tree",
        tree_step="git-commit",
    ),
    Job("tree-rm-rf", "tree copy: rm -rf of the copy", "s", kind="tree", tree_step="rm-rf"),
    Job("tree-tar-x", "tree copy: tar -x of SRC's tarball", "s", kind="tree", tree_step="tar-x"),
)
TREE_JOBS: tuple[Job, ...] = tuple(j for j in JOBS if j.kind == "tree")

JOBS_BY_NAME: dict[str, Job] = {j.name: j for j in JOBS}


def select_jobs(names: str | None) -> list[Job]:
    """Jobs named in a comma-separated list (all jobs if None/empty), in table order."""
    if not names:
        return list(JOBS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in JOBS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown job(s): {', '.join(unknown)}; known: {', '.join(JOBS_BY_NAME)}")
    return [j for j in JOBS if j.name in wanted]


def parse_size(text: str) -> int:
    """'256M' -> bytes (K/M/G suffixes are binary, as fio reads them)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def layout_argv(path: str, size: int) -> list[str]:
    """fio argv that lays out the data file (buffered sequential write + fsync)."""
    return [
        "fio",
        "--name=layout",
        f"--filename={path}",
        f"--size={size}",
        "--rw=write",
        "--bs=1M",
        "--direct=0",
        "--ioengine=psync",
        "--end_fsync=1",
        "--fallocate=none",
        "--output-format=json",
    ]


def fio_argv(job: Job, path: str, size: int, runtime_s: float) -> list[str]:
    """fio argv for one run of ``job`` on the data file at ``path``."""
    assert job.kind == "fio", job
    argv = [
        "fio",
        f"--name={job.name}",
        f"--filename={path}",
        f"--size={size}",
        f"--runtime={runtime_s:g}",
        "--time_based",
        "--output-format=json",
        "--fallocate=none",
        "--numjobs=1",
        "--group_reporting",
        "--lat_percentiles=1",
        "--clat_percentiles=1",
    ]
    argv += [f"--{k}={v}" for k, v in job.fio]
    return argv


def parse_fio_json(text: str) -> dict[str, Any]:
    """Figures of one fio run: mbps, iops, {lat,clat}_p{50,99}_us, fio_{usr,sys}_cpu_pct, io_bytes.

    Picks the direction (read or write) that moved bytes. fio may print warnings before the
    JSON document; they are skipped.
    """
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in fio output")
    doc = _loads_first(text[start:])
    jobs = doc.get("jobs") or []
    if not jobs:
        raise ValueError("fio JSON has no jobs")
    job = jobs[0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    side = max(("read", "write"), key=lambda d: job.get(d, {}).get("io_bytes", 0))
    d = job[side]
    figs: dict[str, Any] = {}
    for kind in ("lat", "clat"):  # lat = submission to completion; clat = after submission
        pct = (d.get(f"{kind}_ns") or {}).get("percentile") or {}
        for q in ("50", "99"):
            v = pct.get(f"{q}.000000")
            figs[f"{kind}_p{q}_us"] = v / 1000 if v is not None else None
    return figs | {
        "direction": side,
        "io_bytes": d.get("io_bytes", 0),
        "mbps": d.get("bw_bytes", 0) / 1e6,
        "iops": d.get("iops", 0.0),
        "fio_usr_cpu_pct": job.get("usr_cpu"),
        "fio_sys_cpu_pct": job.get("sys_cpu"),
    }


def _loads_first(text: str) -> dict[str, Any]:
    import json

    obj, _end = json.JSONDecoder().raw_decode(text)
    return obj


def primary(job: Job, fig: dict[str, Any]) -> float | None:
    """The job's primary figure from a run's figures (None if the run failed)."""
    key = {"MB/s": "mbps", "IOPS": "iops", "ops/s": "ops_per_s", "s": "elapsed_s"}[job.metric]
    v = fig.get(key)
    return float(v) if v is not None else None
