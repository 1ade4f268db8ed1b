"""Images whose checksums are valid but whose metadata lies (diofs/format/verify.py).

Each case writes a real image through a real mount, then rewrites its metadata as a new commit
with valid checksums (a crafted image, or a bug in some other writer). The mount must refuse it
with one line (exit 3) and leave every byte of the image as it was; fsck.diofs must report the
problem (exit 4). With `--bug trust-checksums` the same image mounts, and the file whose
extent was moved onto the superblock reads the superblock back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from diofs.errors import EXIT_CORRUPT, EXIT_DAMAGED
from diofs.format import image as image_fmt
from diofs.format import metadata
from diofs.format.layout import MAGIC, Superblock
from tests.crafting import file_inode, move_extent, rewrite_commit
from tests.mounting import MountFactory, run_cli
from tests.test_cli_errors import assert_one_line_error, try_mount

DATA = b"d" * 8192


def _move_extent(phys: Callable[[metadata.Metadata, Superblock], int]) -> Callable[..., None]:
    def mutate(md: metadata.Metadata, sb: Superblock) -> None:
        move_extent(md, b"a", phys(md, sb))

    return mutate


def _impossible_size(md: metadata.Metadata, sb: Superblock) -> None:
    file_inode(md, b"a").size = 1 << 63


def _dangling_entry(md: metadata.Metadata, sb: Superblock) -> None:
    root = md.inodes[image_fmt.ROOT_INO]
    assert root.entries is not None
    root.entries[b"ghost"] = md.next_ino + 7
    md.next_ino += 8


def _used_block_marked_free(md: metadata.Metadata, sb: Superblock) -> None:
    (e,) = list(file_inode(md, b"b").extents)
    md.bitmap[e.phys] = 0


CASES = {
    "extent-on-superblock": (_move_extent(lambda md, sb: 0), "outside the data area"),
    "extent-on-commit-slots": (_move_extent(lambda md, sb: 1), "outside the data area"),
    "extent-on-metadata": (_move_extent(lambda md, sb: sb.meta_start), "outside the data area"),
    "extent-past-end": (_move_extent(lambda md, sb: sb.total_blocks - 1), "outside the data"),
    "extent-on-other-file": (
        _move_extent(lambda md, sb: next(iter(file_inode(md, b"b").extents)).phys),
        "is used by inodes",
    ),
    "impossible-size": (_impossible_size, "impossible size"),
    "dangling-entry": (_dangling_entry, "missing inode"),
    "used-block-marked-free": (_used_block_marked_free, "used block"),
}


@pytest.fixture
def written_image(mount_factory: MountFactory) -> Path:
    """An image holding files a and b (8 KiB each, one extent each), unmounted; the test
    damages it, so its teardown fsck may not be clean."""
    m = mount_factory()
    for name in ("a", "b"):
        with open(m.path(name), "wb") as f:
            f.write(DATA)
    m.unmount()
    m.expect_dirty()
    return m.image


def _digest(img: Path) -> str:
    return hashlib.sha256(img.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_image_is_refused(written_image: Path, mnt: Path, case: str) -> None:
    mutate, problem = CASES[case]
    rewrite_commit(written_image, mutate)
    before = _digest(written_image)
    proc = try_mount(written_image, mnt, foreground=True)
    line = assert_one_line_error(proc, "mount.diofs", contains="run fsck.diofs")
    assert proc.returncode == EXIT_CORRUPT, line
    assert problem in line, line
    assert _digest(written_image) == before, "a refused mount wrote to the image"
    fsck = run_cli("fsck.diofs", written_image)
    assert fsck.returncode == EXIT_DAMAGED, fsck.stdout + fsck.stderr
    assert problem in fsck.stdout + fsck.stderr


def test_trust_checksums_reads_the_superblock(
    written_image: Path, mount_factory: MountFactory
) -> None:
    """The test can fail: without the checks, file a's extent on block 0 reads the superblock."""
    rewrite_commit(written_image, CASES["extent-on-superblock"][0])
    m = mount_factory(image=written_image, bugs=["trust-checksums"])
    m.expect_dirty()
    with open(m.path("a"), "rb") as f:
        head = f.read(len(MAGIC))
    m.unmount()
    assert head == MAGIC, head
