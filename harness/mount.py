"""Real mounts for tests: start the daemon, wait for the mount, check everything at the end.

`Mount` is one diofs mount of one image (a foreground daemon we started); `MountFactory` makes
them for one test and cleans all of them up; the fixtures in conftest.py wrap these.

What teardown guarantees (for every mount, whatever the test did):
  - the daemon is unmounted with `fusermount3 -u` (rc 0) and exits 0 within a timeout;
  - `fsck.diofs` finds the image clean (unless the test called `expect_dirty()`);
  - the daemon's log has no Traceback and no WARNING/ERROR/CRITICAL line that the test did not
    declare with `expect_log(regex)`;
  - on any failure or hang: the watchdog rescue (kernel stacks, SIGUSR1 to the daemon, abort
    the fusectl connection, lazy unmount), then terminate and kill the daemon by pid. No mount,
    no D-state client and no daemon is left behind.

Backend selection: with DIOFS_TEST_BACKEND=nbd (or pytest --backend nbd), every mount whose
options ask for no other backend (crash, fault) serves its image through a real nbdkit (file
plugin, unix socket in the mount's workdir, harness/nbdserver.py) and mounts its URI; mkfs and
fsck still use the image file. Tests that need a file image (its lock, its path as the mount
source) are marked `@pytest.mark.file_image` and skipped on nbd.

Hang-safety: mount state and the connection id come from /proc/self/mountinfo
(harness.watchdog), never from stat() of a mountpoint that may be hung. Workloads that may hang
go through `run_in_child()` / `Mount.run()` (a child process with a deadline).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from diofs import mountinfo
from diofs.cli.stats import read_stats
from harness import watchdog
from harness.io import wait_for

REPO = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT_S = 15.0
UNMOUNT_TIMEOUT_S = 60.0
DEFAULT_SIZE = "64M"


def harness_backend() -> str:
    """The backend the harness mounts images through: "raw" (the file) or "nbd"."""
    return os.environ.get("DIOFS_TEST_BACKEND", "raw")

# daemon log lines that fail a test unless declared with expect_log()
_BAD_LINE = re.compile(r"Traceback|\b(WARNING|ERROR|CRITICAL)\b")

_CLI_MODULES = {
    "mkfs.diofs": "diofs.cli.mkfs",
    "fsck.diofs": "diofs.cli.fsck",
    "mount.diofs": "diofs.cli.mount",
    "umount.diofs": "diofs.cli.umount",
    "diofs": "diofs.cli.stats",
}


class MountError(AssertionError):
    """A mount-level check failed (mount, unmount, fsck, log); the message says which."""


def cli(name: str) -> list[str]:
    """argv prefix that runs console script `name` (mkfs.diofs, fsck.diofs, mount.diofs, diofs).

    Uses the installed script next to the interpreter if there is one; otherwise runs the
    module's main() with sys.argv[0] set to the program name, from the repository root.
    """
    for bindir in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        script = bindir / name
        if script.exists():
            return [str(script)]
    module = _CLI_MODULES[name]
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import main; main()"
    return [sys.executable, "-c", code]


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: the checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def run_argv(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root with `cli_env()`, stdin closed; text output."""
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run_cli(
    name: str, *args: str | os.PathLike[str], timeout: float = 60.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a diofs command; returns the CompletedProcess (text output)."""
    argv = [*cli(name), *map(os.fspath, args)]
    proc = run_argv(argv, timeout)
    if check and proc.returncode != 0:
        raise MountError(
            f"{shlex.join(argv)} failed with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


def _in_process(name: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a CLI command's function in this process (saves ~0.3 s of interpreter start-up per
    mount); same exit code and output as the console script. Set DIOFS_TEST_CLI=subprocess
    to run every command as a real process instead."""
    import importlib

    from diofs.errors import DiofsError

    module = importlib.import_module(_CLI_MODULES[name])
    fn = getattr(module, name.split(".")[0])  # mkfs.diofs -> mkfs(), fsck.diofs -> fsck()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = fn(argv) or 0
        except DiofsError as exc:
            err.write(f"{name}: {exc.message}\n")
            rc = exc.exit_code
    return subprocess.CompletedProcess([name, *argv], rc, out.getvalue(), err.getvalue())


def run_tool(
    name: str, *args: str | os.PathLike[str], check: bool = False
) -> subprocess.CompletedProcess[str]:
    """mkfs.diofs / fsck.diofs for the harness: in-process unless DIOFS_TEST_CLI=subprocess."""
    argv = [os.fspath(a) for a in args]
    if os.environ.get("DIOFS_TEST_CLI") == "subprocess":
        return run_cli(name, *argv, check=check, timeout=120)
    proc = _in_process(name, argv)
    if check and proc.returncode != 0:
        raise MountError(
            f"{name} {shlex.join(argv)} failed with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


def fuse_unavailable_reason() -> str | None:
    """Why real mounts cannot run here, or None if they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 is not importable ({exc})"
    if not (REPO / "diofs" / "cli" / "mount.py").exists():
        return "diofs/cli/mount.py does not exist yet"
    return None


def format_opts(opts: dict[str, Any] | None) -> str:
    """{'cache_size': '16M', 'ro': True} -> 'cache_size=16M,ro' (None/False values dropped)."""
    items = []
    for key, value in (opts or {}).items():
        if value is True:
            items.append(key)
        elif value is not None and value is not False:
            items.append(f"{key}={value}")
    return ",".join(items)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<no {path.name}>"
    return "\n".join(text.splitlines()[-lines:])


class Mount:
    """One diofs image mounted by a foreground daemon that this object started.

    Attributes: `image`, `mnt` (Path), `daemon` (Popen or None when unmounted), `conn_id`
    (fusectl id, recorded right after mounting), `log` (daemon log of the current mount),
    `opts`, `bugs`.
    """

    def __init__(
        self,
        image: Path,
        mnt: Path,
        workdir: Path,
        *,
        opts: dict[str, Any] | None,
        bugs: Sequence[str],
        extra_args: Sequence[str] = (),
    ) -> None:
        self.image = image
        self.mnt = mnt
        self.workdir = workdir
        self.opts = dict(opts or {})
        self.bugs = list(bugs)
        self.extra_args = list(extra_args)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.nbd: Any = None  # the NbdServer serving the image (nbd backend, or set by a test)
        self.conn_id: int | None = None
        self.log: Path = workdir / "daemon-0.log"
        self.logs: list[Path] = []
        self.outputs: list[Path] = []
        self.expected_logs: list[re.Pattern[str]] = []
        self.dirty_ok = False
        self.rescue_ok = False
        self.rescued: list[str] = []  # watchdog reports
        self._starts = 0
        self._cleaned = False

    # ------------------------------------------------------------------ state

    @property
    def mounted(self) -> bool:
        return mountinfo.is_mounted(self.mnt)

    @property
    def ref(self) -> watchdog.MountRef:
        return watchdog.MountRef(
            str(self.mnt), self.conn_id, self.daemon.pid if self.daemon else None
        )

    def path(self, *parts: str) -> str:
        """`mnt/parts...` as a str (for os.* calls)."""
        return os.path.join(self.mnt, *parts)

    def __truediv__(self, other: str) -> Path:
        return self.mnt / other

    # ------------------------------------------------------------------ mount / unmount

    def start(self, extra_opts: dict[str, Any] | None = None) -> None:
        """Start the daemon and wait until the mount is up (MountError with log tail if not)."""
        assert self.daemon is None, "already started"
        self._cleaned = False
        self.log = self.workdir / f"daemon-{self._starts}.log"
        out = self.workdir / f"daemon-{self._starts}.out"
        self._starts += 1
        self.logs.append(self.log)
        self.outputs.append(out)
        all_opts = {**self.opts, **(extra_opts or {})}
        opts = format_opts(all_opts)
        argv = [
            sys.executable,
            str(REPO / "mount.py"),
            self._source(all_opts),
            str(self.mnt),
            "--foreground",
            "--log",
            str(self.log),
        ]
        if opts:
            argv += ["-o", opts]
        for bug in self.bugs:
            argv += ["--bug", bug]
        argv += self.extra_args
        with open(out, "wb") as out_f:
            self.daemon = subprocess.Popen(
                argv,
                cwd=REPO,
                env=cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_for_mount(argv)

    def _source(self, opts: dict[str, Any]) -> str:
        """What mount.diofs gets as IMAGE: the image file, or on the nbd test backend the URI
        of an nbdkit serving it (started once per Mount, stopped at cleanup). A test may set
        `self.nbd` to a server of its own (filters) before start()."""
        if opts.get("backend", "raw") != "raw" or (self.nbd is None and harness_backend() != "nbd"):
            return str(self.image)  # crash and fault wrap the file
        from harness.nbdserver import NbdServer

        if self.nbd is None:
            self.nbd = NbdServer(self.workdir, ["file", f"file={self.image}"])
        if not self.nbd.running:
            self.nbd.start()
        return str(self.nbd.uri)

    def _wait_for_mount(self, argv: list[str]) -> None:
        assert self.daemon is not None
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while time.monotonic() < deadline:
            if mountinfo.is_mounted(self.mnt):
                self.conn_id = watchdog.connection_id(self.mnt)
                return
            if self.daemon.poll() is not None:
                rc = self.daemon.returncode
                self.daemon = None
                raise MountError(
                    f"daemon exited with {rc} before mounting\n"
                    f"$ {shlex.join(argv)}\n{self.log_tails()}"
                )
            time.sleep(0.02)
        report = self._rescue(f"mount did not appear within {MOUNT_TIMEOUT_S}s")
        raise MountError(
            f"mount did not appear within {MOUNT_TIMEOUT_S}s\n"
            f"$ {shlex.join(argv)}\n{report}\n{self.log_tails()}"
        )

    def unmount(self, timeout: float = UNMOUNT_TIMEOUT_S) -> None:
        """fusermount3 -u; require rc 0, then the daemon's exit 0 within `timeout`."""
        assert self.daemon is not None, "not mounted"
        try:
            proc = subprocess.run(
                ["fusermount3", "-u", str(self.mnt)],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            report = self._rescue("fusermount3 -u hung")
            raise MountError(
                f"fusermount3 -u {self.mnt} hung\n{report}\n{self.log_tails()}"
            ) from None
        if proc.returncode != 0:
            report = self._rescue(f"fusermount3 -u failed: {proc.stderr.strip()}")
            raise MountError(
                f"fusermount3 -u {self.mnt} exited {proc.returncode}: "
                f"{proc.stderr.strip()}\n{report}\n{self.log_tails()}"
            )
        rc = self._wait_daemon_exit(timeout)
        if rc != 0:
            raise MountError(f"daemon exited with {rc} after unmount\n{self.log_tails()}")

    def _wait_daemon_exit(self, timeout: float) -> int:
        """The mount is gone: the daemon must exit within `timeout` (rescued and reported if
        not); returns its exit code."""
        assert self.daemon is not None
        try:
            rc = self.daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            report = self._rescue(f"daemon still running {timeout}s after unmount")
            raise MountError(
                f"daemon did not exit within {timeout}s of unmount\n{report}\n{self.log_tails()}"
            ) from None
        self.daemon = None
        return rc

    def unmount_with(
        self, argv: Sequence[str], timeout: float = UNMOUNT_TIMEOUT_S
    ) -> tuple[subprocess.CompletedProcess[str], int | None, int]:
        """Unmount with a command of the test's choosing (umount.diofs, umount(8)); returns
        (its result, the daemon's exit code if it had already exited when the command
        returned, else None; the daemon's exit code). The mount must be gone afterwards; the
        daemon is reaped within `timeout` (rescued and reported if either fails)."""
        assert self.daemon is not None, "not mounted"
        try:
            proc = run_argv(argv, timeout)
        except subprocess.TimeoutExpired:
            report = self._rescue(f"{shlex.join(argv)} hung")
            raise MountError(f"{shlex.join(argv)} hung\n{report}\n{self.log_tails()}") from None
        at_return = self.daemon.poll()
        if self.mounted:
            report = self._rescue(f"{shlex.join(argv)} left the mount")
            raise MountError(f"{shlex.join(argv)} exited {proc.returncode} and left the mount:"
                             f" {proc.stderr.strip()}\n{report}\n{self.log_tails()}")
        rc = self._wait_daemon_exit(timeout)
        return proc, at_return, rc

    def remount(self, extra_opts: dict[str, Any] | None = None) -> None:
        """Unmount (with all checks) if mounted, then mount the same image again."""
        if self.daemon is not None:
            self.unmount()
        self.start(extra_opts)

    def kill(self) -> None:
        """Simulate a daemon crash: SIGKILL it, abort the connection, lazy-unmount.

        The image is then not cleanly unmounted: the test decides whether fsck must be clean.
        """
        assert self.daemon is not None
        self.daemon.kill()
        self.daemon.wait(10)
        if self.conn_id is not None:
            watchdog.abort_connection(self.conn_id)
        watchdog.lazy_unmount(self.mnt)
        self.daemon = None

    # ------------------------------------------------------------------ checks

    def stats(self) -> dict[str, float]:
        """The daemon's counters (`diofs stats`: the root's virtual `.diofs-stats` file)."""
        return read_stats(self.mnt)

    def wait_stats(
        self, cond: Callable[[dict[str, float]], bool], what: str, timeout: float = 10.0
    ) -> dict[str, float]:
        """Poll the counters until `cond(stats)` holds; returns those stats."""
        def reached() -> dict[str, float] | None:
            s = self.stats()
            return s if cond(s) else None

        return wait_for(reached, what, timeout)

    def fsck(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run fsck.diofs on the (unmounted) image and require it clean."""
        assert self.daemon is None, "fsck of a mounted image"
        proc = run_tool("fsck.diofs", self.image, *args)
        if proc.returncode != 0:
            raise MountError(
                f"fsck.diofs {self.image} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def expect_log(self, regex: str) -> None:
        """Declare that daemon log lines matching `regex` (re.search) are expected."""
        self.expected_logs.append(re.compile(regex))

    def expect_dirty(self) -> None:
        """Do not require a clean fsck at teardown (the test damages the image on purpose)."""
        self.dirty_ok = True

    def unexpected_log_lines(self) -> list[str]:
        """Traceback / WARNING / ERROR / CRITICAL lines of all logs not declared expected."""
        bad = []
        for path in [*self.logs, *self.outputs]:
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                if _BAD_LINE.search(line) and not any(p.search(line) for p in self.expected_logs):
                    bad.append(f"{path.name}: {line}")
        return bad

    def log_text(self) -> str:
        """All daemon logs of this Mount so far, concatenated."""
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def log_tails(self, lines: int = 40) -> str:
        parts = []
        for path in [self.log, *self.outputs[-1:]]:
            parts.append(f"--- {path} (last {lines} lines) ---\n{_tail(path, lines)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ hangs

    def run(
        self, target: Sequence[str] | Callable[..., Any], *args: Any, timeout: float = 60.0
    ) -> watchdog.Result:
        """Run an argv or a callable (forked child) with a deadline against this mount.

        Returns the Result; on timeout the watchdog has already aborted this mount (and the
        failure is recorded for teardown). Prefer `run_in_child` for callables.
        """
        result = watchdog.run_with_deadline(target, timeout, args=args, refs=[self.ref], cwd=REPO)
        if result.timed_out:
            self.rescued.append(result.report)
        return result

    def deadline(self, timeout_s: float) -> watchdog.Deadline:
        """`with m.deadline(5): ...`: rescue this mount if the block takes longer than
        `timeout_s` (the block's blocked syscalls then fail, and teardown reports the rescue
        unless `expect_rescue()` was called)."""
        return watchdog.Deadline(timeout_s, lambda: [self.ref], on_expire=self.rescued.append)

    def _rescue(self, reason: str) -> str:
        report = watchdog.rescue([self.ref], reason=reason)
        self.rescued.append(report)
        return report

    def expect_rescue(self) -> None:
        """The test expects a hang that the watchdog resolves (deadlock demos): do not report
        watchdog rescues, the daemon's exit code, or fsck at teardown."""
        self.rescue_ok = True
        self.dirty_ok = True

    def cleanup(self) -> list[str]:
        """Teardown: unmount, fsck, log check; always leaves no mount and no daemon behind.

        Returns the list of problems (empty if all is well).
        """
        if self._cleaned and self.daemon is None:
            return []  # already cleaned up (a test or a demo called cleanup() itself)
        self._cleaned = True
        problems: list[str] = []
        if self.daemon is not None and not self.rescued and not self.mounted:
            # aborted or unmounted behind our back (a Deadline armed by the test, a crash)
            self.rescued.append("the mount vanished during the test (aborted or unmounted)")
        try:
            if self.rescued:
                if not self.rescue_ok:
                    problems.append(
                        "the watchdog had to rescue this mount:\n" + "\n".join(self.rescued)
                    )
                self._reap_daemon(10.0)
            elif self.daemon is not None:
                if self.daemon.poll() is not None:
                    problems.append(
                        f"daemon died during the test with {self.daemon.returncode}"
                        f"\n{self.log_tails()}"
                    )
                    self.daemon = None
                else:
                    self.unmount()
            if not self.dirty_ok and self._starts and not self.rescued:
                self.fsck()
        except MountError as exc:
            problems.append(str(exc))
        finally:
            self._force_cleanup(problems)
            if self.nbd is not None:
                self.nbd.stop()
        bad = self.unexpected_log_lines()
        if bad and not self.rescued:
            problems.append(
                "unexpected daemon log lines (declare with expect_log):\n"
                + "\n".join(bad[:40])
                + f"\n{self.log_tails()}"
            )
        return problems

    def _reap_daemon(self, timeout: float) -> None:
        """After a rescue: give the daemon `timeout` s to exit by itself (any exit code)."""
        if self.daemon is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.wait(timeout)
            if self.daemon.returncode is not None:
                self.daemon = None

    def _force_cleanup(self, problems: list[str]) -> None:
        """Last resort: rescue a still-mounted mount, then end our daemon by pid."""
        if mountinfo.is_mounted(self.mnt):
            problems.append("mount still present at teardown\n" + self._rescue("teardown"))
        daemon = self.daemon
        if daemon is None:
            return
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(5)
            except subprocess.TimeoutExpired:
                daemon.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    daemon.wait(10)
        if daemon.returncode is None:
            problems.append(
                f"daemon {daemon.pid} did not die:\n" + watchdog.stack_report([daemon.pid])
            )
        self.daemon = None


class MountFactory:
    """Makes Mounts for one test (`factory(size=..., opts=..., ...)`) and cleans them all up."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.mounts: list[Mount] = []

    def __call__(
        self,
        size: str = DEFAULT_SIZE,
        opts: dict[str, Any] | None = None,
        bugs: Iterable[str] = (),
        mkfs_args: Sequence[str] = (),
        image: str | os.PathLike[str] | None = None,
        mount: bool = True,
        extra_args: Sequence[str] = (),
    ) -> Mount:
        """mkfs a fresh image (unless `image` is given) and mount it (unless mount=False)."""
        n = len(self.mounts)
        workdir = self.tmp_path / f"m{n}"
        workdir.mkdir()
        mnt = workdir / "mnt"
        mnt.mkdir()
        if image is None:
            img = workdir / "image"
            run_tool("mkfs.diofs", img, "--size", size, *mkfs_args, check=True)
        else:
            img = Path(image)
        m = Mount(img, mnt, workdir, opts=opts, bugs=list(bugs), extra_args=extra_args)
        self.mounts.append(m)
        if mount:
            m.start()
        return m

    def mark_rescued(self, report: str) -> None:
        """The watchdog rescued every mount of this test (called by the per-test deadline)."""
        for m in self.mounts:
            if m.daemon is not None:
                m.rescued.append(report)

    def refs(self) -> list[watchdog.MountRef]:
        return [m.ref for m in self.mounts if m.daemon is not None]

    def cleanup(self) -> list[str]:
        problems = []
        for m in reversed(self.mounts):
            problems.extend(f"[{m.mnt}] {p}" for p in m.cleanup())
        return problems


def run_in_child(
    fn: Callable[..., Any], *args: Any, timeout: float = 60.0, mounts: Sequence[Mount] = ()
) -> Any:
    """Run `fn(*args)` in a forked child with a deadline; return its (picklable) result.

    Raises AssertionError with the child's traceback if it raised, or with the watchdog report
    if it hung (the watchdog has then aborted `mounts`, which teardown reports as well).
    """
    refs = [m.ref for m in mounts]
    result = watchdog.run_with_deadline(fn, timeout, args=args, refs=refs)
    if result.timed_out:
        for m in mounts:
            m.rescued.append(result.report)
        raise AssertionError(f"{getattr(fn, '__name__', fn)} hung for {timeout}s\n{result.report}")
    if result.returncode != 0:
        raise AssertionError(
            f"{getattr(fn, '__name__', fn)} failed in the child "
            f"(exit {result.returncode}):\n{result.stderr}"
        )
    return result.value


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, /proc/PID/stat fields after the command name) of every process, read from /proc
    only: fields[0] is the state, [1] ppid, [2] process group, [3] session."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        yield int(entry), stat[stat.rfind(")") + 2 :].split()


def kill_by_pid(pid: int) -> None:
    """SIGKILL one process we started (never by name)."""
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def assert_rescued_cleanly(m: Mount, result: Any, daemon_pid: int | None) -> None:
    """After a hang the watchdog broke (`result` of `Mount.run`): it aborted the connection,
    and nothing is left behind (no mount, no client, no D-state task of ours; the daemon
    exits)."""
    client_pid = result.pid
    assert f"abort conn {m.conn_id}: done" in result.report
    assert not mountinfo.is_mounted(m.mnt)
    assert not watchdog.process_alive(client_pid)
    assert watchdog.wait_gone([daemon_pid], 15), "daemon did not exit after the abort"
    stuck = [t for t in watchdog.stuck_tasks() if t.pid in (client_pid, daemon_pid)]
    assert stuck == []


def wait_kernel_invalidations(mnt: str | os.PathLike[str], timeout: float = 10.0) -> None:
    """Wait until the daemon's kernel invalidator has dropped every range posted so far.

    What SPEC 3 holds for *asynchronous* direct writes (docs/concurrency.md race 18): a page
    the kernel cached while such a write was in flight shows the new bytes once this returns.
    """
    wait_for(
        lambda: not read_stats(mnt).get("kernel.invalidations_pending", 0),
        "the kernel invalidations posted so far",
        timeout,
    )
