"""Unit tests of the raw image backend and of open_backend's one-line errors."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from diofs.backend import Backend, open_backend
from diofs.backend.raw import RawImage
from diofs.errors import DiofsError

MiB = 1 << 20


def test_write_read_round_trip(blank_file):
    b = open_backend(blank_file)
    try:
        assert isinstance(b, Backend)
        assert b.size() == 4 * MiB
        payload = os.urandom(12345)
        b.write(1000, payload)
        assert b.read(1000, len(payload)) == payload
        buf = bytearray(len(payload) + 10)
        b.readinto(995, memoryview(buf))
        assert bytes(buf) == b"\0" * 5 + payload + b"\0" * 5
        b.write(0, memoryview(bytearray(b"xy")))
        b.flush()
        assert b.read(0, 2) == b"xy"
    finally:
        b.close()
    with open(blank_file, "rb") as f:
        f.seek(1000)
        assert f.read(len(payload)) == payload


def test_ranges_outside_the_image_are_value_errors(blank_file):
    b = RawImage(blank_file)
    try:
        with pytest.raises(ValueError):
            b.read(4 * MiB - 10, 11)
        with pytest.raises(ValueError):
            b.readinto(-1, memoryview(bytearray(1)))
        with pytest.raises(ValueError):
            b.write(4 * MiB, b"x")
        assert b.read(4 * MiB - 10, 10) == b"\0" * 10
        assert b.read(4 * MiB, 0) == b""
    finally:
        b.close()
        b.close()  # idempotent


def test_readonly_backend_refuses_writes(blank_file):
    b = open_backend(blank_file, writable=False)
    try:
        with pytest.raises(OSError) as exc:
            b.write(0, b"x")
        assert exc.value.errno == errno.EROFS
        assert b.read(0, 1) == b"\0"
    finally:
        b.close()


def test_concurrent_writers_and_readers(blank_file):
    b = RawImage(blank_file)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            chunk = bytes([k]) * 4096
            for i in range(64):
                off = (k * 64 + i) * 4096
                b.write(off, chunk)
                assert b.read(off, 4096) == chunk
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    assert not errors
    with open(blank_file, "rb") as f:
        for k in range(8):
            assert f.read(64 * 4096) == bytes([k]) * (64 * 4096)


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("missing", "does not exist"),
        ("dir", "is a directory"),
        ("fifo", "not a regular file or block device"),
    ],
)
def test_open_backend_errors_are_one_line(tmp_path, setup, needle):
    path = tmp_path / "x"
    if setup == "dir":
        path.mkdir()
    elif setup == "fifo":
        os.mkfifo(path)
    with pytest.raises(DiofsError) as exc:
        open_backend(str(path))
    assert needle in exc.value.message
    assert "\n" not in exc.value.message


def test_open_backend_permission_error(blank_file):
    os.chmod(blank_file, 0o444)
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    with pytest.raises(DiofsError, match="permission denied"):
        open_backend(blank_file)


def test_open_backend_rejects_bad_kinds_and_missing_paths(blank_file):
    with pytest.raises(DiofsError, match="unknown backend"):
        open_backend(blank_file, "nbd")
    with pytest.raises(DiofsError, match="crash_log"):
        open_backend(blank_file, "crash")
    with pytest.raises(DiofsError, match="fault_spec"):
        open_backend(blank_file, "fault")
