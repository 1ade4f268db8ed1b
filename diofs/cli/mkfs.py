"""mkfs.diofs IMAGE --size SIZE [--block-size N] [--dio-align N] [--journal-size SIZE]: write an
empty filesystem (format 2, diofs/format/layout.py). Its cost does not grow with SIZE: it
writes the superblock, the commit slots, the first checkpoint and zeroes the journal.

IMAGE is a file (created, or resized to SIZE), a block device or an NBD URI
(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH). A device or an export has a size of
its own: SIZE, if given, may not exceed it, and the filesystem then uses the first SIZE bytes.
"""

from __future__ import annotations

import argparse
import os
import stat

from diofs import image_lock
from diofs.backend import Backend, is_uri, open_backend
from diofs.cli.common import ArgumentParser, parse_size, run_main
from diofs.errors import DiofsError
from diofs.format import image
from diofs.format.layout import Superblock


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def mkfs(argv: list[str]) -> int:
    p = ArgumentParser(prog="mkfs.diofs", description=__doc__)
    p.add_argument("image")
    p.add_argument("--size", help="image size, e.g. 64M or 2G (default: the existing file's, "
                   "the device's or the export's)")
    p.add_argument("--block-size", type=int, default=4096, help="filesystem block size")
    p.add_argument("--dio-align", type=int, default=512, help="O_DIRECT alignment (512..4096)")
    p.add_argument("--journal-size", help="metadata journal size (default: SIZE / 256 within "
                   "1M..64M); a full journal makes the next commit a checkpoint")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    a.journal_bytes = parse_size(a.journal_size) if a.journal_size else None
    if not _power_of_two(a.block_size) or not 4096 <= a.block_size <= 65536:
        raise DiofsError(f"bad --block-size {a.block_size} (a power of two, 4096..65536)")
    if not _power_of_two(a.dio_align) or not 512 <= a.dio_align <= min(4096, a.block_size):
        raise DiofsError(f"bad --dio-align {a.dio_align} (a power of two, 512..4096)")
    if is_uri(a.image) or _is_block_device(a.image):
        return _mkfs_device(a)
    if a.size is not None:
        size = parse_size(a.size)
    elif os.path.exists(a.image):
        size = os.path.getsize(a.image)
    else:
        raise DiofsError(f"{a.image} does not exist and no --size was given")
    size -= size % a.block_size
    if size <= 0:
        raise DiofsError("--size must be positive")
    if os.path.isdir(a.image):
        raise DiofsError(f"{a.image} is a directory")
    try:
        fd = os.open(a.image, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DiofsError(f"cannot open {a.image}: {exc.strerror}") from None
    try:
        # never over a mounted image (or one fsck is checking): exit 7, nothing written
        image_lock.lock_fd(fd, a.image, exclusive=True)
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        backend = open_backend(a.image)
        try:
            sb = _write(backend, size, a)
        finally:
            backend.close()
    finally:
        os.close(fd)  # releases the lock
    _report(a.image, size, sb)
    return 0


def _mkfs_device(a: argparse.Namespace) -> int:
    """A block device or an NBD export: its size is fixed; lock, then write."""
    lock = image_lock.lock_image(a.image, exclusive=True)  # exit 7 if mounted
    try:
        backend = open_backend(a.image)
        try:
            size = backend.size()
            if a.size is not None:
                want = parse_size(a.size)
                if want > size:
                    raise DiofsError(f"--size {a.size} exceeds {a.image}'s {size} bytes")
                size = want
            size -= size % a.block_size
            if size <= 0:
                raise DiofsError(f"{a.image} is smaller than one block")
            sb = _write(backend, size, a)
        finally:
            backend.close()
    finally:
        os.close(lock)
    _report(a.image, size, sb)
    return 0


def _write(backend: Backend, size: int, a: argparse.Namespace) -> Superblock:
    try:
        return image.mkfs(backend, size, a.block_size, a.dio_align, a.journal_bytes)
    except ValueError as exc:
        raise DiofsError(str(exc)) from None


def _report(name: str, size: int, sb: Superblock) -> None:
    print(
        f"mkfs.diofs: {name}: {size >> 20} MiB, block size {sb.block_size}, "
        f"dio alignment {sb.dio_align}, {sb.data_blocks} data blocks, "
        f"journal {sb.journal_bytes >> 10} KiB"
    )


def main(argv: list[str] | None = None) -> None:
    run_main("mkfs.diofs", mkfs, argv)
