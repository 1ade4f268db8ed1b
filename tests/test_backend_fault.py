"""Unit tests of the fault-injecting backend: rules, run-time re-reads, the .fired sidecar."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from diofs.backend import open_backend
from diofs.backend.fault import parse_spec, read_fired, write_spec
from diofs.errors import DiofsError

MiB = 1 << 20


@pytest.fixture
def spec(tmp_path):
    return str(tmp_path / "faults.json")


def errno_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return None


def test_missing_spec_means_no_faults(blank_file, spec):
    b = open_backend(blank_file, "fault", fault_spec=spec)
    try:
        b.write(0, b"x" * 4096)
        b.flush()
        assert b.read(0, 4096) == b"x" * 4096
        assert read_fired(spec) == {
            "total": 0,
            "by_op": {"read": 0, "write": 0, "flush": 0},
            "rules": [],
            "spec_hash": read_fired(spec)["spec_hash"],
        }
    finally:
        b.close()


def test_eio_after_skip_then_forever(blank_file, spec):
    write_spec(spec, [{"op": "write", "errno": "EIO", "skip": 2}])
    b = open_backend(blank_file, "fault", fault_spec=spec)
    try:
        got = [errno_of(b.write, 4096 * i, bytes([i + 1]) * 4096) for i in range(5)]
        assert got == [None, None, errno.EIO, errno.EIO, errno.EIO]
        # a failing write writes nothing
        assert b.read(2 * 4096, 3 * 4096) == b"\0" * (3 * 4096)
        assert b.read(0, 4096) == b"\1" * 4096
        assert errno_of(b.read, 0, 10) is None and errno_of(b.flush) is None
        fired = read_fired(spec)
        assert fired["total"] == 3 and fired["by_op"]["write"] == 3 and fired["rules"] == [3]
    finally:
        b.close()


def test_enospc_only_on_its_range(blank_file, spec):
    write_spec(spec, [{"op": "write", "errno": "ENOSPC", "offset_min": MiB, "offset_max": 2 * MiB}])
    b = open_backend(blank_file, "fault", fault_spec=spec)
    try:
        assert errno_of(b.write, 0, b"a" * 4096) is None
        assert errno_of(b.write, MiB - 4096, b"a" * 4096) is None  # ends at offset_min
        assert errno_of(b.write, MiB - 1, b"ab") == errno.ENOSPC  # straddles offset_min
        assert errno_of(b.write, MiB + 12345, b"a") == errno.ENOSPC
        assert errno_of(b.write, 2 * MiB - 1, b"a") == errno.ENOSPC
        assert errno_of(b.write, 2 * MiB, b"a" * 4096) is None  # offset_max is exclusive
        assert errno_of(b.read, MiB, 4096) is None  # reads are another op
        assert read_fired(spec)["by_op"] == {"read": 0, "write": 3, "flush": 0}
    finally:
        b.close()


def test_count_exhausts(blank_file, spec):
    write_spec(
        spec,
        [
            {"op": "read", "errno": "EIO", "skip": 1, "count": 2},
            {"op": "flush", "errno": "EIO", "count": 1},
        ],
    )
    b = open_backend(blank_file, "fault", fault_spec=spec)
    try:
        buf = memoryview(bytearray(512))
        got = [errno_of(b.readinto, 0, buf) for _ in range(2)] + [
            errno_of(b.read, 0, 512) for _ in range(3)
        ]
        assert got == [None, errno.EIO, errno.EIO, None, None]
        assert [errno_of(b.flush) for _ in range(3)] == [errno.EIO, None, None]
        assert read_fired(spec)["rules"] == [2, 1]
        assert read_fired(spec)["total"] == 3
    finally:
        b.close()


def test_spec_is_reread_at_run_time(blank_file, spec):
    b = open_backend(blank_file, "fault", fault_spec=spec)
    try:
        assert errno_of(b.write, 0, b"x") is None
        write_spec(spec, [{"op": "write", "errno": "EIO", "count": 1}])
        assert errno_of(b.write, 0, b"x") == errno.EIO
        assert errno_of(b.write, 0, b"x") is None
        # identical rules rewritten (new inode, new mtime): counters persist
        write_spec(spec, [{"op": "write", "errno": "EIO", "count": 1}])
        assert errno_of(b.write, 0, b"x") is None
        # same content, other formatting, rewritten in place: counters persist
        with open(spec, "w") as f:
            f.write('{ "rules" : [ {"count": 1, "errno": "EIO", "op": "write"} ] }\n')
        assert errno_of(b.write, 0, b"x") is None
        # changed rules: counters start afresh
        write_spec(spec, [{"op": "write", "errno": "EIO", "count": 1, "name": "again"}])
        assert errno_of(b.write, 0, b"x") == errno.EIO
        assert errno_of(b.write, 0, b"x") is None
        assert read_fired(spec)["total"] == 2
        # removing the spec removes the faults
        write_spec(spec, [{"op": "write", "errno": "EROFS"}])
        assert errno_of(b.write, 0, b"x") == errno.EROFS
        os.unlink(spec)
        assert errno_of(b.write, 0, b"x") is None
    finally:
        b.close()


def test_a_spec_that_does_not_parse_keeps_the_previous_rules(blank_file, spec, caplog):
    write_spec(spec, [{"op": "write", "errno": "EIO"}])
    b = open_backend(blank_file, "fault", fault_spec=spec)
    try:
        with open(spec, "w") as f:
            f.write('{"rules": [')  # a half-written file
        assert errno_of(b.write, 0, b"x") == errno.EIO
        assert "ignored" in caplog.text
        with open(spec, "w") as f:
            json.dump({"rules": []}, f)
        os.utime(spec, ns=(time.time_ns() + 10**9,) * 2)
        assert errno_of(b.write, 0, b"x") is None
    finally:
        b.close()


def test_delay_rule_slows_without_failing(blank_file, spec):
    write_spec(spec, [{"op": "flush", "errno": None, "delay_ms": 50, "count": 1}])
    b = open_backend(blank_file, "fault", fault_spec=spec)
    try:
        t0 = time.monotonic()
        b.flush()
        assert time.monotonic() - t0 >= 0.045
        assert read_fired(spec)["total"] == 0
    finally:
        b.close()


@pytest.mark.parametrize(
    "bad",
    [
        "[]",
        '{"rules": [{"op": "trim", "errno": "EIO"}]}',
        '{"rules": [{"op": "write", "errno": "EWHAT"}]}',
        '{"rules": [{"op": "write", "errno": "EIO", "skipp": 1}]}',
        '{"rules": [{"op": "write", "errno": "EIO", "offset_min": 10, "offset_max": 5}]}',
        '{"rules": [{"op": "write"}]}',
        '{"rules": [{"op": "write", "errno": "EIO", "count": -1}]}',
    ],
)
def test_bad_spec_at_open_is_a_one_line_error(blank_file, spec, bad):
    with open(spec, "w") as f:
        f.write(bad)
    with pytest.raises(ValueError):
        parse_spec(bad)
    with pytest.raises(DiofsError, match="bad fault spec") as exc:
        open_backend(blank_file, "fault", fault_spec=spec)
    assert "\n" not in exc.value.message
