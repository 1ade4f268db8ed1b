"""The ``scripts/bench`` command line: options, ``--list-jobs``, ``--report``, ``--profile``.

Bad options end with one line on stderr and a non-zero exit (2 from argparse, 1 from the
checks here, 2 for an unusable tree source).

Public API: :func:`main`, :func:`parse_args`, :func:`options_from_args`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

from benchmarks import daemon_profile, report, treecopy
from benchmarks.jobs import JOBS, TREE_JOBS, parse_size, select_jobs
from benchmarks.peers import ALL_PEERS, NBD_SERVERS, PEER_NAMES
from benchmarks.runner import Options, run_bench


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="diofs side by side with its peers (local disk, C and Python passthrough), "
        "interleaved, repeated; writes results.json, results.md and a chart.",
    )
    ap.add_argument(
        "--peers",
        default=None,
        help=f"comma-separated subset of {','.join(ALL_PEERS)} (default: "
        f"{','.join(PEER_NAMES)}; with --backend nbd: diofs,diofs-nbd)",
    )
    ap.add_argument(
        "--backend",
        choices=("raw", "nbd"),
        default="raw",
        help="nbd: diofs on its image file beside diofs on the same kind of image served by "
        "nbdkit (peer diofs-nbd), the fio jobs by default, with the ratio nbd/raw per job "
        "(docs/nbd.md)",
    )
    ap.add_argument(
        "--nbd-server",
        choices=NBD_SERVERS,
        default="nbdkit",
        help="the NBD server of the diofs-nbd peer: nbdkit (file plugin, default), qemu-nbd "
        "(qcow2, cache=writeback) or nbd-server",
    )
    ap.add_argument(
        "--jobs", default=None, help="comma-separated job names (default: all; see --list-jobs)"
    )
    ap.add_argument("--repeat", type=int, default=None, help="repetitions per job (default 3)")
    ap.add_argument("--runtime", type=float, default=None, help="seconds per fio job (default 5)")
    ap.add_argument("--size", default=None, help="data file size (default 256M)")
    ap.add_argument(
        "--meta-files", type=int, default=None, help="files in the metadata job (default 10000)"
    )
    ap.add_argument(
        "--tree-only",
        action="store_true",
        help="run only the tree-copy jobs (" + ",".join(j.name for j in TREE_JOBS) + ")",
    )
    ap.add_argument(
        "--tree-src",
        type=Path,
        default=treecopy.DEFAULT_SRC,
        help=f"source tree of the tree-copy jobs (default {treecopy.DEFAULT_SRC})",
    )
    ap.add_argument(
        "--tree-host-fs",
        choices=("fresh", "host"),
        default="fresh",
        help="fresh (default): every repetition of the tree jobs of a peer that keeps its files "
        "on the host (cpeer, pypeer, local) runs on a freshly made, loop-mounted ext4 in the "
        "work dir; host: on the host's file system itself (docs/bench.md, Tree jobs)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="runtime 2 s, repeat 1, size 64M, 2000 metadata files"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results dir (default bench-results/<timestamp>/ at the repo root)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where mounts, backing dirs and the image go (default "
        "~/.cache/diofs-bench/work-*, removed afterwards)",
    )
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--diofs-image-size", default="1G")
    ap.add_argument(
        "--diofs-opts",
        default="",
        help='extra arguments for mount.py, one shell-quoted string (e.g. "-o cache_size=128M")',
    )
    ap.add_argument(
        "--diofs-b-opts",
        default="",
        help="the same for the peer diofs-b, a second diofs mount in the same run (before and "
        'after of a mount option: --peers diofs,diofs-b,cpeer --diofs-b-opts "-o X=off")',
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--list-jobs", action="store_true", help="print the job table and exit")
    ap.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="rebuild results.md and the chart from a results.json and exit",
    )
    ap.add_argument(
        "--profile",
        default=None,
        metavar="JOB",
        help="run JOB once on diofs with the daemon under a profiler; print top functions",
    )
    ap.add_argument("--profiler", choices=("py-spy", "cprofile"), default="py-spy")
    ap.add_argument(
        "--profile-all-threads",
        action="store_true",
        help="py-spy: sample every thread, not only the one holding the GIL",
    )
    ap.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy: also sample native frames (the binding's Cython and C code)",
    )
    return ap.parse_args(argv)


def options_from_args(a: argparse.Namespace) -> Options:
    q = a.quick
    nbd = a.backend == "nbd"
    default_peers = "diofs,diofs-nbd" if nbd else ",".join(PEER_NAMES)
    peers = [p.strip() for p in (a.peers or default_peers).split(",") if p.strip()]
    bad = [p for p in peers if p not in ALL_PEERS]
    if bad:
        raise SystemExit(f"bench: unknown peer(s) {bad}; known: {', '.join(ALL_PEERS)}")
    if nbd and "diofs-nbd" not in peers:
        raise SystemExit("bench: --backend nbd needs the peer diofs-nbd in --peers")
    if a.tree_only and a.jobs:
        raise SystemExit("bench: --tree-only and --jobs exclude each other")
    try:
        jobs = list(TREE_JOBS) if a.tree_only else select_jobs(a.jobs)
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from None
    if nbd and not a.jobs and not a.tree_only:
        jobs = [j for j in jobs if j.kind == "fio"]  # what issue 16 compares
    if any(j.kind == "tree" for j in jobs) and not a.tree_src.is_dir():
        raise SystemExit(f"bench: --tree-src {a.tree_src} is not a directory")
    return Options(
        peers=peers,
        jobs=jobs,
        repeat=a.repeat if a.repeat is not None else (1 if q else 3),
        runtime_s=a.runtime if a.runtime is not None else (2.0 if q else 5.0),
        size_bytes=parse_size(a.size or ("64M" if q else "256M")),
        meta_files=a.meta_files if a.meta_files is not None else (2000 if q else 10_000),
        out=a.out,
        workdir=a.workdir,
        keep_workdir=a.keep_workdir,
        diofs_image_size=a.diofs_image_size,
        diofs_args=shlex.split(a.diofs_opts),
        diofs_b_args=shlex.split(a.diofs_b_opts),
        nbd_server=a.nbd_server,
        plots=not a.no_plots,
        tree_src=a.tree_src,
        tree_host_fs=a.tree_host_fs,
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.list_jobs:
        for j in JOBS:
            fio = " ".join(f"--{k}={v}" for k, v in j.fio) or (
                f"(tree step {j.tree_step}, treecopy.py)"
                if j.kind == "tree"
                else "(Python loop, metaload.py)"
            )
            print(f"{j.name:<26} {j.metric:<6} {j.title}\n{'':<33}{fio}")
        return 0
    if a.report:
        results = json.loads(a.report.read_text())
        out = a.out or a.report.parent
        report.write_results(results, out)
        print(report.plot(results, out))
        print(report.markdown(results))
        return 0
    opts = options_from_args(a)
    if a.profile:
        return daemon_profile.run_profile(
            a.profile, opts, a.profiler, not a.profile_all_threads, a.profile_native
        )
    if any(j.kind == "fio" for j in opts.jobs) and shutil.which("fio") is None:
        print("bench: fio is not installed", file=sys.stderr)
        return 2
    try:
        results = run_bench(opts)
    except ValueError as exc:  # an unusable tree source (unreadable, tar failed)
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    failed = sum(not r["ok"] for r in results["runs"])
    print(f"done: {len(results['runs'])} runs, {failed} failed")
    return 0
