"""--bug native-read-armed: the binding answers O_DIRECT reads of a file in the steady state
with its own copy of the file's extents (diofs/native_io.py, binding patch 0014); without
the disarm on exclusive operations and extent changes, that copy outlives a punch hole and a
truncate, and the reads return bytes the file no longer has: the punched range's old bytes
(or another file's, once an allocation reused the freed blocks), and the old bytes of a range
that a truncate cut off and a second truncate brought back as a hole (docs/concurrency.md race
22; seed 003: no read exposes a block the file has not written).

The workload: a 1 MiB file of "SECRET" bytes written with O_DIRECT and fsynced; one O_DIRECT
descriptor reads it block by block (the handle is armed); through another descriptor, the
second half is punched out and the punch committed, a second file of "OTHER" bytes is
written, and the first file is truncated to 100 KiB and back to 512 KiB. The armed
descriptor then reads the punched range and the range the truncates cut off and brought back
(zeros expected in both; the kernel itself stops reads at its i_size). It prints what came
back.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from harness.io import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, aligned, fallocate  # noqa: E402

BUG = "native-read-armed"
TITLE = "O_DIRECT reads after a punch hole and a truncate return bytes the file no longer has"
BAD_KEY = "bytes_the_file_no_longer_has"

BS = 4096
SIZE = 1 << 20
HALF = SIZE // 2
NEW_END = 100 << 10


def _read_blocks(fd: int, start: int, end: int) -> bytes:
    out = []
    with aligned(BS) as buf:
        for off in range(start, end, BS):
            n = os.preadv(fd, [buf], off)
            out.append(bytes(buf[:n]))
    return b"".join(out)


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    m = factory(size="16M", bugs=[BUG] if bug_on else [])
    path, other = m.path("secret"), m.path("other")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        with aligned(SIZE, b"SECRET" * (SIZE // 6) + b"SECRET"[: SIZE % 6]) as buf:
            os.pwrite(fd, buf, 0)
        os.fsync(fd)
        armed = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            _read_blocks(armed, 0, SIZE)  # the steady state: the handle is armed
            native_before = m.stats().get("dio.native_reads", 0)
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, HALF, HALF)
            os.fsync(fd)  # the punch committed: its blocks are free again
            with aligned(HALF, b"OTHER" * (HALF // 5) + b"OTHER"[: HALF % 5]) as buf:
                ofd = os.open(other, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
                try:
                    os.pwrite(ofd, buf, 0)
                    os.fsync(ofd)
                finally:
                    os.close(ofd)
            punched = _read_blocks(armed, HALF, SIZE)
            os.ftruncate(fd, NEW_END)
            os.ftruncate(fd, HALF)
            cut_off = _read_blocks(armed, NEW_END, HALF)
        finally:
            os.close(armed)
    finally:
        os.close(fd)
    punched_bad = len(punched) - punched.count(0)
    cut_off_bad = len(cut_off) - cut_off.count(0)
    return {
        "native_reads_before_punch": int(native_before),
        "punched_range_bytes_not_zero": punched_bad,
        "of_which_other_files_bytes": punched.count(b"OTHER") * 5,
        "truncated_range_bytes_not_zero": cut_off_bad,
        "bytes_the_file_no_longer_has": punched_bad + cut_off_bad,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from demolib import compare

    sys.exit(0 if compare(sys.modules[__name__]) else 1)
