"""A real nbdkit for tests: one server on a unix socket in the test's directory.

`NbdServer(workdir, plugin_args, filters=[...]).start()` runs `nbdkit --foreground
--exit-with-parent -U SOCKET [--filter=F]... PLUGIN ARGS...` and waits for its socket; `uri` is
`nbd+unix:///?socket=SOCKET`. `stop()` kills it by pid (SIGKILL with `kill=True`: a server
crash), `restart()` starts the same command again on the same socket. Nothing listens on the
network, and `--exit-with-parent` ends the server if the test process dies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

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


class NbdServer:
    """One nbdkit process that this object started (see the module docstring)."""

    def __init__(
        self, workdir: Path, plugin: Sequence[str], *, filters: Sequence[str] = (),
        name: str = "nbd",
    ) -> None:
        self.workdir = workdir
        self.socket = workdir / f"{name}.sock"
        self.log = workdir / f"{name}.log"
        self.argv = ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(self.socket)]
        self.argv += [f"--filter={f}" for f in filters]
        self.argv += list(plugin)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def start(self) -> NbdServer:
        assert self.proc is None, "already running"
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"nbdkit did not start: {self.argv}\n"
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
