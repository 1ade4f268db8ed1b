"""Crafted images: a commit rewritten with valid checksums around metadata that lies, as a new
checkpoint (`rewrite_commit`) or as a journal transaction replayed at mount
(`append_transaction`) (tests/test_crafted_images.py, scripts/demo_trust_checksums.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diofs.backend import open_backend
from diofs.format import image, journal, metadata
from diofs.format.extents import Extent, ExtentMap
from diofs.format.layout import Superblock


def rewrite_commit(img: Path, mutate: Callable[[metadata.Metadata, Superblock], None]) -> None:
    """Load the image's current commit, let `mutate` change it, commit it with valid sums."""
    backend = open_backend(str(img), writable=True)
    try:
        loaded = image.load(backend)
        mutate(loaded.md, loaded.sb)
        for inode in loaded.md.inodes.values():
            inode.record = None
        image.write_commit(
            backend, loaded.sb, loaded.generation + 1, metadata.encode(loaded.md)
        )
    finally:
        backend.close()


def append_transaction(
    img: Path, mutate: Callable[[metadata.Metadata, Superblock], None]
) -> None:
    """Load the image's current commit, let `mutate` change it, and append the result to the
    journal as the next transaction (every inode's record, the changed names), with valid
    checksums."""
    backend = open_backend(str(img), writable=True)
    try:
        loaded = image.load(backend)
        assert loaded.checkpoint is not None
        md = loaded.md
        mutate(md, loaded.sb)
        dirs = [(i.ino, i.entries.take_changes()) for i in md.inodes.values()
                if i.entries is not None]
        body = journal.payload(md.inodes.values(), dirs, [])
        sb = loaded.sb
        header = (sb.fs_id, loaded.checkpoint.generation, loaded.generation + 1, md.next_ino)
        txn = journal.transaction(header, body, sb.block_size)
        image.append_transaction(backend, sb, loaded.journal_end, txn, True)
    finally:
        backend.close()


def one_transaction_then_kill(factory: Any, bugs: list[str]) -> Path:
    """An image whose journal holds one transaction of about 3 KiB (12 new files with long
    names) after the checkpoint of a clean unmount (file `f`, 5000 bytes of b"f"); the daemon
    is killed after the fsync that wrote it. `factory`: a harness.mount.MountFactory."""
    m = factory(opts={"commit_interval": 600}, bugs=bugs)
    with open(m.path("f"), "wb") as f:
        f.write(b"f" * 5000)
    m.remount()
    for i in range(12):
        with open(m.path("n" * 100 + str(i)), "wb") as f:
            f.write(b"x")
    fd = os.open(m.path("f"), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    m.kill()
    m.expect_dirty()
    return Path(m.image)


def tear_first_append(img: Path) -> int:
    """Zero the journal's first transaction after its first 512-byte sector, as a power cut
    in the middle of the append leaves it (the header landed, the records did not). Returns
    the transaction's payload length."""
    backend = open_backend(str(img), writable=True)
    try:
        loaded = image.load(backend)
        sb = loaded.sb
        header = journal.Header.unpack(backend.read(sb.journal_offset, sb.block_size))
        assert header is not None and loaded.replayed == 1, "expected one transaction"
        backend.write(sb.journal_offset + 512, bytes(loaded.journal_end - 512))
        backend.flush()
        return header.payload_len
    finally:
        backend.close()


def file_inode(md: metadata.Metadata, name: bytes) -> metadata.Inode:
    """The inode of the root directory's entry `name`."""
    root = md.inodes[image.ROOT_INO]
    assert root.entries is not None
    return md.inodes[root.entries[name]]


def move_extent(md: metadata.Metadata, name: bytes, phys: int) -> None:
    """Point the only extent of file `name` at image block `phys`."""
    inode = file_inode(md, name)
    (e,) = list(inode.extents)
    inode.extents = ExtentMap([Extent(e.start, phys, e.count, e.unwritten)])
