"""diofs stats MOUNTPOINT: print the daemon's counters as JSON (SPEC 9).

Transport: the virtual file `.diofs-stats` in the root directory (diofs.ops), read with one
open + read; it is not listed by readdir and not stored in the image.
"""

from __future__ import annotations

import json
import os

from diofs.cli.common import ArgumentParser, run_main
from diofs.errors import DiofsError

STATS_NAME = ".diofs-stats"


def read_stats(mountpoint: str | os.PathLike[str]) -> dict[str, float]:
    path = os.path.join(mountpoint, STATS_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DiofsError(f"{mountpoint} is not a mounted diofs filesystem") from None
    except OSError as exc:
        raise DiofsError(f"cannot read stats of {mountpoint}: {exc.strerror}") from None
    counters: dict[str, float] = json.loads(raw)
    return counters


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
