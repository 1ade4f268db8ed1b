"""Shared machinery of the demos (scripts/demo_<bug>.py): mount a fresh image with the
protection on and again with `--bug NAME`, run the same real workload on both, and print the
two results side by side with exact counts.

A demo module defines:
    BUG          the --bug switch it demonstrates (kebab-case, diofs.bugs)
    TITLE        one line: what goes wrong without the protection
    run(factory, bug_on) -> dict[str, int | str]   the workload; `factory` is a
                 harness.mount.MountFactory (mounts are cleaned up, and rescued by the
                 watchdog if they hang, by `compare`)
    BAD_KEY      the count that must be 0 with the protection and > 0 with the bug
Mounts come from harness/mount.py, the same code the test suite uses: every mount is
unmounted, a hang is caught by the watchdog (stack report, fusectl abort, lazy unmount).
"""

from __future__ import annotations

import itertools
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diofs import mountinfo  # noqa: E402
from harness import watchdog  # noqa: E402
from harness.mount import MountFactory  # noqa: E402


def stuck_lines(report: str, frames: int = 4) -> list[str]:
    """The D-state threads of a watchdog report, each with its top kernel stack frames (for
    the deadlock demos)."""
    out: list[str] = []
    lines = report.splitlines()
    for i, line in enumerate(lines):
        if "state=D" in line:
            out.append(line.strip())
            frames_of = itertools.takewhile(lambda s: s.startswith("      ["), lines[i + 1 :])
            stack = itertools.islice(frames_of, frames)
            out.extend("    " + re.sub(r"^\[<0>\] ", "", s.strip()) for s in stack)
    return out


def report_hang(label: str, seconds: float, report: str, daemon_pid: int | None,
                frames: int = 4) -> None:
    """Print a hung run's stuck tasks (from the watchdog's report), then wait up to 15 s for
    the aborted daemon to exit."""
    print(f"   [{label}] run hung for {seconds:.1f}s; watchdog: stuck tasks")
    for line in stuck_lines(report, frames):
        print(f"      {line}")
    watchdog.wait_gone([daemon_pid], 15)


def leftovers(m: Any, result: Any, daemon_pid: int | None) -> tuple[int, int]:
    """End of a run that may have hung: unmount if still mounted and served, then count what
    is left behind: (1 if still mounted, tasks of the client or daemon in D state)."""
    if m.daemon is not None and mountinfo.is_mounted(m.mnt):
        m.unmount()
    stuck = sum(1 for t in watchdog.stuck_tasks() if t.pid in (result.pid, daemon_pid))
    return int(mountinfo.is_mounted(m.mnt)), stuck


def hang_runs(
    factory: Any, bug: str, bug_on: bool, runs: int, timeout: float,
    start: Callable[[Any, int], tuple[Any, tuple[Any, ...]]],
    done: Callable[[Any, Any], dict[str, int]],
) -> dict[str, Any]:
    """The shape of a demo whose bug is a hang: `runs` fresh mounts; on each, `start(m, i)`
    gives the workload (an argv or a callable, and its args) run with a `timeout` deadline.
    A run that completes adds `done(m, result)`'s counts; a hung one prints its stuck tasks.
    Returns the run counts, the summed counts, and what each run left behind."""
    out: dict[str, Any] = {"runs": runs, "completed": 0}
    hung = aborted = left_mounted = d_state_left = 0
    for i in range(runs):
        m = factory(size="16M", bugs=(bug,) if bug_on else ())
        daemon_pid = m.daemon.pid if m.daemon else None
        m.expect_rescue()  # the runs that hang are rescued by the watchdog
        target, args = start(m, i)
        t0 = time.monotonic()
        result = m.run(target, *args, timeout=timeout)
        if result.timed_out:
            hung += 1
            aborted += f"abort conn {m.conn_id}: done" in result.report
            report_hang(bug if bug_on else "protection on", time.monotonic() - t0,
                        result.report, daemon_pid, frames=5)
        elif result.returncode == 0:
            out["completed"] += 1
            for k, v in done(m, result).items():
                out[k] = out.get(k, 0) + v
            m.unmount()
        mounted, stuck = leftovers(m, result, daemon_pid)
        left_mounted += mounted
        d_state_left += stuck
    out.update(hung_runs=hung, connections_aborted=aborted, left_mounted=left_mounted,
               d_state_left=d_state_left)
    return out


def run_side(demo: ModuleType, bug_on: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"diofs-demo-{demo.BUG}-") as tmp:
        factory = MountFactory(Path(tmp))
        try:
            result = demo.run(factory, bug_on)
        except Exception as exc:  # report, never a traceback without context
            result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
            if "--debug" in sys.argv:
                traceback.print_exc()
        finally:
            for m in factory.mounts:  # demos with the bug on may leave damage behind
                m.expect_dirty()
                m.expect_log(r".*")
            problems = factory.cleanup()
        if problems:
            result["cleanup"] = "; ".join(problems)[:300]
        return result


def compare(demo: ModuleType) -> bool:
    """Run both sides, print them, return True if the demo showed what it should."""
    print(f"== --bug {demo.BUG}: {demo.TITLE}")
    on = run_side(demo, bug_on=False)
    off = run_side(demo, bug_on=True)
    keys = list(dict.fromkeys([*on, *off]))
    width = max(len(k) for k in keys) + 2
    print(f"   {'':{width}}{'protection on':>22}{'--bug ' + demo.BUG:>30}")
    for k in keys:
        print(f"   {k:{width}}{str(on.get(k, '-')):>22}{str(off.get(k, '-')):>30}")
    bad_on, bad_off = on.get(demo.BAD_KEY), off.get(demo.BAD_KEY)
    shown = bad_on == 0 and isinstance(bad_off, int) and bad_off > 0
    verdict = "shown" if shown else "NOT SHOWN"
    print(f"   => {demo.BAD_KEY}: {bad_on} with the protection, {bad_off} without: {verdict}\n")
    return shown
