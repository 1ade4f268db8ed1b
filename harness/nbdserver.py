"""Real NBD servers for tests: one server on a unix socket in the test's directory.

Three kinds, one interface (`start() -> self`, `stop(kill=False)`, `restart()`, `uri`,
`running`, `socket`, `log`):

- `NbdServer(workdir, plugin_args, filters=[...])`: nbdkit. `start()` runs `nbdkit --foreground
  --exit-with-parent -U SOCKET [--filter=F]... PLUGIN ARGS...`; `uri` is
  `nbd+unix:///?socket=SOCKET`.
- `QemuNbdServer(workdir, image, fmt="qcow2", cache="writeback", shared=1)`: qemu-nbd
  (`--socket=SOCKET --format=FMT --cache=CACHE --discard=unmap --persistent`), in the
  foreground; the export is named `diofs`.
- `NbdServerDaemon(workdir, image, options={...})`: nbd-server, with a config file in the
  workdir (a `unixsock`, so it listens on no TCP port; the export section `diofs` with
  flush, fua and trim on unless `options` says otherwise). nbd-server always daemonizes
  (`-d` would serve a single connection and exit): it runs under a small reaper process
  (`REAPER`: PR_SET_CHILD_SUBREAPER, so the daemon and its per-connection children stay
  its descendants and are reaped, not left as zombies of pid 1).

`stop()` ends the server by pid: SIGTERM (nbd-server: to the daemon, which ends its
children), or with `kill=True` SIGKILL of the server and, for nbd-server, every process of
it (a server crash). `restart()` starts the same command again on the same socket. Nothing
listens on the network. If the test process dies, nbdkit ends by `--exit-with-parent`, qemu-nbd
and the reaper by PR_SET_PDEATHSIG (the reaper then kills its descendants).

`advertised(uri)` says what a server offers, as libnbd sees it (docs/nbd.md's table).
`file_server(workdir, image)` serves a raw image file with the server DIOFS_TEST_NBD_SERVER
names (nbdkit by default, qemu-nbd, nbd-server), for running whole suites on another server.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

START_TIMEOUT_S = 10.0


def nbdkit_missing() -> str | None:
    """Why NBD tests cannot run here, or None."""
    if shutil.which("nbdkit") is None:
        return "nbdkit is not installed (scripts/setup)"
    try:
        import nbd  # noqa: F401
    except ImportError:
        return "libnbd's Python module is not importable (scripts/setup)"
    return None


def qemu_nbd_missing() -> str | None:
    """Why qemu-nbd tests cannot run here, or None."""
    for prog in ("qemu-nbd", "qemu-img"):
        if shutil.which(prog) is None:
            return f"{prog} is not installed (Debian qemu-utils; scripts/setup)"
    return nbdkit_missing()


def nbd_server_missing() -> str | None:
    """Why nbd-server tests cannot run here, or None."""
    if shutil.which("nbd-server") is None:
        return "nbd-server is not installed (scripts/setup)"
    return nbdkit_missing()


ADVERTISED = ("flush", "fua", "trim", "zero", "fast_zero", "multi_conn", "cache", "df")


def advertised(uri: str) -> dict[str, Any]:
    """What the server at `uri` offers (libnbd's can_* after the handshake), plus `size`,
    `structured_replies` and the advertised `block_sizes` (minimum, preferred, maximum; 0: none)."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        out: dict[str, Any] = {k: bool(getattr(h, f"can_{k}")()) for k in ADVERTISED}
        out["size"] = h.get_size()
        out["structured_replies"] = bool(h.get_structured_replies_negotiated())
        out["block_sizes"] = [h.get_block_size(i) for i in range(3)]
        h.shutdown()
    finally:
        del h
    return out


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the process that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _listens(path: Path) -> bool:
    """A connection to the unix socket `path` is accepted (closed at once)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
    return True


class _Server:
    """A server process this object started; subclasses set argv, socket and log."""

    socket: Path
    log: Path
    argv: list[str]
    what = "server"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            return subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def _ready(self) -> bool:
        return self.socket.exists()

    def start(self) -> Self:
        assert self.proc is None, "already running"
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.proc = self._spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"{self.what} did not start: {self.argv}\n"
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.01)
        return self

    def stop(self, *, kill: bool = False) -> None:
        """End the server by pid: SIGKILL (`kill`, a crash) or SIGTERM, and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class QemuNbdServer(_Server):
    """qemu-nbd serving `image` (qcow2 by default) on a unix socket (module docstring).

    `shared` > 1 lets that many clients connect at once, and qemu-nbd 7.2 then advertises
    multi-conn (diofs opens its pool of 4); with 1 it does not (diofs uses one connection)."""

    what = "qemu-nbd"

    def __init__(self, workdir: Path, image: Path, *, fmt: str = "qcow2",
                 cache: str = "writeback", shared: int = 1, name: str = "qemu-nbd") -> None:
        super().__init__()
        self.workdir = workdir
        self.image = image
        self.socket = workdir / f"{name}.sock"
        self.log = workdir / f"{name}.log"
        self.argv = ["qemu-nbd", f"--socket={self.socket}", f"--format={fmt}",
                     f"--cache={cache}", "--discard=unmap", f"--shared={shared}",
                     "--persistent", "--export-name=diofs", str(image)]

    @property
    def uri(self) -> str:
        return f"nbd+unix:///diofs?socket={self.socket}"


# nbd-server daemonizes; this process (its parent) becomes the subreaper of everything it
# forks, reaps it all and exits when nothing is left. SIGTERM (from the harness, or at the
# death of the test process: PR_SET_PDEATHSIG) SIGKILLs every descendant first.
REAPER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
me = os.getpid()

def descendants():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [me]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out

def kill_all(*_):
    for pid in descendants():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

signal.signal(signal.SIGTERM, kill_all)
if os.fork() == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
"""


class NbdServerDaemon(_Server):
    """nbd-server serving the raw file `image` as export `diofs` (module docstring).

    `options` go into the export section (default flush, fua and trim true)."""

    what = "nbd-server"

    def __init__(self, workdir: Path, image: Path, *, options: Mapping[str, str] | None = None,
                 name: str = "nbd-server") -> None:
        super().__init__()
        self.workdir = workdir
        self.image = image
        self.socket = workdir / f"{name}.sock"
        self.log = workdir / f"{name}.log"
        self.pidfile = workdir / f"{name}.pid"
        self.config = workdir / f"{name}.conf"
        export = {"exportname": str(image), "flush": "true", "fua": "true", "trim": "true",
                  **(options or {})}
        self.config.write_text(
            "[generic]\n"
            f"\tunixsock = {self.socket}\n"  # and so no TCP listener (nbd-server(5))
            "\tallowlist = false\n"
            "[diofs]\n" + "".join(f"\t{k} = {v}\n" for k, v in export.items()))
        self.argv = [sys.executable, "-c", REAPER, "nbd-server", "-C", str(self.config),
                     "-p", str(self.pidfile)]

    def _spawn(self) -> subprocess.Popen[bytes]:
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        with open(self.log, "ab") as log:
            return subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)

    def _ready(self) -> bool:
        # the socket file appears at bind(), the pid file may come before listen(): only a
        # connection shows the server listens (a check that once failed a CI run with
        # ECONNREFUSED). nbd-server forks a child for the probe, which ends at its EOF.
        return self.socket.exists() and self.daemon_pid() is not None and _listens(self.socket)

    def daemon_pid(self) -> int | None:
        """The pid of the listening nbd-server (from its pid file), or None."""
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///diofs?socket={self.socket}"

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM the daemon (it ends its children), or with `kill` have the reaper SIGKILL
        every nbd-server process; then the reaper exits."""
        proc = self.proc
        if proc is None:
            return
        pid = self.daemon_pid()
        if proc.poll() is None:
            if kill or pid is None:
                os.kill(proc.pid, signal.SIGTERM)  # the reaper: SIGKILL to all of them
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        self.proc = None


class NbdServer(_Server):
    """One nbdkit process that this object started (see the module docstring)."""

    what = "nbdkit"

    def __init__(
        self, workdir: Path, plugin: Sequence[str], *, filters: Sequence[str] = (),
        name: str = "nbd",
    ) -> None:
        super().__init__()
        self.workdir = workdir
        self.socket = workdir / f"{name}.sock"
        self.log = workdir / f"{name}.log"
        self.argv = ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(self.socket)]
        self.argv += [f"--filter={f}" for f in filters]
        self.argv += list(plugin)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:  # --exit-with-parent does what preexec_fn would
            return subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)


NBD_TEST_SERVERS = ("nbdkit", "qemu-nbd", "nbd-server")


def file_server(workdir: Path, image: Path) -> NbdServer | QemuNbdServer | NbdServerDaemon:
    """A server (not started) of the raw image file `image`: nbdkit's file plugin, or the server
    that DIOFS_TEST_NBD_SERVER names (qemu-nbd with --format=raw and multi-conn, nbd-server)."""
    kind = os.environ.get("DIOFS_TEST_NBD_SERVER", "nbdkit")
    if kind == "qemu-nbd":
        return QemuNbdServer(workdir, image, fmt="raw", shared=8)
    if kind == "nbd-server":
        return NbdServerDaemon(workdir, image)
    if kind != "nbdkit":
        raise ValueError(f"DIOFS_TEST_NBD_SERVER={kind!r}: not one of {NBD_TEST_SERVERS}")
    return NbdServer(workdir, ["file", f"file={image}"])
