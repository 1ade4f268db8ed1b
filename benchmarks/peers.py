"""The peers: build or find them, mount them, measure their daemon, unmount them.

Peers (``PEER_NAMES``, in report order; ``ALL_PEERS`` adds diofs-nbd, which runs only when
asked for: ``--backend nbd`` or ``--peers diofs-nbd``):
  diofs   ``python mount.py IMG MNT --foreground --log FILE`` on an image made by mkfs.diofs
  diofs-b the same, a second mount with its own extra arguments (``--diofs-b-opts``): a before
          and an after of one change (a mount option) side by side in one run
  diofs-nbd  the same, but the image is served over NBD on a unix socket in the peer's dir
          (same disk) and mounted by its URI (docs/nbd.md): nbdkit's file plugin, or with
          ``--nbd-server`` qemu-nbd (qcow2) or nbd-server
  pypeer  pyfuse3 3.5.0 ``examples/passthroughfs.py``, variant without O_DIRECT on backing opens
  cpeer   libfuse 3.14 ``example/passthrough_ll.c``, same variant, compiled with gcc
  local   a plain directory on the ext4 file system of the work dir (the limit)

cpeer, pypeer and local keep their files on the host (``Peer.host_dir``); for the tree jobs the
runner mounts a fresh ext4 there per repetition (benchmarks/freshfs.py).

Why the variants: as shipped, both passthrough examples open the backing file with the caller's
O_DIRECT and then write from an unaligned buffer, so every O_DIRECT write fails with EINVAL (and
the Python daemon dies). Dropping O_DIRECT from the backing open is the fair comparison (kernel
side FUSE direct I/O, server side page cache, like diofs); reports always carry the label.

Builds are cached under ``~/.cache/diofs-bench/`` (never in the repository), keyed by a hash of
the patched source.

Invariants: a peer's daemon is started by this module in its own session and is only ever
signalled by its pid; :meth:`FusePeer.unmount` always returns with the mount gone and the daemon
reaped (abort + lazy unmount + SIGKILL as the last resort), and never stats a possibly hung mount.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from harness import watchdog
from harness.nbdserver import NbdServer, NbdServerDaemon, QemuNbdServer

_NbdServer = NbdServer | QemuNbdServer | NbdServerDaemon

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DIOFS_BENCH_CACHE", Path.home() / ".cache" / "diofs-bench"))
PEER_NAMES = ("diofs", "pypeer", "cpeer", "local")  # the default set
# every peer, in report order
ALL_PEERS = ("diofs", "diofs-b", "diofs-nbd", "pypeer", "cpeer", "local")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# passthrough_ll keeps an O_PATH fd open per inode the kernel knows: the tree jobs (two copies
# of /usr/include and a .git) pass 20,000, and at EMFILE its flush fails with EBADF
DAEMON_NOFILE = 1 << 20

LIBFUSE_EXAMPLES = Path("/usr/share/doc/libfuse3-dev/examples")
PYFUSE3_SDIST_DIRS = (Path("/tmp/sdist/pyfuse3-3.5.0"), CACHE / "sdist" / "pyfuse3-3.5.0")

VARIANT = "variant: no O_DIRECT on backing open"
LABELS = {
    "diofs": "diofs",
    "diofs-b": "diofs, second mount with --diofs-b-opts",
    "diofs-nbd": "diofs over NBD (nbdkit file plugin on the same disk, unix socket)",
    "pypeer": f"Python peer ({VARIANT})",
    "cpeer": f"C peer ({VARIANT})",
    "local": "local disk (ext4)",
}
SHORT = {
    "diofs": "diofs",
    "diofs-b": "diofs B",
    "diofs-nbd": "diofs NBD",
    "pypeer": "Python peer*",
    "cpeer": "C peer*",
    "local": "local disk",
}


class PeerUnavailable(Exception):
    """The peer cannot be built or mounted here; the message says why (shown to the user)."""


def venv_python() -> str:
    p = REPO / ".venv" / "bin" / "python"
    return str(p) if p.exists() else sys.executable


def _replace_once(text: str, old: str, new: str, what: str) -> str:
    if text.count(old) != 1:
        raise PeerUnavailable(f"{what}: expected exactly one {old!r} to patch")
    return text.replace(old, new)


# --- builds -------------------------------------------------------------------------------


def build_cpeer() -> Path:
    """Compile the C peer variant (cached); returns the binary's path."""
    src = LIBFUSE_EXAMPLES / "passthrough_ll.c"
    if src.exists():
        text = src.read_text()
    elif src.with_suffix(".c.gz").exists():
        text = gzip.decompress(src.with_suffix(".c.gz").read_bytes()).decode()
    else:
        raise PeerUnavailable(f"cpeer: {src} not found (is libfuse3-dev installed?)")
    text = _replace_once(
        text,
        "fd = open(buf, fi->flags & ~O_NOFOLLOW);",
        "fd = open(buf, fi->flags & ~(O_NOFOLLOW | O_DIRECT)); /* diofs-bench variant */",
        "passthrough_ll.c open",
    )
    text = _replace_once(
        text,
        "(fi->flags | O_CREAT) & ~O_NOFOLLOW",
        "(fi->flags | O_CREAT) & ~(O_NOFOLLOW | O_DIRECT)",
        "passthrough_ll.c create",
    )
    try:
        flags = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "fuse3"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise PeerUnavailable(f"cpeer: pkg-config fuse3 failed: {exc}") from exc
    key = hashlib.sha256((text + " ".join(flags)).encode()).hexdigest()[:12]
    out = CACHE / "cpeer"
    binary = out / f"passthrough_ll_nodirect-{key}"
    if binary.exists():
        return binary
    out.mkdir(parents=True, exist_ok=True)
    csrc = out / f"passthrough_ll_nodirect-{key}.c"
    csrc.write_text(text)
    argv = ["gcc", "-Wall", "-O2", f"-I{LIBFUSE_EXAMPLES}", str(csrc), *flags, "-o", str(binary)]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise PeerUnavailable(f"cpeer: gcc failed:\n{r.stderr[-2000:]}")
    return binary


def _pyfuse3_sdist() -> Path:
    for d in PYFUSE3_SDIST_DIRS:
        if (d / "examples" / "passthroughfs.py").exists():
            return d
    dl = CACHE / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [
            venv_python(),
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            "pyfuse3",  # not ":all:": that builds setuptools and Cython from source too
            "-d",
            str(dl),
            "pyfuse3==3.5.0",
        ],
        capture_output=True,
        text=True,
    )
    tgz = dl / "pyfuse3-3.5.0.tar.gz"
    if r.returncode != 0 or not tgz.exists():
        raise PeerUnavailable(f"pypeer: cannot get the pyfuse3 3.5.0 sdist: {r.stderr[-500:]}")
    with tarfile.open(tgz) as tf:
        tf.extractall(dl, filter="data")
    return dl / "pyfuse3-3.5.0"


def build_pypeer() -> Path:
    """Write the Python peer variant (cached); returns the script's path."""
    text = (_pyfuse3_sdist() / "examples" / "passthroughfs.py").read_text()
    text = _replace_once(
        text,
        "fd = os.open(self._inode_to_path(inode), flags)",
        "fd = os.open(self._inode_to_path(inode), flags & ~os.O_DIRECT)",
        "passthroughfs.py open",
    )
    text = _replace_once(
        text,
        "fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC)",
        "fd = os.open(path, (flags | os.O_CREAT | os.O_TRUNC) & ~os.O_DIRECT)",
        "passthroughfs.py create",
    )
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    out = CACHE / "pypeer"
    out.mkdir(parents=True, exist_ok=True)
    script = out / f"passthroughfs_nodirect-{key}.py"
    if not script.exists():
        script.write_text(f"# diofs-bench {VARIANT}\n" + text)
    return script


# --- peers --------------------------------------------------------------------------------


class Peer:
    """A place to run jobs. ``data_dir`` is where jobs put their files."""

    name = "local"
    is_fuse = False

    def __init__(self, workdir: Path) -> None:
        self.root = workdir / self.name
        self.errors: list[str] = []
        self.restarts = 0

    @property
    def label(self) -> str:
        return LABELS[self.name]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def host_dir(self) -> Path | None:
        """The directory on the host's file system where this peer keeps its files (the tree
        jobs put a fresh ext4 there, benchmarks/freshfs.py), None when they go into an image."""
        return self.data_dir

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def mount(self) -> None:
        pass

    def unmount(self, deadline_s: float = 20.0) -> None:
        pass

    def alive(self) -> bool:
        return True

    def daemon_pid(self) -> int | None:
        return None

    def daemon_cpu_s(self) -> float | None:
        """utime+stime of the daemon process (all threads) in seconds, None without daemon."""
        pid = self.daemon_pid()
        if pid is None:
            return None
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(rest[11]) + int(rest[12])) / CLK_TCK

    def abort(self, client_pids: list[int] | None = None, reason: str = "deadline") -> str:
        """Free clients stuck on this peer; returns a watchdog report ("" without FUSE)."""
        return ""

    def log_tail(self, n: int = 20) -> str:
        return ""


class LocalPeer(Peer):
    name = "local"


class FusePeer(Peer):
    """A FUSE peer: a daemon started in the foreground, mounted on ``root/mnt``."""

    is_fuse = True
    mount_timeout_s = 30.0

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.mnt = self.root / "mnt"
        self.log_path = self.root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn_id: int | None = None
        self.wrapper: list[str] = []  # e.g. ["-m", "cProfile", "-o", FILE] for Python daemons

    @property
    def data_dir(self) -> Path:
        return self.mnt

    @property
    def host_dir(self) -> Path | None:
        return None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)

    def mount(self) -> None:
        if os.path.ismount(self.mnt):
            raise PeerUnavailable(f"{self.name}: {self.mnt} is already a mount point")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.argv())}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_raise_nofile,
        )
        log.close()
        deadline = time.monotonic() + self.mount_timeout_s
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise PeerUnavailable(
                    f"{self.name}: daemon exited with {rc} before mounting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self._kill()
                raise PeerUnavailable(
                    f"{self.name}: not mounted after {self.mount_timeout_s}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.conn_id = watchdog.connection_id(self.mnt)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def abort(self, client_pids: list[int] | None = None, reason: str = "deadline") -> str:
        """Abort the FUSE connection (every request fails with ENOTCONN), detach the mount.

        Returns the watchdog report (kernel stacks of daemon and ``client_pids``; it also
        sends SIGUSR1 to the daemon first).
        """
        ref = watchdog.MountRef(str(self.mnt), self.conn_id, self.daemon_pid())
        return watchdog.rescue([ref], list(client_pids or []), reason=f"{self.name}: {reason}")

    def unmount(self, deadline_s: float = 20.0) -> None:
        """Unmount and reap the daemon; escalate to abort/lazy unmount/SIGKILL past deadline."""
        if self.proc is None and not self._mounted_here():
            return
        clean = False
        if self._mounted_here():
            um = subprocess.Popen(
                ["fusermount3", "-u", str(self.mnt)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                out, _ = um.communicate(timeout=deadline_s)
                clean = um.returncode == 0
                if not clean:
                    self.errors.append(f"fusermount3 -u failed: {out.decode().strip()}")
            except subprocess.TimeoutExpired:
                report = self.abort(reason=f"unmount still running after {deadline_s}s")
                self.errors.append(
                    f"unmount hung for {deadline_s}s: aborted the connection\n" + report
                )
                with contextlib.suppress(ProcessLookupError):
                    um.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    um.wait(timeout=10)
            else:
                if not clean:
                    self.abort(reason="fusermount3 -u failed")
        if self.proc is not None:
            try:
                self.proc.wait(timeout=deadline_s if clean else 5)
            except subprocess.TimeoutExpired:
                self.errors.append("daemon did not exit after unmount: killed")
                self._kill()
        self.proc = None
        self.conn_id = None

    def _mounted_here(self) -> bool:
        # /proc/self/mountinfo, not os.path.ismount: must not stat a possibly hung mount
        target = str(self.mnt)
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target for line in f)

    def _kill(self) -> None:
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        if self._mounted_here():
            self.abort()
        self.proc = None

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def _raise_nofile() -> None:
    """In the daemon child before exec: as many fds as the system allows (root may raise)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            limit = min(DAEMON_NOFILE, int(f.read()))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    except (OSError, ValueError):
        pass  # not root, or no /proc: keep the inherited limit


class PassthroughPeer(FusePeer):
    """A passthrough daemon over the directory ``backing`` on the host's file system."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.backing = self.root / "backing"

    @property
    def host_dir(self) -> Path | None:
        return self.backing

    def prepare(self) -> None:
        super().prepare()
        self.backing.mkdir(exist_ok=True)


class CPeer(PassthroughPeer):
    name = "cpeer"

    def prepare(self) -> None:
        super().prepare()
        self.binary = build_cpeer()

    def argv(self) -> list[str]:
        return [str(self.binary), "-f", "-o", f"source={self.backing},fsname=cpeer", str(self.mnt)]


class PyPeer(PassthroughPeer):
    name = "pypeer"

    def prepare(self) -> None:
        super().prepare()
        self.python = venv_python()
        r = subprocess.run(
            [self.python, "-c", "import pyfuse3, trio"], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise PeerUnavailable(
                f"pypeer: {self.python} cannot import pyfuse3 and trio: "
                f"{r.stderr.strip().splitlines()[-1:]}"
            )
        self.script = build_pypeer()

    def argv(self) -> list[str]:
        return [self.python, *self.wrapper, str(self.script), str(self.backing), str(self.mnt)]


class DiofsPeer(FusePeer):
    name = "diofs"

    def __init__(
        self, workdir: Path, image_size: str = "1G", extra_args: list[str] | None = None
    ) -> None:
        super().__init__(workdir)
        self.image = self.root / "diofs.img"
        self.image_size = image_size
        self.extra_args = extra_args or []

    def prepare(self) -> None:
        super().prepare()
        self.python = venv_python()
        if not (REPO / "diofs" / "cli" / "mount.py").exists():
            raise PeerUnavailable("diofs: diofs/cli/mount.py does not exist yet (skipped)")
        mkfs = REPO / ".venv" / "bin" / "mkfs.diofs"
        run_mkfs = "import sys; from diofs.cli.mkfs import main; sys.exit(main())"
        argv = [str(mkfs)] if mkfs.exists() else [self.python, "-c", run_mkfs]
        r = subprocess.run(
            [*argv, str(self.image), "--size", self.image_size],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        if r.returncode != 0:
            raise PeerUnavailable(
                f"diofs: mkfs failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-1000:]}"
            )
        if not self.image.exists():
            raise PeerUnavailable(f"diofs: mkfs made no image ({' '.join(argv)})")

    def source(self) -> str:
        """What mount.py mounts: the image file."""
        return str(self.image)

    def argv(self) -> list[str]:
        return [
            self.python,
            *self.wrapper,
            str(REPO / "mount.py"),
            self.source(),
            str(self.mnt),
            "--foreground",
            "--log",
            str(self.root / "diofs.log"),
            *self.extra_args,
        ]

    def log_tail(self, n: int = 20) -> str:
        out = super().log_tail(n)
        try:
            lines = (self.root / "diofs.log").read_text(errors="replace").splitlines()
        except OSError:
            return out
        return out + "\n--- diofs.log:\n" + "\n".join(lines[-n:])


class DiofsBPeer(DiofsPeer):
    """A second diofs mount, its image and mount in a directory of its own, mounted with the
    arguments of ``--diofs-b-opts`` instead of ``--diofs-opts``."""

    name = "diofs-b"


NBD_SERVERS = ("nbdkit", "qemu-nbd", "nbd-server")
NBD_SERVER_LABELS = {
    "nbdkit": "nbdkit file plugin",
    "qemu-nbd": "qemu-nbd, qcow2, cache=writeback",
    "nbd-server": "nbd-server, flush fua trim",
}


class DiofsNbdPeer(DiofsPeer):
    """diofs with its image served over NBD on a unix socket in the peer's dir, on the same
    disk: nbdkit's file plugin (default), qemu-nbd over a qcow2 (--shared=5: multi-conn) or
    nbd-server (harness/nbdserver.py).

    The server lives as long as the mount: started by ``mount``, ended by pid in ``unmount``
    (also on a failed mount), so a remount after a failed run restarts both."""

    name = "diofs-nbd"

    def __init__(
        self,
        workdir: Path,
        image_size: str = "1G",
        extra_args: list[str] | None = None,
        server: str = "nbdkit",
    ) -> None:
        super().__init__(workdir, image_size, extra_args)
        if server not in NBD_SERVERS:
            raise ValueError(f"unknown NBD server {server!r}; known: {', '.join(NBD_SERVERS)}")
        self.server_kind = server
        self.server: _NbdServer | None = None

    @property
    def label(self) -> str:
        return f"diofs over NBD ({NBD_SERVER_LABELS[self.server_kind]}, same disk, unix socket)"

    def prepare(self) -> None:
        tools = {"qemu-nbd": ["qemu-nbd", "qemu-img"]}.get(self.server_kind, [self.server_kind])
        for tool in tools:
            if shutil.which(tool) is None:
                raise PeerUnavailable(f"diofs-nbd: {tool} is not installed (scripts/setup)")
        super().prepare()  # mkfs of the raw image file
        if self.server_kind == "qemu-nbd":
            qcow2 = self.image.with_suffix(".qcow2")
            r = subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(self.image), str(qcow2)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if r.returncode != 0:
                raise PeerUnavailable(f"diofs-nbd: qemu-img convert failed: {r.stderr.strip()}")
            self.image.unlink()
            self.image = qcow2

    def source(self) -> str:
        assert self.server is not None
        return self.server.uri

    def _new_server(self) -> _NbdServer:
        if self.server_kind == "qemu-nbd":
            return QemuNbdServer(self.root, self.image, cache="writeback", shared=5)
        if self.server_kind == "nbd-server":
            return NbdServerDaemon(self.root, self.image)
        return NbdServer(self.root, ["file", f"file={self.image}"])

    def mount(self) -> None:
        if self.server is None:
            server = self._new_server()
            try:
                server.start()
            except RuntimeError as exc:
                raise PeerUnavailable(f"diofs-nbd: {exc}") from None
            self.server = server
        try:
            super().mount()
        except BaseException:
            self._stop_server()
            raise

    def unmount(self, deadline_s: float = 20.0) -> None:
        try:
            super().unmount(deadline_s)
        finally:
            self._stop_server()

    def _stop_server(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()


def make_peer(
    name: str,
    workdir: Path,
    diofs_image_size: str = "1G",
    diofs_args: list[str] | None = None,
    nbd_server: str = "nbdkit",
    diofs_b_args: list[str] | None = None,
) -> Peer:
    if name == "local":
        return LocalPeer(workdir)
    if name == "cpeer":
        return CPeer(workdir)
    if name == "pypeer":
        return PyPeer(workdir)
    if name == "diofs":
        return DiofsPeer(workdir, diofs_image_size, diofs_args)
    if name == "diofs-b":
        return DiofsBPeer(workdir, diofs_image_size, diofs_b_args)
    if name == "diofs-nbd":
        return DiofsNbdPeer(workdir, diofs_image_size, diofs_args, nbd_server)
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(ALL_PEERS)}")


def cleanup_workdir(workdir: Path) -> None:
    """Remove the work dir unless something is still mounted below it."""
    with open("/proc/self/mountinfo") as f:
        if any(line.split()[4].startswith(str(workdir) + "/") for line in f):
            return
    shutil.rmtree(workdir, ignore_errors=True)
