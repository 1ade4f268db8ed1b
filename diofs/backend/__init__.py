"""The Backend protocol and `open_backend`: where every byte of the image is read and written.

A backend is a synchronous object over one image (a regular file, a block device, or an NBD
export named by a URI: `image_name`, `nbd.is_uri`). The daemon calls it inline on the trio
thread for transfers up to `inline_io_bytes` (a backend attribute; 1 MiB when absent, 0 for
NBD: a network round trip must not stall the loop) and from worker threads
(`trio.to_thread.run_sync`, at most 4) for larger ones and for every flush (fs.Filesystem._io),
so every backend must accept concurrent `read` / `readinto` / `write` / `flush` calls from
several threads. `close()` must not race with
anything: the caller closes only once all I/O has returned.

Kinds (mount option `backend=`):
    raw    `raw.RawImage`: pread / pwrite / fdatasync on the image; for an NBD URI
           `nbd.NbdBackend` instead (NBD_CMD_WRITE / FUA / NBD_CMD_FLUSH through libnbd).
    crash  `crash.CrashBackend`: raw, plus a log of every write and flush from which
           `python -m diofs.backend.crash materialize` rebuilds the image as after a power cut.
    fault  `fault.FaultBackend`: raw, plus errors (EIO, ENOSPC, ...) injected by a JSON spec
           file that tests rewrite while the daemon runs.

Contract shared by all kinds:
    - byte ranges are half-open `[off, off + n)` and must lie inside `[0, size())`, else
      `ValueError` (a caller bug, never an I/O error); `size()` is fixed at open;
    - `read` returns exactly `size` bytes, `readinto` fills `buf` exactly, `write` writes all of
      `data` (short transfers are retried inside);
    - I/O failures raise `OSError` with the image's errno (callers map `exc.errno`);
    - `flush()` makes every write that returned before `flush()` was called durable
      (fdatasync on the image); it says nothing about writes still in progress.
    - `write_durable()` is a write that is durable when it returns (RWF_DSYNC: a flush of
      that range only, as the kernel's O_DSYNC write path does); it says nothing about
      other writes.
    - optional `write_zeroes(off, n)`: a `write` of n zero bytes that sends no zero bytes
      where the image can do better (NBD_CMD_WRITE_ZEROES on a server that offers it); same
      range rule, same durability as `write` (a flush covers it). Callers use the function
      `write_zeroes(backend, off, n)`, which falls back to a plain write for a backend
      without it (crash and fault: their log and their injected errors see a write).
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from diofs.errors import DiofsError

if TYPE_CHECKING:
    from diofs.backend.nbd import NbdOptions

__all__ = ["KINDS", "Backend", "image_name", "is_uri", "open_backend", "write_zeroes"]

KINDS = ("raw", "crash", "fault")


@runtime_checkable
class Backend(Protocol):
    """Synchronous, thread-safe access to one image. See the module docstring for the rules."""

    def read(self, off: int, size: int) -> bytes:
        """Return the `size` bytes at `off`; ValueError if `off + size > self.size()`."""
        ...

    def readinto(self, off: int, buf: memoryview) -> None:
        """Fill `buf` (all of it) with the bytes at `off`; same range rule as `read`."""
        ...

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` at `off`; same range rule as `read`."""
        ...

    def write_durable(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """`write`, durable on return (RWF_DSYNC); other writes stay as they are."""
        ...

    def flush(self) -> None:
        """Make every write that returned before this call durable (fdatasync)."""
        ...

    def size(self) -> int:
        """The image size in bytes (fixed at open)."""
        ...

    def close(self) -> None:
        """Release the image; idempotent. No call may be in progress."""
        ...


def write_zeroes(backend: Backend, off: int, n: int) -> None:
    """Write n zero bytes at `off`: the backend's own `write_zeroes` if it has one, else a
    plain write (module docstring)."""
    fn = getattr(backend, "write_zeroes", None)
    if fn is not None:
        fn(off, n)
    else:
        backend.write(off, bytes(n))


def is_uri(image: str) -> bool:
    """True if `image` names an NBD export rather than a file (see diofs/backend/nbd.py)."""
    from diofs.backend.nbd import is_uri as nbd_is_uri

    return nbd_is_uri(image)


def image_name(image: str) -> str:
    """The image's canonical name: an NBD URI as given, a file's absolute path. It is the
    mount's source (fsname) and what diofs.image_lock locks."""
    return image if is_uri(image) else os.path.abspath(image)


def open_backend(
    path: str,
    kind: str = "raw",
    *,
    crash_log: str | None = None,
    fault_spec: str | None = None,
    writable: bool = True,
    nbd_options: NbdOptions | None = None,
) -> Backend:
    """Open the image at `path` (a file, a block device or an NBD URI) as a backend of `kind`
    ("raw", "crash" or "fault"; an NBD URI supports "raw" only).

    `crash_log` is required for "crash" (the log path; `<crash_log>.base` receives a copy of
    the image as it is now), `fault_spec` for "fault" (a JSON spec path; it may not exist yet),
    `nbd_options` (timeout, retry, unsafe) apply to a URI.
    Every problem (missing image, not a regular file or block device, permission, bad spec,
    unwritable log, unreachable NBD server, one that cannot flush) raises `DiofsError` with a
    one-line message.
    """
    from diofs.backend.raw import RawImage  # local imports: raw has no import-time cost anyway

    if kind not in KINDS:
        raise DiofsError(f"unknown backend {kind!r} (known: {', '.join(KINDS)})")
    if is_uri(path):
        if kind != "raw":
            raise DiofsError(f"backend={kind} needs an image file, not an NBD URI")
        from diofs.backend.nbd import NbdBackend

        return NbdBackend(path, nbd_options, writable=writable)
    if kind == "crash" and not crash_log:
        raise DiofsError("backend=crash needs crash_log=PATH")
    if kind == "fault" and not fault_spec:
        raise DiofsError("backend=fault needs fault_spec=PATH")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DiofsError(f"image {path} does not exist") from None
    except OSError as exc:
        raise DiofsError(f"cannot access image {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DiofsError(f"image {path} is a directory")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise DiofsError(f"image {path} is not a regular file or block device")
    try:
        raw = RawImage(path, writable=writable)
    except PermissionError:
        mode = "read-write" if writable else "reading"
        raise DiofsError(f"cannot open image {path} for {mode}: permission denied") from None
    except OSError as exc:
        raise DiofsError(f"cannot open image {path}: {exc.strerror}") from None
    if kind == "raw":
        return raw
    try:
        if kind == "crash":
            from diofs.backend.crash import CrashBackend

            assert crash_log is not None
            return CrashBackend(raw, crash_log)
        from diofs.backend.fault import FaultBackend

        assert fault_spec is not None
        return FaultBackend(raw, fault_spec)
    except BaseException:
        raw.close()
        raise
