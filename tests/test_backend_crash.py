"""Unit tests of the crash-simulating backend and of the off-line cut-point materializer."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from diofs.backend import crash, open_backend
from diofs.backend.crash import SECTOR, Kind
from diofs.errors import DiofsError

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def base_file(tmp_path):
    """The backend's base file: SIZE bytes, b"B" * 8192 at 0 (not a diofs image)."""
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(0)
        f.write(b"B" * 8192)  # the state at mount, in the base
    return str(path)


def read_at(path: str, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


# A script of operations: ("w", offset, data) or ("f",).
SCRIPT = [
    ("w", 0, b"a" * 4096),
    ("w", 8192, b"b" * 1024),
    ("f",),
    ("w", 0, b"c" * 512),  # overwrites part of a durable write
    ("w", 20000, b"d" * 3000),
    ("f",),
    ("w", 4096, b"e" * 8192),
    ("w", 4096, b"f" * 100),  # overlapping in-flight writes
]


def run_script(base_file: str, log: str, script=SCRIPT) -> None:
    b = open_backend(base_file, "crash", crash_log=log)
    try:
        for step in script:
            if step[0] == "w":
                b.write(step[1], step[2])
                assert b.read(step[1], len(step[2])) == step[2]  # reads its own writes
            else:
                b.flush()
    finally:
        b.close()


def model(base: bytes, writes) -> bytes:
    img = bytearray(base)
    for off, data in writes:
        img[off : off + len(data)] = data
    return bytes(img)


WINDOW = 40000  # every script write lies in [0, WINDOW)


def test_log_records_every_write_and_flush(base_file, tmp_path):
    log = str(tmp_path / "log")
    run_script(base_file, log)
    cl = crash.load_log(log)
    assert [r.kind for r in cl.records] == [
        Kind.FLUSH if s[0] == "f" else Kind.WRITE for s in SCRIPT
    ]
    assert cl.n_points == len(SCRIPT) + 1
    assert cl.truncated_bytes == 0
    assert cl.image_size == SIZE
    assert cl.info()["writes"] == 6 and cl.info()["flushes"] == 2
    assert cl.data(cl.records[1]) == b"b" * 1024
    assert crash.cut_points(log) == list(range(len(SCRIPT) + 1))
    assert read_at(cl.base_path, 0, 8193) == b"B" * 8192 + b"\0"


@pytest.mark.parametrize("mode", ["drop", "all"])
def test_materialize_every_cut_point_exactly(base_file, tmp_path, mode):
    log = str(tmp_path / "log")
    base = read_at(base_file, 0, WINDOW)
    run_script(base_file, log)
    out = str(tmp_path / "out")
    for cut in range(len(SCRIPT) + 1):
        issued = SCRIPT[:cut]
        last_flush = max((i for i, s in enumerate(issued) if s[0] == "f"), default=-1)
        durable = [(s[1], s[2]) for s in issued[: max(last_flush, 0)] if s[0] == "w"]
        inflight = [(s[1], s[2]) for s in issued[last_flush + 1 :] if s[0] == "w"]
        want = model(base, durable + (inflight if mode == "all" else []))
        plan = crash.materialize(log, out, cut, mode=mode)
        assert os.path.getsize(out) == SIZE
        assert read_at(out, 0, WINDOW) == want, f"cut {cut}"
        assert len(plan.durable) == len(durable) and len(plan.in_flight) == len(inflight)
    # the last cut point with every in-flight write landing is the image itself
    crash.materialize(log, out, len(SCRIPT), mode="all")
    assert read_at(out, 0, SIZE) == read_at(base_file, 0, SIZE)


def random_script(rng: random.Random, n: int):
    script = []
    for _ in range(n):
        if rng.random() < 0.2:
            script.append(("f",))
        else:
            off = rng.randrange(0, 64) * 256  # unaligned starts too
            script.append(("w", off, os.urandom(rng.randrange(1, 6000))))
    return script


def test_random_mode_tears_only_at_sector_boundaries_and_keeps_flushed_data(base_file, tmp_path):
    """Each in-flight write lands whole, not at all, or as a prefix ending on a sector boundary;
    everything written before the last flush is always present."""
    rng = random.Random(1)
    script = random_script(rng, 60)
    log = str(tmp_path / "log")
    base = read_at(base_file, 0, 64 * 256 + 6000)
    run_script(base_file, log, script)
    cl = crash.load_log(log)
    out = str(tmp_path / "out")
    seen_torn = 0
    for cut in crash.cut_points(cl):
        for seed in range(3):
            plan = crash.materialize(cl, out, cut, rng=random.Random(seed))
            got = read_at(out, 0, len(base))
            for rec, n in plan.landed:
                assert 0 < n <= rec.length
                if n < rec.length:
                    seen_torn += 1
                    assert (rec.offset + n) % SECTOR == 0
            # rebuild the expectation from the plan and compare byte for byte
            writes = [(r.offset, cl.data(r)) for r in plan.durable]
            writes += [(r.offset, cl.data(r)[:n]) for r, n in plan.landed]
            assert got == model(base, writes)
            # durable = every write before the last flush preceding the cut, in log order
            f = cl.last_flush_before(cut)
            assert plan.durable == [r for r in cl.records[: max(f, 0)] if r.kind is Kind.WRITE]
            assert {r.seq for r, _ in plan.landed} <= {r.seq for r in plan.in_flight}
    assert seen_torn > 0


def test_flushed_data_present_at_every_later_cut(base_file, tmp_path):
    """A write followed by a flush is in the image at every cut after the flush, whatever
    happens to later in-flight writes elsewhere."""
    script = [("w", 0, b"x" * 4096), ("f",)]
    script += [("w", 65536 + 4096 * i, os.urandom(4096)) for i in range(10)]
    script += [("f",), ("w", 0, b"y" * 512)]
    log = str(tmp_path / "log")
    run_script(base_file, log, script)
    out = str(tmp_path / "out")
    for cut in range(2, len(script) + 1):
        for mode in crash.MODES:
            crash.materialize(log, out, cut, mode=mode)
            head = read_at(out, 0, 4096)
            if cut < len(script):
                assert head == b"x" * 4096
            else:  # the last write is in flight: y may land over x, whole or torn
                assert head in {b"y" * k + b"x" * (4096 - k) for k in (0, 512)}
    crash.materialize(log, out, 1, mode="all")
    assert read_at(out, 0, 4096) == b"x" * 4096  # in flight, landed
    crash.materialize(log, out, 1, mode="drop")
    assert read_at(out, 0, 4096) == b"B" * 4096  # in flight, dropped: the base


def test_truncated_last_record_is_tolerated(base_file, tmp_path):
    log = str(tmp_path / "log")
    run_script(base_file, log)
    full = crash.load_log(log)
    last = full.records[-1]
    with open(log, "rb") as f:
        data = f.read()
    for keep in (last.end_pos - 1, last.data_pos + 1, last.data_pos - 5):
        with open(log, "wb") as f:
            f.write(data[:keep])
        cl = crash.load_log(log)
        assert cl.records == full.records[:-1]
        assert cl.truncated_bytes == keep - full.records[-2].end_pos
        crash.materialize(cl, str(tmp_path / "out"), cl.n_points - 1, mode="all")
    with open(log, "wb") as f:  # garbage after the last complete record
        f.write(data + b"\xff" * 100)
    assert crash.load_log(log).records == full.records


def test_log_is_readable_while_the_backend_is_open(base_file, tmp_path):
    log = str(tmp_path / "log")
    b = open_backend(base_file, "crash", crash_log=log)
    try:
        b.write(0, b"z" * 4096)
        assert crash.load_log(log).writes == 1
        b.flush()
        size_after_flush = os.stat(log).st_size
        b.write(4096, b"q" * 4096)
        cl = crash.load_log(log)
        assert len(cl.records) == 3
        assert cl.records_before(size_after_flush) == 2
    finally:
        b.close()


def test_not_a_log_is_a_value_error(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"hello world, this is not a crash log at all")
    with pytest.raises(ValueError):
        crash.load_log(str(p))


def test_unwritable_crash_log_is_a_one_line_error(base_file, tmp_path):
    with pytest.raises(DiofsError, match="cannot create crash log"):
        open_backend(base_file, "crash", crash_log=str(tmp_path / "no" / "such" / "log"))


def test_cli_info_and_materialize(base_file, tmp_path):
    log = str(tmp_path / "log")
    run_script(base_file, log)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "diofs.backend.crash"]
    r = subprocess.run(cmd + ["info", log], capture_output=True, text=True, check=True)
    info = json.loads(r.stdout)
    assert info["records"] == len(SCRIPT) and info["writes"] == 6 and info["flushes"] == 2
    assert info["bytes"] == sum(len(s[2]) for s in SCRIPT if s[0] == "w")
    r = subprocess.run(
        cmd + ["materialize", log, out, "--cut", "-1", "--mode", "all"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(r.stdout)["landed"] == 2
    assert read_at(out, 0, SIZE) == read_at(base_file, 0, SIZE)
    r = subprocess.run(
        cmd + ["materialize", log, out, "--cut", "99"], capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "outside" in r.stderr


def test_concurrent_writers_log_in_image_order(base_file, tmp_path):
    """With writes racing from several threads over the same blocks, replaying the whole log
    gives exactly the final image: log order is the order writes reached the image."""
    import threading

    log = str(tmp_path / "log")
    b = open_backend(base_file, "crash", crash_log=log)

    def worker(k: int) -> None:
        rng = random.Random(k)
        for i in range(300):
            b.write(rng.randrange(0, 16) * 2048, bytes([k * 16 + i % 16]) * 4096)
            if i % 50 == 0:
                b.flush()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    cl = crash.load_log(log)
    assert cl.writes == 1200 and cl.flushes == 24
    out = str(tmp_path / "out")
    crash.materialize(cl, out, cl.n_points - 1, mode="all")
    assert read_at(out, 0, SIZE) == read_at(base_file, 0, SIZE)
