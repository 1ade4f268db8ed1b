"""--bug no-sync-flush: O_DSYNC writes are acknowledged before the image is flushed, so a power
cut loses writes the application was told were durable (SPEC 6, seed 001).

fio, libaio QD16, `--direct=1 --sync=dsync`, random 4 KiB writes of unique random data over a
pre-written, fsync'ed file, on the crash-simulating backend. The kernel sends no FSYNC for these
asynchronous non-extending O_DSYNC direct writes (fuse-facts row 4): only the daemon can flush.
What fio was acknowledged is the file as read through the mount when fio has exited. Then a
power cut at the end of the log (every write not followed by a flush is lost), the cut image
is mounted, and its blocks are compared with the acknowledged ones.
"""

from __future__ import annotations

import json
import os
from typing import Any

from diofs.backend import crash

BUG = "no-sync-flush"
TITLE = "acknowledged O_DSYNC writes lost at a power cut"
BAD_KEY = "lost_acknowledged_blocks"
BS = 4096
FILE_BLOCKS = 2048  # 8 MiB
WRITES = 1024  # fio's random map: each block at most once


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    m = factory(size="64M", opts={"backend": "crash", "crash_log": "PENDING",
                                  "writeback_age": 3600, "commit_interval": 3600},
                bugs=[BUG] if bug_on else [], mount=False)
    log = str(m.workdir / "crash.log")
    m.opts["crash_log"] = log
    m.start()
    path = m.path("data")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, bytes(FILE_BLOCKS * BS), 0)  # zeros: never equal to fio's random data
        os.fsync(fd)
    finally:
        os.close(fd)
    argv = ["fio", "--name=dsync", f"--filename={path}", "--rw=randwrite", f"--bs={BS}",
            f"--size={FILE_BLOCKS * BS}", f"--io_size={WRITES * BS}", "--ioengine=libaio",
            "--iodepth=16", "--direct=1", "--sync=dsync", "--refill_buffers",
            "--randrepeat=0", "--output-format=json"]
    res = m.run(argv, timeout=120)
    if res.timed_out or res.returncode != 0:
        raise RuntimeError(f"fio failed: {res.stderr.strip()[-200:]}")
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    with open(path, "rb") as f:
        acknowledged = f.read()
    stats = m.stats()
    end_pos = os.stat(log).st_size  # the power cut: right after fio, before unmount
    m.unmount()

    cl = crash.load_log(log)
    cut = cl.records_before(end_pos)
    img = m.workdir / "after-power-cut.img"
    crash.materialize(cl, str(img), cut, mode="drop")
    after = factory(image=img)  # mount the image as the power cut left it
    with open(after.path("data"), "rb") as f:
        survived = f.read()
    after.unmount()

    def block(data: bytes, i: int) -> bytes:
        return data[i * BS : (i + 1) * BS]

    acked = [i for i in range(FILE_BLOCKS) if block(acknowledged, i) != bytes(BS)]
    lost = [i for i in acked if block(survived, i) != block(acknowledged, i)]
    return {
        "fio_writes_acknowledged": int(job["write"]["total_ios"]),
        "distinct_blocks_acknowledged": len(acked),
        "lost_acknowledged_blocks": len(lost),
        "image_flushes": int(stats.get("durability.flushes", 0)),
        "fio_iops": round(job["write"]["iops"]),
    }
