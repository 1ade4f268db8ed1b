"""Watchdog for FUSE mounts: find stuck tasks, report their stacks, and free them.

Used by the tests (harness/mount.py), the demos and the benchmarks; it imports nothing from
pytest, and from diofs only the read-only mountinfo queries it shares with the daemon
(diofs/mountinfo.py: the mount, its source, its connection id, fusectl `waiting`).

Why it exists (notes/fuse-facts.md): a client stuck in a FUSE request (for example in
`fuse_direct_IO` waiting for a reply that never comes) cannot be killed, not even by SIGKILL.
Only aborting the connection through fusectl (`/sys/fs/fuse/connections/<id>/abort`) frees it,
after which every pending and later request on that mount fails with ENOTCONN.

The rescue sequence (`rescue()`), always in this order:
  1. collect the report first (kernel stacks of daemon and clients, D-state tasks), while the
     evidence is still there;
  2. SIGUSR1 to the daemon, which dumps its Python stacks to its log (faulthandler);
  3. abort the connection (this is what unblocks the clients);
  4. lazy unmount (`fusermount3 -u -z`), so that no mount is left behind;
  5. kill the clients that *we* started, by pid (or their process group, which we created).

Invariants:
  - Nothing here touches the mounted filesystem once it may be hung: the connection id and the
    mount check come from /proc/self/mountinfo, never from stat() of the mountpoint.
  - Nothing here kills a process it did not start. The daemon only gets SIGUSR1; ending it is
    the caller's business (it started it).
  - `Deadline` uses one `threading.Timer`. This is tooling outside the daemon (the daemon
    itself never uses threads); the timer thread only reads /proc, writes to fusectl and runs
    fusermount3, none of which can block on the hung mount.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from diofs.mountinfo import FUSECTL, connection_waiting, find_mount, is_mounted, mounts

# --------------------------------------------------------------------------- fusectl and unmount


def ensure_fusectl() -> str:
    """Mount fusectl on /sys/fs/fuse/connections if needed; return that path.

    Raises OSError if it cannot be mounted (not root, no fuse module).
    """
    if any(m.mountpoint == FUSECTL and m.fstype == "fusectl" for m in mounts()):
        return FUSECTL
    if not os.path.isdir(FUSECTL):
        # the directory appears when the fuse module is loaded
        subprocess.run(["modprobe", "fuse"], capture_output=True, check=False)
    proc = subprocess.run(
        ["mount", "-t", "fusectl", "none", FUSECTL], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 and not any(m.mountpoint == FUSECTL for m in mounts()):
        raise OSError(f"cannot mount fusectl on {FUSECTL}: {proc.stderr.strip()}")
    return FUSECTL


def connection_id(mnt: str | os.PathLike[str]) -> int:
    """The fusectl connection id of the FUSE mount on `mnt`.

    It is the kernel's dev_t of the superblock, `(major << 20) | minor`; FUSE uses anonymous
    devices (major 0), so it equals `os.minor(os.stat(mnt).st_dev)`. Read from mountinfo, so
    it is safe to call even on a hung mount; still, record it right after mounting.
    """
    m = find_mount(mnt)
    if m is None:
        st = os.stat(mnt)  # may block on a hung mount: only reached if mountinfo failed us
        return (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
    return m.conn_id


def abort_connection(conn_id: int) -> bool:
    """Abort FUSE connection `conn_id`; every waiting and later request fails (ENOTCONN).

    Returns False if the connection no longer exists. Mounts fusectl if needed.
    """
    with contextlib.suppress(OSError):
        ensure_fusectl()
    try:
        with open(f"{FUSECTL}/{conn_id}/abort", "w") as f:
            f.write("1")
    except FileNotFoundError:
        return False
    return True


def lazy_unmount(mnt: str | os.PathLike[str], timeout_s: float = 10.0) -> None:
    """`fusermount3 -u -z MNT`, ignoring every error (also falls back to `umount -l`)."""
    path = os.fspath(mnt)
    for argv in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        if not is_mounted(path, ""):
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)


# --------------------------------------------------------------------------- tasks and stacks


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """One thread as seen in /proc."""

    pid: int
    tid: int
    comm: str
    state: str  # one letter: R, S, D, Z, T, ...
    wchan: str


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError as exc:
        return f"<{exc.strerror or exc}>"


def _task(pid: int, tid: int) -> Task | None:
    base = f"/proc/{pid}/task/{tid}"
    stat = _read(f"{base}/stat")
    if stat.startswith("<"):
        return None
    # comm is in parentheses and may contain spaces or parentheses: split at the last ')'
    lpar, rpar = stat.find("("), stat.rfind(")")
    comm = stat[lpar + 1 : rpar]
    state = stat[rpar + 2 : rpar + 3]
    return Task(pid, tid, comm, state, _read(f"{base}/wchan").strip() or "0")


def tasks(pid: int) -> list[Task]:
    """The threads of process `pid` (empty if it is gone)."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []
    return [t for t in (_task(pid, tid) for tid in tids) if t is not None]


def stack_report(pids: Sequence[int | None]) -> str:
    """For each pid and each of its threads: comm, state, wchan and the kernel stack."""
    lines: list[str] = []
    for pid in pids:
        if pid is None:
            continue
        ts = tasks(pid)
        if not ts:
            lines.append(f"pid {pid}: gone")
            continue
        cmdline = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()
        lines.append(f"pid {pid}: {cmdline[:200]}")
        for t in ts:
            lines.append(f"  tid {t.tid} {t.comm!r} state={t.state} wchan={t.wchan}")
            stack = _read(f"/proc/{pid}/task/{t.tid}/stack").rstrip()
            lines.extend(f"      {s}" for s in stack.splitlines())
    return "\n".join(lines)


def stuck_tasks() -> list[Task]:
    """Every thread on the machine in uninterruptible sleep (state D)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            t = _task(pid, tid)
            if t is not None and t.state == "D":
                found.append(t)
    return found


def process_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    stat = _read(f"/proc/{pid}/stat")
    if stat.startswith("<"):
        return False
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] != "Z"


def wait_gone(pids: Sequence[int | None], timeout_s: float) -> bool:
    """Wait up to `timeout_s` for every process of `pids` (None entries ignored) to exit or
    become a zombie; True if they all did. For processes that are not our children (a
    daemon started by mount(8), a forked client), which waitpid cannot wait for."""
    deadline = time.monotonic() + timeout_s
    while any(p is not None and process_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- rescue


@dataclasses.dataclass(frozen=True, slots=True)
class MountRef:
    """What the watchdog needs to know about one mount (recorded right after mounting)."""

    mnt: str
    conn_id: int | None
    daemon_pid: int | None


def rescue(
    refs: Sequence[MountRef], client_pids: Sequence[int] = (), *, reason: str = "deadline"
) -> str:
    """Report, SIGUSR1 the daemons, abort their connections, lazy-unmount; return the report.

    Kills nothing: the caller kills the clients it started (they can die once aborted).
    """
    daemon_pids = [r.daemon_pid for r in refs if r.daemon_pid is not None]
    parts = [f"=== watchdog: {reason} ==="]
    for r in refs:
        waiting = connection_waiting(r.conn_id) if r.conn_id is not None else None
        parts.append(f"mount {r.mnt}: conn {r.conn_id}, daemon {r.daemon_pid}, waiting={waiting}")
    parts.append(stack_report([*daemon_pids, *client_pids]))
    stuck = stuck_tasks()
    parts.append(
        "D-state tasks: "
        + (", ".join(f"{t.pid}/{t.tid} {t.comm} ({t.wchan})" for t in stuck) or "none")
    )
    for pid in daemon_pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGUSR1)
    if daemon_pids:
        time.sleep(0.3)  # let faulthandler write the daemon's stacks before the abort
    for r in refs:
        if r.conn_id is not None:
            aborted = abort_connection(r.conn_id)
            parts.append(f"abort conn {r.conn_id}: {'done' if aborted else 'already gone'}")
        lazy_unmount(r.mnt)
    return "\n".join(parts)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by `pid` (one we created) or, failing that, `pid`."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- deadlines


class Deadline:
    """Past `timeout_s`, run `rescue()` on the mounts `refs()` returns, from a timer thread.

    The rescue aborts the connections, so the blocked syscalls of the thread that armed the
    deadline return (ENOTCONN) and it can fail and clean up normally. Use as a context manager
    or call `cancel()`. `expired` and `report` tell what happened.
    """

    def __init__(
        self,
        timeout_s: float,
        refs: Callable[[], Sequence[MountRef]] | Sequence[MountRef],
        *,
        client_pids: Callable[[], Sequence[int]] | Sequence[int] = (),
        on_expire: Callable[[str], None] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self._refs = refs
        self._client_pids = client_pids
        self._on_expire = on_expire
        self.expired = False
        self.report = ""
        self._timer = threading.Timer(timeout_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        refs = self._refs() if callable(self._refs) else self._refs
        pids = self._client_pids() if callable(self._client_pids) else self._client_pids
        self.expired = True
        self.report = rescue(list(refs), list(pids), reason=f"deadline {self.timeout_s}s expired")
        if self._on_expire is not None:
            self._on_expire(self.report)

    def cancel(self) -> None:
        """Disarm (waits for a rescue that is already running to finish)."""
        self._timer.cancel()
        if self._timer.is_alive() and threading.current_thread() is not self._timer:
            self._timer.join()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


@dataclasses.dataclass
class Result:
    """Outcome of `run_with_deadline`.

    For a callable target, `value` is its return value, `stderr` the formatted traceback if it
    raised (returncode 1), and `stdout` is empty (its output goes to this process's fds).
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    report: str
    value: Any = None
    pid: int = 0


def _child_main(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        value = fn(*args)
        payload = ("ok", value)
        try:
            pickle.dumps(payload)
        except Exception:
            payload = ("ok", repr(value))
    except BaseException:
        payload = ("err", traceback.format_exc())
    conn.send(payload)
    conn.close()
    os._exit(0 if payload[0] == "ok" else 1)


def run_with_deadline(
    target: Sequence[str] | Callable[..., Any],
    timeout_s: float,
    *,
    args: Sequence[Any] = (),
    mnt: str | os.PathLike[str] | None = None,
    conn_id: int | None = None,
    daemon_pid: int | None = None,
    refs: Sequence[MountRef] = (),
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    kill_grace_s: float = 10.0,
) -> Result:
    """Run `target` (an argv, or a callable in a forked child) with a deadline.

    Past the deadline: stack report of daemon + child, SIGUSR1 to the daemon, abort the
    connection, lazy-unmount, SIGKILL the child (its own process group) and reap it; returns
    `timed_out=True`. The mount is given by `mnt`/`conn_id`/`daemon_pid` or by `refs`.
    argv children run in a new session, so that grandchildren (fio workers) die with them.
    """
    all_refs = list(refs)
    if mnt is not None:
        all_refs.append(MountRef(os.fspath(mnt), conn_id, daemon_pid))

    if callable(target):
        ctx = multiprocessing.get_context("fork")
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, args=(child_conn, target, tuple(args)))
        proc.start()
        child_conn.close()
        assert proc.pid is not None
        payload = None
        if parent_conn.poll(timeout_s):
            with contextlib.suppress(EOFError, OSError):
                payload = parent_conn.recv()
        proc.join(timeout=0 if payload is None else kill_grace_s)
        if payload is None and proc.exitcode is None:
            report = rescue(all_refs, [proc.pid], reason=f"child timed out after {timeout_s}s")
            proc.kill()
            proc.join(kill_grace_s)
            if proc.exitcode is None:
                report += f"\nchild {proc.pid} did not die within {kill_grace_s}s of SIGKILL"
            parent_conn.close()
            return Result(proc.exitcode, "", "", True, report, pid=proc.pid)
        parent_conn.close()
        if payload is None:
            return Result(proc.exitcode, "", "child died without a result", False, "", pid=proc.pid)
        kind, value = payload
        if kind == "ok":
            return Result(proc.exitcode, "", "", False, "", value=value, pid=proc.pid)
        return Result(
            proc.exitcode if proc.exitcode is not None else 1, "", value, False, "", pid=proc.pid
        )

    popen = subprocess.Popen(
        list(target),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = popen.communicate(timeout=timeout_s)
        return Result(popen.returncode, out, err, False, "", pid=popen.pid)
    except subprocess.TimeoutExpired:
        report = rescue(all_refs, [popen.pid], reason=f"command timed out after {timeout_s}s")
        _kill_group(popen.pid)
        try:
            out, err = popen.communicate(timeout=kill_grace_s)
        except subprocess.TimeoutExpired:
            out, err = "", ""
            report += f"\nchild {popen.pid} did not die within {kill_grace_s}s of SIGKILL"
        return Result(popen.returncode, out or "", err or "", True, report, pid=popen.pid)
