"""The hung-request detector (issue 12), in the manner of the kernel's hung_task: it watches
every FUSE request that a diofs handler has started and not yet answered, and reports each one
that stays outstanding for `-o hang_timeout=S` seconds (default 60; 0 switches it off).

What it watches: `OUTSTANDING`, a dict that `ops._fuse_handler` keeps for every handler. An
entry is added when the handler starts and removed when it returns or raises; the entry is the
tuple

    (start_s, handler, coro, ops, args, kwargs, binding)

`start_s` is time.monotonic() (seconds), `handler` the undecorated Operations method (its name
is the opcode), `coro` the coroutine of its call (whose await chain says where the request
waits), `ops`/`args`/`kwargs` its arguments as pyfuse3 gave them, and `binding` the patched
binding's (tid, flags) for the data requests of `BINDING_TID_OPS` (diofs.request), None for
the others, whose RequestContext argument `ctx` carries the tid as `ctx.pid`. Nothing is
decoded on the hot path: the scanner decodes an entry only when it reports it.

What it reports, once per request, as one WARNING record (a headline naming the opcode, inode,
offset and length where the op has them, then indented lines): how long the request has been
outstanding; the requesting thread's tid, comm, state and kernel stack (`/proc/TID/stack`,
readable by root only: the report says so when it is not); where the handler waits (the await
chain of its coroutine); and the daemon's state: every outstanding request, the kernel's count
of requests waiting on the connection (fusectl), the Python stacks of the daemon's threads
(sys._current_frames), their kernel stacks (/proc/self/task/*/stack) and the trio task tree.
The daemon's part is written at most once per scan and `MAX_DAEMON_DUMPS` times per mount (as
hung_task stops after hung_task_warnings); later reports carry the request and its client. When
a reported request is answered after all, an INFO line says after how long. Counted in `diofs
stats`: `hangs.detected` (requests reported so far) and the gauge `hangs.outstanding` (requests
outstanding longer than the timeout now), published by `publish_stats()` in the trio thread.

It never aborts anything: it reads, logs and counts. Ending a hang (fusectl's `abort`, whose
path the report gives) stays the administrator's decision.

What it cannot see: requests the kernel has queued that no pyfuse3 worker has read yet (every
worker busy, or the loop stuck outside any handler); the `waiting` count in the report shows
them. Frames below pyfuse3's Cython code (its worker tasks) are invisible to the task tree,
which is why each request's own coroutine is in the table.

Why a thread, when the daemon otherwise never uses one (STYLE "trio"): the report matters most
when the trio loop itself is stuck, so it cannot be a trio task. The thread touches no diofs
state and no counter; it copies the table (one C-level dict copy, retried if the dict changed
meanwhile), reads /proc and frame objects, and logs. Hazards: it needs the GIL (a thread stuck
in C code holding the GIL would stop it; none of ours does) and the logging handlers' lock (a
handler blocked in write(2) blocks its report too: the syslog handler of diofs.cli.common
drops messages rather than block, for that reason). Reading a running loop's task tree and
coroutines from another thread is racy by nature: a part that changed under the reader says
"unavailable" instead of failing the report.

Cost on the hot path, per request: one itertools counter step, one time.monotonic(), one
7-tuple, a dict insert and a dict pop, plus a ContextVar read for data requests. Measured by
`scripts/bench_hang_table`: 0.24-0.30 us per request (its docstring has the figures), next to
the 25-80 us that the fastest diofs requests take end to end.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import inspect
import itertools
import logging
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import trio

from diofs import stats

log = logging.getLogger(__name__)

Entry = tuple[
    float, Callable[..., Any], Any, Any, tuple[Any, ...], dict[str, Any], tuple[int, int] | None
]

#: request key -> Entry, for every request a handler is working on. Written by the trio thread
#: only (ops._fuse_handler); the scanner thread reads copies of it.
OUTSTANDING: dict[int, Entry] = {}

#: a new key for OUTSTANDING (thread-safe under the GIL; keys are never reused)
next_key: Callable[[], int] = itertools.count(1).__next__

#: the handlers for which the patched binding publishes (tid, flags) (diofs.request)
BINDING_TID_OPS = frozenset({"read", "write", "flush", "fsync", "release", "fallocate"})

#: handlers whose `fh` is the directory's inode (ops.opendir returns the inode as the handle)
_DIR_FH_OPS = frozenset({"readdir", "releasedir", "fsyncdir"})

#: arguments that are not worth printing (the RequestContext gives the tid; readdir's token)
_SKIP_ARGS = frozenset({"self", "ctx", "token", "attr", "fields"})

DEFAULT_TIMEOUT_S = 60.0
MAX_DAEMON_DUMPS = 10
_MAX_INTERVAL_S = 5.0
_MIN_INTERVAL_S = 0.05
_MAX_STACK_LINES = 60  # of one kernel stack or one Python stack

_active: HangDetector | None = None


def publish_stats() -> None:
    """Copy the running detector's counters into diofs.stats (trio thread only)."""
    det = _active
    if det is not None:
        stats.gauge("hangs.detected", det.detected)
        stats.gauge("hangs.outstanding", det.count_outstanding(time.monotonic()))


def check_timeout(value: float) -> float:
    """`value` if it is a valid hang_timeout (finite, >= 0), else ValueError."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"hang_timeout must be a number of seconds >= 0 (0: off), not {value}")
    return value


class HangDetector:
    """Scans `table` every `interval_s` from a daemon thread and reports requests outstanding
    for `timeout_s` or longer, once each.

    `detected` is written by the scanner thread only and read by anyone. `_reported` belongs to
    the scanner thread (and to callers of `scan()` in tests, which run no thread).
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        mountpoint: str | None = None,
        interval_s: float | None = None,
        table: dict[int, Entry] | None = None,
    ) -> None:
        self.timeout_s = check_timeout(timeout_s)
        if interval_s is None:
            interval_s = min(max(timeout_s / 4, _MIN_INTERVAL_S), _MAX_INTERVAL_S)
        self.interval_s = interval_s
        self.mountpoint = mountpoint
        self.table = OUTSTANDING if table is None else table
        self.detected = 0
        self.daemon_dumps = 0
        self._reported: dict[int, tuple[float, str]] = {}  # key -> (start_s, opcode)
        self._root_task: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start the scanner thread (nothing if disabled). Call it after daemonizing (a fork
        keeps no threads); called inside trio.run, it also reports the loop's task tree."""
        global _active
        if not self.enabled:
            log.info("hang detector off (hang_timeout=0)")
            return
        with contextlib.suppress(RuntimeError):
            self._root_task = trio.lowlevel.current_root_task()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="diofs-hang-detector", daemon=True)
        self._thread.start()
        _active = self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the scanner thread and wait for it (it never blocks on the mount)."""
        global _active
        if _active is self:
            _active = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan(time.monotonic())
            except Exception:  # a bug here must not end the detector silently
                log.exception("hang detector: scan failed")

    # ------------------------------------------------------------------ scanning
    def count_outstanding(self, now: float) -> int:
        """Requests outstanding for timeout_s or longer at `now` (from the table's own thread)."""
        limit = now - self.timeout_s
        return sum(1 for e in list(self.table.values()) if e[0] <= limit)

    def _copy_table(self) -> dict[int, Entry]:
        for _ in range(100):
            try:
                return self.table.copy()
            except RuntimeError:  # changed size during the copy (only without the GIL)
                continue
        return {}

    def scan(self, now: float) -> list[str]:
        """One pass: log each newly hung request, and an INFO line for each reported one that
        has been answered since. Returns the reports written (for tests)."""
        entries = self._copy_table()
        for key in [k for k in self._reported if k not in entries]:
            start_s, opcode = self._reported.pop(key)
            age_s = time.monotonic() - start_s
            log.info("hung request #%d (%s) answered after %.1f s", key, opcode, age_s)
        limit = now - self.timeout_s
        hung = sorted(
            (key, e) for key, e in entries.items() if e[0] <= limit and key not in self._reported
        )
        reports = []
        daemon_part = ""  # the daemon's state, written with the first report of this scan
        for key, entry in hung:
            self._reported[key] = (entry[0], entry[1].__name__.upper())
            self.detected += 1
            if not daemon_part:
                if self.daemon_dumps < MAX_DAEMON_DUMPS:
                    self.daemon_dumps += 1
                    tail = self._daemon_report(entries, now)
                    daemon_part = f"  daemon stacks: in the report of #{key}"
                else:
                    tail = daemon_part = (
                        f"  daemon stacks: not written again ({MAX_DAEMON_DUMPS} dumps so far)"
                    )
            else:
                tail = daemon_part
            text = self._request_report(key, entry, now) + "\n" + tail
            log.warning("%s", text)
            reports.append(text)
        return reports

    # ------------------------------------------------------------------ reports
    def _request_report(self, key: int, entry: Entry, now: float) -> str:
        start_s, fn, coro = entry[:3]
        what, tid = describe(entry)
        lines = [
            f"hung request #{key}: {what} outstanding {now - start_s:.1f} s "
            f"(hang_timeout={self.timeout_s:g}); {_requester(fn.__name__, tid)}"
        ]
        if tid:
            lines.append(f"  requesting thread {tid}: {_thread_line(tid)}")
            lines.extend(_indent(_kernel_stack(f"/proc/{tid}/stack"), 4))
        lines.append(f"  the handler awaits (diofs {fn.__name__} first):")
        try:
            lines.extend(_indent(_format_frames(list(_await_frames(coro))), 4))
        except Exception as exc:  # the loop moved the coroutine on while we read it
            lines.append(f"    unavailable ({exc!r})")
        return "\n".join(lines)

    def _daemon_report(self, entries: dict[int, Entry], now: float) -> str:
        lines = [f"  daemon pid {os.getpid()}: {self._connection_line()}"]
        lines.append(f"  outstanding requests ({len(entries)}, oldest first):")
        for key, entry in sorted(entries.items(), key=lambda ke: ke[1][0])[:_MAX_STACK_LINES]:
            lines.append(f"    #{key} {describe(entry)[0]} for {now - entry[0]:.1f} s")
        lines.append("  daemon Python stacks (sys._current_frames):")
        lines.extend(_indent(_python_stacks(), 4))
        lines.append("  daemon kernel stacks (/proc/self/task/*/stack):")
        lines.extend(_indent(_daemon_kernel_stacks(), 4))
        lines.append("  trio tasks of the main loop:")
        lines.extend(_indent(self._task_tree(), 4))
        return "\n".join(lines)

    def _connection_line(self) -> str:
        if self.mountpoint is None:
            return "mount unknown"
        from diofs import mountinfo  # never stat()s the mount

        m = mountinfo.find_mount(self.mountpoint)
        if m is None:
            return f"{self.mountpoint} not in /proc/self/mountinfo"
        conn = m.conn_id
        waiting = mountinfo.connection_waiting(conn)
        count = "unknown (fusectl not mounted)" if waiting is None else str(waiting)
        return (
            f"FUSE connection {conn} of {self.mountpoint}: requests waiting in the kernel: "
            f"{count}; nothing is aborted (to end the hang: echo 1 > "
            f"{mountinfo.FUSECTL}/{conn}/abort)"
        )

    def _tasks(self) -> Iterator[tuple[int, Any]]:
        """(depth, task) of the trio task tree, depth first (racy reads: see module doc)."""
        todo = [(0, self._root_task)] if self._root_task is not None else []
        while todo:
            depth, task = todo.pop()
            yield depth, task
            children = []
            for nursery in list(task.child_nurseries):
                children.extend(nursery.child_tasks)
            children.sort(key=lambda t: t.name, reverse=True)
            todo.extend((depth + 1, c) for c in children)

    def _task_tree(self) -> list[str]:
        if self._root_task is None:
            return ["unknown (the detector was not started inside trio.run)"]
        try:
            out: list[str] = []
            # siblings awaiting at the same place (idle pyfuse3 workers) are shown once
            last: tuple[int, str] | None = None
            count = 0
            for depth, task in self._tasks():
                frames = list(task.iter_await_frames())
                where = _task_where(frames)
                line = f"{'  ' * depth}{task.name}: {where}"
                if last is not None and last == (depth, where):
                    count += 1
                    continue
                if count:
                    out[-1] += f"  [and {count} more at the same place]"
                last, count = (depth, where), 0
                out.append(line)
            if count:
                out[-1] += f"  [and {count} more at the same place]"
            return out
        except Exception as exc:
            return [f"unavailable ({exc!r})"]


# ---------------------------------------------------------------------- decoding an entry
_signatures: dict[Callable[..., Any], inspect.Signature] = {}


def describe(entry: Entry) -> tuple[str, int | None]:
    """("OPCODE name=value ...", tid or None) of one table entry.

    Inode first (`inode=`, resolved from the handle for fh-based ops), then pyfuse3's own
    argument names (`off`, `size`, `offset`, `length`, `parent_inode`, `name`, ...); WRITE's
    buffer as `len=`. tid: the binding's for data requests (0: the kernel's own request),
    ctx.pid for the others, None where pyfuse3 gives none (READDIR, FORGET, ...).
    """
    _start, fn, _coro, ops, args, kwargs, binding = entry
    sig = _signatures.get(fn)
    if sig is None:
        sig = _signatures[fn] = inspect.signature(fn)
    try:
        bound: dict[str, Any] = dict(sig.bind(ops, *args, **kwargs).arguments)
    except TypeError:
        bound = {f"arg{i}": a for i, a in enumerate(args)} | kwargs
    name = fn.__name__
    parts = [name.upper()]
    if "fh" in bound:
        parts.append(f"inode={_inode_of_fh(name, ops, bound['fh'])}")
    for arg, value in bound.items():
        if arg in _SKIP_ARGS:
            continue
        parts.append(_format_arg(arg, value))
    if name == "setattr":
        fields, attr = bound.get("fields"), bound.get("attr")
        updates = [f[7:] for f in dir(fields) if f.startswith("update_") and getattr(fields, f)]
        parts.append(f"update={','.join(updates) or 'none'}")
        if getattr(fields, "update_size", False):
            parts.append(f"size={getattr(attr, 'st_size', '?')}")
    if binding is not None:
        tid: int | None = binding[0]
    else:
        tid = getattr(bound.get("ctx"), "pid", None)
    return " ".join(parts), tid


def _inode_of_fh(name: str, ops: Any, fh: Any) -> str:
    if name in _DIR_FH_OPS:
        return str(fh)
    from diofs.ops import STATS_INO

    if isinstance(fh, int) and fh >= STATS_INO:
        return f"{STATS_INO} (the stats file)"
    try:
        return str(ops.handles.get(fh).inode.ino)
    except Exception:  # closed meanwhile, or not an ops object
        return "? (handle not open)"


def _format_arg(arg: str, value: Any) -> str:
    if arg == "buf":
        return f"len={len(value)}"
    if isinstance(value, bytes):
        text = repr(value)
        return f"{arg}={text if len(text) <= 80 else text[:77] + '...'}"
    if arg in ("flags", "mode") and isinstance(value, int):
        return f"{arg}={value:#o}"
    if isinstance(value, list):
        return f"{arg}=[{len(value)} items]"
    return f"{arg}={value!r}"


def _requester(name: str, tid: int | None) -> str:
    if tid is None:
        return f"requesting thread unknown (pyfuse3 gives no requester for {name.upper()})"
    if tid == 0:
        return "requested by the kernel itself (writeback or RELEASE: no thread waits in it)"
    return f"requested by tid {tid}"


# ---------------------------------------------------------------------- /proc and frames
def _read(path: str) -> tuple[str | None, int, str]:
    """(text, 0, "") or (None, errno, why not)."""
    try:
        with open(path, errors="replace") as f:
            return f.read(), 0, ""
    except OSError as exc:
        return None, exc.errno or 0, exc.strerror or str(exc)


def _thread_line(tid: int) -> str:
    comm, _errno, why = _read(f"/proc/{tid}/comm")
    if comm is None:
        return f"gone ({why})"
    status = _read(f"/proc/{tid}/status")[0] or ""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    tgid = fields.get("Tgid", "?").strip()
    state = fields.get("State", "?").strip()
    cmdline = (_read(f"/proc/{tgid}/cmdline")[0] or "").replace("\0", " ").strip()
    return f"comm {comm.strip()!r}, state {state}, pid {tgid} ({cmdline[:160]})"


def _kernel_stack(path: str) -> list[str]:
    text, err, why = _read(path)
    if text is None:
        hint = " (readable by root only)" if err in (errno.EPERM, errno.EACCES) else ""
        return [f"kernel stack unreadable: {path}: {why}{hint}"]
    lines = text.rstrip().splitlines()
    if not lines:
        return ["kernel stack empty (running, or a kernel that hides it)"]
    return lines[:_MAX_STACK_LINES]


def _daemon_kernel_stacks() -> list[str]:
    try:
        tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError as exc:
        return [f"unreadable: {exc}"]
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = []
    for tid in tids:
        comm = (_read(f"/proc/self/task/{tid}/comm")[0] or "?").strip()
        stat = _read(f"/proc/self/task/{tid}/stat")[0] or ""
        state = stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] or "?"
        wchan = (_read(f"/proc/self/task/{tid}/wchan")[0] or "?").strip() or "0"
        label = f" ({names[tid]})" if tid in names else ""
        out.append(f"tid {tid} {comm!r}{label} state={state} wchan={wchan}")
        out.extend(_indent(_kernel_stack(f"/proc/self/task/{tid}/stack"), 2))
    return out


def _python_stacks() -> list[str]:
    threads = {t.ident: t for t in threading.enumerate()}
    me = threading.get_ident()
    out = []
    for ident, frame in sorted(sys._current_frames().items()):
        t = threads.get(ident)
        label = f"thread {t.native_id} {t.name!r}" if t else f"thread ident {ident}"
        if ident == me:
            out.append(f"{label}: this detector")
            continue
        out.append(f"{label}:")
        summary = traceback.extract_stack(frame)[-_MAX_STACK_LINES:]
        out.extend(_indent([_summary_line(fs) for fs in summary], 2))
    return out


def _summary_line(fs: traceback.FrameSummary) -> str:
    src = f": {fs.line.strip()}" if fs.line else ""
    return f"{_short(fs.filename)}:{fs.lineno} in {fs.name}{src}"


def _await_frames(coro: Any) -> Iterator[tuple[FrameType, int]]:
    """(frame, line) of `coro` and of everything it awaits, outermost first: the walk of
    trio's Task.iter_await_frames, from any coroutine."""
    while coro is not None:
        if hasattr(coro, "cr_frame"):
            if frame := coro.cr_frame:  # None once finished
                yield frame, frame.f_lineno
            coro = coro.cr_await
        elif hasattr(coro, "gi_frame"):  # a generator-based coroutine (trio's traps)
            if frame := coro.gi_frame:
                yield frame, frame.f_lineno
            coro = coro.gi_yieldfrom
        elif type(coro).__name__ in ("async_generator_athrow", "async_generator_asend"):
            for referent in gc.get_referents(coro):  # no attribute leads to the generator
                if hasattr(referent, "ag_frame"):
                    if frame := referent.ag_frame:
                        yield frame, frame.f_lineno
                    coro = referent.ag_await
                    break
            else:
                return
        else:  # a Cython coroutine or a future: nothing more to see
            return


def _task_where(frames: list[tuple[FrameType, int]]) -> str:
    """Where a task waits: its innermost frame outside trio (trio's own are the same for every
    waiting task), and the trio function it is in."""
    if not frames:
        return "(not started, or in Cython code)"
    trio_dir = os.path.dirname(os.path.dirname(trio.__file__)) + os.sep + "trio" + os.sep
    outside = [fl for fl in frames if not fl[0].f_code.co_filename.startswith(trio_dir)]
    frame, lineno = (outside or frames)[-1]
    where = f"{frame.f_code.co_name} ({_short(frame.f_code.co_filename)}:{lineno})"
    if outside and outside[-1] is not frames[-1]:
        inner = next(fl[0] for fl in frames[frames.index(outside[-1]) + 1 :])
        where += f" in trio {inner.f_code.co_name}"
    return where


def _format_frames(frames: list[tuple[FrameType, int]]) -> list[str]:
    if not frames:
        return ["(finished meanwhile)"]
    return [_summary_line(fs) for fs in traceback.StackSummary.extract(iter(frames))][
        :_MAX_STACK_LINES
    ]


def _short(path: str) -> str:
    """`path` relative to the longest sys.path entry (or checkout) that holds it."""
    for prefix in sorted({os.path.dirname(os.path.dirname(__file__)), *sys.path}, key=len)[::-1]:
        if prefix and path.startswith(prefix + os.sep):
            return path[len(prefix) + 1 :]
    return path


def _indent(lines: list[str], n: int) -> list[str]:
    pad = " " * n
    return [pad + line for line in lines]
