"""What every command shares: one-line errors, exit codes (diofs.errors), size parsing."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

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


def setup_logging(debug: bool, log_file: str | None = None) -> None:
    logging.getLogger("pyfuse3").addFilter(_ForgottenReplyFilter())
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
