"""The I/O context: the mount-wide objects that the buffered path (diofs/buffered.py) and the
direct path (diofs/dio.py) both work on. Built once by cli/mount.py `Daemon.build`; both
paths, and ops.py, hold the same instance, so neither owns what the other needs.

Nothing here changes after the mount is built; what each object protects, and with which
lock, is said in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass

from diofs.cache import PageCache, Writeback
from diofs.durability import Durability
from diofs.durable_pool import DurablePool
from diofs.fs import Filesystem
from diofs.incore import IncoreInodes
from diofs.kernel_cache import KernelCache
from diofs.locks import FaultMarker
from diofs.native_io import NativeIo


@dataclass(frozen=True, slots=True, eq=False)
class IoContext:
    fs: Filesystem  # metadata, extents, image data I/O
    cache: PageCache  # the daemon page cache
    writeback: Writeback  # its writeback of dirty pages
    inodes: IncoreInodes  # per-inode run-time state: locks, errseq, references
    marker: FaultMarker  # per-task "inside my own DIO BLOCK section" (seed 004)
    durability: Durability  # sync writes, group commit, errseq
    kernel: KernelCache  # what the kernel may cache, and its invalidator
    pool: DurablePool  # O_DSYNC direct overwrites written by the binding's native threads
    native: NativeIo  # direct reads and O_DSYNC overwrites the binding takes without Python
