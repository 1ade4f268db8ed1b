"""The tree-copy jobs (issue 17): cp -a, tar extract, git add + commit and rm -rf of a tree.

The source tree (``--tree-src``, default /usr/include) is surveyed once (files, directories,
symlinks, bytes: shown in the report) and packed once into a tarball in the work dir, on the
local disk, before any job runs; the tarball's own making is not timed.

Invariants: the four steps of one repetition build on each other on every peer, in job-table
order (the runner runs each job on every peer before the next job):
    tree-cp-a        cp -a SRC DATA/tree-REP
    tree-git-commit  in DATA/tree-REP: git init, git add -A, git commit (config from env only)
    tree-rm-rf       rm -rf DATA/tree-REP (the copy and its .git)
    tree-tar-x       mkdir DATA/tar-REP; tar -xf TARBALL -C DATA/tar-REP; then, untimed and
                     after the run's counters are read, rm -rf DATA/tar-REP (`cleanup_command`)
A step whose predecessor failed fails too (its directory is missing); names carry REP, so a
leftover of a failed repetition never collides with a later one.

Why this order, with one copy on the mount at a time: the C peer (passthrough_ll) holds an
O_PATH fd per inode the kernel knows; a second copy of /usr/include next to the first and its
.git passed the 20,000 fds allowed here (no CAP_SYS_RESOURCE to raise it), and its git commit
failed with EBADF.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_SRC = Path("/usr/include")
TARBALL = "tree-src.tar"
STEPS = ("cp-a", "git-commit", "rm-rf", "tar-x")

# git must not read the user's or the system's configuration, only this
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "diofs bench",
    "GIT_AUTHOR_EMAIL": "bench@diofs.invalid",
    "GIT_COMMITTER_NAME": "diofs bench",
    "GIT_COMMITTER_EMAIL": "bench@diofs.invalid",
}


@dataclasses.dataclass(frozen=True)
class TreeSource:
    """The source tree of a run: its path, its survey (:func:`survey`) and its tarball."""

    path: Path
    info: dict[str, Any]
    tarball: Path


def prepare(src: Path, workdir: Path) -> TreeSource:
    """Survey ``src`` and pack it into the work dir. Raises ValueError (one line)."""
    info = survey(src)
    return TreeSource(src, info, make_tarball(src, workdir))


def survey(src: Path) -> dict[str, Any]:
    """Counts of the tree at ``src``: files (regular), dirs, symlinks, bytes (regular files).

    Raises ValueError (one line) when ``src`` is not a readable directory.
    """
    if not src.is_dir():
        raise ValueError(f"tree source {src} is not a directory")
    files = dirs = links = other = size = 0
    for root, dnames, fnames in os.walk(src, onerror=_raise):  # does not follow symlinks
        dirs += 1
        for name in dnames + fnames:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISLNK(st.st_mode):
                links += 1
            elif stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
            elif not stat.S_ISDIR(st.st_mode):
                other += 1
    return {
        "path": str(src),
        "files": files,
        "dirs": dirs,
        "symlinks": links,
        "other": other,
        "bytes": size,
    }


def _raise(exc: OSError) -> None:
    raise ValueError(f"tree source: {exc}")


def describe(src: dict[str, Any]) -> str:
    """'/usr/include: 8,002 files, 130 MB (7 symlinks, 300 dirs)'."""
    return (
        f"{src['path']}: {src['files']:,} files, {src['bytes'] / 1e6:.0f} MB "
        f"({src['dirs']:,} dirs, {src['symlinks']:,} symlinks)"
    )


def make_tarball(src: Path, workdir: Path) -> Path:
    """Pack ``src`` into ``workdir/TARBALL`` (local disk); returns its path."""
    out = workdir / TARBALL
    r = subprocess.run(
        ["tar", "-cf", str(out), "-C", str(src), "."], capture_output=True, text=True, timeout=600
    )
    if r.returncode != 0:
        raise ValueError(f"tar of {src} failed: {r.stderr.strip()[-300:]}")
    return out


def timeout_s(src: dict[str, Any]) -> float:
    """Deadline of one step: generous (the Python peer runs ~40x slower than ext4)."""
    return max(300.0, src["files"] * 0.1 + src["bytes"] / 1e6)


def step_command(
    step: str, data_dir: Path, rep: int, tree_src: TreeSource
) -> tuple[list[str], Path | None, dict[str, str] | None]:
    """(argv, cwd, extra environment) of one step."""
    src, tarball = tree_src.path, tree_src.tarball
    tree = data_dir / f"tree-{rep}"
    tar_dir = data_dir / f"tar-{rep}"
    if step == "cp-a":
        return ["cp", "-a", str(src), str(tree)], None, None
    if step == "tar-x":
        script = 'mkdir "$1" && exec tar -xf "$2" -C "$1"'
        return ["sh", "-c", script, "sh", str(tar_dir), str(tarball)], None, None
    if step == "git-commit":
        script = "git init -q -b main . && git add -A && git commit -q -m tree"
        return ["sh", "-c", script], tree, GIT_ENV
    if step == "rm-rf":
        return ["rm", "-rf", str(tree)], None, None
    raise ValueError(f"unknown tree step {step!r}")


def cleanup_command(step: str, data_dir: Path, rep: int) -> list[str] | None:
    """argv run after ``step``'s figures are taken (untimed, uncounted), or None."""
    if step == "tar-x":
        return ["rm", "-rf", str(data_dir / f"tar-{rep}")]
    return None
