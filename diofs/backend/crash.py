"""Crash simulation: log every write and flush, then rebuild the image as after a power cut.

On-line part, `CrashBackend` (mount option `backend=crash,crash_log=LOG`):
    - at open, the image is copied to `LOG.base` (sparse-aware), the state at mount; an
      existing LOG and LOG.base are replaced (one log per mount);
    - every `write` goes to the real image (so the daemon reads its own writes) and is appended
      to LOG as a WRITE record (seq, offset, length, data); every `flush` appends a FLUSH record
      and then fdatasyncs the image;
    - each record is handed to the kernel with one `os.writev` (retried until complete) before
      the call returns, so another process reading LOG sees every record up to the last
      returned call. LOG is never fsynced: we simulate power cuts, we do not survive real ones.
      A reader tolerates a truncated last record (a log read while the daemon runs, or a
      daemon killed mid-append).

Durability model (what a power cut may leave on the disk):
    A flush guarantees that every write that *returned before the flush was called* is durable
    once the flush returns; nothing else is. The FLUSH record is appended when flush() is
    called, so the writes logged before it are exactly the ones it covers (a write racing with
    the flush lands on either side of the record; both are legal). A cut point `c` in
    `0 .. len(records)` means power failed just before record `c`: records `[0, c)` were
    issued, later ones never happened. Let `f` be the last FLUSH before `c`:
      (a) writes before `f` are durable: applied to the base in log order;
      (b) writes between `f` and `c` are in flight: with mode "drop" none lands, with "all"
          all land in log order, with "random" each one independently lands whole, is dropped,
          or is torn (only a prefix ending at a 512-byte-aligned image offset lands), and the
          ones that land do so in a random order (overlapping in-flight writes may land in
          any order: the device may reorder anything not separated by a flush).
    Cuts between a flush's call and its return are treated as "flush completed" (one legal
    outcome; cut `f` itself explores the other). A failed fdatasync is not modelled.

Log format (little-endian), file LOG:
    header  8s magic b"DIOFSCL1", u32 version 1, u32 sector 512, u64 image size, u64 zero
    record  4s tag b"DREC", u8 kind (1 WRITE, 2 FLUSH), 3 pad, u64 seq (= record index),
            u64 offset, u64 length; then `length` data bytes (WRITE only)

Thread safety: `CrashBackend` holds a `threading.Lock` across "write the image, append the
record" so that log order equals the order in which writes reached the image. This is the one
place where `threading` is right: backends run in trio worker threads, not in trio tasks.

Off-line part (pure functions, for tests and demos): `load_log`, `cut_points`, `plan_cut`,
`materialize`, and the CLI
    python -m diofs.backend.crash info LOG
    python -m diofs.backend.crash materialize LOG OUT --cut N [--mode random|drop|all] [--seed S]
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import os
import random
import struct
import threading

from diofs.backend.raw import RawImage, check_range
from diofs.errors import DiofsError

__all__ = [
    "MODES",
    "SECTOR",
    "CrashBackend",
    "CrashLog",
    "CutPlan",
    "Kind",
    "Record",
    "copy_image",
    "cut_points",
    "load_log",
    "main",
    "materialize",
    "plan_cut",
]

SECTOR = 512
MAGIC = b"DIOFSCL1"
VERSION = 1
TAG = b"DREC"
_HEADER = struct.Struct("<8sIIQQ")
_REC = struct.Struct("<4sBxxxQQQ")
MODES = ("random", "drop", "all")


class Kind(enum.IntEnum):
    WRITE = 1
    FLUSH = 2


def base_path(crash_log: str) -> str:
    """Where the image as it was at open is kept."""
    return crash_log + ".base"


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """os.writev all of `parts`, retrying short writes (one call in the common case)."""
    views = [memoryview(p) for p in parts]
    views = [v for v in views if v.nbytes]
    while views:
        put = os.writev(fd, views)
        if put == 0:
            raise OSError(errno.EIO, "short write to the crash log")
        while views and put >= views[0].nbytes:
            put -= views[0].nbytes
            views.pop(0)
        if put:
            views[0] = views[0][put:]


def _copy_range(src: int, dst: int, off: int, end: int) -> None:
    """Copy bytes [off, end) from fd `src` to fd `dst` at the same offsets."""
    pos = off
    try:
        while pos < end:
            n = os.copy_file_range(src, dst, end - pos, pos, pos)
            if n == 0:
                raise OSError(errno.EIO, "source shrank while copying")
            pos += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while pos < end:  # block devices and file systems without copy_file_range
        chunk = os.pread(src, min(end - pos, 1 << 20), pos)
        if not chunk:
            raise OSError(errno.EIO, "source shrank while copying")
        mv = memoryview(chunk)
        while mv:
            n = os.pwrite(dst, mv, pos)
            pos += n
            mv = mv[n:]


def copy_image(src: int, dst: int, size: int) -> None:
    """Make fd `dst` a copy of the first `size` bytes of fd `src`, keeping holes as holes.

    Only the data segments (SEEK_DATA / SEEK_HOLE) are copied, so a freshly made 256 MiB
    image copies in milliseconds; `dst` is truncated to `size` first.
    """
    os.ftruncate(dst, 0)
    os.ftruncate(dst, size)
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            data = pos  # SEEK_DATA unsupported (block device): copy everything
            hole = size
        else:
            hole = os.lseek(src, data, os.SEEK_HOLE)
        if data >= size:
            return
        hole = min(hole, size)
        _copy_range(src, dst, data, hole)
        pos = hole


class CrashBackend:
    """A RawImage whose writes and flushes are also logged for crash simulation.

    `_lock` (threading.Lock) protects `_seq` and `_log_fd`, and is held across "write the
    image, append the record" so that log order is the order writes reached the image.
    """

    def __init__(self, inner: RawImage, crash_log: str) -> None:
        self._inner = inner
        self.crash_log = crash_log
        self._lock = threading.Lock()
        self._seq = 0
        size = inner.size()
        base = base_path(crash_log)
        try:
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                copy_image(inner.fd, fd, size)
            finally:
                os.close(fd)
            self._log_fd = os.open(
                crash_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise DiofsError(f"cannot create crash log {crash_log}: {exc.strerror}") from None
        try:
            _write_all(self._log_fd, [_HEADER.pack(MAGIC, VERSION, SECTOR, size, 0)])
        except OSError as exc:
            os.close(self._log_fd)
            raise DiofsError(f"cannot write crash log {crash_log}: {exc.strerror}") from None
        self._closed = False

    def size(self) -> int:
        return self._inner.size()

    def read(self, off: int, size: int) -> bytes:
        return self._inner.read(off, size)

    def readinto(self, off: int, buf: memoryview) -> None:
        self._inner.readinto(off, buf)

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        check_range(off, mv.nbytes, self._inner.size())
        with self._lock:
            self._inner.write(off, mv)
            hdr = _REC.pack(TAG, Kind.WRITE, self._seq, off, mv.nbytes)
            _write_all(self._log_fd, [hdr, mv])
            self._seq += 1

    def flush(self) -> None:
        with self._lock:
            _write_all(self._log_fd, [_REC.pack(TAG, Kind.FLUSH, self._seq, 0, 0)])
            self._seq += 1
        self._inner.flush()

    def write_durable(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Logged as a write and a flush. The model is stronger than RWF_DSYNC (the flush
        record covers earlier writes too); diofs never counts on that (fs.flushed_writes
        does not move for a durable write)."""
        self.write(off, data)
        self.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._log_fd)
            self._inner.close()

    def __repr__(self) -> str:
        return f"CrashBackend({self._inner!r}, crash_log={self.crash_log!r})"


# ---------------------------------------------------------------------------------------------
# Off-line part: read the log, plan a cut, materialize the image.


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One log record. `data_pos` is where its data starts in the log file; `end_pos` is the
    log size once this record was complete."""

    seq: int
    kind: Kind
    offset: int
    length: int
    data_pos: int
    end_pos: int


@dataclasses.dataclass(frozen=True, slots=True)
class CrashLog:
    """A parsed log. `truncated_bytes` counts bytes after the last complete record (ignored)."""

    path: str
    base_path: str
    image_size: int
    records: list[Record]
    truncated_bytes: int

    @property
    def n_points(self) -> int:
        """Number of cut points: 0 (nothing issued) .. len(records) (everything issued)."""
        return len(self.records) + 1

    @property
    def writes(self) -> int:
        return sum(1 for r in self.records if r.kind is Kind.WRITE)

    @property
    def flushes(self) -> int:
        return sum(1 for r in self.records if r.kind is Kind.FLUSH)

    @property
    def bytes_written(self) -> int:
        return sum(r.length for r in self.records if r.kind is Kind.WRITE)

    def records_before(self, log_bytes: int) -> int:
        """Number of records complete within the first `log_bytes` bytes of the log.

        A test that notes `os.stat(LOG).st_size` right after an fsync returned to it gets,
        through this, the first cut point at which that fsync counts as acknowledged.
        """
        lo, hi = 0, len(self.records)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.records[mid].end_pos <= log_bytes:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def last_flush_before(self, cut: int) -> int:
        """Index of the last FLUSH record before cut point `cut`, or -1."""
        for i in range(min(cut, len(self.records)) - 1, -1, -1):
            if self.records[i].kind is Kind.FLUSH:
                return i
        return -1

    def data(self, rec: Record) -> bytes:
        """The data of a WRITE record."""
        with open(self.path, "rb") as f:
            f.seek(rec.data_pos)
            return f.read(rec.length)

    def info(self) -> dict[str, int]:
        return {
            "records": len(self.records),
            "writes": self.writes,
            "flushes": self.flushes,
            "bytes": self.bytes_written,
            "image_size": self.image_size,
            "n_points": self.n_points,
            "truncated_bytes": self.truncated_bytes,
        }


def load_log(crash_log: str) -> CrashLog:
    """Parse the log at `crash_log`, stopping quietly at a truncated or garbled last record.

    Raises ValueError if the file is not a crash log at all (bad or short header).
    """
    with open(crash_log, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise ValueError(f"{crash_log}: not a diofs crash log (too short)")
        magic, version, sector, image_size, _ = _HEADER.unpack(head)
        if magic != MAGIC or version != VERSION or sector != SECTOR:
            raise ValueError(f"{crash_log}: not a diofs crash log (bad header)")
        records: list[Record] = []
        pos = _HEADER.size
        while pos + _REC.size <= file_size:
            f.seek(pos)
            raw = f.read(_REC.size)
            if len(raw) < _REC.size:
                break
            tag, kind, seq, offset, length = _REC.unpack(raw)
            if tag != TAG or kind not in (Kind.WRITE, Kind.FLUSH) or seq != len(records):
                break
            if kind == Kind.FLUSH and length != 0:
                break
            if offset + length > image_size:
                break
            end = pos + _REC.size + length
            if end > file_size:
                break
            records.append(Record(seq, Kind(kind), offset, length, pos + _REC.size, end))
            pos = end
    return CrashLog(crash_log, base_path(crash_log), image_size, records, file_size - pos)


def _as_log(crash_log: str | CrashLog) -> CrashLog:
    return crash_log if isinstance(crash_log, CrashLog) else load_log(crash_log)


def cut_points(crash_log: str | CrashLog) -> list[int]:
    """Every cut point of the log: 0 .. len(records)."""
    return list(range(_as_log(crash_log).n_points))


@dataclasses.dataclass(frozen=True, slots=True)
class CutPlan:
    """What a power cut at `cut` leaves: `durable` writes (applied first, in log order), then
    `landed` in-flight writes as (record, bytes applied from its start), in landing order.
    In-flight writes absent from `landed` were dropped; a length below `record.length` is a
    torn write (always ending on a 512-byte-aligned image offset)."""

    cut: int
    mode: str
    durable: list[Record]
    in_flight: list[Record]
    landed: list[tuple[Record, int]]

    @property
    def torn(self) -> int:
        return sum(1 for r, n in self.landed if n < r.length)

    @property
    def dropped(self) -> int:
        return len(self.in_flight) - len(self.landed)


def plan_cut(
    crash_log: str | CrashLog, cut: int, *, rng: random.Random | None = None, mode: str = "random"
) -> CutPlan:
    """Decide what a power cut just before record `cut` leaves (see the module docstring).

    `rng` drives mode "random"; by default `random.Random(cut)`, so a plan is reproducible.
    """
    log = _as_log(crash_log)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    if not 0 <= cut < log.n_points:
        raise ValueError(f"cut {cut} outside 0..{log.n_points - 1}")
    f = log.last_flush_before(cut)
    durable = [r for r in log.records[: max(f, 0)] if r.kind is Kind.WRITE]
    in_flight = [r for r in log.records[f + 1 : cut] if r.kind is Kind.WRITE]
    landed: list[tuple[Record, int]] = []
    if mode == "all":
        landed = [(r, r.length) for r in in_flight]
    elif mode == "random":
        rng = rng if rng is not None else random.Random(cut)
        order = list(in_flight)
        rng.shuffle(order)
        for r in order:
            first = (r.offset // SECTOR + 1) * SECTOR  # first sector boundary after the start
            inner = range(first, r.offset + r.length, SECTOR)  # boundaries strictly inside
            fate = rng.choice(("drop", "land", "tear") if len(inner) else ("drop", "land"))
            if fate == "land":
                landed.append((r, r.length))
            elif fate == "tear":
                landed.append((r, rng.choice(inner) - r.offset))
    return CutPlan(cut, mode, durable, in_flight, landed)


def materialize(
    crash_log: str | CrashLog,
    out_path: str,
    cut: int,
    *,
    rng: random.Random | None = None,
    mode: str = "random",
) -> CutPlan:
    """Write to `out_path` the image as after a power cut just before record `cut`.

    Starts from `<crash_log>.base`, applies the durable writes, then the in-flight writes as
    `plan_cut` decides. Returns the plan (callers may ignore it). `out_path` is created or
    overwritten; it must not be the log or its base.
    """
    log = _as_log(crash_log)
    plan = plan_cut(log, cut, rng=rng, mode=mode)
    out_real = os.path.realpath(out_path)
    if out_real in (os.path.realpath(log.path), os.path.realpath(log.base_path)):
        raise ValueError(f"refusing to overwrite {out_path}: it is the crash log or its base")
    base_fd = os.open(log.base_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(base_fd).st_size != log.image_size:
            raise ValueError(f"{log.base_path}: size does not match the log's image size")
        out_fd = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            copy_image(base_fd, out_fd, log.image_size)
            with open(log.path, "rb", buffering=0) as lf:
                lfd = lf.fileno()
                steps = [(r, r.length) for r in plan.durable] + plan.landed
                for rec, n in steps:
                    data = os.pread(lfd, n, rec.data_pos)
                    if len(data) != n:
                        raise ValueError(f"{log.path}: record {rec.seq} shrank")
                    mv = memoryview(data)
                    pos = rec.offset
                    while mv:
                        put = os.pwrite(out_fd, mv, pos)
                        pos += put
                        mv = mv[put:]
        finally:
            os.close(out_fd)
    finally:
        os.close(base_fd)
    return plan


# ---------------------------------------------------------------------------------------------
# CLI


def _cli(argv: list[str]) -> int:
    from diofs.cli.common import ArgumentParser

    p = ArgumentParser(
        prog="diofs-crash", description="Inspect a crash log; rebuild an image after a power cut."
    )
    p.add_argument("--debug", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="print the log's counts as JSON")
    pi.add_argument("log")
    pm = sub.add_parser("materialize", help="write the image as after a power cut")
    pm.add_argument("log")
    pm.add_argument("out")
    pm.add_argument(
        "--cut", type=int, required=True, help="cut point 0..records (negative: from the end)"
    )
    pm.add_argument("--mode", choices=MODES, default="random")
    pm.add_argument("--seed", type=int, default=None, help="seed for --mode random")
    a = p.parse_args(argv)
    try:
        log = load_log(a.log)
    except FileNotFoundError:
        raise DiofsError(f"crash log {a.log} does not exist") from None
    except ValueError as exc:
        raise DiofsError(str(exc)) from None
    if a.cmd == "info":
        print(json.dumps(log.info()))
        return 0
    cut = a.cut + log.n_points if a.cut < 0 else a.cut
    if not 0 <= cut < log.n_points:
        raise DiofsError(f"--cut {a.cut} outside 0..{log.n_points - 1}")
    rng = random.Random(a.seed if a.seed is not None else cut)
    try:
        plan = materialize(log, a.out, cut, rng=rng, mode=a.mode)
    except FileNotFoundError as exc:
        raise DiofsError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise DiofsError(str(exc)) from None
    summary = {
        "cut": cut,
        "mode": a.mode,
        "durable_writes": len(plan.durable),
        "in_flight": len(plan.in_flight),
        "landed": len(plan.landed),
        "torn": plan.torn,
        "dropped": plan.dropped,
    }
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> None:
    from diofs.cli.common import run_main

    run_main("diofs-crash", _cli, argv)


if __name__ == "__main__":
    main()
