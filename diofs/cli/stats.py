"""diofs stats MOUNTPOINT: print the daemon's counters as JSON (SPEC 9).

Transport: the root directory's extended attribute `user.diofs.stats` (diofs.ops).
"""

from __future__ import annotations

import errno
import json
import os

from diofs.cli.common import ArgumentParser, run_main
from diofs.errors import DiofsError

STATS_XATTR = "user.diofs.stats"


def read_stats(mountpoint: str) -> dict[str, float]:
    try:
        raw = os.getxattr(mountpoint, STATS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            raise DiofsError(f"{mountpoint} is not a mounted diofs filesystem") from None
        raise DiofsError(f"cannot read stats of {mountpoint}: {exc.strerror}") from None
    return json.loads(raw)


def stats_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="diofs", description="diofs tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats", help="print run-time counters of a mounted diofs as JSON")
    s.add_argument("mountpoint")
    a = p.parse_args(argv)
    print(json.dumps(read_stats(a.mountpoint), indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> None:
    run_main("diofs", stats_main, argv)
