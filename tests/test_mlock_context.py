"""SPEC 7 (seed 000): with --mlock the daemon is mlockall'd and each O_DIRECT handle reuses one
direct-I/O context, so sequential direct reads allocate no new buffers."""

from __future__ import annotations

import mmap
import os

import pytest

CHUNK = 1 << 20
N = 64


def sequential_direct_reads(path: str) -> bytes:
    buf = mmap.mmap(-1, CHUNK)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = []
        for i in range(N):
            assert os.preadv(fd, [buf], i * CHUNK) == CHUNK
            out.append(buf[:16])
        return b"".join(out)
    finally:
        os.close(fd)


def write_numbered_chunks(path: str) -> bytes:
    with open(path, "wb") as f:
        for i in range(N):
            f.write(i.to_bytes(16, "little") * (CHUNK // 16))
    return b"".join(i.to_bytes(16, "little") for i in range(N))


@pytest.mark.parametrize("mlock", [True, False], ids=["mlock", "no-mlock"])
def test_direct_reads_reuse_one_context_per_handle(mount_factory, mlock):
    m = mount_factory(size="128M", extra_args=["--mlock"] if mlock else [])
    path = m.path("f")
    want = write_numbered_chunks(path)
    before = m.stats()
    assert sequential_direct_reads(path) == want
    after = m.stats()
    allocs = after.get("dio.buffer_allocs", 0) - before.get("dio.buffer_allocs", 0)
    reuses = after.get("dio.context_reuses", 0) - before.get("dio.context_reuses", 0)
    if mlock:
        assert allocs == 0 and reuses == N
        assert after.get("dio.contexts", 0) - before.get("dio.contexts", 0) == 1
        with open(f"/proc/{m.daemon.pid}/status") as f:
            locked_kb = int(next(line for line in f if line.startswith("VmLck:")).split()[1])
        assert locked_kb > 0, "mlockall did not lock the daemon's memory"
    else:
        assert allocs == N and reuses == 0
