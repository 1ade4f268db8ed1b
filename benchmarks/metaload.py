"""Metadata workload: create (with 100 bytes of data), stat, unlink N small files.

Run as a child process by the runner (``python metaload.py DIR N``) so that a hung mount can
be dealt with by the watchdog; prints one JSON line with the figures. Three phases, each over
all N files, timed separately; ``ops_per_s`` counts create, stat and unlink as one op each.
DIR must not exist; it is created and removed.
"""

from __future__ import annotations

import json
import os
import sys
import time


def run(directory: str, n: int) -> dict[str, float]:
    os.mkdir(directory)
    data = b"m" * 100
    names = [os.path.join(directory, f"f{i:06d}") for i in range(n)]
    t0 = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, data)
        os.close(fd)
    t1 = time.perf_counter()
    for p in names:
        if os.stat(p).st_size != len(data):
            raise RuntimeError(f"{p}: wrong size after create")
    t2 = time.perf_counter()
    for p in names:
        os.unlink(p)
    t3 = time.perf_counter()
    os.rmdir(directory)
    total = t3 - t0
    return {
        "files": n,
        "create_s": t1 - t0,
        "stat_s": t2 - t1,
        "unlink_s": t3 - t2,
        "elapsed_s": total,
        "ops_per_s": 3 * n / total,
        "files_per_s": n / total,
    }


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], int(sys.argv[2]))))
