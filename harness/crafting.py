"""Crafted images: a commit rewritten with valid checksums around metadata that lies, as a new
checkpoint (`rewrite_commit`) or as a journal transaction replayed at mount
(`append_transaction`) (tests/test_crafted_images.py, scripts/demo_trust_checksums.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
