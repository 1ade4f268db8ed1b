"""pytest wiring: options, markers, and the real-mount fixtures (`mounted`, `mount_factory`).

Fixtures:
  mount_factory   `mount_factory(size="64M", opts={...}, bugs=[...], mkfs_args=[...],
                  image=None, mount=True) -> Mount` (harness/mount.py); any number per test.
  mounted         one Mount of a fresh 64M image with default options.
  image           a fresh 64M image made by mkfs.diofs, not mounted (Path); the only `image`.
  blank_file      a 4 MiB file of zeros (str): the raw file under a backend unit test.
  mnt             an empty directory to mount on (Path).
  fuse_required   skips the test when real mounts cannot run here (no /dev/fuse, ...).

Every test that uses a mount has a deadline (default 120 s; `--deadline S` or
`@pytest.mark.deadline(S)`). Past it, the test process's Python stacks are dumped
(faulthandler) and the watchdog rescues every mount of the test (kernel stacks, SIGUSR1 to the
daemon, fusectl abort, lazy unmount), so the test's blocked syscalls return with an error and
the test fails with the report. Teardown then unmounts, requires the daemon's exit 0, a clean
fsck and a clean log (harness/mount.py, `Mount.cleanup`).

`--stress` enables tests marked `@pytest.mark.stress` (skipped otherwise).
`--backend nbd` (or DIOFS_TEST_BACKEND=nbd) mounts every image through nbdkit
(harness/mount.py); tests marked `@pytest.mark.file_image` are then skipped.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import watchdog
from harness.mount import (
    Mount,
    MountFactory,
    fuse_unavailable_reason,
    harness_backend,
    run_cli,
)

DEFAULT_DEADLINE_S = 120.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("diofs")
    group.addoption(
        "--stress", action="store_true", default=False, help="run long stress tests (marked stress)"
    )
    group.addoption(
        "--backend", choices=("raw", "nbd"), default=None,
        help="mount images as files (raw) or through nbdkit (nbd); default $DIOFS_TEST_BACKEND",
    )
    group.addoption(
        "--deadline",
        type=float,
        default=DEFAULT_DEADLINE_S,
        help="per-test deadline in seconds for tests that mount (default 120)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stress: long stress runs (enable with --stress)")
    config.addinivalue_line("markers", "deadline(seconds): per-test deadline for mount tests")
    config.addinivalue_line(
        "markers", "file_image: needs the raw file backend (its lock, path or inline fast path)"
    )
    if config.getoption("--backend"):
        os.environ["DIOFS_TEST_BACKEND"] = config.getoption("--backend")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if harness_backend() == "nbd":
        skip_nbd = pytest.mark.skip(reason="needs a file image (DIOFS_TEST_BACKEND=nbd)")
        for item in items:
            if "file_image" in item.keywords:
                item.add_marker(skip_nbd)
    if config.getoption("--stress"):
        return
    skip = pytest.mark.skip(reason="stress test: run with --stress")
    for item in items:
        if "stress" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def _fusectl() -> str | None:
    """fusectl mounted once per session, so that the watchdog can abort connections."""
    try:
        return watchdog.ensure_fusectl()
    except OSError:
        return None


@pytest.fixture
def fuse_required() -> None:
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(f"real mounts unavailable: {reason}")


def _deadline_s(request: pytest.FixtureRequest) -> float:
    marker = request.node.get_closest_marker("deadline")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(request.config.getoption("--deadline"))


@pytest.fixture
def mount_factory(
    request: pytest.FixtureRequest, tmp_path: Path, fuse_required: None, _fusectl: str | None
) -> Iterator[MountFactory]:
    factory = MountFactory(tmp_path)
    timeout = _deadline_s(request)
    dump_path = tmp_path / "test-stacks.txt"
    dump_file = open(dump_path, "w")  # noqa: SIM115 - closed below
    faulthandler.dump_traceback_later(timeout, exit=False, file=dump_file)
    deadline = watchdog.Deadline(timeout, factory.refs, on_expire=factory.mark_rescued)
    try:
        yield factory
    finally:
        deadline.cancel()
        faulthandler.cancel_dump_traceback_later()
        dump_file.close()
        problems = factory.cleanup()
        if deadline.expired:
            stacks = dump_path.read_text(errors="replace")
            problems.insert(
                0,
                f"test exceeded its deadline of {timeout}s\n"
                f"{deadline.report}\n--- test process stacks ---\n{stacks}",
            )
        with contextlib.suppress(OSError):
            os.unlink(dump_path)
        if problems:
            pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def mounted(mount_factory: MountFactory) -> Mount:
    return mount_factory()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A fresh 64M image made by mkfs.diofs (not mounted)."""
    img = tmp_path / "image"
    run_cli("mkfs.diofs", img, "--size", "64M", check=True)
    return img


@pytest.fixture
def blank_file(tmp_path: Path) -> str:
    """A 4 MiB file of zeros (not a diofs image): the raw file under a backend unit test."""
    path = tmp_path / "blank"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return str(path)


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    """An empty directory to mount on."""
    d = tmp_path / "mnt"
    d.mkdir()
    return d
