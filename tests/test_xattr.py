"""Extended attributes on a real mount (issue 17 item 4): the syscalls and their errnos,
persistence, crash consistency, fsck, cp -a / tar --xattrs, and the per-write GETXATTR that
FUSE_HANDLE_KILLPRIV_V2 removes (with the suid/sgid kill that the daemon then owes).

`--bug no-killpriv-v2` gives the INIT reply libfuse 3.14 sends by itself: the GETXATTR count
test asserts one request per WRITE there, and none (or one per file) by default. The suid
tests run both ways: the kernel kills suid/sgid itself without KILLPRIV_V2, the daemon with it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import shutil
import stat
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from diofs.backend import crash
from diofs.backend.raw import RawImage
from diofs.format import image, metadata
from diofs.format import xattrs as xattr_format
from harness.mount import Mount, MountFactory, run_cli, run_in_child
from tests.test_crash_namespace import load_offline

XATTR_CREATE, XATTR_REPLACE = os.XATTR_CREATE, os.XATTR_REPLACE
NOBODY = 65534
OTHERS = {"allow_other": True}  # FUSE denies every other uid without it
# a valid VFS_CAP_REVISION_2 security.capability value (cap_net_bind_service permitted)
CAPABILITY = struct.pack("<IIIII", 0x02000000, 1 << 10, 0, 0, 0)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.getxattr.restype = ctypes.c_ssize_t
_libc.listxattr.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.listxattr.restype = ctypes.c_ssize_t


def _errno_of(fn: Any, *args: Any, **kwargs: Any) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args, **kwargs)
    return exc.value.errno  # type: ignore[no-any-return]


def _raw_getxattr(path: str, name: str, size: int) -> tuple[int, int]:
    """getxattr(2) with a buffer of `size` bytes (0: the size probe): (result, errno)."""
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.getxattr(path.encode(), name.encode(), buf if size else None, size)
    return n, ctypes.get_errno() if n < 0 else 0


def _raw_listxattr(path: str, size: int) -> tuple[int, int]:
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.listxattr(path.encode(), buf if size else None, size)
    return n, ctypes.get_errno() if n < 0 else 0


def _file(m: Mount, name: str = "f", data: bytes = b"data") -> str:
    p = m.path(name)
    with open(p, "wb") as f:
        f.write(data)
    return p


def _as_user(mnt: str, fn: Any, *args: Any, uid: int = NOBODY, gid: int = NOBODY) -> Any:
    """Run fn(*args) in a child after dropping to uid/gid (no capabilities left), in the
    mount's root directory (entered by a descriptor: the test's tmp dirs are root-only), so
    `args` name files relative to it."""

    def child() -> Any:
        dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        os.fchdir(dfd)
        return fn(*args)

    return run_in_child(child, timeout=30)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (trusted.*, setuid)")


# --------------------------------------------------------------------------- the syscalls
def test_set_get_list_remove_on_file_and_directory(mounted: Mount) -> None:
    f = _file(mounted)
    d = mounted.path("d")
    os.mkdir(d)
    for p in (f, d):
        os.setxattr(p, "user.a", b"1")
        os.setxattr(p, "user.b", b"")
        os.setxattr(p, "user.a", b"22")  # replace
        assert os.getxattr(p, "user.a") == b"22"
        assert os.getxattr(p, "user.b") == b""
        assert sorted(os.listxattr(p)) == ["user.a", "user.b"]
        os.removexattr(p, "user.a")
        assert os.listxattr(p) == ["user.b"]
        assert _errno_of(os.getxattr, p, "user.a") == errno.ENODATA


def test_create_and_replace_flags(mounted: Mount) -> None:
    p = _file(mounted)
    assert _errno_of(os.setxattr, p, "user.x", b"1", XATTR_REPLACE) == errno.ENODATA
    os.setxattr(p, "user.x", b"1", XATTR_CREATE)
    assert _errno_of(os.setxattr, p, "user.x", b"2", XATTR_CREATE) == errno.EEXIST
    os.setxattr(p, "user.x", b"3", XATTR_REPLACE)
    assert os.getxattr(p, "user.x") == b"3"


def test_size_probes_and_erange(mounted: Mount) -> None:
    p = _file(mounted)
    os.setxattr(p, "user.long", b"v" * 100)
    os.setxattr(p, "user.s", b"1")
    assert _raw_getxattr(p, "user.long", 0) == (100, 0)
    assert _raw_getxattr(p, "user.long", 99) == (-1, errno.ERANGE)
    assert _raw_getxattr(p, "user.long", 100) == (100, 0)
    names = len(b"user.long\0user.s\0")
    assert _raw_listxattr(p, 0) == (names, 0)
    assert _raw_listxattr(p, names - 1) == (-1, errno.ERANGE)
    assert _raw_listxattr(p, names) == (names, 0)


def test_limits_erange_e2big_enospc(mounted: Mount) -> None:
    p = _file(mounted)
    assert _errno_of(os.setxattr, p, "user." + "n" * 251, b"1") == errno.ERANGE  # 256 bytes
    os.setxattr(p, "user." + "n" * 250, b"1")  # 255 bytes: allowed
    assert _errno_of(os.setxattr, p, "user.big", b"v" * (xattr_format.VALUE_MAX + 1)) == (
        errno.E2BIG
    )
    os.setxattr(p, "user.v1", b"v" * 40000)
    assert _errno_of(os.setxattr, p, "user.v2", b"v" * 30000) == errno.ENOSPC
    os.setxattr(p, "user.v1", b"v" * 10000)  # replacing frees the old value's room
    os.setxattr(p, "user.v2", b"v" * 30000)
    assert _errno_of(os.removexattr, p, "user.missing") == errno.ENODATA


def test_namespaces(mounted: Mount) -> None:
    p = _file(mounted)
    link = mounted.path("l")
    os.symlink("f", link)
    # user.* only on regular files and directories
    assert _errno_of(os.setxattr, link, "user.x", b"1", 0, follow_symlinks=False) == errno.EPERM
    # POSIX ACLs are not supported (no FUSE_CAP_POSIX_ACL); unknown namespaces neither
    assert _errno_of(os.setxattr, p, "system.posix_acl_access", b"\x02\0\0\0") == errno.EOPNOTSUPP
    assert _errno_of(os.setxattr, p, "bogus.x", b"1") == errno.EOPNOTSUPP
    assert _errno_of(os.getxattr, p, "system.posix_acl_access") in (errno.ENODATA, errno.EOPNOTSUPP)


@needs_root
def test_trusted_and_security_need_root(mount_factory: MountFactory) -> None:
    mounted = mount_factory(opts=OTHERS)
    p = _file(mounted)
    os.chmod(p, 0o666)
    os.setxattr(p, "trusted.t", b"root")
    os.setxattr(p, "security.s", b"label")
    os.setxattr(p, "user.u", b"all")

    def unprivileged(path: str) -> dict[str, Any]:
        out: dict[str, Any] = {"list": sorted(os.listxattr(path))}
        for name in ("trusted.t2", "security.s2"):
            try:
                os.setxattr(path, name, b"x")
                out[name] = 0
            except OSError as exc:
                out[name] = exc.errno
        try:
            os.getxattr(path, "trusted.t")
            out["get trusted"] = 0
        except OSError as exc:
            out["get trusted"] = exc.errno
        out["get security"] = os.getxattr(path, "security.s")
        try:
            os.removexattr(path, "security.s")
            out["remove security"] = 0
        except OSError as exc:
            out["remove security"] = exc.errno
        os.setxattr(path, "user.mine", b"1")
        return out

    got = _as_user(mounted.mnt, unprivileged, "f")
    assert got["list"] == ["security.s", "user.u"]  # trusted.* hidden from non-root
    assert got["trusted.t2"] == errno.EPERM and got["security.s2"] == errno.EPERM
    assert got["get trusted"] == errno.ENODATA
    assert got["get security"] == b"label"
    assert got["remove security"] == errno.EPERM  # the kernel's check (cap_inode_removexattr)
    assert sorted(os.listxattr(p)) == ["security.s", "trusted.t", "user.mine", "user.u"]


# --------------------------------------------------------------------------- the encoding
def test_blob_round_trip_md1_without_xattrs_md2_with() -> None:
    """Off-line: a blob without xattrs is byte-for-byte the md1 layout; with them, md2 round
    trips names and values, and an ino without an inode is reported, not loaded."""
    root = metadata.Inode(1, stat.S_IFDIR | 0o755, nlink=2, entries={b"f": 2})
    f = metadata.Inode(2, stat.S_IFREG | 0o644)
    md = metadata.Metadata(3, {1: root, 2: f})
    plain = zlib.decompress(metadata.encode(md))
    assert plain[:8] == b"DIOFSmd1"
    f.xattrs = {b"user.a": b"1", b"security.b": bytes(300)}
    f.record = None
    raw = zlib.decompress(metadata.encode(md))
    assert raw[:8] == b"DIOFSmd2" and raw[8 : len(plain)] == plain[8:]
    back = metadata.decode(metadata.encode(md))
    assert back.inodes[2].xattrs == f.xattrs and back.inodes[1].xattrs is None
    assert back.lost_xattrs == []
    # a section naming inode 9, which the blob does not hold
    raw2 = raw[: len(plain)] + struct.pack("<I", 1) + struct.pack("<QI", 9, 1)
    raw2 += struct.pack("<BI", 6, 1) + b"user.z" + b"z"
    lost = metadata.decode(zlib.compress(raw2)).lost_xattrs
    assert lost == ["xattrs of inode 9, which does not exist"]


# --------------------------------------------------------------------------- persistence
def _blob_magic(img: Path) -> bytes:
    backend = RawImage(str(img), writable=False)
    try:
        sb = image.read_superblock(backend)
        slot = max((s for s in image.read_slots(backend, sb) if s), key=lambda s: s.generation)
        raw = backend.read(sb.region_offset(slot.region), slot.blob_len)
    finally:
        backend.close()
    return zlib.decompress(raw)[:8]


def test_persist_across_remount_and_unlink_frees(mounted: Mount) -> None:
    p = _file(mounted)
    os.mkdir(mounted.path("d"))
    os.setxattr(p, "user.a", b"\0\1binary\xff")
    os.setxattr(mounted.path("d"), "user.b", b"dir")
    ino = os.stat(p).st_ino
    mounted.remount()
    assert os.getxattr(p, "user.a") == b"\0\1binary\xff"
    assert os.getxattr(mounted.path("d"), "user.b") == b"dir"
    assert _blob_magic(mounted.image) == b"DIOFSmd2"
    os.unlink(p)
    os.rmdir(mounted.path("d"))
    mounted.unmount()
    off = load_offline(str(mounted.image))
    assert off.problems == []
    assert ino not in off.fs.inodes
    assert all(n.xattrs is None for n in off.fs.inodes.values())
    # no xattr left: the blob is the format of images that never had one
    assert _blob_magic(mounted.image) == b"DIOFSmd1"
    mounted.start()


def test_image_without_xattrs_keeps_md1(mounted: Mount) -> None:
    _file(mounted)
    mounted.unmount()
    assert _blob_magic(mounted.image) == b"DIOFSmd1"
    mounted.start()


# --------------------------------------------------------------------------- fsck
def _rewrite_blob(img: Path, edit: Any) -> None:
    """Load the image, let `edit(raw_blob_bytes) -> raw` change the decompressed blob, and
    commit it as the next generation (what a corruption with a valid checksum looks like)."""
    backend = RawImage(str(img), writable=True)
    try:
        loaded = image.load(backend)
        raw = zlib.decompress(metadata.encode(loaded.md))
        image.write_commit(backend, loaded.sb, loaded.generation + 1, zlib.compress(edit(raw)))
    finally:
        backend.close()


def test_fsck_finds_bad_name_and_xattrs_of_missing_inode(mount_factory: MountFactory) -> None:
    m = mount_factory()
    p = _file(m)
    os.setxattr(p, "user.good", b"1")
    os.setxattr(p, "user.zzzz", b"2")
    m.unmount()
    m.fsck()
    # (a) a name outside every namespace, same length so the record stays well-formed
    _rewrite_blob(m.image, lambda raw: raw.replace(b"user.zzzz", b"bogus.zzz"))
    proc = run_cli("fsck.diofs", m.image)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "has no supported namespace" in proc.stdout
    # (b) xattrs of an inode that does not exist, appended as a second section entry
    def orphan(raw: bytes) -> bytes:
        count_at = raw.rindex(struct.pack("<QI", 2, 2)) - 4  # after the bitmap: n_inodes
        (n,) = struct.unpack_from("<I", raw, count_at)
        extra = struct.pack("<QI", 999, 1) + struct.pack("<BI", 6, 1) + b"user.o" + b"x"
        return raw[:count_at] + struct.pack("<I", n + 1) + raw[count_at + 4 :] + extra
    _rewrite_blob(m.image, orphan)
    proc = run_cli("fsck.diofs", m.image)
    assert proc.returncode == 4
    assert "xattrs of inode 999, which does not exist" in proc.stdout
    assert "has no supported namespace" in proc.stdout
    proc = run_cli("fsck.diofs", m.image, "--repair")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m.fsck()
    m.start()
    assert os.listxattr(p) == ["user.good"]


# --------------------------------------------------------------------------- tools
def test_cp_a_and_tar_xattrs_preserve_user_xattr(mounted: Mount, tmp_path: Path) -> None:
    src = _file(mounted, "src", b"payload")
    os.setxattr(src, "user.keep", b"me")
    subprocess.run(["cp", "-a", src, mounted.path("copy")], check=True)
    assert os.getxattr(mounted.path("copy"), "user.keep") == b"me"
    if shutil.which("tar") is None:
        pytest.skip("tar is missing")
    tarball = tmp_path / "t.tar"
    subprocess.run(["tar", "--xattrs", "--xattrs-include=user.*", "-cf", str(tarball), "-C",
                    mounted.mnt, "src"], check=True)
    os.mkdir(mounted.path("x"))
    subprocess.run(["tar", "--xattrs", "--xattrs-include=user.*", "-xf", str(tarball), "-C",
                    mounted.path("x")], check=True)
    assert os.getxattr(mounted.path("x", "src"), "user.keep") == b"me"


# --------------------------------------------------------------------------- KILLPRIV_V2
def _write_loop(path: str, n: int, direct: bool) -> None:
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, 4096)
    buf.write(b"w" * 4096)
    try:
        for i in range(n):
            os.pwritev(fd, [buf], (i % 8) * 4096)
    finally:
        os.close(fd)
        buf.close()


@pytest.mark.parametrize("bug", [None, "no-killpriv-v2"])
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_getxattr_count_under_write_loop(
    mount_factory: MountFactory, bug: str | None, direct: bool
) -> None:
    m = mount_factory(bugs=[bug] if bug else [])
    p = _file(m, data=bytes(8 * 4096))
    os.setxattr(p, "user.x", b"1")  # the mount answers xattrs
    before = m.stats()
    _write_loop(p, 500, direct)
    after = m.stats()
    writes = after["ops.write"] - before["ops.write"]
    getxattr = after.get("ops.getxattr", 0) - before.get("ops.getxattr", 0)
    assert writes >= 500
    if bug:
        assert after["fuse.killpriv_v2"] == 0
        assert getxattr >= writes  # security.capability before every WRITE
    else:
        assert after["fuse.killpriv_v2"] == 1
        assert getxattr <= 1, (getxattr, writes)


def _suid_file(m: Mount, name: str, mode: int) -> str:
    p = _file(m, name, b"x" * 8192)
    os.chown(p, 1000, 1000)
    os.chmod(p, mode)
    return p


def _kill_by(how: str, mnt: str, name: str) -> None:
    """As uid/gid 1000 (in the file's group, no CAP_FSETID). The mount's root dir is reached
    through a descriptor opened before the uid change (the test's tmp dirs are root-only)."""
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(name, os.O_RDWR, dir_fd=dfd)
    os.setgroups([])
    os.setgid(1000)
    os.setuid(1000)
    if how == "write":
        os.pwrite(fd, b"y", 0)
    elif how == "truncate":
        os.ftruncate(fd, 4096)
    elif how == "open-trunc":
        os.close(os.open(name, os.O_WRONLY | os.O_TRUNC, dir_fd=dfd))
    os.close(fd)


@needs_root
@pytest.mark.parametrize("bug", [None, "no-killpriv-v2"])
@pytest.mark.parametrize("how", ["write", "truncate", "open-trunc"])
def test_unprivileged_write_truncate_open_trunc_kill_suid_sgid(
    mount_factory: MountFactory, bug: str | None, how: str
) -> None:
    m = mount_factory(bugs=[bug] if bug else [], opts=OTHERS)
    both = _suid_file(m, "both", 0o6775)  # suid + sgid + group x: both go
    os.setxattr(both, "security.capability", CAPABILITY)  # goes too
    sgid_only = _suid_file(m, "nox", 0o6745)  # sgid without group x: stays (in the group)
    run_in_child(_kill_by, how, m.mnt, "both", timeout=30)
    run_in_child(_kill_by, how, m.mnt, "nox", timeout=30)
    if bug and how == "open-trunc":
        # without KILLPRIV_V2 the kernel drops this kill: with atomic_o_trunc it sends no
        # SETATTR for an open's truncate, the mode change included (fuse-facts-more row 27)
        assert stat.S_IMODE(os.stat(both).st_mode) == 0o6775
        return
    assert stat.S_IMODE(os.stat(both).st_mode) == 0o0775
    assert stat.S_IMODE(os.stat(sgid_only).st_mode) == 0o2745
    assert "security.capability" not in os.listxattr(both)
    m.remount()  # the daemon's own inode changed, not just the kernel's view
    assert stat.S_IMODE(os.stat(both).st_mode) == 0o0775


@needs_root
@pytest.mark.parametrize("bug", [None, "no-killpriv-v2"])
def test_root_write_keeps_suid_and_drops_capability(
    mount_factory: MountFactory, bug: str | None
) -> None:
    m = mount_factory(bugs=[bug] if bug else [])
    p = _file(m, "cap", b"x" * 4096)
    os.chmod(p, 0o4755)
    os.setxattr(p, "security.capability", CAPABILITY)
    assert os.getxattr(p, "security.capability") == CAPABILITY
    with open(p, "r+b") as f:
        f.write(b"y")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4755  # CAP_FSETID keeps suid
    assert _errno_of(os.getxattr, p, "security.capability") == errno.ENODATA


# --------------------------------------------------------------------------- crash consistency
def _xattr_workload(mnt: str, log: str, seed: int, steps: int) -> dict[str, Any]:
    """setxattr / replace / remove on a few files, fsync now and then. Returns, per file,
    the list of states (xattr dicts) it went through and, per fsync, the crash-log size when
    it returned and the state index it made durable."""
    rng = random.Random(seed)
    names = ["f0", "f1", "d0"]
    states: dict[str, list[dict[str, str]]] = {n: [{}] for n in names}
    inos: dict[str, int] = {}
    for n in names:
        p = os.path.join(mnt, n)
        if n.startswith("d"):
            os.mkdir(p)
        else:
            with open(p, "wb") as f:
                f.write(b"x")
        inos[n] = os.stat(p).st_ino
    fsyncs: list[dict[str, Any]] = []
    for step in range(steps):
        n = rng.choice(names)
        p = os.path.join(mnt, n)
        cur = dict(states[n][-1])
        if rng.random() < 0.25:
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            fsyncs.append({"name": n, "pos": os.stat(log).st_size,
                           "state": len(states[n]) - 1})
            continue
        key = f"user.k{rng.randrange(6)}"
        if key in cur and rng.random() < 0.3:
            os.removexattr(p, key)
            del cur[key]
        else:
            value = f"{step}:" + "v" * rng.choice([0, 10, 300, 5000])
            os.setxattr(p, key, value.encode())
            cur[key] = value
        states[n].append(cur)
    return {"states": states, "inos": inos, "fsyncs": fsyncs}


@pytest.mark.deadline(150)
def test_crash_cuts_show_a_whole_xattr_state_never_older_than_fsync(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    log = str(tmp_path / "crash.log")
    m = mount_factory(size="48M", opts={"backend": "crash", "crash_log": log,
                                        "commit_interval": 0.05})
    result = run_in_child(_xattr_workload, m.mnt, log, 17, 240, timeout=90, mounts=[m])
    cl = crash.load_log(log)
    m.unmount()
    states, inos = result["states"], result["inos"]
    rng = random.Random(5)
    cuts = sorted(set(rng.sample(range(cl.n_points), min(cl.n_points, 120)))
                  | {cl.records_before(f["pos"]) for f in result["fsyncs"]} | {cl.n_points - 1})
    out = str(tmp_path / "cut.img")
    failures: list[str] = []
    seen_md2 = 0
    for cut in cuts:
        crash.materialize(cl, out, cut, rng=random.Random(cut), mode="random")
        off = load_offline(out)
        failures += [f"cut {cut}: fsck: {p}" for p in off.problems]
        for name, ino in inos.items():
            inode = off.fs.inodes.get(ino)
            if inode is None:
                continue  # created after the cut's commit
            got = {k.decode(): v.decode() for k, v in (inode.xattrs or {}).items()}
            seen_md2 += bool(got)
            if got not in states[name]:
                failures.append(f"cut {cut}: {name} has xattrs {sorted(got)} never set together")
                continue
            index = max(i for i, s in enumerate(states[name]) if s == got)
            acked = [f["state"] for f in result["fsyncs"]
                     if f["name"] == name and cl.records_before(f["pos"]) <= cut]
            if acked and index < max(acked):
                failures.append(f"cut {cut}: {name} at state {index}, fsync'ed {max(acked)}")
    assert not failures, "\n".join(failures[:20])
    assert len(result["fsyncs"]) >= 30 and seen_md2 > 50
