"""mount.diofs IMAGE MOUNTPOINT [-o opts] [--foreground] [--bug NAME]... [--log FILE]

IMAGE is an image file, a block device, or an NBD export: nbd://HOST[:PORT]/EXPORT or
nbd+unix:///EXPORT?socket=PATH (diofs/backend/nbd.py, docs/nbd.md).

Without --foreground the command returns once the filesystem is mounted and serving; the
daemon keeps running in the background until the mount is unmounted, when it writes everything
back, commits the metadata and exits 0 (1 if the final writeback or commit failed). Unmount
with `umount.diofs MOUNTPOINT`, which returns once that is done, with the daemon's status
(`fusermount3 -u` returns before). The mount's source (`mount`, `df`) is the image's path.
The image stays locked (diofs.image_lock) until the final commit is durable: mount.diofs and
fsck.diofs refuse a locked image with exit code 7.

Options (-o k=v,...): cache_size=64M, dio_align=N (a multiple of the image's), writeback_age=S,
commit_interval=S, shootdown=unlocked|locked, backend=raw|crash|fault, crash_log=PATH,
fault_spec=PATH, nbd_timeout=S (an NBD request fails with EIO after S seconds; default 30),
nbd_retry=S (pause between reconnects to a lost NBD server; default 1), nbd_unsafe (mount an
NBD server that cannot flush: not crash consistent), nbd_connections=N (default 4), discard
(blocks a commit frees are trimmed on an NBD server that offers trim; off by default, as ext4),
max_tasks=N, hang_timeout=S (a request outstanding that long is logged once with its stacks
and counted in `hangs.detected`; never aborted; default 60, 0 = off),
xattr=on|off (extended attributes; off answers ENOSYS to every xattr request),
dsync_pool=N (native threads that write and answer O_DSYNC direct overwrites, diofs/durable_pool.py;
default 8, 0 or off = none: group commit or an inline RWF_DSYNC write instead),
receive_spin=US (how long a worker that answered a request keeps reading /dev/fuse for the next
one before it sleeps in the event loop; default 50 microseconds, 0 = off; diofs/ops.py),
native_io=on|off (O_DIRECT reads, and O_DSYNC direct overwrites, of files in the steady state
answered by the binding without Python, diofs/native_io.py; default on),
entry_timeout=S and attr_timeout=S (how long the kernel may cache names and attributes;
default 3600, see diofs/ops.py), fill_delay=S, dio_delay=S and data_delay=S (demo hooks that
widen race windows; data_delay: a data write into new blocks or past EOF sleeps between
allocating and writing its data). Unknown
-o options are passed to FUSE only if they are known FUSE options (allow_other,
default_permissions, ro...).

Logging: to --log FILE if given; else to stderr with --foreground, and to syslog (ident
`diofs`, facility daemon, via /dev/log) in the background; nowhere if /dev/log is missing.
"""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import gc
import logging
import os
import signal
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import trio

from diofs import bugs, daemon_status, hang_detector, image_lock, request, stats
from diofs.backend import image_name, is_uri, open_backend
from diofs.backend.nbd import NbdOptions
from diofs.backend.raw import RawImage
from diofs.buffered import Buffered, write_back_pages
from diofs.cache import PageCache, Writeback
from diofs.cli.common import ArgumentParser, parse_size, run_main, setup_logging, syslog_handler
from diofs.dio import Direct
from diofs.durability import Durability
from diofs.durable_pool import DEFAULT_THREADS as DEFAULT_POOL_THREADS
from diofs.durable_pool import DurablePool
from diofs.errors import EXIT_ERROR, EXIT_MOUNT_FAILED, EXIT_MOUNTPOINT, DiofsError
from diofs.fs import Filesystem
from diofs.incore import IncoreInodes
from diofs.iocontext import IoContext
from diofs.kernel_cache import KernelCache
from diofs.locks import FaultMarker
from diofs.native_io import NativeIo

log = logging.getLogger(__name__)

FUSE_PASSTHROUGH = {"allow_other", "default_permissions", "ro", "rw", "noatime", "nodev",
                    "nosuid", "dev", "suid", "exec", "noexec", "relatime", "atime"}
MOUNT8_ONLY = {"auto", "noauto", "user", "nouser", "_netdev", "nofail", "defaults"}  # fstab
MCL_CURRENT, MCL_FUTURE = 1, 2
# seconds the kernel may cache names and attributes (-o entry_timeout, attr_timeout); why it
# can be this long: diofs/ops.py, "Kernel caching of names and attributes"
CACHE_TIMEOUT_S = 3600.0


@dataclass
class Options:
    cache_size: int = 64 << 20
    dio_align: int | None = None
    writeback_age: float = 5.0
    commit_interval: float = 5.0
    shootdown: str = "unlocked"
    backend: str = "raw"
    crash_log: str | None = None
    fault_spec: str | None = None
    max_tasks: int = 64
    hang_timeout: float = hang_detector.DEFAULT_TIMEOUT_S
    entry_timeout: float = CACHE_TIMEOUT_S
    attr_timeout: float = CACHE_TIMEOUT_S
    fill_delay: float = 0.0
    dio_delay: float = 0.0
    data_delay: float = 0.0
    async_dio: bool = True
    sync_dispatch: bool = True
    receive_spin_us: float = 50.0  # Operations.receive_spin_us; 0: sleep at once
    dsync_pool: int = DEFAULT_POOL_THREADS  # native threads for O_DSYNC writes; 0: none
    native_io: bool = True  # diofs/native_io.py
    xattr: bool = True
    nbd: NbdOptions = field(default_factory=NbdOptions)
    discard: bool = False
    fuse: tuple[str, ...] = ()


def parse_options(items: list[str]) -> Options:
    o = Options()
    fuse: list[str] = []
    for group in items:
        for item in filter(None, group.split(",")):
            key, _, value = item.partition("=")
            try:
                if key == "cache_size":
                    o.cache_size = parse_size(value)
                elif key == "dio_align":
                    o.dio_align = int(value)
                elif key in (
                    "writeback_age", "commit_interval", "fill_delay", "dio_delay", "data_delay",
                    "hang_timeout", "entry_timeout", "attr_timeout",
                ):
                    setattr(o, key, float(value))
                elif key == "receive_spin" and 0 <= float(value) <= 10_000:
                    o.receive_spin_us = float(value)
                elif key == "max_tasks":
                    o.max_tasks = int(value)
                elif key == "dsync_pool":
                    o.dsync_pool = 0 if value == "off" else int(value)
                    if not 0 <= o.dsync_pool <= 256:
                        raise ValueError
                elif key in ("nbd_timeout", "nbd_retry") and float(value) > 0:
                    setattr(o.nbd, key[4:], float(value))
                elif key == "nbd_connections" and 1 <= int(value) <= 64:
                    o.nbd.connections = int(value)
                elif key == "nbd_unsafe" and not value:
                    o.nbd.unsafe = True
                elif key == "discard" and not value:
                    o.discard = True
                elif key == "async_dio" and value in ("on", "off"):
                    o.async_dio = value == "on"
                elif key == "xattr" and value in ("on", "off"):
                    o.xattr = value == "on"
                elif key == "sync_dispatch" and value in ("on", "off"):
                    o.sync_dispatch = value == "on"
                elif key == "native_io" and value in ("on", "off"):
                    o.native_io = value == "on"
                elif key == "shootdown" and value in ("unlocked", "locked"):
                    o.shootdown = value
                elif key == "backend" and value in ("raw", "crash", "fault"):
                    o.backend = value
                elif key in ("crash_log", "fault_spec") and value:
                    setattr(o, key, os.path.abspath(value))
                elif key in FUSE_PASSTHROUGH and not value:
                    fuse.append(key)
                elif key in MOUNT8_ONLY and not value:
                    pass
                else:
                    raise DiofsError(f"bad mount option {item!r}")
            except ValueError:
                raise DiofsError(f"bad mount option {item!r}") from None
    if not 0 <= o.entry_timeout <= 1e9 or not 0 <= o.attr_timeout <= 1e9:
        raise DiofsError("entry_timeout and attr_timeout must be between 0 and 1e9 seconds")
    if o.cache_size < 1 << 20:
        raise DiofsError("cache_size must be at least 1M")
    try:
        hang_detector.check_timeout(o.hang_timeout)
    except ValueError as exc:
        raise DiofsError(str(exc)) from None
    if o.backend == "crash" and not o.crash_log:
        raise DiofsError("backend=crash needs crash_log=PATH")
    if o.backend == "fault" and not o.fault_spec:
        raise DiofsError("backend=fault needs fault_spec=PATH")
    o.fuse = tuple(fuse)
    return o


def check_mountpoint(mnt: str) -> None:
    if not os.path.exists(mnt):
        raise DiofsError(f"mountpoint {mnt} does not exist", EXIT_MOUNTPOINT)
    if not os.path.isdir(mnt):
        raise DiofsError(f"mountpoint {mnt} is not a directory", EXIT_MOUNTPOINT)
    if os.path.ismount(mnt):
        raise DiofsError(f"mountpoint {mnt} is busy (already a mount point)", EXIT_MOUNTPOINT)


def mlockall() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        raise DiofsError(f"mlockall failed: {os.strerror(err)}")


def fsname_option(image: str) -> str:
    """`fsname=IMAGE`: the mount's source in mountinfo, `mount` and `df`, and what `umount
    IMAGE` matches. fuse_opt unescapes backslashes, so `\\` and `,` are escaped; pyfuse3
    passes options as ASCII, so a path that is not printable ASCII shows as `diofs`
    (umount.diofs does not need it: it finds the daemon by the mount's device number)."""
    if not (image.isascii() and image.isprintable()):
        return "fsname=diofs"
    return "fsname=" + image.replace("\\", "\\\\").replace(",", "\\,")


class Daemon:
    """Owns the mount's objects; `serve()` is the one trio.run of the process."""

    def __init__(self, image: str, mnt: str, opts: Options, *, mlock: bool) -> None:
        self.mnt = mnt
        self.opts = opts
        self.mlock = mlock
        self.image = image_name(image)
        # one mount per image; held until release(), after the final commit (ImageInUse: 7)
        self._image_lock = image_lock.lock_image(image)
        self.status = daemon_status.Publisher()
        # why the daemon's exit status is not 0; shutdown() clears it after the final commit
        self.final_error: str | None = "the daemon ended before its final commit"
        self.backend = open_backend(
            image, opts.backend, crash_log=opts.crash_log, fault_spec=opts.fault_spec,
            nbd_options=opts.nbd,
        )
        try:
            self.fs = Filesystem.load(self.backend)
        except BaseException:
            self.backend.close()
            raise
        # The metadata is many small long-lived objects (an Inode, its ExtentMap and lists per
        # file). With the default thresholds full collections scan them all, often enough that
        # a create cost ~60% more daemon CPU at 100k files than at 1k (issue 13, bench_meta):
        # what the mount loaded goes to the permanent generation, and collections run 70x
        # less often.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        sb = self.fs.sb
        if opts.dio_align is not None and (
            opts.dio_align < sb.dio_align or opts.dio_align % sb.dio_align
            or opts.dio_align > sb.block_size
        ):
            self.backend.close()
            raise DiofsError(
                f"dio_align={opts.dio_align} must be a multiple of the image's {sb.dio_align} "
                f"and at most the block size {sb.block_size}"
            )

    def build(self) -> None:
        import pyfuse3

        from diofs.ops import Operations

        fs, o = self.fs, self.opts
        self.cache = PageCache(fs.bs, o.cache_size)
        self.kernel = KernelCache()
        inodes = IncoreInodes(fs, self.cache, self.kernel)
        self.durability = Durability(fs, inodes)
        self.writeback = Writeback(
            self.cache, functools.partial(write_back_pages, fs), age_s=o.writeback_age,
            on_error=self.durability.record_writeback_error,
        )
        # the write pool writes to the image fd itself: a plain image only (not through the
        # crash-log or fault-injection wrappers, nor NBD), and a writable one
        pool_fd = self.backend.fd if type(self.backend) is RawImage and self.backend.writable \
            else None
        dio_align = o.dio_align or fs.sb.dio_align
        native = NativeIo(
            fs, self.cache, self.kernel, inodes,
            fd=self.backend.fd if type(self.backend) is RawImage and o.native_io else None,
            align=dio_align, writes=pool_fd is not None and o.dsync_pool > 0,
        )
        self.pool = DurablePool(
            fs, self.cache, inodes, self.kernel, native, threads=o.dsync_pool, fd=pool_fd
        )
        self.io = IoContext(
            fs, self.cache, self.writeback, inodes, FaultMarker(), self.durability, self.kernel,
            self.pool, native,
        )
        self.buffered = Buffered(self.io, fill_delay=o.fill_delay)
        self.direct = Direct(
            self.io, dio_align=dio_align,
            locked_shootdown=o.shootdown == "locked", dio_delay=o.dio_delay,
            mlock=self.mlock,
        )
        fs.data_delay = o.data_delay
        fs.discard_freed = o.discard
        self.ops = Operations(
            self.io, self.buffered, self.direct, xattrs=o.xattr,
            entry_timeout=o.entry_timeout, attr_timeout=o.attr_timeout, async_dio=o.async_dio,
            sync_dispatch=o.sync_dispatch, receive_spin_us=o.receive_spin_us,
        )
        fuse_opts = set(pyfuse3.default_options)
        fuse_opts.discard("default_permissions")
        fuse_opts |= {fsname_option(self.image), "subtype=diofs", "default_permissions", *o.fuse}
        canonical_mnt = os.path.realpath(self.mnt)  # now: once mounted, this would stat us
        # the binding's init-time switches (auto_inval_data off, eager receive, write views,
        # KILLPRIV_V2, async_dio) are attributes of self.ops: diofs/ops.py, class Operations
        pyfuse3.init(self.ops, self.mnt, fuse_opts)
        self.status.publish(self.image, canonical_mnt)  # for umount.diofs
        self.kernel.start()

    async def _periodic_commit(self) -> None:
        while True:
            await trio.sleep(self.opts.commit_interval)
            if self.fs.meta_dirty:
                try:
                    await self.durability.make_durable(metadata=True)
                except OSError as exc:
                    stats.add("errors.commit")
                    log.error("periodic metadata commit failed: %s", exc)

    async def serve(self) -> None:
        import pyfuse3

        async with AsyncExitStack() as stack:
            # inside trio.run, so that its reports include the task tree; a thread, so that it
            # reports when this loop is stuck (diofs/hang_detector.py)
            hangs = hang_detector.HangDetector(self.opts.hang_timeout, mountpoint=self.mnt)
            hangs.start()
            stack.callback(hangs.stop)
            nursery = await stack.enter_async_context(trio.open_nursery())
            await nursery.start(self.writeback.run)
            await nursery.start(self.pool.run)
            nursery.start_soon(self._periodic_commit)
            try:
                await pyfuse3.main(min_tasks=2, max_tasks=self.opts.max_tasks)
            finally:
                with trio.CancelScope(shield=True):
                    await self.shutdown()
                nursery.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Unmount: write everything back, free orphans, commit (durable on return; the image
        is closed and the lock released after, in mount()). Sets `final_error`."""
        error = None
        self.io.native.disarm_all()  # the request loop has ended: none in progress
        await self.pool.stop()  # in-flight O_DSYNC writes land and are drained first
        try:
            await self.writeback.writeback_all()
        except OSError as exc:
            log.error("final writeback failed: %s", exc)
            error = f"final writeback failed ({exc}): data not yet written back is lost"
        self.fs.unmount_cleanup()
        try:
            await self.fs.commit()
        except OSError as exc:  # an image that went away (an NBD server down): exit 1, no crash
            log.error("final commit failed: %s", exc)
            error = error or f"final commit failed ({exc}): the image keeps its last commit"
        if error is None and self.ops.failsafe:
            error = "an internal error made the mount failsafe (see the log); run fsck.diofs"
        self.final_error = error
        if error is None:
            log.info("unmounted cleanly (generation %d)", self.fs.generation)

    def release(self) -> None:
        """The daemon's last steps, in this order: publish the exit status, then release the
        image lock. Whoever waits for the lock or for this process then finds the final commit
        durable (it fdatasyncs before returning) and the status readable."""
        self.status.finish(EXIT_ERROR if self.final_error else 0, self.final_error or "")
        os.close(self._image_lock)


def _daemonize(ready_w: int) -> None:
    """Detach: the parent waits on `ready_w`'s pipe; this process continues as the daemon."""
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def mount(argv: list[str]) -> int:
    p = ArgumentParser(prog="mount.diofs", description=__doc__)
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[], help="mount options")
    p.add_argument("--foreground", "-f", action="store_true", help="serve in the foreground")
    p.add_argument("--bug", action="append", default=[], metavar="NAME",
                   help=f"switch a protection off: {', '.join(bugs.names())}")
    p.add_argument("--log", help="log file (default: stderr in the foreground, else syslog)")
    p.add_argument("--mlock", action="store_true", help="mlockall(MCL_CURRENT|MCL_FUTURE)")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    try:
        bugs.enable(a.bug)
    except ValueError as exc:
        raise DiofsError(str(exc)) from None
    opts = parse_options(a.options)
    mnt = os.path.abspath(a.mountpoint)
    log_file = os.path.abspath(a.log) if a.log else None
    check_mountpoint(mnt)
    if not is_uri(a.image) and not os.path.exists(a.image):
        raise DiofsError(f"image {a.image} does not exist")
    request.check_binding()
    daemon = Daemon(a.image, mnt, opts, mlock=a.mlock)  # ImageCorrupt -> one line, exit 3

    if not a.foreground:
        r, w = os.pipe()
        if os.fork() > 0:  # parent: report the daemon's outcome
            os.close(w)
            msg = b""
            while chunk := os.read(r, 4096):
                msg += chunk
            if msg == b"ok":
                return 0
            sys.stderr.write(f"mount.diofs: {msg.decode(errors='replace') or 'daemon died'}\n")
            return EXIT_MOUNT_FAILED
        os.close(r)
        _daemonize(w)
    else:
        w = -1

    if log_file or a.foreground:
        setup_logging(a.debug, log_file)
    else:  # in the background: syslog as sshfs and rclone do, or nowhere without /dev/log
        setup_logging(a.debug, handler=syslog_handler())
    if log_file:
        crit = open(log_file, "a")  # noqa: SIM115 - lives as long as the process
        faulthandler.register(signal.SIGUSR1, file=crit, all_threads=True)
    elif a.foreground:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        if a.mlock:
            mlockall()
        daemon.build()
    except Exception as exc:
        text = exc.message if isinstance(exc, DiofsError) else f"cannot mount {mnt}: {exc}"
        if w >= 0:
            os.write(w, text.encode())
            os._exit(EXIT_MOUNT_FAILED)
        raise DiofsError(text, EXIT_MOUNT_FAILED) from None
    log.info("mounted %s on %s (bugs: %s)", a.image, mnt, ",".join(bugs.active()) or "none")
    if w >= 0:
        os.write(w, b"ok")
        os.close(w)
    import pyfuse3

    try:
        trio.run(daemon.serve)
    except BaseException as exc:
        log.exception("daemon failed")
        daemon.final_error = f"daemon failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            daemon.kernel.stop()  # before close: the thread may be inside a session call
            pyfuse3.close(unmount=True)
            daemon.backend.close()
        finally:
            daemon.release()
    if daemon.final_error:
        raise DiofsError(daemon.final_error)
    return 0


def main(argv: list[str] | None = None) -> None:
    run_main("mount.diofs", mount, argv)



