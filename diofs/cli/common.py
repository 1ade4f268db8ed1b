"""What every command shares: one-line errors, exit codes (diofs.errors), size parsing, and
the daemon's log handlers (file, stderr, syslog)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from diofs.errors import EXIT_ERROR, EXIT_USAGE, DiofsError

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtKMGT]?)(i?[bB])?\s*$")


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise DiofsError(f"bad size {text!r} (use a number with an optional K, M, G or T suffix)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors on one line."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message}\n")
        sys.exit(EXIT_USAGE)


def run_main(prog: str, fn: Callable[[list[str]], int | None], argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = fn(args)
    except DiofsError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"{prog}: {exc.message}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        sys.exit(130)
    except OSError as exc:
        if debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"{prog}: {exc.strerror or exc}{where}\n")
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # never a traceback without --debug
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"{prog}: internal error: {exc!r} (run with --debug for details)\n")
        sys.exit(EXIT_ERROR)
    sys.exit(code or 0)


class _ForgottenReplyFilter(logging.Filter):
    """Downgrade pyfuse3's "fuse_<op>(): fuse_reply_* failed with No such file or directory"
    from ERROR to INFO. ENOENT on a reply means the kernel no longer knows the request: it was
    aborted by the unmount (a file closed just before `fusermount -u` sends an asynchronous
    RELEASE that the unmount can abort after the daemon has read it) or interrupted. Nothing
    is lost: the daemon already did the work. Seen in tests as a rare teardown log error."""

    _ENOENT = re.compile(r"fuse_reply_\* failed with No such file or directory")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and self._ENOENT.search(record.getMessage()):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


SYSLOG_SOCKET = "/dev/log"


class SyslogLines(logging.handlers.SysLogHandler):
    """SysLogHandler that sends each line of a record as a message of its own, and waits for a
    slow server only for a bounded time.

    Lines: a multi-line record (a traceback, a hang report) sent whole becomes one line with
    `#012` in it at rsyslog, cut at its message size (8 KiB by default); the kernel's hung_task
    writes one printk per line for the same reason.

    Bounded waits: the server's queue holds few datagrams (`net.unix.max_dgram_qlen`, 10 unless
    raised; systemd raises it to 512), so a report of a hundred lines outruns it: a line waits
    up to LINE_WAIT_S for room, a record RECORD_WAIT_S in all, and what does not fit is dropped.
    A server that made us wait that long is taken as stalled for STALL_S: lines that find no
    room then are dropped at once, so that a stuck syslog daemon costs messages, never a
    stalled request. A missing or restarted server is retried at the next line, as
    SysLogHandler does.
    """

    LINE_WAIT_S = 0.1
    RECORD_WAIT_S = 1.0
    STALL_S = 10.0

    socket: Any  # set by SysLogHandler (missing from its type stub)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._stalled_until = 0.0
        self.dropped = 0  # lines dropped because the server had no room
        super().__init__(*args, **kwargs)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prio = f"<{self.encodePriority(self.facility, self.mapPriority(record.levelname))}>"
            lines = self.format(record).splitlines() or [""]
            deadline = time.monotonic() + self.RECORD_WAIT_S
            for n, line in enumerate(lines):
                if not self._send(f"{prio}{self.ident}{line}".encode(errors="replace"), deadline):
                    self.dropped += len(lines) - n
                    return
        except Exception:
            self.handleError(record)

    def _send(self, packet: bytes, deadline: float) -> bool:
        """Send one datagram; False if the server had no room in time (the line is dropped)."""
        for retry in (False, True):
            if retry or self.socket is None:
                with contextlib.suppress(OSError):
                    self.socket.close()
                self.createSocket()
            now = time.monotonic()
            wait = 0.0 if now < self._stalled_until else min(self.LINE_WAIT_S, deadline - now)
            try:
                self.socket.settimeout(max(wait, 0.0))  # 0: non-blocking
                self.socket.send(packet)
                return True
            except (BlockingIOError, TimeoutError):
                if wait > 0:
                    self._stalled_until = time.monotonic() + self.STALL_S
                return False
            except OSError:
                if retry:
                    raise
        return False


def syslog_handler(address: str = SYSLOG_SOCKET) -> logging.Handler:
    """The background daemon's handler: syslog through `address` with ident `diofs[PID]: `
    (call it after the fork: the pid is the daemon's), facility daemon; a handler that drops
    everything if `address` does not exist, as before syslog logging."""
    if not os.path.exists(address):
        return logging.NullHandler()
    handler = SyslogLines(
        address, facility=logging.handlers.SysLogHandler.LOG_DAEMON, socktype=socket.SOCK_DGRAM
    )
    handler.ident = f"diofs[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    return handler


def setup_logging(
    debug: bool, log_file: str | None = None, *, handler: logging.Handler | None = None
) -> None:
    """Log to `handler` if given, else to `log_file`, else to stderr."""
    logging.getLogger("pyfuse3").addFilter(_ForgottenReplyFilter())
    if handler is None:
        handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
