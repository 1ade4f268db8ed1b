"""Smoke tests of the benchmark harness (benchmarks/, scripts/bench).

Fast: the job table, fio argv building and JSON parsing, and the report built from a small fake
result set run without fio or FUSE. One real fio job (1 s, 16 MiB, local disk peer only) proves
the run loop end to end; it is skipped when fio is not installed. The tree-copy jobs run once
on a real diofs mount and the local disk with a 40-file source tree (a few seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import jobs, report, treecopy
from benchmarks.cli import options_from_args, parse_args
from benchmarks.daemon_profile import summarize_collapsed
from benchmarks.jobs import JOBS, JOBS_BY_NAME, TREE_JOBS, fio_argv, parse_fio_json, select_jobs
from benchmarks.runner import Options, run_bench

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench"


def test_job_table_is_consistent() -> None:
    assert len(JOBS_BY_NAME) == len(JOBS)
    for job in JOBS:
        assert job.metric in ("MB/s", "IOPS", "ops/s", "s")
        assert (job.kind == "tree") == bool(job.tree_step) == (job.metric == "s")
        if job.kind != "fio":
            continue
        argv = fio_argv(job, "/x/bench.dat", 1 << 20, 2)
        assert "--output-format=json" in argv and "--time_based" in argv
        assert "--runtime=2" in argv and "--filename=/x/bench.dat" in argv
        if job.prime:
            assert "--invalidate=0" in argv and "--direct=1" not in argv
        else:
            assert "--direct=1" in argv
    dsync = [j for j in JOBS if ("sync", "dsync") in j.fio]
    assert sorted(dict(j.fio)["iodepth"] for j in dsync) == ["1", "16"]
    assert [j.name for j in select_jobs("mmap-read-cached,seqread-1m-psync")] == [
        "seqread-1m-psync",
        "mmap-read-cached",
    ]
    with pytest.raises(ValueError):
        select_jobs("no-such-job")
    assert jobs.parse_size("256M") == 256 << 20 and jobs.parse_size("1G") == 1 << 30


def _fio_doc(side: str, bw: int, iops: float) -> str:
    other = "write" if side == "read" else "read"
    pct = {"50.000000": 100_000, "99.000000": 900_000}
    return "fio: some warning\n" + json.dumps(
        {
            "jobs": [
                {
                    "error": 0,
                    "usr_cpu": 1.5,
                    "sys_cpu": 20.0,
                    side: {
                        "io_bytes": 10,
                        "bw_bytes": bw,
                        "iops": iops,
                        "lat_ns": {"percentile": pct},
                        "clat_ns": {"percentile": pct},
                    },
                    other: {"io_bytes": 0, "bw_bytes": 0, "iops": 0.0},
                }
            ]
        }
    )


def test_parse_fio_json_picks_the_busy_direction() -> None:
    f = parse_fio_json(_fio_doc("write", 2_000_000, 500.0))
    assert f["direction"] == "write" and f["mbps"] == 2.0 and f["iops"] == 500.0
    assert f["lat_p50_us"] == 100.0 and f["lat_p99_us"] == 900.0


def _fake_results() -> dict:
    names = ["seqread-1m-psync", "randread-4k-aio16", "meta-create-stat-unlink"]
    peers = ["diofs", "pypeer", "cpeer", "local"]
    base = {"diofs": 400.0, "pypeer": 200.0, "cpeer": 800.0, "local": 1000.0}
    runs = []
    for rep in range(3):
        for name in names:
            key = {"MB/s": "mbps", "IOPS": "iops", "ops/s": "ops_per_s"}[JOBS_BY_NAME[name].metric]
            for p in peers:
                ok = not (p == "pypeer" and name == "randread-4k-aio16" and rep == 2)
                r = {
                    "job": name,
                    "peer": p,
                    "rep": rep,
                    "ok": ok,
                    "runtime_s": 5.0,
                    "error": None if ok else "daemon died (exit 1)",
                    "daemon_cpu_s": None if p == "local" else 1.0,
                }
                if ok:
                    r[key] = base[p] * (1 + rep / 10)
                    r["iops"] = r.get("iops", r[key])
                    r["lat_p50_us"], r["lat_p99_us"] = 50.0, 500.0
                    if name.startswith("meta"):
                        r["files"] = 100
                runs.append(r)
    return {
        "started": "2025-01-01 00:00:00",
        "machine": {"kernel": "6.18", "cpu_count": 2},
        "config": {
            "peers": peers,
            "jobs": names,
            "repeat": 3,
            "runtime_s": 5.0,
            "size_bytes": 256 << 20,
            "meta_files": 100,
        },
        "peers": {p: {"label": p, "available": True, "errors": []} for p in peers},
        "jobs": [{"name": n} for n in names],
        "runs": runs,
    }


def test_report_from_fake_results(tmp_path: Path) -> None:
    results = _fake_results()
    summ = report.summarize(results)
    s = summ["seqread-1m-psync"]["diofs"]
    assert (s["median"], s["min"], s["max"], s["n"]) == pytest.approx((440.0, 400.0, 480.0, 3))
    assert summ["randread-4k-aio16"]["pypeer"]["failed"] == 1
    md = report.markdown(results)
    assert "| 1 MiB seq read, O_DIRECT, psync | MB/s | 440 (400–480) |" in md
    assert "diofs / Python peer*" in md and "diofs / local disk" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| 1 MiB seq read"))
    assert row.endswith("| 2.00 | 0.40 |")
    assert "pypeer / randread-4k-aio16 / rep 2: daemon died" in md
    report.write_results(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == results["runs"]
    status = report.plot(results, tmp_path)
    assert status.startswith(("chart:", "plots skipped"))


def test_collapsed_stack_summary() -> None:
    own, incl, total = summarize_collapsed(
        "main (m.py:1);read (ops.py:10) 3\nmain (m.py:1);read (ops.py:12) 2\n"
        "main (m.py:1);write (ops.py:20) 5\n"
    )
    assert total == 10
    assert own[0] == ("read (ops.py)", 5) or own[0] == ("write (ops.py)", 5)
    assert dict(incl)["main (m.py)"] == 10


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_one_second_fio_job_on_local_disk(tmp_path: Path) -> None:
    opts = Options(
        peers=["local"],
        jobs=[JOBS_BY_NAME["seqread-1m-psync"]],
        repeat=1,
        runtime_s=1,
        size_bytes=16 << 20,
        meta_files=10,
        out=tmp_path / "out",
        workdir=tmp_path / "work",
        plots=False,
        quiet=True,
    )
    results = run_bench(opts)
    (run,) = results["runs"]
    assert run["ok"], run["error"]
    assert run["mbps"] > 0 and run["lat_p50_us"] > 0
    assert (tmp_path / "out" / "results.md").exists()
    assert not (tmp_path / "work").exists()


def test_stats_delta_keeps_changed_counters_only() -> None:
    from benchmarks.runner import stats_delta

    d = stats_delta({"a": 1, "b": 2, "s": "x"}, {"a": 4, "b": 2, "s": "y", "c": 1})
    assert d == {"a": 3, "s": "y", "c": 1}


def test_script_lists_jobs() -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--list-jobs"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert all(j.name in r.stdout for j in JOBS)


def test_modules_import_alone() -> None:
    """No import cycle (daemon_profile <-> runner), and no module shadows the stdlib's profile."""
    for mod in ("benchmarks.daemon_profile", "benchmarks.runner", "benchmarks.cli"):
        r = subprocess.run(
            [sys.executable, "-c", f"import {mod}"], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
    assert not (SCRIPT.parent.parent / "benchmarks" / "profile.py").exists()


def test_tree_only_and_bad_tree_source(tmp_path: Path) -> None:
    opts = options_from_args(parse_args(["--tree-only", "--tree-src", str(tmp_path)]))
    assert [j.name for j in opts.jobs] == [
        "tree-cp-a",
        "tree-git-commit",
        "tree-rm-rf",
        "tree-tar-x",
    ]
    assert opts.tree_src == tmp_path
    assert opts.tree_host_fs == "fresh"  # the default
    assert (
        options_from_args(parse_args(["--tree-only", "--tree-host-fs", "host"])).tree_host_fs
        == "host"
    )
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--tree-only", "--tree-src", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"bench: --tree-src {tmp_path / 'missing'} is not a directory"
    ]


def _small_tree(root: Path) -> Path:
    src = root / "src"
    for d in range(4):
        (src / f"d{d}" / "sub").mkdir(parents=True)
        for i in range(9):
            (src / f"d{d}" / f"f{i}.h").write_bytes(os.urandom(100 + 500 * i))
        os.symlink("../f0.h", src / f"d{d}" / "sub" / "link.h")
        (src / f"d{d}" / "sub" / "x.h").write_text("int x;\n")
    return src


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_tree_jobs_on_diofs_and_local_disk(tmp_path: Path) -> None:
    src = _small_tree(tmp_path)
    info = treecopy.survey(src)
    assert (info["files"], info["symlinks"], info["dirs"]) == (40, 4, 9)
    opts = Options(
        peers=["diofs", "local"],
        jobs=list(TREE_JOBS),
        repeat=1,
        out=tmp_path / "out",
        workdir=tmp_path / "work",
        diofs_image_size="64M",
        plots=False,
        quiet=True,
        tree_src=src,
        # a fresh loop-mounted ext4 for the local disk peer needs root
        tree_host_fs="fresh" if os.geteuid() == 0 else "host",
    )
    results = run_bench(opts)
    runs = {(r["job"], r["peer"]): r for r in results["runs"]}
    assert len(runs) == 8
    for rec in runs.values():
        assert rec["ok"], rec["error"]
        assert rec["elapsed_s"] > 0
    assert results["config"]["tree_src"]["files"] == 40
    assert results["config"]["tree_host_fs"] == opts.tree_host_fs
    if opts.tree_host_fs == "fresh":
        assert results["config"]["tree_host_fs_ext4"]["image_bytes"] >= 256 << 20
        assert not results["peers"]["local"]["errors"]
        assert all(
            r["fresh_ext4"].startswith("/dev/loop") for (_, p), r in runs.items() if p == "local"
        )
    assert all("fresh_ext4" not in r for (_, p), r in runs.items() if p == "diofs")
    ops = runs[("tree-cp-a", "diofs")]["diofs_stats_delta"]
    assert ops["ops.create"] >= 40 and ops["ops.mkdir"] >= 8 and ops["ops.symlink"] >= 4
    assert runs[("tree-rm-rf", "diofs")]["diofs_stats_delta"]["ops.unlink"] >= 40
    tar = runs[("tree-tar-x", "diofs")]["diofs_stats_delta"]
    # tar replaces a placeholder file by each symlink at the end; its cleanup is not counted
    assert tar["ops.create"] >= 40 and tar.get("ops.unlink", 0) <= 4
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"## Tree copy of `{src}`, 40 files" in md
    for job in TREE_JOBS:
        assert f"| {job.title} | " in md
    assert "diofs requests by opcode" in md
    assert "| create | 40 (1.00) |" in md
    assert "## Primary figure per job" not in md  # tree-only: no empty fio tables
    assert not (tmp_path / "work").exists()
