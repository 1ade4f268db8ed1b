"""The benchmark run: mount every peer, lay out the data file, run jobs interleaved, report.

Order of runs: for each repetition, for each job, every peer in turn; the peer order rotates by
one each repetition, so machine noise (this VM is noisy) spreads evenly over the peers.

Watchdog: every child (fio, the metadata loop, priming reads) runs in its own session with a
deadline. Past it, the peer's FUSE connection is aborted (fusectl), the mount lazily detached,
the child's process group killed, the run recorded as failed, and the peer remounted. A daemon
that dies during a run is recorded the same way and remounted, at most ``MAX_RESTARTS`` times
per peer. On any exit (also Ctrl-C / SIGTERM) every peer is unmounted and its daemon reaped.

Tree jobs (benchmarks/treecopy.py) need no data file: the file is laid out, and fio required,
only when an fio job is selected. The tree source is surveyed and packed once per run. Each
repetition of the tree jobs starts on a freshly mounted FUSE peer, and (``tree_host_fs``
"fresh", the default) every peer that keeps its files on the host's file system gets a freshly
made ext4 for it (benchmarks/freshfs.py); :class:`TreeRepetitions` owns both.

Public API: :func:`run_bench` (one run from an :class:`Options`, returns the results
document), :class:`Options`, :func:`run_one`, :func:`lay_out`. The command line is
benchmarks/cli.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks import freshfs, report, treecopy
from benchmarks.jobs import (
    DATA_FILE,
    JOBS,
    Job,
    fio_argv,
    layout_argv,
    parse_fio_json,
    primary,
)
from benchmarks.peers import (
    CACHE,
    PEER_NAMES,
    REPO,
    SHORT,
    Peer,
    PeerUnavailable,
    cleanup_workdir,
    make_peer,
    venv_python,
)
from harness import watchdog

MAX_RESTARTS = 3
METALOAD = Path(__file__).resolve().parent / "metaload.py"


@dataclasses.dataclass
class Options:
    peers: list[str] = dataclasses.field(default_factory=lambda: list(PEER_NAMES))
    jobs: list[Job] = dataclasses.field(default_factory=lambda: list(JOBS))
    repeat: int = 3
    runtime_s: float = 5.0
    size_bytes: int = 256 << 20
    meta_files: int = 10_000
    out: Path | None = None
    workdir: Path | None = None
    keep_workdir: bool = False
    diofs_image_size: str = "1G"
    diofs_args: list[str] = dataclasses.field(default_factory=list)
    diofs_b_args: list[str] = dataclasses.field(default_factory=list)  # the diofs-b peer's
    nbd_server: str = "nbdkit"  # the server of the diofs-nbd peer (peers.NBD_SERVERS)
    plots: bool = True
    quiet: bool = False
    tree_src: Path = treecopy.DEFAULT_SRC
    tree_host_fs: str = "fresh"  # freshfs.CHOICES: a fresh ext4 per tree repetition, or not


class ChildFailed(Exception):
    """A child (fio, metadata loop, priming) failed, hung or lost its file system.

    ``report`` holds the watchdog report when the child hung ("" otherwise).
    """

    def __init__(self, message: str, report: str = "") -> None:
        super().__init__(message)
        self.report = report


def _say(opts: Options, msg: str) -> None:
    if not opts.quiet:
        print(msg, flush=True)


def run_child(
    argv: list[str],
    timeout_s: float,
    peer: Peer,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``argv`` to completion within ``timeout_s``; return stdout. Raises ChildFailed.

    ``env`` is added to this process's environment; ``cwd`` is the child's directory.

    On timeout: abort the peer's FUSE connection first (a child stuck in D state on a hung
    mount cannot be killed before that), then kill the child's process group, then reap it.
    """
    child = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=cwd,
        env={**os.environ, **env} if env else None,
    )
    try:
        out, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        name = Path(argv[0]).name
        rep = peer.abort([child.pid], f"{name} still running after {timeout_s:.0f}s")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.communicate(timeout=15)
        raise ChildFailed(
            f"{name} hung for {timeout_s:.0f}s: aborted the FUSE connection and killed it", rep
        ) from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        raise
    if child.returncode != 0:
        tail = (err.decode(errors="replace") or out.decode(errors="replace")).strip()[-800:]
        raise ChildFailed(f"{Path(argv[0]).name} exited with {child.returncode}: {tail}")
    return out.decode(errors="replace")


def _data_path(peer: Peer) -> Path:
    return peer.data_dir / DATA_FILE


def lay_out(peer: Peer, opts: Options) -> None:
    """Make sure the peer's data file exists with the configured size (if an fio job needs it)."""
    if not any(j.kind == "fio" for j in opts.jobs):
        return
    path = _data_path(peer)
    with contextlib.suppress(OSError):
        if path.stat().st_size >= opts.size_bytes:
            return
    run_child(layout_argv(str(path), opts.size_bytes), 60 + opts.size_bytes / 5e6, peer)


def recover(peer: Peer, opts: Options, layout: bool = True) -> None:
    """Unmount (reaping the daemon) and mount again; raises PeerUnavailable past the limit.

    ``layout`` False: no data file (a fresh ext4 of the tree jobs is mounted under the peer)."""
    peer.unmount()
    peer.restarts += 1
    if peer.restarts > MAX_RESTARTS:
        raise PeerUnavailable(f"{peer.name}: gave up after {MAX_RESTARTS} restarts")
    _say(opts, f"    {peer.name}: remounting (restart {peer.restarts})")
    peer.mount()
    if layout:
        lay_out(peer, opts)


class TreeRepetitions:
    """What each peer's repetition of the tree jobs starts from and ends with.

    :meth:`start` (before the peer's first tree job of a repetition): the FUSE daemon is
    unmounted and mounted again, so every repetition starts from a daemon that knows no inode
    (passthrough_ll keeps an fd per inode the kernel knows and finds inodes in a linked list:
    a second cp -a into the same C-peer mount took 4.3 s of daemon CPU instead of 1.8 s, and a
    third failed with EMFILE); with ``tree_host_fs`` "fresh", a peer with a ``host_dir`` gets a
    freshly made ext4 mounted there in between (benchmarks/freshfs.py: why). :meth:`finish`
    (after its last tree job): daemon unmounted, the ext4 unmounted and deleted, the daemon
    mounted again over the plain host directory for the jobs that follow. :meth:`close` (on
    every exit of the run, after the peers are unmounted): removes what is left.

    Invariant: a fresh ext4 is mounted under a peer only between its start and finish, and
    the peer's daemon is never running over it while it is made or removed.
    """

    def __init__(self, opts: Options, tree_src: treecopy.TreeSource | None) -> None:
        if opts.tree_host_fs not in freshfs.CHOICES:
            raise ValueError(f"tree_host_fs must be one of {freshfs.CHOICES}")
        self.opts = opts
        self.size = freshfs.image_size(tree_src.info) if tree_src else 0
        self.active: dict[str, freshfs.FreshExt4] = {}

    def wants_fresh(self, peer: Peer) -> bool:
        return self.opts.tree_host_fs == "fresh" and peer.host_dir is not None

    def config(self, workdir: Path) -> dict[str, Any]:
        """What goes into the results' config (``tree_host_fs_ext4``)."""
        return {
            "image_bytes": self.size,
            "mkfs": freshfs.mkfs_argv(Path(freshfs.IMAGE_NAME), self.size),
            "mount_options": freshfs.mount_options(freshfs.host_options(workdir)),
            "loop": "losetup --direct-io=on",
        }

    def start(self, peer: Peer, rep: int) -> None:
        """Raises FreshFsError, PeerUnavailable, ChildFailed or OSError (peer unusable)."""
        fresh = self.wants_fresh(peer)
        if not fresh and (rep == 0 or not peer.is_fuse):
            return  # rep 0: mounted just now
        peer.unmount()
        if fresh:
            assert peer.host_dir is not None
            fs = freshfs.FreshExt4(peer.root / freshfs.IMAGE_NAME, peer.host_dir, self.size)
            self.active[peer.name] = fs
            fs.make()
        peer.mount()
        if not fresh:
            lay_out(peer, self.opts)

    def finish(self, peer: Peer, remount: bool) -> None:
        """Raises PeerUnavailable, ChildFailed or OSError (remounting the peer failed)."""
        fs = self.active.pop(peer.name, None)
        if fs is None:
            return
        peer.unmount()
        peer.errors.extend(f"fresh ext4: {p}" for p in fs.remove())
        if remount:
            peer.mount()
            lay_out(peer, self.opts)

    def close(self, peers: list[Peer]) -> None:
        for peer in peers:
            if (fs := self.active.pop(peer.name, None)) is not None:
                peer.unmount()
                peer.errors.extend(f"fresh ext4: {p}" for p in fs.remove())


def run_one(
    peer: Peer, job: Job, rep: int, opts: Options, tree_src: treecopy.TreeSource | None = None
) -> dict[str, Any]:
    """One job on one peer; returns the run record (ok=False with error on failure).

    ``tree_src`` is required for tree jobs."""
    rec: dict[str, Any] = {
        "job": job.name,
        "peer": peer.name,
        "rep": rep,
        "ok": False,
        "error": None,
        "runtime_s": opts.runtime_s,
    }
    path = _data_path(peer)
    try:
        if job.prime:
            run_child(["dd", f"if={path}", "of=/dev/null", "bs=1M"], 120, peer)
        if job.kind == "tree":
            # the host's dirty pages (the previous job's, any peer's, a fresh ext4's mkfs)
            # written back first: they slowed whichever job ran next (docs/bench.md, run M)
            run_child(["sync"], 300, peer)
        stats0 = diofs_stats(peer)
        cpu0 = peer.daemon_cpu_s()
        t0 = time.monotonic()
        if job.kind == "fio":
            out = run_child(
                fio_argv(job, str(path), opts.size_bytes, opts.runtime_s), opts.runtime_s + 60, peer
            )
            rec.update(parse_fio_json(out))
        elif job.kind == "tree":
            assert tree_src is not None, "tree jobs need the prepared tree source"
            argv, cwd, env = treecopy.step_command(job.tree_step, peer.data_dir, rep, tree_src)
            run_child(argv, treecopy.timeout_s(tree_src.info), peer, cwd=cwd, env=env)
            rec["elapsed_s"] = rec["runtime_s"] = time.monotonic() - t0
            rec["files"] = tree_src.info["files"]
        else:
            d = peer.data_dir / f"meta-{rep}-{os.getpid()}"
            out = run_child(
                [venv_python(), str(METALOAD), str(d), str(opts.meta_files)],
                max(120.0, opts.meta_files / 50),
                peer,
            )
            rec.update(json.loads(out.strip().splitlines()[-1]))
            rec["runtime_s"] = rec["elapsed_s"]
        rec["wall_s"] = time.monotonic() - t0
        cpu1 = peer.daemon_cpu_s()
        rec["daemon_cpu_s"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
        rec["ok"] = True
        if stats0 is not None and (stats1 := diofs_stats(peer)) is not None:
            rec["diofs_stats_delta"] = stats_delta(stats0, stats1)
            rec["diofs_stats_after"] = stats1  # gauges (e.g. writes_per_flush) read here
        if job.kind == "tree" and tree_src is not None:
            cleanup = treecopy.cleanup_command(job.tree_step, peer.data_dir, rep)
            if cleanup:  # after the figures: neither timed nor counted
                run_child(cleanup, treecopy.timeout_s(tree_src.info), peer)
    except (ChildFailed, ValueError, OSError, json.JSONDecodeError) as exc:
        rec["error"] = str(exc)
        if getattr(exc, "report", ""):
            rec["watchdog_report"] = exc.report
    if peer.is_fuse and not peer.alive():
        rc = getattr(getattr(peer, "proc", None), "returncode", None)
        msg = f"daemon died (exit {rc}); log tail:\n{peer.log_tail(12)}"
        rec["ok"] = False
        rec["error"] = (rec["error"] + "; " if rec["error"] else "") + msg
    return rec


_GET_STATS = (
    "import os, sys; sys.stdout.write(open(os.path.join(sys.argv[1], '.diofs-stats')).read())"
)


def diofs_stats(peer: Peer) -> dict[str, Any] | None:
    """The diofs daemon's stats snapshot (xattr ``user.diofs.stats``), None if unavailable.

    Read in a child with a deadline: a getxattr on a hung mount would block this process.
    """
    if not peer.name.startswith("diofs"):
        return None
    try:
        out = run_child([venv_python(), "-c", _GET_STATS, str(peer.data_dir)], 15, peer)
        doc = json.loads(out)
    except (ChildFailed, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Counters that changed between two flat snapshots (numbers as differences)."""
    out: dict[str, Any] = {}
    for k, v in after.items():
        b = before.get(k)
        if isinstance(v, int | float) and isinstance(b, int | float) and not isinstance(v, bool):
            if v != b:
                out[k] = v - b
        elif v != b:
            out[k] = v
    return out


def _progress(job: Job, rec: dict[str, Any]) -> str:
    head = f"  [rep {rec['rep'] + 1}] {job.name:<26} {SHORT[rec['peer']]:<13}"
    if not rec["ok"]:
        return head + " FAILED: " + " ".join((rec["error"] or "").split())[:200]
    txt = f"{report.fmt(job.metric, primary(job, rec)):>8} {job.metric:<5}"
    if rec.get("lat_p99_us") is not None:
        txt += f" p50 {rec['lat_p50_us']:.0f} µs p99 {rec['lat_p99_us']:.0f} µs"
    if rec.get("daemon_cpu_s") is not None:
        txt += f" cpu {rec['daemon_cpu_s']:.2f} s"
    if job.kind == "tree" and (delta := rec.get("diofs_stats_delta")):
        txt += f" requests {sum(v for k, v in delta.items() if k.startswith('ops.')):,}"
    return head + " " + txt


def _fs_type(path: Path) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(
            ["findmnt", "-no", "FSTYPE", "-T", str(path)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return r.stdout.strip() or None
    return None


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_bench(opts: Options) -> dict[str, Any]:
    """Run the benchmark; returns the results document (also written to ``opts.out``)."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    out = opts.out or REPO / "bench-results" / stamp
    workdir = opts.workdir or CACHE / f"work-{stamp}-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "version": 1,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": report.machine_facts(),
        "config": {
            "peers": list(opts.peers),
            "jobs": [j.name for j in opts.jobs],
            "repeat": opts.repeat,
            "runtime_s": opts.runtime_s,
            "size_bytes": opts.size_bytes,
            "meta_files": opts.meta_files,
            "tree_src": None,
            "tree_host_fs": opts.tree_host_fs,
            "diofs_args": opts.diofs_args,
            "diofs_b_args": opts.diofs_b_args,
            "nbd_server": opts.nbd_server,
            "workdir": str(workdir),
        },
        "peers": {},
        "jobs": [{"name": j.name, "title": j.title, "metric": j.metric} for j in opts.jobs],
        "runs": [],
    }
    results["machine"]["workdir_fs"] = _fs_type(workdir)
    if results["machine"]["workdir_fs"] != "ext4":
        _say(
            opts, f"warning: work dir {workdir} is on {results['machine']['workdir_fs']}, not ext4"
        )
    tree_src = None
    tree_reps: TreeRepetitions | None = None
    live: list[Peer] = []
    try:  # SIGTERM unmounts like Ctrl-C does (only possible from the main thread)
        prev_term = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    except ValueError:
        prev_term = None
    try:
        if any(j.kind == "tree" for j in opts.jobs):  # ValueError: SRC unusable
            tree_src = treecopy.prepare(opts.tree_src, workdir)
            results["config"]["tree_src"] = tree_src.info
            _say(opts, f"tree source {treecopy.describe(tree_src.info)}")
        tree_reps = TreeRepetitions(opts, tree_src)
        if tree_src is not None and opts.tree_host_fs == "fresh":
            results["config"]["tree_host_fs_ext4"] = tree_reps.config(workdir)
        if any(p != "local" for p in opts.peers):
            try:
                watchdog.ensure_fusectl()
            except OSError:
                _say(opts, "warning: fusectl is not available: hung mounts cannot be aborted")
        for name in opts.peers:
            peer = make_peer(
                name,
                workdir,
                opts.diofs_image_size,
                opts.diofs_args,
                opts.nbd_server,
                opts.diofs_b_args,
            )
            info: dict[str, Any] = {
                "label": peer.label,
                "available": True,
                "skip_reason": None,
                "errors": peer.errors,
                "restarts": 0,
            }
            results["peers"][name] = info
            try:
                peer.prepare()
                peer.mount()
                lay_out(peer, opts)
            except (PeerUnavailable, ChildFailed, OSError, subprocess.SubprocessError) as exc:
                peer.unmount()
                info.update(available=False, skip_reason=str(exc).strip())
                _say(opts, f"skipping {name}: {exc}")
                continue
            live.append(peer)
            _say(opts, f"{name}: ready ({peer.label}) at {peer.data_dir}")
        tree_jobs = [j for j in opts.jobs if j.kind == "tree"]
        first_tree, last_tree = (tree_jobs[0], tree_jobs[-1]) if tree_jobs else (None, None)

        def drop(peer: Peer, exc: Exception) -> None:
            results["peers"][peer.name].update(
                available=False, skip_reason=f"stopped mid-run: {exc}"
            )
            peer.errors.append(str(exc))
            _say(opts, f"    {peer.name}: dropped: {exc}")

        assert tree_reps is not None
        for rep in range(opts.repeat):
            for job in opts.jobs:
                k = rep % len(live) if live else 0
                for peer in live[k:] + live[:k]:
                    if not results["peers"][peer.name]["available"]:
                        continue
                    if job is first_tree:
                        try:
                            tree_reps.start(peer, rep)
                        except (freshfs.FreshFsError, PeerUnavailable, ChildFailed, OSError) as exc:
                            drop(peer, exc)
                            continue
                    rec = run_one(peer, job, rep, opts, tree_src)
                    if job.kind == "tree" and (fs := tree_reps.active.get(peer.name)):
                        rec["fresh_ext4"] = fs.device  # the peer's files were on this loop dev
                    results["runs"].append(rec)
                    _say(opts, _progress(job, rec))
                    if peer.is_fuse and (not rec["ok"] or not peer.alive()):
                        try:
                            recover(peer, opts, layout=peer.name not in tree_reps.active)
                        except (PeerUnavailable, ChildFailed, OSError) as exc:
                            drop(peer, exc)
                    if job is last_tree:
                        try:
                            tree_reps.finish(peer, results["peers"][peer.name]["available"])
                        except (PeerUnavailable, ChildFailed, OSError) as exc:
                            drop(peer, exc)
                    results["peers"][peer.name]["restarts"] = peer.restarts
                report.write_results(results, out)  # partial results survive a crash
    except KeyboardInterrupt:
        results["interrupted"] = True
        _say(opts, "interrupted: unmounting")
    finally:
        for peer in live:
            peer.unmount()
            if peer.is_fuse:
                results["peers"][peer.name]["daemon_log"] = peer.log_tail(40)
        if tree_reps is not None:
            tree_reps.close(live)
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
        if not opts.keep_workdir:
            cleanup_workdir(workdir)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report.write_results(results, out)
    if opts.plots:
        _say(opts, report.plot(results, out))
    _say(opts, f"results: {out}/results.json, {out}/results.md")
    return results


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)
