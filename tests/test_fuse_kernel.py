"""The kernel FUSE engine (vdisk.export.fuse.kernel: the protocol spoken on /dev/fuse by reader
threads) against the real kernel.

* tests/test_fuse.py runs on this engine (the default); tests/test_fuse_pyfuse3.py
  runs it again on pyfuse3;
* what only this engine does: fallocate punch-hole / zero-range on MOUNTPOINT/disk,
  discard from a loop device (blkdiscard, fstrim of an ext4 on it), the second
  signal of a busy mount, mounting through fusermount3, several reader threads;
* the protocol module's layouts, checked against the sizes of include/uapi/linux/fuse.h
  (no I/O), and the engine in-process on a real mount (tree, xattrs, readdir paging,
  refused operations, invalidation).

Everything a test sets up is torn down by vdisk.export.fuse.testing.Rig (or the ``served``
fixture) even when it fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import random
import signal
import subprocess
import time

import pytest
import test_fuse as _tf
from test_fuse import rig  # noqa: F401  (the fixture, for the imported tests and ours)

import vdisk
from vdisk.export.fuse import control
from vdisk.export.fuse.daemon import is_mounted
from vdisk.export.fuse.fs import DISK_INO, ROOT_INO, SNAPDIR_INO, VdiskFS
from vdisk.export.fuse.kernel import mount as kmount
from vdisk.export.fuse.kernel import proto
from vdisk.export.fuse.kernel.engine import KernelEngine
from vdisk.export.fuse.testing import need_loop, run, wait_until

MiB = 1 << 20

fuse_test = [pytest.mark.fuse, pytest.mark.timeout(180)]


def _fuse(fn):
    for m in fuse_test:
        fn = m(fn)
    return fn


@pytest.fixture(autouse=True)
def kernel_engine(monkeypatch, tmp_path):
    """Every mount a test makes through vdisk.export.fuse.daemon uses the kernel engine; after
    the test, no daemon log under its directory may name another one."""
    monkeypatch.setenv("VDISK_FUSE_ENGINE", "kernel")
    yield
    for log in tmp_path.rglob("*.log"):
        text = log.read_text(errors="replace")
        assert "engine pyfuse3" not in text, f"{log} shows a pyfuse3 mount"


# ---------------------------------------------------------------- the protocol's layouts (no I/O)
def test_struct_sizes_match_the_kernel_header():
    # sizeof() of each struct in include/uapi/linux/fuse.h (7.38)
    sizes = {
        proto.IN_HEADER: 40, proto.OUT_HEADER: 16, proto.RW_IN: 40, proto.WRITE_OUT: 8, proto.INIT_IN: 16,
        proto.INIT_OUT: 64, proto.ATTR: 88, proto.ENTRY_OUT_HEAD: 40, proto.ATTR_OUT_HEAD: 16,
        proto.GETATTR_IN: 16, proto.SETATTR_IN: 88, proto.OPEN_IN: 8, proto.CREATE_IN: 16, proto.OPEN_OUT: 16,
        proto.RELEASE_IN: 24, proto.FLUSH_IN: 24, proto.FSYNC_IN: 16, proto.GETXATTR_IN: 8,
        proto.GETXATTR_OUT: 8, proto.ACCESS_IN: 8, proto.KSTATFS: 80, proto.INTERRUPT_IN: 8,
        proto.FALLOCATE_IN: 32, proto.BATCH_FORGET_IN: 8, proto.FORGET_ONE: 16, proto.DIRENT: 24,
        proto.NOTIFY_INVAL_INODE_OUT: 24, proto.NOTIFY_INVAL_ENTRY_OUT: 16, proto.NOTIFY_DELETE_OUT: 24,
    }
    for st, size in sizes.items():
        assert st.size == size, (st.format, st.size, size)
    assert proto.ENTRY_OUT_SIZE == 128 and proto.ATTR_OUT_SIZE == 104 and proto.WRITE_DATA_OFFSET == 80
    assert proto.DEV_IOC_CLONE == 0x8004E500


def test_init_out_fields_are_where_the_kernel_reads_them():
    raw = proto.encode_init_out(minor=38, max_readahead=0x20000, flags=proto.MAX_PAGES | proto.ASYNC_DIO,
                                max_background=64, congestion_threshold=48, max_write=1 << 20, time_gran=1,
                                max_pages=256)
    assert len(raw) == 64
    u32 = lambda off: int.from_bytes(raw[off:off + 4], "little")
    u16 = lambda off: int.from_bytes(raw[off:off + 2], "little")
    assert (u32(0), u32(4), u32(8), u32(12)) == (7, 38, 0x20000, proto.MAX_PAGES | proto.ASYNC_DIO)
    assert (u16(16), u16(18), u32(20), u32(24), u16(28)) == (64, 48, 1 << 20, 1, 256)
    assert raw[30:] == bytes(34)
    # INIT from a 7.36+ kernel: flags2 counts only with FUSE_INIT_EXT
    body = proto.INIT_IN.pack(7, 45, 0x20000, proto.INIT_EXT | 1) + proto.INIT_IN_FLAGS2.pack(3) + bytes(44)
    assert proto.parse_init(body) == proto.InitIn(7, 45, 0x20000, proto.INIT_EXT | 1 | 3 << 32)
    body = proto.INIT_IN.pack(7, 45, 0, 1) + proto.INIT_IN_FLAGS2.pack(3) + bytes(44)
    assert proto.parse_init(body).flags == 1
    with pytest.raises(proto.ProtocolError):
        proto.parse_init(b"\0" * 8)


def test_dirents_are_padded_to_8_bytes_and_decode_back():
    entry = proto.Entry(proto.Attr(ino=17, size=5, mode=0o100444), entry_timeout=1.5, attr_timeout=2)
    names = [b"a", b"seven77", b"eight888", b"x" * 255]
    plain = b"".join(proto.encode_dirent(10 + i, i + 1, n, 8) for i, n in enumerate(names))
    plus = b"".join(proto.encode_direntplus(entry, i + 1, n, 8) for i, n in enumerate(names))
    assert len(plain) == sum(proto.dirent_size(n) for n in names) and len(plain) % 8 == 0
    assert len(plus) == sum(proto.dirent_size(n, plus=True) for n in names) and len(plus) % 8 == 0
    assert proto.dirent_size(b"eight888") == 32 and proto.dirent_size(b"seven77") == 32
    assert proto.decode_dirents(plain) == [(10 + i, i + 1, n, 8) for i, n in enumerate(names)]
    assert proto.decode_dirents(plus, plus=True) == [(17, i + 1, n, 8) for i, n in enumerate(names)]
    head = proto.ENTRY_OUT_HEAD.unpack_from(plus, 0)
    assert head == (17, 0, 1, 2, 500_000_000, 0)
    assert proto.decode_attr(plus, proto.ENTRY_OUT_HEAD.size).mode == 0o100444


def test_replies_and_notifications():
    assert proto.error_reply(7, errno.ENOENT) == proto.OUT_HEADER.pack(16, -errno.ENOENT, 7)
    assert proto.reply(9, b"abcdefgh") == proto.OUT_HEADER.pack(24, 0, 9) + b"abcdefgh"
    msg = proto.notify_inval_entry(3, b"snap")
    assert proto.OUT_HEADER.unpack_from(msg) == (len(msg), proto.NOTIFY_INVAL_ENTRY, 0)
    assert msg[16:] == proto.NOTIFY_INVAL_ENTRY_OUT.pack(3, 4, 0) + b"snap\0"
    msg = proto.notify_delete(3, 16, b"snap")
    assert proto.OUT_HEADER.unpack_from(msg) == (len(msg), proto.NOTIFY_DELETE, 0)
    assert msg[16:] == proto.NOTIFY_DELETE_OUT.pack(3, 16, 4, 0) + b"snap\0"
    msg = proto.notify_inval_inode(2)
    assert msg == proto.OUT_HEADER.pack(40, proto.NOTIFY_INVAL_INODE, 0) + proto.NOTIFY_INVAL_INODE_OUT.pack(2, 0, 0)
    assert proto.parse_name(b"disk\0junk") == b"disk"
    with pytest.raises(proto.ProtocolError):
        proto.parse_name(b"disk")


# ---------------------------------------------------------------- the engine in-process, on a real mount
class Served:
    def __init__(self, tmp_path, img, *, read_only=False, threads=2, via=None, direct_io=True):
        self.image = vdisk.open(img, read_only=read_only)
        self.fs = VdiskFS(self.image, direct_io=direct_io, xattrs={"pid": str(os.getpid()), "image": img})
        self.engine = KernelEngine(self.fs, threads=threads)
        self.mnt = str(tmp_path / "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        self.mounted = False
        self.engine.mount(self.mnt, read_only=self.image.read_only, via=via)
        self.mounted = True
        self.engine.start()

    def close(self):
        try:
            if self.mounted and is_mounted(self.mnt):
                rc, _ = kmount.unmount(self.mnt)
                if rc != 0:
                    kmount.unmount(self.mnt, lazy=True)
            assert self.engine.wait(20) or not self.mounted, "the reader threads did not end after the unmount"
        finally:
            self.engine.close()
            self.fs.close()


@pytest.fixture
def served(tmp_path):
    made = []

    def serve(img, **kw):
        s = Served(tmp_path, img, **kw)
        made.append(s)
        return s

    yield serve
    for s in reversed(made):
        s.close()


def _image(tmp_path, size=8 * MiB, snaps=(), name="d.vdk"):
    img = str(tmp_path / name)
    vdisk.create(img, size)
    with vdisk.open(img) as im:
        for s in snaps:
            im.snapshot_create(s)
    return img


@_fuse
@pytest.mark.parametrize("via,threads", [("syscall", 2), ("fusermount", 2), ("syscall", 1), ("syscall", 3)],
                         ids=["mount2-2threads", "fusermount3", "1thread", "3threads"])
def test_tree_data_and_metadata(tmp_path, served, via, threads):
    img = _image(tmp_path, snaps=["s1"])
    s = served(img, via=via, threads=threads)
    mnt = s.mnt
    assert len(s.engine.fds) == threads
    m = is_mounted(mnt)
    assert m is not None and m[0].startswith("fuse") and m[1] == "vdisk"
    assert os.listdir(mnt) == ["disk", "snapshots"]
    assert s.engine.minor >= proto.MIN_MINOR  # INIT was answered before the first request
    assert os.listdir(os.path.join(mnt, "snapshots")) == ["s1"]
    st = os.stat(os.path.join(mnt, "disk"))
    assert st.st_size == 8 * MiB and st.st_ino == DISK_INO and oct(st.st_mode)[-3:] == "644"
    assert os.stat(mnt).st_ino == ROOT_INO and os.stat(os.path.join(mnt, "snapshots")).st_ino == SNAPDIR_INO
    assert os.getxattr(mnt, "user.vdisk.pid") == str(os.getpid()).encode()
    assert sorted(os.listxattr(mnt)) == ["user.vdisk.image", "user.vdisk.pid"]
    with pytest.raises(OSError) as ei:
        os.getxattr(mnt, "user.vdisk.nope")
    assert ei.value.errno == errno.ENODATA
    vfs = os.statvfs(mnt)
    assert vfs.f_blocks * vfs.f_frsize == 8 * MiB and vfs.f_namemax == 255

    # data: sizes around the 1 MiB request limit, unaligned, past the end
    disk = os.path.join(mnt, "disk")
    rnd = random.Random(3)
    fd = os.open(disk, os.O_RDWR)
    try:
        for off, n in [(0, 1), (511, 4097), (3 * MiB - 7, MiB + 1000), (5 * MiB, 2 * MiB + 3)]:
            data = rnd.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            assert os.pread(fd, n, off) == data
        assert os.pwrite(fd, b"z" * 8192, 8 * MiB - 4096) == 4096
        assert os.pread(fd, 8192, 8 * MiB - 4096) == b"z" * 4096
        assert os.pread(fd, 10, 8 * MiB) == b""
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"a", 8 * MiB)
        assert ei.value.errno in (errno.ENOSPC, errno.EFBIG)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    with open(os.path.join(mnt, "snapshots", "s1"), "rb") as f:
        assert f.read(4096) == bytes(4096)

    # what a disk export refuses
    with pytest.raises(OSError):
        os.mkdir(os.path.join(mnt, "d"))
    with pytest.raises(OSError) as ei:
        open(os.path.join(mnt, "new"), "wb")
    assert ei.value.errno in (errno.EACCES, errno.EROFS)
    with pytest.raises(OSError):
        os.unlink(disk)
    with pytest.raises(OSError):
        os.rename(disk, os.path.join(mnt, "other"))
    with pytest.raises(OSError):
        os.symlink("disk", os.path.join(mnt, "link"))
    with pytest.raises(OSError) as ei:
        os.setxattr(disk, "user.x", b"1")
    assert ei.value.errno in (errno.ENOTSUP, errno.ENOSYS, errno.EPERM)
    with pytest.raises(OSError) as ei:
        os.truncate(disk, MiB)
    assert ei.value.errno == errno.EPERM
    os.chmod(disk, 0o600)  # accepted and ignored, as by a device node
    os.utime(disk, (1, 1))
    os.truncate(disk, 8 * MiB)  # the same size: nothing to do
    os.sync()  # FUSE_SYNCFS where the kernel sends it


@_fuse
def test_readdir_pages_through_many_snapshots(tmp_path, served):
    names = [f"snapshot-{i:03d}-" + "n" * 180 for i in range(60)]  # more than a page of entries
    img = _image(tmp_path, snaps=names)
    s = served(img)
    sd = os.path.join(s.mnt, "snapshots")
    assert os.listdir(sd) == sorted(names)
    with os.scandir(sd) as it:  # READDIRPLUS: the attributes come with the names
        ents = list(it)
    assert sorted(e.name for e in ents) == sorted(names)
    assert all(e.is_file() and e.stat().st_size == 8 * MiB for e in ents)
    assert len({e.inode() for e in ents}) == len(names)


@_fuse
def test_invalidation_reaches_the_kernel(tmp_path, served):
    img = _image(tmp_path, snaps=["a"])
    s = served(img)
    sd = os.path.join(s.mnt, "snapshots")
    assert os.listdir(sd) == ["a"]
    assert not os.path.exists(os.path.join(sd, "b"))  # a cached negative entry
    with s.engine.lock:
        s.fs.snapshot_create("b")
    s.engine.invalidate_entry(SNAPDIR_INO, b"b")
    s.engine.invalidate_inode(SNAPDIR_INO)
    assert os.path.exists(os.path.join(sd, "b"))
    assert sorted(os.listdir(sd)) == ["a", "b"]
    old = os.stat(os.path.join(sd, "a")).st_ino
    with s.engine.lock:
        s.fs.snapshot_delete("a")
    s.engine.invalidate_entry(SNAPDIR_INO, b"a", old)
    s.engine.invalidate_inode(SNAPDIR_INO)
    assert not os.path.exists(os.path.join(sd, "a"))
    assert os.listdir(sd) == ["b"]
    s.engine.invalidate_entry(SNAPDIR_INO, b"never-looked-up")  # ENOENT from the kernel: quiet


@_fuse
def test_read_only_in_process(tmp_path, served):
    img = _image(tmp_path)
    with vdisk.open(img) as im:
        im.write(0, b"ro data")
    s = served(img, read_only=True)
    disk = os.path.join(s.mnt, "disk")
    with open(disk, "rb") as f:
        assert f.read(7) == b"ro data"
    with pytest.raises(OSError) as ei:
        os.open(disk, os.O_RDWR)
    assert ei.value.errno in (errno.EROFS, errno.EACCES)


# ---------------------------------------------------------------- fallocate and discard
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
PUNCH = proto.FALLOC_FL_PUNCH_HOLE | proto.FALLOC_FL_KEEP_SIZE
ZERO = proto.FALLOC_FL_ZERO_RANGE


def _fallocate(fd, mode, off, length) -> int:
    """0, or the errno of fallocate(2)."""
    return 0 if _libc.fallocate(fd, mode, off, length) == 0 else ctypes.get_errno()


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def _check_clean(img):
    with vdisk.open(img, read_only=True) as im:
        res = im.check()
        assert res.corruptions == [] and res.leaks == [], res


@_fuse
def test_fallocate_punch_hole_and_zero_range_free_space(rig, tmp_path):  # noqa: F811
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 32 * MiB)
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt, engine="kernel")
    disk = os.path.join(mnt, "disk")
    data = random.Random(5).randbytes(16 * MiB)
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        full = _allocated(img)
        assert full >= 16 * MiB

        # punch 4 MiB (cluster-aligned): reads as zeros, the image gives the space back
        assert _fallocate(fd, PUNCH, 2 * MiB, 4 * MiB) == 0
        os.fsync(fd)
        assert os.pread(fd, 4 * MiB, 2 * MiB) == bytes(4 * MiB)
        assert os.pread(fd, MiB, MiB) == data[MiB:2 * MiB] and os.pread(fd, MiB, 6 * MiB) == data[6 * MiB:7 * MiB]
        punched = _allocated(img)
        assert punched <= full - 3 * MiB, (full, punched)

        # zero range (util-linux fallocate -z): zeros, space freed too
        run("fallocate", "-z", "-o", str(8 * MiB), "-l", str(4 * MiB), disk)
        os.fsync(fd)
        assert os.pread(fd, 4 * MiB, 8 * MiB) == bytes(4 * MiB)
        assert os.pread(fd, MiB, 12 * MiB) == data[12 * MiB:13 * MiB]
        zeroed = _allocated(img)
        assert zeroed <= punched - 3 * MiB, (punched, zeroed)

        # unaligned ranges: exactly those bytes become zeros (fallocate -p)
        run("fallocate", "-p", "-o", "100", "-l", "5000", disk)
        assert _fallocate(fd, ZERO | proto.FALLOC_FL_KEEP_SIZE, 13 * MiB + 7, 70001) == 0
        assert os.pread(fd, 6000, 0) == data[:100] + bytes(5000) + data[5100:6000]
        got = os.pread(fd, 80000, 13 * MiB)
        assert got == data[13 * MiB:13 * MiB + 7] + bytes(70001) + data[13 * MiB + 70008:13 * MiB + 80000]

        # plain allocation inside the disk: nothing changes; growing the disk this way: refused
        assert _fallocate(fd, 0, 0, MiB) == 0
        assert os.pread(fd, 16, 200 * 1024) == data[200 * 1024:200 * 1024 + 16]
        assert _fallocate(fd, 0, 31 * MiB, 2 * MiB) == errno.ENOSPC
        assert os.path.getsize(disk) == 32 * MiB
        # past the end with KEEP_SIZE: clipped
        assert _fallocate(fd, PUNCH, 15 * MiB, 20 * MiB) == 0
        assert os.pread(fd, MiB, 15 * MiB) == bytes(MiB)
        assert os.path.getsize(disk) == 32 * MiB
        assert _fallocate(fd, proto.FALLOC_FL_PUNCH_HOLE, 0, 4096) == errno.EOPNOTSUPP  # needs KEEP_SIZE
    finally:
        os.close(fd)

    # snapshots are read-only
    control.call(img, "snapshot-create", name="s")
    sfd = os.open(os.path.join(mnt, "snapshots", "s"), os.O_RDONLY)
    try:
        assert _fallocate(sfd, PUNCH, 0, 4096) == errno.EBADF
    finally:
        os.close(sfd)
    rig.umount(mnt)
    with vdisk.open(img, read_only=True) as im:
        assert im.read(2 * MiB, 4096) == bytes(4096)
        assert im.read(MiB, 4096) == data[MiB:MiB + 4096]
    _check_clean(img)


@_fuse
def test_fallocate_on_a_read_only_mount_is_refused(rig, tmp_path):  # noqa: F811
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 8 * MiB)
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt, read_only=True, engine="kernel")
    fd = os.open(os.path.join(mnt, "disk"), os.O_RDONLY)
    try:
        assert _fallocate(fd, PUNCH, 0, 4096) == errno.EBADF  # the kernel: not open for writing
    finally:
        os.close(fd)
    rig.umount(mnt)


@_fuse
def test_blkdiscard_and_fstrim_through_a_loop_device_free_space(rig, tmp_path):  # noqa: F811
    need_loop()
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 96 * MiB)
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt, engine="kernel")
    disk = os.path.join(mnt, "disk")
    dev = rig.attach(disk)

    def sync_image():
        fd = os.open(disk, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # raw discard on the loop device -> FUSE_FALLOCATE punch hole -> Image.discard
    pattern = random.Random(9).randbytes(MiB)
    with open(dev, "r+b", buffering=0) as f:
        f.write(pattern * 16)
        os.fsync(f.fileno())
    sync_image()
    before = _allocated(img)
    assert before >= 16 * MiB
    run("blkdiscard", "-o", str(4 * MiB), "-l", str(8 * MiB), dev)
    sync_image()
    after = _allocated(img)
    assert after <= before - 7 * MiB, (before, after)
    with open(dev, "rb", buffering=0) as f:
        f.seek(4 * MiB)
        assert f.read(8 * MiB) == bytes(8 * MiB)
        f.seek(12 * MiB)
        assert f.read(MiB) == pattern

    # ext4 on it: a deleted file's blocks go back to the image with fstrim
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0", dev)
    fsdir = str(tmp_path / "fs")
    rig.mount_fs(dev, fsdir)
    with open(os.path.join(fsdir, "big"), "wb") as f:
        f.write(random.Random(1).randbytes(24 * MiB))
        os.fsync(f.fileno())
    run("sync")
    sync_image()
    with_file = _allocated(img)
    os.unlink(os.path.join(fsdir, "big"))
    run("sync")
    run("fstrim", fsdir)
    sync_image()
    trimmed = _allocated(img)
    assert trimmed <= with_file - 20 * MiB, (with_file, trimmed)
    rig.umount_fs(fsdir)
    rig.detach(dev)
    rig.umount(mnt)
    _check_clean(img)


# ---------------------------------------------------------------- the daemon with this engine
def _text(path) -> str:
    with open(path) as f:
        return f.read()


@_fuse
def test_cli_engine_option_and_status(rig, tmp_path, run_vdisk, monkeypatch):  # noqa: F811
    monkeypatch.delenv("VDISK_FUSE_ENGINE")  # the option alone chooses
    img = str(tmp_path / "disk.vdk")
    run_vdisk("create", img, "8M")
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    rig.fuse_mounts.append(mnt)
    r = run_vdisk("mount", "--engine", "bogus", img, mnt, expect=None)
    assert r.returncode != 0 and "bogus" in r.stderr
    run_vdisk("mount", "--engine", "kernel", img, mnt)
    pid = int(os.getxattr(mnt, "user.vdisk.pid"))
    rig.pids.append(pid)
    status = control.call(img, "status")
    assert status["engine"] == "kernel" and status["pid"] == pid
    # the reader threads: one per cloned descriptor
    fuse_fds = [fd for fd in os.listdir(f"/proc/{pid}/fd")
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"]
    assert len(fuse_fds) == 2
    with open(os.path.join(mnt, "disk"), "r+b", buffering=0) as f:
        f.write(b"via the CLI")
    run_vdisk("snapshot", "create", img, "s")
    assert os.listdir(os.path.join(mnt, "snapshots")) == ["s"]
    run_vdisk("umount", mnt)
    rig.fuse_mounts.remove(mnt)
    with vdisk.open(img, read_only=True) as im:
        assert im.read(0, 11) == b"via the CLI"


@_fuse
def test_a_run_directory_longer_than_a_socket_address_holds(rig, tmp_path, run_vdisk, monkeypatch):  # noqa: F811
    """The mount's control sockets live in the run directory; one deeper than a Unix
    socket address holds (107 bytes with the socket's name) still serves the CLI's
    requests through the mount (vdisk/unixaddr.py). Before, the mount failed with
    "internal error: AF_UNIX path too long"."""
    run_dir = tmp_path / ("r" * 60) / ("u" * 60)
    run_dir.mkdir(parents=True, mode=0o700)
    run_dir.parent.chmod(0o700)
    monkeypatch.setenv("VDISK_RUN_DIR", str(run_dir))
    assert len(control.socket_path(str(tmp_path))) > 107
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 8 << 20)
    mnt = str(tmp_path / "mnt")
    pid = rig.mount(img, mnt)
    assert control.call(img, "status")["pid"] == pid
    run_vdisk("snapshot", "create", img, "s")  # handed to the mount through its socket
    assert os.listdir(os.path.join(mnt, "snapshots")) == ["s"]
    assert any(len(str(p)) > 107 for p in run_dir.glob("*.sock"))
    run_vdisk("umount", mnt)  # asks the mount through its socket too
    rig.fuse_mounts.remove(mnt)


@_fuse
def test_second_signal_detaches_a_busy_mount(rig, tmp_path):  # noqa: F811
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 8 * MiB)
    mnt = str(tmp_path / "mnt")
    log = str(tmp_path / "mount.log")
    pid = rig.mount(img, mnt, log_file=log)
    f = open(os.path.join(mnt, "disk"), "r+b", buffering=0)
    try:
        f.write(b"flushed on the first signal")
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: "still serving" in _text(log), 30, "the daemon to give up unmounting")
        f.seek(0)
        assert f.read(5) == b"flush"  # busy: still served
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: _tf._dead(pid), 30, "the daemon to exit")
        assert not is_mounted(mnt)  # detached lazily
        with pytest.raises(OSError) as ei:
            f.read(5)
        assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    finally:
        try:
            f.close()
        except OSError:
            pass
    rig.fuse_mounts.remove(mnt)
    with vdisk.open(img) as im:
        assert im.read(0, 27) == b"flushed on the first signal"
        assert im.check().exit_code == 0
    assert "Traceback" not in _text(log)


@_fuse
def test_four_threads_fio_qd16_with_snapshots_and_listing(rig, tmp_path, monkeypatch):  # noqa: F811
    """Four reader threads under fio at depth 16 (verify), with live snapshots and
    directory listings between the requests."""
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 32 * MiB)
    mnt = str(tmp_path / "mnt")
    monkeypatch.setenv("VDISK_FUSE_THREADS", "4")
    pid = rig.mount(img, mnt)
    assert sum(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse" for fd in os.listdir(f"/proc/{pid}/fd")) == 4
    fio = subprocess.Popen(
        ["fio", "--name=load", f"--filename={mnt}/disk", "--direct=1", "--rw=randwrite", "--bs=4k",
         "--ioengine=libaio", "--iodepth=16", "--size=32M", "--verify=crc32c", "--do_verify=1",
         "--verify_fatal=1", "--fallocate=none", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
    )
    try:
        for i in range(6):
            control.call(img, "snapshot-create", name=f"t{i}")
            assert f"t{i}" in os.listdir(os.path.join(mnt, "snapshots"))
            time.sleep(0.1)
        out, err = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err
    assert json.loads(out[out.index("{"):])["jobs"][0]["error"] == 0
    rig.umount(mnt)
    _check_clean(img)
