"""Results: machine facts, results.json, results.md and PNG charts.

The results document (``results.json``) is a plain dict:
  machine   kernel, cpu count and model, python, fio, libfuse, pyfuse3, trio, git commit
  config    size, runtime, repeat, peers, jobs, meta_files, tree_src (survey of the tree-copy
            source: path, files, dirs, symlinks, bytes; None without tree jobs)
  peers     name -> {label, available, skip_reason, errors, restarts}
  jobs      [{name, title, metric}] in table order
  runs      [{job, peer, rep, ok, error, mbps, iops, ops_per_s, lat_p50_us, lat_p99_us,
              elapsed_s (tree jobs), daemon_cpu_s, wall_s, diofs_stats_delta (diofs only:
              counters changed during the run, ``ops.<handler>`` = requests), ...}] in the
              order they ran

Everything else (tables, ratios, charts) is derived from that document by the functions here,
so a report can be rebuilt from a results.json alone (``scripts/bench --report FILE``).
Medians are over the successful runs only; failed runs are counted and listed.
Tree jobs (metric ``s``, lower is better) get their own table with the ratio diofs / C peer
and a table of diofs requests by opcode; the other tables leave them out.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.jobs import JOBS_BY_NAME, Job, primary
from benchmarks.peers import ALL_PEERS, REPO, SHORT, venv_python


def _cmd(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def machine_facts() -> dict[str, Any]:
    """Facts about this machine and the software under test (best effort, never raises)."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        pass
    py = venv_python()
    ver = "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))"
    return {
        "kernel": platform.release(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "fio": _cmd(["fio", "--version"]),
        "libfuse": _cmd(["pkg-config", "--modversion", "fuse3"]),
        "pyfuse3": _cmd([py, "-c", ver, "pyfuse3"]),
        "trio": _cmd([py, "-c", ver, "trio"]),
        "git_commit": _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "workdir_fs": None,  # filled in by the runner
    }


# --- summaries ----------------------------------------------------------------------------


def summarize(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """job -> peer -> {median, min, max, n, failed, p50_us, p99_us, cpu_s, cpu_us_per_op}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for jd in results["jobs"]:
        job = JOBS_BY_NAME[jd["name"]]
        per: dict[str, dict[str, Any]] = {}
        for peer in results["config"]["peers"]:
            runs = [r for r in results["runs"] if r["job"] == job.name and r["peer"] == peer]
            if not runs:
                continue
            ok = [r for r in runs if r.get("ok")]
            vals = [v for r in ok if (v := primary(job, r)) is not None]
            s: dict[str, Any] = {"n": len(ok), "failed": len(runs) - len(ok)}
            if vals:
                s.update(median=statistics.median(vals), min=min(vals), max=max(vals))
            for key, src in (
                ("p50_us", "lat_p50_us"),
                ("p99_us", "lat_p99_us"),
                ("cpu_s", "daemon_cpu_s"),
            ):
                xs = [r[src] for r in ok if r.get(src) is not None]
                s[key] = statistics.median(xs) if xs else None
            ops = [_ops(job, r) for r in ok]
            cpu_per = [
                r["daemon_cpu_s"] / o * 1e6
                for r, o in zip(ok, ops, strict=True)
                if o and r.get("daemon_cpu_s") is not None
            ]
            s["cpu_us_per_op"] = statistics.median(cpu_per) if cpu_per else None
            per[peer] = s
        out[job.name] = per
    return out


def _ops(job: Job, run: dict[str, Any]) -> float | None:
    """Requests (fio I/Os or metadata ops) done in the run."""
    if job.kind == "meta":
        return 3 * run["files"] if run.get("files") else None
    if run.get("iops") and run.get("runtime_s"):
        return run["iops"] * run["runtime_s"]
    return None


def fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "–"
    if metric == "s":
        return f"{v:.2f}" if v < 10 else f"{v:.1f}"
    if metric == "IOPS":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or not a.get("median") or not b.get("median"):
        return "–"
    return f"{a['median'] / b['median']:.2f}"


def _cell(metric: str, s: dict[str, Any] | None) -> str:
    if not s:
        return "–"
    if "median" not in s:
        return f"FAILED ×{s['failed']}"
    txt = fmt(metric, s["median"])
    if s["n"] > 1:
        txt += f" ({fmt(metric, s['min'])}–{fmt(metric, s['max'])})"
    if s["failed"]:
        txt += f" ⚠{s['failed']} failed"
    return txt


def markdown(results: dict[str, Any]) -> str:
    """The results.md document: facts, primary table with ratios, latency, CPU, errors."""
    cfg, mach = results["config"], results["machine"]
    peers = [p for p in ALL_PEERS if p in cfg["peers"]]
    summ = summarize(results)
    lines = [
        f"# diofs benchmark, {results.get('started', '?')}",
        "",
        f"Machine: Linux {mach.get('kernel')}, {mach.get('cpu_count')} CPUs "
        f"({mach.get('cpu_model')}), work dir on {mach.get('workdir_fs')}. "
        f"Python {mach.get('python')}, {mach.get('fio')}, libfuse {mach.get('libfuse')}, "
        f"pyfuse3 {mach.get('pyfuse3')}, trio {mach.get('trio')}, "
        f"diofs commit {mach.get('git_commit')}.",
        "",
        f"Config: data file {cfg['size_bytes'] >> 20} MiB, {cfg['runtime_s']:g} s per fio job, "
        f"{cfg['repeat']} repetition(s) interleaved across peers, metadata job "
        f"{cfg['meta_files']} files.",
        "",
        "Peers:",
    ]
    for p in peers:
        info = results["peers"].get(p, {})
        state = "" if info.get("available", True) else f" — **skipped**: {info.get('skip_reason')}"
        lines.append(f"- {SHORT[p]}: {info.get('label', p)}{state}")
    kinds = {JOBS_BY_NAME[jd["name"]].kind for jd in results["jobs"]}
    flat = [
        "",
        "## Primary figure per job (median, min–max over repetitions)",
        "",
    ]
    ratio_cols = [
        (a, b)
        for a, b in (
            ("diofs-nbd", "diofs"), ("diofs", "cpeer"), ("diofs-b", "cpeer"), ("diofs", "pypeer"),
            ("diofs-b", "pypeer"), ("diofs", "local"),
        )
        if a in peers and b in peers
    ]
    head = [
        "job",
        "unit",
        *(SHORT[p] for p in peers),
        *(f"{SHORT[a]} / {SHORT[b]}" for a, b in ratio_cols),
    ]
    flat += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for jd in results["jobs"]:
        job = JOBS_BY_NAME[jd["name"]]
        if job.kind == "tree":
            continue
        per = summ[job.name]
        row = [
            job.title,
            job.metric,
            *(_cell(job.metric, per.get(p)) for p in peers),
            *(_ratio(per.get(a), per.get(b)) for a, b in ratio_cols),
        ]
        flat.append("| " + " | ".join(row) + " |")
    flat += [
        "",
        "## Latency (submission to completion, fio `lat`) p50 / p99 (µs, median over repetitions)",
        "",
        "| job | " + " | ".join(SHORT[p] for p in peers) + " |",
        "|" + "---|" * (len(peers) + 1),
    ]
    for jd in results["jobs"]:
        job = JOBS_BY_NAME[jd["name"]]
        if job.kind != "fio":
            continue
        per = summ[job.name]
        cells = []
        for p in peers:
            s = per.get(p) or {}
            cells.append(f"{_us(s.get('p50_us'))} / {_us(s.get('p99_us'))}")
        flat.append(f"| {job.title} | " + " | ".join(cells) + " |")
    if kinds - {"tree"}:  # the tree jobs have tables of their own
        lines += flat
    lines += tree_tables(results, summ, peers)
    fuse_peers = [p for p in peers if p != "local"]
    if fuse_peers:
        lines += [
            "",
            "## Daemon CPU per run: seconds (µs per request), median",
            "",
            "| job | " + " | ".join(SHORT[p] for p in fuse_peers) + " |",
            "|" + "---|" * (len(fuse_peers) + 1),
        ]
        for jd in results["jobs"]:
            job = JOBS_BY_NAME[jd["name"]]
            per = summ[job.name]
            cells = []
            for p in fuse_peers:
                s = per.get(p) or {}
                cpu, per_op = s.get("cpu_s"), s.get("cpu_us_per_op")
                cells.append(
                    "–"
                    if cpu is None
                    else f"{cpu:.2f}" + (f" ({per_op:.0f})" if per_op is not None else "")
                )
            lines.append(f"| {job.title} | " + " | ".join(cells) + " |")
    errs = [r for r in results["runs"] if not r.get("ok")]
    peer_errs = [(p, e) for p, info in results["peers"].items() for e in info.get("errors", [])]
    if errs or peer_errs:
        lines += ["", "## Errors", ""]
        for r in errs:
            lines.append(f"- {r['peer']} / {r['job']} / rep {r['rep']}: {_one_line(r['error'])}")
        for p, e in peer_errs:
            lines.append(f"- {p}: {_one_line(e)}")
    lines += [
        "",
        "\\* variant: O_DIRECT dropped from the backing open (as shipped, every "
        "O_DIRECT write through it fails with EINVAL).",
        "",
    ]
    return "\n".join(lines)


def _median_ops(results: dict[str, Any], job: str) -> dict[str, float]:
    """Handler name -> median diofs requests over the job's successful runs."""
    runs = [
        r.get("diofs_stats_delta") or {}
        for r in results["runs"]
        if r["job"] == job and r["peer"] == "diofs" and r.get("ok")
    ]
    names = {k for d in runs for k in d if k.startswith("ops.")}
    return {
        k.removeprefix("ops."): statistics.median(d.get(k, 0) for d in runs) for k in names
    }


def tree_tables(
    results: dict[str, Any], summ: dict[str, dict[str, dict[str, Any]]], peers: list[str]
) -> list[str]:
    """Markdown lines: the tree-copy seconds table and diofs's requests by opcode."""
    tree_jobs = [JOBS_BY_NAME[jd["name"]] for jd in results["jobs"]]
    tree_jobs = [j for j in tree_jobs if j.kind == "tree"]
    if not tree_jobs:
        return []
    src = results["config"].get("tree_src") or {}
    files = src.get("files")
    what = (
        f"`{src.get('path')}`, {files:,} files, {src.get('bytes', 0) / 1e6:.0f} MB, "
        f"{src.get('dirs', 0):,} dirs, {src.get('symlinks', 0):,} symlinks"
        if files is not None
        else "?"
    )
    ratio = ("diofs", "cpeer") if "diofs" in peers and "cpeer" in peers else None
    head = ["job", *(SHORT[p] for p in peers), *([f"diofs / {SHORT['cpeer']}"] if ratio else [])]
    lines = [
        "",
        f"## Tree copy of {what}: seconds (median, min–max), lower is better",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for job in tree_jobs:
        per = summ[job.name]
        row = [job.title, *(_cell("s", per.get(p)) for p in peers)]
        if ratio:
            row.append(_ratio(per.get("diofs"), per.get("cpeer")))
        lines.append("| " + " | ".join(row) + " |")
    ops = {j.name: _median_ops(results, j.name) for j in tree_jobs}
    names = sorted(
        {n for d in ops.values() for n in d}, key=lambda n: -sum(d.get(n, 0) for d in ops.values())
    )
    if "diofs" not in peers or not names:
        return lines
    lines += [
        "",
        "### diofs requests by opcode during each tree job (median; per source file)",
        "",
        "| request | " + " | ".join(j.name for j in tree_jobs) + " |",
        "|" + "---|" * (len(tree_jobs) + 1),
    ]
    for n in [*names, "total"]:
        cells = []
        for j in tree_jobs:
            v = sum(ops[j.name].values()) if n == "total" else ops[j.name].get(n)
            cells.append(
                "–"
                if not v
                else f"{v:,.0f}" + (f" ({v / files:.2f})" if files else "")
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def _us(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def _one_line(text: str | None, limit: int = 300) -> str:
    t = " ".join((text or "").split())
    return t if len(t) <= limit else t[:limit] + "…"


def write_results(results: dict[str, Any], out: Path) -> None:
    """results.json + results.md into ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    (out / "results.md").write_text(markdown(results))


def plot(results: dict[str, Any], out: Path) -> str:
    """results.png (one bar chart per job, error bars = min–max). Returns a one-line status."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not importable (.venv/bin/pip install matplotlib)"
    summ = summarize(results)
    peers = [p for p in ALL_PEERS if p in results["config"]["peers"]]
    jobs = [JOBS_BY_NAME[jd["name"]] for jd in results["jobs"]]
    ncol = min(4, len(jobs))
    nrow = (len(jobs) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    colors = {
        "diofs": "tab:red",
        "diofs-b": "tab:purple",
        "diofs-nbd": "tab:orange",
        "pypeer": "tab:blue",
        "cpeer": "tab:green",
        "local": "tab:gray",
    }
    for ax, job in zip(axes.flat, jobs, strict=False):
        per = summ[job.name]
        xs, meds, lo, hi, cols = [], [], [], [], []
        for p in peers:
            s = per.get(p)
            if not s or "median" not in s:
                continue
            xs.append(SHORT[p])
            meds.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
            cols.append(colors[p])
        ax.bar(xs, meds, yerr=[lo, hi], color=cols, capsize=3)
        ax.set_title(job.title, fontsize=8)
        ax.set_ylabel(job.metric, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(jobs) :]:
        ax.axis("off")
    fig.suptitle(
        f"diofs vs peers ({results.get('started', '')}; * = no O_DIRECT on backing "
        "open; bars = median, whiskers = min–max)",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"
