"""O_DIRECT reads answered by the binding without Python (diofs/native_io.py, issue 15).

After `ARM_AFTER` inline direct reads of an inode, diofs arms the file handle: the binding
then answers O_DIRECT, aligned READs of it that lie inside one written extent and inside the
armed i_size with one pread of the image (`dio.native_reads`). Every test keeps its fds open
across the mutation it makes, so the fd that reads is armed when the file changes.

- Steady state: a file laid out with O_DIRECT writes, read 4 KiB at a time at random from
  two threads and by fio (libaio, QD16): `dio.native_reads` > 0, `dio.native_arms` >= 1, and
  every byte read is the pattern written. With `-o native_io=off`: no native read, the
  same bytes.
- Sector-sized reads (any multiple of `-o dio_align`, 512 or 4096, at any aligned offset) of
  a file of short extents, holes and unwritten extents through an armed fd: the model's
  bytes, many of them native; a read not aligned to dio_align is EINVAL as before.
- Disarm on each mutation, through another fd, while the reading fd is armed (its reads
  were seen going native): punch hole (zeros), truncate to a size that is not a multiple of
  the block (nothing past the new EOF, not even the tail of the last block), open(O_TRUNC)
  and a rewrite (the new bytes, in new blocks), zero range (zeros), an O_DIRECT overwrite in
  place, plain or O_DSYNC (new bytes, no disarm: the native path reads the image), a
  buffered write (new bytes: dirty in the daemon cache, the kernel caching the mount), an
  extending O_DIRECT write (the new range), and direct and buffered writes into a punched
  hole (new bytes). Afterwards native reads resume (`dio.native_arms` grows again) and
  still return the new bytes.
- The bug switch: with `--bug native-read-armed` (no disarm on an extent change or an
  exclusive rwsem request) a read through the armed fd after a punch hole returns the
  freed blocks' old bytes, and after a truncate a read across the new EOF returns the whole
  old range; in the default mount zeros and a short read.
- mmap: a page written through a MAP_SHARED mapping of another fd (with and without msync)
  is what the armed fd reads next. An O_DIRECT read into a MAP_SHARED mapping of the same
  file (seed 004's self-read; the mapping made through another fd or through the armed
  O_DIRECT fd itself, whose fault READs name no lock owner and are buffered: fuse-facts-more
  row 33) completes in a child within a deadline and moves the right bytes.
- More handles than the binding's table (64): the others stay on the Python path
  (`dio.native_table_full`), all bytes right; after closing them, arming works again.
- Stress (~3 s): readers of blocks nobody writes, writers that each own blocks, a
  punch-and-rewrite thread and a truncate-the-tail-away-and-back thread (each checking its
  own region through its own armed fd after every step), and open/read/close churn with a
  buffered read now and then, all on one file: no mismatch, native reads happened, and the
  final contents are right, before and after a remount.
- Unmount right after armed fds are closed: the file reads right after the remount, and
  native reads work again in the new mount.

Which tests fail without which disarm (checked with the daemon patched to leave each out):
(a)+(b), `--bug native-read-armed`: the punch, zero range, truncate, O_TRUNC, hole and stress
cases; (c) and (d) both left out: the buffered write and both mapping-write cases (either
one alone covers them); (e): the table test (released handles stay in the table).

Native reads need the raw file backend (`file_image`).
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Callable

import pytest

from harness.io import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    direct_pread,
    direct_pwrite,
    fallocate,
    pattern,
    wait_for,
)
from harness.mount import Mount, MountFactory, run_in_child

pytestmark = [pytest.mark.deadline(90), pytest.mark.file_image]

KiB, MiB = 1 << 10, 1 << 20
BS = 4096
FILE_SIZE = 4 * MiB
NBLOCKS = FILE_SIZE // BS
SEED = 1
ARM_READS = 16  # > ARM_AFTER (4): the last ones are answered natively
HOT = 256 * KiB  # the range each mutation changes: [HOT, HOT + HOT_LEN)
HOT_LEN = 64 * KiB
TRUNC_SIZE = 100 * BS + 1000  # not a multiple of the block size
ZEROS = bytes(HOT_LEN)


# --------------------------------------------------------------------------- helpers


def lay_out(path: str, size: int = FILE_SIZE, seed: int = SEED) -> bytearray:
    """`size` bytes of pattern(seed) written with O_DIRECT (nothing cached anywhere), fsynced;
    returns the model of the file's contents."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        for off in range(0, size, MiB):
            n = min(MiB, size - off)
            assert direct_pwrite(fd, pattern(n, seed, off), off) == n
        os.fsync(fd)
    finally:
        os.close(fd)
    return bytearray(pattern(size, seed))


def native(m: Mount) -> tuple[int, int, int]:
    """(dio.native_reads, dio.native_arms, dio.native_disarms)."""
    st = m.stats()
    return (
        int(st.get("dio.native_reads", 0)),
        int(st.get("dio.native_arms", 0)),
        int(st.get("dio.native_disarms", 0)),
    )


def check_read(fd: int, model: bytes | bytearray, size: int, off: int) -> None:
    """An O_DIRECT read of [off, off + size) through `fd` returns what the model holds there
    (short at the model's end)."""
    got = direct_pread(fd, size, off)
    want = bytes(model[off : off + size])
    if got != want:
        raise AssertionError(f"read {size}@{off:#x}: {describe(got, want, off)}")


def describe(got: bytes, want: bytes, base: int) -> str:
    """Where `got` first differs from `want` (lengths, first differing block and whether it
    is zeros), for assertion messages."""
    if len(got) != len(want):
        return f"{len(got)} bytes instead of {len(want)}"
    for i in range(0, len(want), 512):
        if got[i : i + 512] != want[i : i + 512]:
            kind = "zeros" if not any(got[i : i + 512]) else got[i : i + 16].hex()
            return f"first wrong sector at {base + i:#x}: {kind}, want {want[i : i + 16].hex()}"
    return "equal"


def arm(m: Mount, fd: int, model: bytes | bytearray, first_block: int = 0) -> None:
    """Read ARM_READS blocks through `fd` (checked) until its reads go native: afterwards
    `fd` is armed (no other fd of the file reads meanwhile)."""
    reads, arms, _ = native(m)
    for i in range(ARM_READS):
        check_read(fd, model, BS, ((first_block + i) % NBLOCKS) * BS)
    check_read(fd, model, HOT_LEN, HOT)  # the hot range too, natively
    reads2, arms2, _ = native(m)
    assert arms2 > arms, f"no arm after {ARM_READS} reads ({arms} -> {arms2})"
    assert reads2 - reads >= ARM_READS - 4, f"reads did not go native ({reads} -> {reads2})"


def open_direct(path: str, flags: int = os.O_RDWR) -> int:
    return os.open(path, flags | os.O_DIRECT)


def laid_out_mount(
    mount_factory: MountFactory, bugs: list[str] | None = None
) -> tuple[Mount, str, bytearray]:
    """A fresh 64M mount (with `bugs`) holding file "f" laid out by `lay_out`: (mount, path,
    model)."""
    m = mount_factory(size="64M", bugs=bugs or [])
    path = m.path("f")
    return m, path, lay_out(path)


# --------------------------------------------------------------------------- steady state


def _random_reads(path: str, model: bytes, n: int, seed: int, errors: list[str]) -> None:
    rnd = random.Random(seed)
    fd = open_direct(path, os.O_RDONLY)
    try:
        for _ in range(n):
            off = rnd.randrange(NBLOCKS) * BS
            got = direct_pread(fd, BS, off)
            if got != model[off : off + BS]:
                errors.append(f"read {BS}@{off:#x}: {describe(got, model[off : off + BS], off)}")
                return
    finally:
        os.close(fd)


def _fio_randread(path: str) -> None:
    argv = [
        "fio", "--name=nr", f"--filename={path}", f"--size={FILE_SIZE}", "--bs=4k",
        "--rw=randread", "--direct=1", "--ioengine=libaio", "--iodepth=16", "--runtime=2",
        "--time_based", "--fallocate=none", "--output-format=terse",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize("native_io", ["on", "off"])
def test_steady_state_reads_go_native(mount_factory: MountFactory, native_io: str) -> None:
    m = mount_factory(size="64M", opts={"native_io": native_io})
    path = m.path("f")
    model = bytes(lay_out(path))
    errors: list[str] = []
    threads = [
        threading.Thread(target=_random_reads, args=(path, model, 1000, seed, errors))
        for seed in (1, 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "readers hung"
    assert not errors, errors
    reads, arms, _ = native(m)
    if native_io == "off":
        assert (reads, arms) == (0, 0)
    else:
        assert reads > 0 and arms >= 1, (reads, arms)
    if shutil.which("fio") is not None:
        _fio_randread(path)
        after, _, _ = native(m)
        if native_io == "off":
            assert after == 0
        else:
            assert after - reads > 1000, f"fio's QD16 reads did not go native ({reads} -> {after})"
    # every block once more, through one fd, 4 KiB at a time
    fd = open_direct(path, os.O_RDONLY)
    try:
        for off in range(0, FILE_SIZE, BS):
            check_read(fd, model, BS, off)
    finally:
        os.close(fd)


def fragmented_file(m: Mount) -> tuple[str, bytearray]:
    """A 1 MiB file whose extents are short (its blocks written interleaved with another
    file's, in runs of 1-3 blocks), with holes (punched) and unwritten extents
    (preallocated in a hole); returns its path and model."""
    path, other = m.path("frag"), m.path("other")
    size = MiB
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    ofd = os.open(other, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    model = bytearray(pattern(size, 8))
    rnd = random.Random(8)
    try:
        off = 0
        while off < size:
            n = min(rnd.randint(1, 3) * BS, size - off)
            assert direct_pwrite(fd, bytes(model[off : off + n]), off) == n
            assert direct_pwrite(ofd, pattern(BS, 9, off), off) == BS
            off += n
        for hole in (40, 41, 100, 170, 171, 172):
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, hole * BS, BS)
            model[hole * BS : (hole + 1) * BS] = bytes(BS)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 171 * BS, BS)  # unwritten: zeros
        os.fsync(fd)
    finally:
        os.close(ofd)
        os.close(fd)
    return path, model


@pytest.mark.parametrize("dio_align", [512, 4096])
def test_sector_reads_across_extents(mount_factory: MountFactory, dio_align: int) -> None:
    """Reads of any multiple of the alignment, at any aligned offset, over short extents,
    holes and unwritten extents: the ones inside one written extent go native, the others
    to Python, all return the model's bytes; a read that is not aligned to `-o dio_align`
    is EINVAL on an armed fd as on any other."""
    m = mount_factory(size="64M", opts={"dio_align": dio_align})
    path, model = fragmented_file(m)
    fd = open_direct(path, os.O_RDONLY)
    try:
        for i in range(ARM_READS):
            check_read(fd, model, BS, i * BS)
        reads, arms, _ = native(m)
        assert arms >= 1
        rnd = random.Random(dio_align)
        for _ in range(1500):
            off = rnd.randrange(0, MiB, dio_align)
            size = rnd.choice([1, 1, 2, 3, 8, 17, 64]) * dio_align
            check_read(fd, model, size, off)
        reads2, _, _ = native(m)
        assert reads2 - reads > 100, (reads, reads2)
        if dio_align == 4096:
            for off, size in ((512, BS), (0, 512), (BS + 1024, 2048)):
                with pytest.raises(OSError) as err:
                    direct_pread(fd, size, off)
                assert err.value.errno == 22, (off, size)
    finally:
        os.close(fd)
    assert native(m)[0] == reads2  # the EINVAL ones were not answered natively


# --------------------------------------------------------------------------- each mutation


def _punch(path: str, model: bytearray) -> None:
    fd = open_direct(path)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, HOT, HOT_LEN)
    finally:
        os.close(fd)
    model[HOT : HOT + HOT_LEN] = ZEROS


def _zero_range(path: str, model: bytearray) -> None:
    fd = open_direct(path)
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE, HOT, HOT_LEN)
    finally:
        os.close(fd)
    model[HOT : HOT + HOT_LEN] = ZEROS


def _truncate(path: str, model: bytearray) -> None:
    os.truncate(path, TRUNC_SIZE)
    del model[TRUNC_SIZE:]


def _direct_overwrite(path: str, model: bytearray) -> None:
    data = pattern(HOT_LEN, 2, HOT)
    assert direct_pwrite(path, data, HOT) == HOT_LEN
    model[HOT : HOT + HOT_LEN] = data


def _dsync_overwrite(path: str, model: bytearray) -> None:
    data = pattern(HOT_LEN, 10, HOT)
    fd = open_direct(path, os.O_RDWR | os.O_DSYNC)
    try:
        assert direct_pwrite(fd, data, HOT) == HOT_LEN
    finally:
        os.close(fd)
    model[HOT : HOT + HOT_LEN] = data


def _open_trunc(path: str, model: bytearray) -> None:
    """open(O_TRUNC), then the first 512 KiB written again (new blocks)."""
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    data = pattern(512 * KiB, 11)
    assert direct_pwrite(path, data, 0) == len(data)
    model[:] = data


def _buffered_write(path: str, model: bytearray) -> None:
    data = pattern(2 * BS, 3, HOT + BS)  # dirty in the daemon cache
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, HOT + BS) == len(data)
    finally:
        os.close(fd)
    model[HOT + BS : HOT + 3 * BS] = data


def _extend(path: str, model: bytearray) -> None:
    data = pattern(HOT_LEN, 4, FILE_SIZE)
    assert direct_pwrite(path, data, FILE_SIZE) == HOT_LEN
    model.extend(data)


MUTATIONS: dict[str, Callable[[str, bytearray], None]] = {
    "punch": _punch,
    "zero_range": _zero_range,
    "truncate": _truncate,
    "direct_overwrite": _direct_overwrite,
    "dsync_overwrite": _dsync_overwrite,
    "open_trunc": _open_trunc,
    "buffered_write": _buffered_write,
    "extend": _extend,
}


def _check_after(fd: int, model: bytearray, name: str) -> None:
    """The reads through the armed fd that must see the mutation."""
    if name == "truncate":
        last = (TRUNC_SIZE // BS) * BS
        got = direct_pread(fd, BS, last)  # the last block: up to the new EOF only
        assert got == model[last:TRUNC_SIZE], describe(got, bytes(model[last:TRUNC_SIZE]), last)
        got = direct_pread(fd, HOT_LEN, last - 4 * BS)  # across the new EOF
        want = bytes(model[last - 4 * BS : TRUNC_SIZE])
        assert got == want, describe(got, want, last - 4 * BS)
        assert direct_pread(fd, BS, HOT + HOT_LEN + 200 * BS) == b""  # past it
        assert direct_pread(fd, HOT_LEN, 200 * BS) == b""
        return
    if name == "extend":
        check_read(fd, model, HOT_LEN, FILE_SIZE)
        for off in range(FILE_SIZE, FILE_SIZE + HOT_LEN, BS):
            check_read(fd, model, BS, off)
        check_read(fd, model, 2 * HOT_LEN, FILE_SIZE - HOT_LEN)
        return
    for off in range(HOT, HOT + HOT_LEN, BS):
        check_read(fd, model, BS, off)
    check_read(fd, model, HOT_LEN, HOT)
    check_read(fd, model, 4 * HOT_LEN, HOT - HOT_LEN)


def _resume(m: Mount, path: str, fd: int, model: bytearray) -> None:
    """Native reads resume after the mutation: `fd` is armed again by more reads."""
    reads, arms, _ = native(m)
    # a new O_DIRECT open and one request through it clear the kernel-cache mark a buffered
    # request set (kernel_cache.py "Which inodes"); nothing to do for the other mutations
    other = open_direct(path, os.O_RDONLY)
    try:
        check_read(other, model, BS, 0)
    finally:
        os.close(other)
    for i in range(ARM_READS):
        check_read(fd, model, BS, i * BS)
    check_read(fd, model, HOT_LEN, HOT)
    reads2, arms2, _ = native(m)
    assert arms2 > arms, f"not armed again ({arms} -> {arms2})"
    assert reads2 - reads >= ARM_READS - 4, f"reads did not go native again ({reads} -> {reads2})"


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_armed_fd_sees_each_mutation(mount_factory: MountFactory, name: str) -> None:
    m, path, model = laid_out_mount(mount_factory)
    fd = open_direct(path, os.O_RDONLY)
    try:
        arm(m, fd, model)
        _, _, disarms = native(m)
        MUTATIONS[name](path, model)
        reads, _, _ = native(m)
        _check_after(fd, model, name)
        reads2, _, disarms2 = native(m)
        if name in ("direct_overwrite", "dsync_overwrite"):
            # nothing to disarm: the native path reads the new bytes from the image
            assert disarms2 == disarms
            assert reads2 - reads >= HOT_LEN // BS, (reads, reads2)
        else:
            assert disarms2 > disarms, f"no disarm for {name}"
        _resume(m, path, fd, model)
        _check_after(fd, model, name)
    finally:
        os.close(fd)
    check_whole_file(path, model)


def test_armed_fd_sees_write_into_hole(mount_factory: MountFactory) -> None:
    """Punch (disarms), armed again, then a direct write into the hole (allocation: disarms
    again) and a buffered one into the rest of it (dirty, then written back into new blocks):
    the armed fd reads the new bytes each time."""
    m, path, model = laid_out_mount(mount_factory)
    fd = open_direct(path, os.O_RDONLY)
    try:
        arm(m, fd, model)
        _punch(path, model)
        _check_after(fd, model, "punch")
        _resume(m, path, fd, model)
        _, _, disarms = native(m)
        data = pattern(HOT_LEN // 2, 5, HOT)
        assert direct_pwrite(path, data, HOT) == len(data)  # into the hole: new extent
        model[HOT : HOT + len(data)] = data
        _check_after(fd, model, "write_into_hole")
        _, _, disarms2 = native(m)
        assert disarms2 > disarms, "no disarm for the write into the hole"
        _resume(m, path, fd, model)
        rest = pattern(HOT_LEN // 2, 6, HOT + HOT_LEN // 2)
        bfd = os.open(path, os.O_RDWR)
        try:
            assert os.pwrite(bfd, rest, HOT + HOT_LEN // 2) == len(rest)
        finally:
            os.close(bfd)
        model[HOT + HOT_LEN // 2 : HOT + HOT_LEN] = rest
        _check_after(fd, model, "buffered_write_into_hole")
        _resume(m, path, fd, model)
        _check_after(fd, model, "buffered_write_into_hole")
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the bug switch


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "native-read-armed"])
def test_bug_switch_punch_returns_freed_blocks(mount_factory: MountFactory, bug_on: bool) -> None:
    """After a punch hole through another fd, the armed fd reads zeros there; with
    --bug native-read-armed it still reads the freed blocks' old bytes."""
    m, path, model = laid_out_mount(mount_factory, ["native-read-armed"] if bug_on else None)
    old = bytes(model[HOT : HOT + HOT_LEN])
    fd = open_direct(path, os.O_RDONLY)
    try:
        arm(m, fd, model)
        _punch(path, model)
        got = direct_pread(fd, HOT_LEN, HOT)
        blocks = [direct_pread(fd, BS, off) for off in range(HOT, HOT + HOT_LEN, BS)]
    finally:
        os.close(fd)
    if bug_on:
        assert got != ZEROS, "the armed fd read zeros although nothing disarmed it"
        assert got == old
        assert b"".join(blocks) == old
    else:
        assert got == ZEROS, describe(got, ZEROS, HOT)
        assert b"".join(blocks) == ZEROS
    # a fresh fd is never armed before its own reads: zeros either way
    assert direct_pread(path, HOT_LEN, HOT) == ZEROS


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "native-read-armed"])
def test_bug_switch_truncate_returns_old_bytes(mount_factory: MountFactory, bug_on: bool) -> None:
    """After a truncate to TRUNC_SIZE through the path, a 64 KiB read through the armed fd
    that starts 4 blocks below the new EOF returns 4 blocks + 1000 bytes; with
    --bug native-read-armed all 64 KiB, the freed blocks' old bytes included."""
    m, path, model = laid_out_mount(mount_factory, ["native-read-armed"] if bug_on else None)
    old = bytes(model)
    start = (TRUNC_SIZE // BS - 4) * BS
    fd = open_direct(path, os.O_RDONLY)
    try:
        arm(m, fd, model, first_block=start // BS)
        _truncate(path, model)
        got = direct_pread(fd, HOT_LEN, start)
    finally:
        os.close(fd)
    if bug_on:
        assert len(got) == HOT_LEN, f"{len(got)} bytes: the native path did not answer"
        past = (TRUNC_SIZE // BS + 1) * BS  # the blocks after the new last one: freed
        assert got[past - start :] == old[past : start + HOT_LEN], "not the old bytes"
    else:
        want = old[start:TRUNC_SIZE]
        assert got == want, describe(got, want, start)
    assert direct_pread(path, HOT_LEN, start) == old[start:TRUNC_SIZE]


# --------------------------------------------------------------------------- mmap


@pytest.mark.parametrize("msync", [True, False], ids=["msync", "no-msync"])
def test_mapping_write_then_armed_read(mount_factory: MountFactory, msync: bool) -> None:
    """A page written through a MAP_SHARED mapping of another fd: the armed fd's O_DIRECT
    read returns it (with msync the WRITE comes first; without it the kernel writes the
    dirty page back before it sends the direct READ)."""
    m, path, model = laid_out_mount(mount_factory)
    fd = open_direct(path, os.O_RDONLY)
    mfd = os.open(path, os.O_RDWR)
    try:
        arm(m, fd, model)
        _, _, disarms = native(m)
        data = pattern(BS, 7, HOT)
        with mmap.mmap(mfd, FILE_SIZE) as mm:
            mm[HOT : HOT + BS] = data
            model[HOT : HOT + BS] = data
            if msync:
                mm.flush(HOT, BS)
            check_read(fd, model, BS, HOT)
            check_read(fd, model, HOT_LEN, HOT)
            assert mm[HOT : HOT + BS] == data
        _, _, disarms2 = native(m)
        assert disarms2 > disarms
    finally:
        os.close(mfd)
        os.close(fd)
    check_whole_file(path, model)


def self_read_into_mapping(path: str, via_direct_fd: bool, n: int) -> dict[str, bool]:
    """Child: arm an O_DIRECT fd, then preadv through it of [0, n) into a MAP_SHARED
    mapping of [2 MiB, 2 MiB + n) of the same file (made through another fd, or through
    the O_DIRECT fd itself). Returns what the mapping and the file hold afterwards."""
    src, dst = 0, 2 * MiB
    expected = pattern(n, SEED, src)
    fd = open_direct(path)
    mfd = fd if via_direct_fd else os.open(path, os.O_RDWR)
    try:
        for i in range(ARM_READS):
            assert direct_pread(fd, BS, (i + 600) * BS) == pattern(BS, SEED, (i + 600) * BS)
        with mmap.mmap(mfd, FILE_SIZE) as mm:
            with memoryview(mm)[dst : dst + n] as dest:
                assert os.preadv(fd, [dest], src) == n
            in_mapping = mm[dst : dst + n] == expected
            mm.flush()
        on_image = direct_pread(fd, n, dst) == expected
        rest = direct_pread(fd, FILE_SIZE - dst - n, dst + n) == pattern(
            FILE_SIZE - dst - n, SEED, dst + n
        )
    finally:
        if mfd != fd:
            os.close(mfd)
        os.close(fd)
    return {"in_mapping": in_mapping, "on_image": on_image, "rest": rest}


@pytest.mark.parametrize("n", [BS, MiB], ids=["4k", "1m"])
@pytest.mark.parametrize("via_direct_fd", [False, True], ids=["other-fd", "same-direct-fd"])
def test_direct_read_into_own_mapping(
    mount_factory: MountFactory, via_direct_fd: bool, n: int
) -> None:
    m = mount_factory(size="64M")
    path = m.path("f")
    lay_out(path)
    result = run_in_child(self_read_into_mapping, path, via_direct_fd, n, timeout=30, mounts=[m])
    assert result == {"in_mapping": True, "on_image": True, "rest": True}, result
    assert native(m)[0] > 0


# --------------------------------------------------------------------------- the table


def test_more_handles_than_the_table(mount_factory: MountFactory) -> None:
    m = mount_factory(size="64M")
    path = m.path("f")
    model = lay_out(path, size=MiB)
    fds = [open_direct(path, os.O_RDONLY) for _ in range(80)]
    try:
        for round_ in range(6):
            for k, fd in enumerate(fds):
                check_read(fd, model, BS, ((k * 7 + round_) % (MiB // BS)) * BS)
        st = m.stats()
        assert st.get("dio.native_table_full", 0) > 0, st
        assert st.get("dio.native_reads", 0) > 0, st
    finally:
        for fd in fds:
            os.close(fd)
    _, arms, _ = native(m)
    fd = open_direct(path, os.O_RDONLY)
    try:
        # the released handles leave the table (RELEASEs are asynchronous: read until then)
        def armed_again() -> bool:
            for i in range(ARM_READS):
                check_read(fd, model, BS, i * BS)
            return native(m)[1] > arms

        wait_for(armed_again, "an arm after the other handles were closed", timeout=30)
        reads = native(m)[0]
        check_read(fd, model, MiB, 0)
        for i in range(ARM_READS):
            check_read(fd, model, BS, i * BS)
        assert native(m)[0] >= reads + ARM_READS
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- stress

STRESS_S = 3.0
R_END = 2 * MiB  # [0, 2M): read only
W_END = 3 * MiB  # [2M, 3M): two writers, even and odd blocks
CHUNK = 16 * KiB
P_END = 3 * MiB + 512 * KiB  # [3M, 3.5M - CHUNK): punch and rewrite; then CHUNK read only
# [3.5M, 4M): truncated to T_SIZE and back to FILE_SIZE, then a block rewritten
T_SIZE = P_END + 1000


class Stress:
    def __init__(self, path: str, model: bytearray) -> None:
        self.path = path
        self.model = model  # each region is written by its owner only
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.steps: dict[str, int] = {}

    def run(self, name: str, body: Callable[[random.Random], None], seed: int) -> None:
        rnd = random.Random(seed)
        n = 0
        try:
            while not self.stop.is_set():
                body(rnd)
                n += 1
        except BaseException as exc:
            self.errors.append(f"{name}: {exc!r}")
            self.stop.set()
        self.steps[name] = n

    def expect(self, what: str, got: bytes, off: int) -> None:
        want = bytes(self.model[off : off + len(got)])
        if len(want) != len(got) or got != want:
            raise AssertionError(f"{what} @{off:#x}: {describe(got, want, off)}")


def _reader(s: Stress, fd: int) -> Callable[[random.Random], None]:
    def body(rnd: random.Random) -> None:
        if rnd.random() < 0.1:
            off = rnd.randrange(0, R_END - HOT_LEN, BS)
            s.expect("reader 64k", direct_pread(fd, HOT_LEN, off), off)
        else:
            off = rnd.randrange(0, R_END, BS)
            s.expect("reader", direct_pread(fd, BS, off), off)

    return body


def _writer(s: Stress, wfd: int, rfd: int, parity: int) -> Callable[[random.Random], None]:
    gen = [parity * 1_000_000]

    def body(rnd: random.Random) -> None:
        off = R_END + (rnd.randrange(0, (W_END - R_END) // BS // 2) * 2 + parity) * BS
        if rnd.random() < 0.5:
            gen[0] += 1
            data = pattern(BS, gen[0], off)
            assert direct_pwrite(wfd, data, off) == BS
            s.model[off : off + BS] = data
        s.expect(f"writer {parity} read-back", direct_pread(rfd, BS, off), off)

    return body


def _puncher(s: Stress, wfd: int, rfd: int) -> Callable[[random.Random], None]:
    gen = [2_000_000]

    def body(rnd: random.Random) -> None:
        off = rnd.randrange(W_END, P_END - CHUNK, CHUNK)
        fallocate(wfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, CHUNK)
        s.model[off : off + CHUNK] = bytes(CHUNK)
        s.expect("after punch", direct_pread(rfd, CHUNK, off), off)
        s.expect("after punch, 4k", direct_pread(rfd, BS, off + BS), off + BS)
        gen[0] += 1
        data = pattern(CHUNK, gen[0], off)
        assert direct_pwrite(wfd, data, off) == CHUNK  # into the hole
        s.model[off : off + CHUNK] = data
        s.expect("after rewrite", direct_pread(rfd, CHUNK, off), off)
        for _ in range(4):
            o = rnd.randrange(W_END, P_END - CHUNK, BS)
            s.expect("puncher read", direct_pread(rfd, BS, o), o)

    return body


def _truncater(s: Stress, wfd: int, rfd: int) -> Callable[[random.Random], None]:
    gen = [3_000_000]

    def body(rnd: random.Random) -> None:
        os.ftruncate(wfd, T_SIZE)
        s.model[T_SIZE:] = bytes(FILE_SIZE - T_SIZE)  # as read after the size comes back
        got = direct_pread(rfd, 2 * BS, P_END - BS)  # across the new EOF
        if got != s.model[P_END - BS : T_SIZE]:
            want = bytes(s.model[P_END - BS : T_SIZE])
            raise AssertionError(f"after truncate: {describe(got, want, P_END - BS)}")
        got = direct_pread(rfd, BS, P_END)  # the new last block
        if got != s.model[P_END:T_SIZE]:
            raise AssertionError(
                f"after truncate, last block: {describe(got, bytes(s.model[P_END:T_SIZE]), P_END)}"
            )
        os.ftruncate(wfd, FILE_SIZE)
        s.expect("after truncate up", direct_pread(rfd, FILE_SIZE - P_END, P_END), P_END)
        off = rnd.randrange(P_END, FILE_SIZE, BS)
        gen[0] += 1
        data = pattern(BS, gen[0], off)
        assert direct_pwrite(wfd, data, off) == BS
        s.model[off : off + BS] = data
        s.expect("tail rewrite", direct_pread(rfd, BS, off), off)
        for _ in range(4):
            o = rnd.randrange(P_END, FILE_SIZE, BS)
            s.expect("truncater read", direct_pread(rfd, BS, o), o)

    return body


def _churn(s: Stress) -> Callable[[random.Random], None]:
    count = [0]

    def body(rnd: random.Random) -> None:
        count[0] += 1
        if count[0] % 25 == 0:  # the kernel caches a page of the mount: disarms everything
            bfd = os.open(s.path, os.O_RDONLY)
            try:
                off = rnd.randrange(0, R_END, BS)
                s.expect("buffered read", os.pread(bfd, BS, off), off)
            finally:
                os.close(bfd)
        fd = open_direct(s.path, os.O_RDONLY)
        try:
            for _ in range(6):
                off = rnd.randrange(0, R_END, BS)
                s.expect("churn read", direct_pread(fd, BS, off), off)
        finally:
            os.close(fd)

    return body


def check_whole_file(path: str, model: bytes | bytearray) -> None:
    fd = open_direct(path, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == len(model)
        for off in range(0, len(model), MiB):
            check_read(fd, model, MiB, off)
    finally:
        os.close(fd)


def test_stress_mutations_against_armed_readers(mount_factory: MountFactory) -> None:
    m = mount_factory(size="64M")
    path = m.path("f")
    s = Stress(path, lay_out(path))
    fds: list[int] = []

    def fd(flags: int = os.O_RDONLY) -> int:
        fds.append(open_direct(path, flags))
        return fds[-1]

    bodies: dict[str, Callable[[random.Random], None]] = {
        **{f"reader{i}": _reader(s, fd()) for i in range(3)},
        **{f"writer{p}": _writer(s, fd(os.O_RDWR), fd(), p) for p in (0, 1)},
        "puncher": _puncher(s, fd(os.O_RDWR), fd()),
        "truncater": _truncater(s, fd(os.O_RDWR), fd()),
        "churn": _churn(s),
    }
    threads = [
        threading.Thread(target=s.run, args=(name, body, seed), name=name)
        for seed, (name, body) in enumerate(bodies.items())
    ]
    try:
        for t in threads:
            t.start()
        s.stop.wait(STRESS_S)
        s.stop.set()
        for t in threads:
            t.join(60)
        assert not [t.name for t in threads if t.is_alive()], "threads hung"
    finally:
        s.stop.set()
        for f in fds:
            os.close(f)
    assert not s.errors, s.errors
    print(f"steps {s.steps}, native (reads, arms, disarms) {native(m)}")
    assert all(n > 0 for n in s.steps.values()), s.steps
    reads, arms, disarms = native(m)
    assert reads > 0 and arms > 1 and disarms > 0, (reads, arms, disarms)
    check_whole_file(path, s.model)
    m.remount()
    check_whole_file(m.path("f"), s.model)


# --------------------------------------------------------------------------- unmount


def test_unmount_right_after_armed_fds(mount_factory: MountFactory) -> None:
    m, path, model = laid_out_mount(mount_factory)
    fds = [open_direct(path, os.O_RDONLY) for _ in range(2)]
    try:
        for fd in fds:
            arm(m, fd, model)
    finally:
        for fd in fds:
            os.close(fd)
    m.remount()  # the RELEASEs may still be on their way: unmount disarms everything
    path = m.path("f")
    check_whole_file(path, model)
    fd = open_direct(path, os.O_RDONLY)
    try:
        reads_before = native(m)[0]
        arm(m, fd, model)
        assert native(m)[0] > reads_before
    finally:
        os.close(fd)
