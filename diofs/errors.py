"""Error types and the exit-code table.

CLI code raises `DiofsError(message, exit_code)`; `main()` wrappers print
`<prog>: <message>` on one line and exit with the code. Filesystem code raises
`FsError(errno)`; only `diofs.ops` turns it into `pyfuse3.FUSEError`.

Exit codes:
    1  generic error (bad arguments, bad input)
    2  usage error (argparse)
    3  image is corrupt, truncated or foreign
    4  fsck found damage (and did not repair it)
    5  mountpoint missing, busy or not a directory
    6  mount failed (daemon did not come up)
    7  image in use: locked by a running daemon, fsck --repair or mkfs (diofs.image_lock)
    8  unmount failed: not a diofs mount, or fusermount3 refused (busy)      [umount.diofs]
    9  unmounted, but the daemon reported a failed final writeback or commit [umount.diofs]
   10  unmounted, but the daemon's final status cannot be known (it died without
       reporting one, or did not exit within --timeout)                      [umount.diofs]
"""

from __future__ import annotations

import errno as _errno

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CORRUPT = 3
EXIT_DAMAGED = 4
EXIT_MOUNTPOINT = 5
EXIT_MOUNT_FAILED = 6
EXIT_IN_USE = 7
EXIT_UNMOUNT_FAILED = 8
EXIT_DAEMON_FAILED = 9
EXIT_STATUS_UNKNOWN = 10


class DiofsError(Exception):
    """An error that ends a command with one line on stderr and a non-zero exit."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ImageCorrupt(DiofsError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_CORRUPT)


class FsError(OSError):
    """A filesystem operation failed with `errno`; ops.py answers the request with it.
    An OSError, so that code catching image errors (writeback, fsync) also sees ENOSPC from
    allocation."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(errno, message or _errno.errorcode.get(errno, str(errno)))
