"""``scripts/bench --profile JOB``: one job on diofs with its daemon under a profiler.

py-spy (default): the daemon is mounted normally, ``py-spy record --format raw`` attaches to
its pid for the length of the job, and the collapsed stacks (``profile.txt``, loadable by
speedscope or flamegraph.pl) are summarised as the top 20 functions by own time and by
inclusive time. By default only samples of the thread holding the GIL are kept (``--gil``):
idle trio worker threads otherwise show up as busy in ``WorkerThread._work`` and hide the
Python CPU profile; ``--profile-all-threads`` keeps every thread (then native time without the
GIL, such as pread in a worker thread, shows too).

A tree job (benchmarks/treecopy.py) first runs the tree steps before it in the job table
(cp -a before git commit, ...), unprofiled under py-spy, so that only JOB is sampled.

cProfile: the daemon runs as ``python -m cProfile -o profile.pstats mount.py ...``; the file is
written when the daemon exits after the unmount. cProfile sees the main thread only.

Public API: :func:`run_profile`, :func:`summarize_collapsed`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report, treecopy
from benchmarks.jobs import JOBS_BY_NAME, TREE_JOBS, primary
from benchmarks.peers import CACHE, REPO, DiofsPeer, PeerUnavailable, cleanup_workdir
from benchmarks.runner import ChildFailed, Options, lay_out, run_one

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME_LINENO = re.compile(r":\d+\)$")


def summarize_collapsed(
    text: str, top: int = 20
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """(top functions by own samples, top by inclusive samples, total samples).

    ``text`` is py-spy's raw output: one ``frame;frame;...;leaf COUNT`` line per stack; line
    numbers are dropped so that a function is counted once however many lines were sampled.
    """
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        frames = [_FRAME_LINENO.sub(")", f) for f in m.group(1).split(";") if f]
        n = int(m.group(2))
        total += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return own.most_common(top), incl.most_common(top), total


def _print_table(title: str, rows: list[tuple[str, int]], total: int) -> None:
    print(f"\n{title} ({total} samples)")
    for fn, n in rows:
        print(f"  {100 * n / max(total, 1):5.1f}%  {n:7d}  {fn}")


def run_profile(
    job_name: str,
    opts: Options,
    profiler: str = "py-spy",
    gil_only: bool = True,
    native: bool = False,
) -> int:
    """Run ``job_name`` once on diofs under ``profiler``; print the top functions. Exit code."""
    job = JOBS_BY_NAME.get(job_name)
    if job is None:
        print(f"bench: unknown job {job_name!r}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    out = opts.out or REPO / "bench-results" / f"{stamp}-profile-{job_name}"
    out.mkdir(parents=True, exist_ok=True)
    workdir = opts.workdir or CACHE / f"work-{stamp}-{os.getpid()}-profile"
    workdir.mkdir(parents=True, exist_ok=True)
    opts = dataclasses.replace(opts, peers=["diofs"], jobs=[job])
    peer = DiofsPeer(workdir, opts.diofs_image_size, opts.diofs_args)
    pyspy = shutil.which("py-spy") or str(REPO / ".venv" / "bin" / "py-spy")
    if profiler == "py-spy" and not Path(pyspy).exists():
        print(
            "bench: py-spy not found (.venv/bin/pip install py-spy), or use --profiler cprofile",
            file=sys.stderr,
        )
        return 2
    pstats_path = out / "profile.pstats"
    raw_path = out / "profile.txt"
    if profiler == "cprofile":
        peer.wrapper = ["-m", "cProfile", "-o", str(pstats_path)]
    spy: subprocess.Popen[bytes] | None = None
    rec = None
    try:
        tree_src = treecopy.prepare(opts.tree_src, workdir) if job.kind == "tree" else None
        peer.prepare()
        peer.mount()
        lay_out(peer, opts)
        for before in TREE_JOBS[: TREE_JOBS.index(job)] if tree_src else ():
            if not (r := run_one(peer, before, 0, opts, tree_src))["ok"]:
                raise ChildFailed(f"{before.name}: {r['error']}")
        if profiler == "py-spy":
            pid = peer.daemon_pid()
            assert pid is not None
            spy = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--format",
                    "raw",
                    "-o",
                    str(raw_path),
                    "--pid",
                    str(pid),
                    "--rate",
                    "200",
                    *(["--gil"] if gil_only else []),
                    *(["--native"] if native else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            time.sleep(1.0)  # let it attach
        rec = run_one(peer, job, 0, opts, tree_src)
    except (PeerUnavailable, ChildFailed, OSError, ValueError) as exc:
        print(f"bench: profile run failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if spy is not None:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)
            try:
                _, err = spy.communicate(timeout=30)
                if spy.returncode not in (0, -signal.SIGINT):
                    print(f"py-spy: {err.decode(errors='replace').strip()[-500:]}", file=sys.stderr)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        peer.unmount()
        if not opts.keep_workdir:
            cleanup_workdir(workdir)
    if rec is not None:
        if rec["ok"]:
            print(
                f"{job.name} on diofs: {report.fmt(job.metric, primary(job, rec))} {job.metric}, "
                f"daemon cpu {rec.get('daemon_cpu_s') or 0:.2f} s"
            )
        else:
            print(f"{job.name} on diofs FAILED: {rec['error']}")
    if profiler == "py-spy":
        if not raw_path.exists():
            print("bench: py-spy wrote no profile", file=sys.stderr)
            return 1
        own, incl, total = summarize_collapsed(raw_path.read_text())
        _print_table("top 20 functions by own time", own, total)
        _print_table("top 20 functions by inclusive time", incl, total)
        print(
            f"\ncollapsed stacks: {raw_path} (open in https://www.speedscope.app or flamegraph.pl)"
        )
    else:
        if not pstats_path.exists():
            print(
                "bench: cProfile wrote no profile (did the daemon exit cleanly?)", file=sys.stderr
            )
            return 1
        import pstats

        st = pstats.Stats(str(pstats_path))
        st.sort_stats("tottime").print_stats(20)
        st.sort_stats("cumulative").print_stats(20)
        print(f"pstats: {pstats_path}")
    return 0 if rec is not None and rec["ok"] else 1
