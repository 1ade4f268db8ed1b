"""Images whose checksums are valid but whose metadata lies (diofs/format/verify.py), and
images whose metadata area is damaged.

Each case writes a real image through a real mount, then rewrites its metadata as a new commit
with valid checksums (a crafted image, or a bug in some other writer): a new checkpoint, or
(the journal-* cases) a journal transaction that the mount replays. The mount must refuse it
with one line (exit 3) and leave every byte of the image as it was; fsck.diofs must report the
problem (exit 4). With `--bug trust-checksums` the same image mounts, and the file whose
extent was moved onto the superblock reads the superblock back.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from diofs import mountinfo
from diofs.backend import open_backend
from diofs.errors import EXIT_CORRUPT, EXIT_DAMAGED
from diofs.format import image as image_fmt
from diofs.format import metadata
from diofs.format.layout import MAGIC, Superblock
from harness.crafting import append_transaction, file_inode, move_extent, rewrite_commit
from harness.mount import MountFactory, run_argv, run_cli, run_tool
from tests.test_cli_errors import (
    assert_one_line_error,
    mount_cmd,
    try_mount,
    unmount_unexpected,
)

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


def _in_journal(mutate: Callable[..., None]) -> Callable[[Path], None]:
    return lambda img: append_transaction(img, mutate)


def _in_checkpoint(mutate: Callable[..., None]) -> Callable[[Path], None]:
    return lambda img: rewrite_commit(img, mutate)


_MUTATIONS = {
    "extent-on-superblock": (_move_extent(lambda md, sb: 0), "outside the data area"),
    "extent-on-commit-slots": (_move_extent(lambda md, sb: 1), "outside the data area"),
    "extent-on-metadata": (_move_extent(lambda md, sb: sb.meta_start), "outside the data area"),
    "extent-on-journal": (_move_extent(lambda md, sb: sb.journal_start), "outside the data area"),
    "extent-past-end": (_move_extent(lambda md, sb: sb.total_blocks - 1), "outside the data"),
    "extent-on-other-file": (
        _move_extent(lambda md, sb: next(iter(file_inode(md, b"b").extents)).phys),
        "is used by inodes",
    ),
    "impossible-size": (_impossible_size, "impossible size"),
    "dangling-entry": (_dangling_entry, "missing inode"),
}
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    name: (_in_checkpoint(mutate), problem) for name, (mutate, problem) in _MUTATIONS.items()
}
CASES.update({
    f"journal-{name}": (_in_journal(_MUTATIONS[name][0]), _MUTATIONS[name][1])
    for name in ("extent-on-superblock", "extent-on-other-file", "impossible-size",
                 "dangling-entry")
})


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
    craft, problem = CASES[case]
    craft(written_image)
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
    CASES["extent-on-superblock"][0](written_image)
    m = mount_factory(image=written_image, bugs=["trust-checksums"])
    m.expect_dirty()
    with open(m.path("a"), "rb") as f:
        head = f.read(len(MAGIC))
    m.unmount()
    assert head == MAGIC, head


# --------------------------------------------------------------------------- damaged images


def _damaged_variants(base: bytes, sb: Superblock, seed: int = 1203) -> dict[str, bytes]:
    """Bit flips in the metadata area, zeroed metadata blocks, truncations."""
    rng = random.Random(seed)
    bs, meta_end = sb.block_size, sb.data_start * sb.block_size
    out: dict[str, bytes] = {}
    for i in range(8):
        img = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            bit = rng.randrange(meta_end * 8)
            img[bit // 8] ^= 1 << (bit % 8)
        out[f"flips-{i}"] = bytes(img)
    regions = [sb.region_offset(0), sb.region_offset(1)]
    for name, off in [("superblock", 0), ("slot-0", sb.slot_offset(0)),
                      ("slot-1", sb.slot_offset(1)), ("region-0", regions[0]),
                      ("region-1", regions[1]), ("journal", sb.journal_offset)]:
        img = bytearray(base)
        start = off - off % bs
        img[start : start + bs] = bytes(bs)
        out[f"zeroed-{name}"] = bytes(img)
    for size in (0, 100, bs, meta_end, len(base) - bs):
        out[f"truncated-{size}"] = base[:size]
    return out


def test_damaged_images_give_one_line_or_mount(written_image: Path, tmp_path: Path) -> None:
    """Bit flips, zeroed blocks and truncations of the metadata area: fsck.diofs reports
    (exit 0, 3 or 4, never a traceback) and mount.diofs either mounts a valid older commit
    or refuses with one line; nothing hangs (the test's deadline)."""
    base = written_image.read_bytes()
    backend = open_backend(str(written_image), writable=False)
    try:
        sb = image_fmt.load(backend).sb
    finally:
        backend.close()
    mnt = tmp_path / "dmnt"
    mnt.mkdir()
    outcomes: dict[str, int] = {}
    for name, raw in _damaged_variants(base, sb).items():
        img = tmp_path / f"damaged-{name}"
        img.write_bytes(raw)
        fsck = run_tool("fsck.diofs", img)
        assert fsck.returncode in (0, EXIT_CORRUPT, EXIT_DAMAGED), (name, fsck)
        assert "Traceback" not in fsck.stdout + fsck.stderr, (name, fsck.stderr)
        proc = run_argv(mount_cmd(img, mnt))
        if proc.returncode == 0:
            assert mountinfo.is_mounted(mnt), name
            unmount_unexpected(mnt)
        else:
            assert_one_line_error(proc, "mount.diofs")
        outcomes[name] = proc.returncode
        img.unlink()
    assert any(rc == 0 for rc in outcomes.values()), outcomes  # older commits do mount
    assert any(rc == EXIT_CORRUPT for rc in outcomes.values()), outcomes
