"""The FUSE operations in-process, without the kernel (the fast tier, as s3ql does):
error mapping, the read-only failsafe, bounds."""

from __future__ import annotations

import errno
import logging
import os

import pyfuse3
import pytest
import trio

import vdisk
from vdisk.export.fuse.fs import DISK_INO, ROOT_INO, SNAPDIR_INO, VdiskFS
from vdisk.errors import ChecksumMismatch, CorruptImage, HostIOError, VdiskError

MiB = 1 << 20


@pytest.fixture
def fs(tmp_path):
    p = str(tmp_path / "d.vdk")
    vdisk.create(p, 4 * MiB)
    img = vdisk.open(p)
    img.snapshot_create("s1")
    f = VdiskFS(img)
    yield f
    f.close()


def call(coro_fn, *args):
    return trio.run(coro_fn, *args)


def errno_of(coro_fn, *args) -> int:
    with pytest.raises(pyfuse3.FUSEError) as ei:
        call(coro_fn, *args)
    return ei.value.errno


def test_read_write_and_bounds(fs):
    assert call(fs.write, DISK_INO, 0, b"abc") == 3
    assert call(fs.read, DISK_INO, 0, 3) == b"abc"
    assert call(fs.read, DISK_INO, 4 * MiB - 2, 100) == b"\0\0"
    assert call(fs.read, DISK_INO, 4 * MiB, 100) == b""
    assert call(fs.write, DISK_INO, 4 * MiB - 2, b"xyz") == 2
    assert errno_of(fs.write, DISK_INO, 4 * MiB, b"x") == errno.ENOSPC
    call(fs.fsync, DISK_INO, True)


def test_tree(fs):
    assert call(fs.lookup, ROOT_INO, b"disk", None).st_size == 4 * MiB
    assert call(fs.lookup, ROOT_INO, b"snapshots", None).st_ino == SNAPDIR_INO
    snap = call(fs.lookup, SNAPDIR_INO, b"s1", None)
    assert snap.st_size == 4 * MiB
    assert errno_of(fs.lookup, SNAPDIR_INO, b"nope", None) == errno.ENOENT
    assert errno_of(fs.lookup, ROOT_INO, b"nope", None) == errno.ENOENT
    assert errno_of(fs.getattr, 999, None) == errno.ENOENT
    assert errno_of(fs.getxattr, ROOT_INO, b"user.other", None) == pyfuse3.ENOATTR


def test_checksum_mismatch_is_eio_for_that_request_only(fs, caplog):
    real = fs.image.read

    def bad(off, n):
        raise ChecksumMismatch("data checksum mismatch at 0x10000", 0x10000)

    fs.image.read = bad
    with caplog.at_level(logging.ERROR, logger="vdisk.export.fuse"):
        assert errno_of(fs.read, DISK_INO, 0x10000, 4096) == errno.EIO
    assert "guest offset 65536" in caplog.text
    fs.image.read = real
    assert fs.failed is None
    assert call(fs.write, DISK_INO, 0, b"ok") == 2


def test_corrupt_image_turns_mount_read_only(fs, caplog):
    def bad(off, data):
        raise CorruptImage("L2 table at 0x30000 fails its checksum")

    fs.image.write = bad
    with caplog.at_level(logging.ERROR, logger="vdisk.export.fuse"):
        assert errno_of(fs.write, DISK_INO, 0, b"x") == errno.EIO
    assert "read-only from now on" in caplog.text and "L2 table" in caplog.text
    assert errno_of(fs.write, DISK_INO, 0, b"x") == errno.EROFS
    assert errno_of(fs.open, DISK_INO, 0o2, None) == errno.EROFS  # O_RDWR
    assert call(fs.getattr, DISK_INO, None).st_mode & 0o222 == 0
    with pytest.raises(CorruptImage):
        fs.snapshot_create("later")
    # reads still work
    assert call(fs.read, DISK_INO, 0, 2) == b"\0\0"


def test_host_errors(fs, caplog):
    def full(off, data):
        raise HostIOError("no space", errno.ENOSPC)

    fs.image.write = full
    assert errno_of(fs.write, DISK_INO, 0, b"x") == errno.ENOSPC

    def eio(off, n):
        raise VdiskError("something")

    fs.image.read = eio
    assert errno_of(fs.read, DISK_INO, 512, 512) == errno.EIO
    assert fs.failed is None


def test_unexpected_exception_is_eio_with_traceback(fs, caplog):
    def boom(off, n):
        raise ZeroDivisionError("boom")

    fs.image.read = boom
    with caplog.at_level(logging.ERROR, logger="vdisk.export.fuse"):
        assert errno_of(fs.read, DISK_INO, 0, 512) == errno.EIO
    assert "Traceback" in caplog.text and "ZeroDivisionError" in caplog.text

    def boom2():
        raise KeyError("x")

    fs.image.flush = boom2
    assert errno_of(fs.fsync, DISK_INO, False) == errno.EIO
    fs.image.flush = lambda: None
    fs._attrs = lambda ino: 1 / 0
    assert errno_of(fs.getattr, DISK_INO, None) == errno.EIO


def test_read_only_fs(tmp_path):
    p = str(tmp_path / "d.vdk")
    vdisk.create(p, MiB)
    img = vdisk.open(p, read_only=True)
    f = VdiskFS(img)
    try:
        assert errno_of(f.write, DISK_INO, 0, b"x") == errno.EROFS
        assert errno_of(f.open, DISK_INO, 0o1, None) == errno.EROFS
        call(f.fsync, DISK_INO, False)  # nothing to flush: fine
    finally:
        f.close()


def test_snapshot_views(fs):
    call(fs.write, DISK_INO, 0, b"new")
    ino = call(fs.lookup, SNAPDIR_INO, b"s1", None).st_ino
    fi = call(fs.open, ino, 0, None)
    assert call(fs.read, fi.fh, 0, 3) == b"\0\0\0"
    assert errno_of(fs.write, fi.fh, 0, b"x") == errno.EBADF
    with pytest.raises(VdiskError, match="in use"):
        fs.snapshot_delete("s1")
    call(fs.release, fi.fh)
    fs.snapshot_create("s2")
    assert [n for n in fs.snapshot_names()] == ["s1", "s2"]
    ino2 = call(fs.lookup, SNAPDIR_INO, b"s2", None).st_ino
    fi2 = call(fs.open, ino2, 0, None)
    assert call(fs.read, fi2.fh, 0, 3) == b"new"
    call(fs.release, fi2.fh)
    fs.snapshot_delete("s1")
    assert fs.snapshot_names() == ["s2"]
    assert errno_of(fs.lookup, SNAPDIR_INO, b"s1", None) == errno.ENOENT
    # a re-created snapshot gets a fresh inode (no stale kernel cache)
    fs.snapshot_create("s1")
    assert call(fs.lookup, SNAPDIR_INO, b"s1", None).st_ino != ino


def test_modes_follow_the_image_file(tmp_path):
    p = str(tmp_path / "d.vdk")
    vdisk.create(p, MiB)
    os.chmod(p, 0o600)
    img = vdisk.open(p)
    img.snapshot_create("s")
    f = VdiskFS(img)
    try:
        assert call(f.getattr, DISK_INO, None).st_mode & 0o777 == 0o600
        ino = call(f.lookup, SNAPDIR_INO, b"s", None).st_ino
        assert call(f.getattr, ino, None).st_mode & 0o777 == 0o400
    finally:
        f.close()


def test_a_failed_flush_turns_the_mount_read_only(fs, monkeypatch):
    """vdisk/host.py: a failed fdatasync is final until the image is reopened; the
    mount says so once and refuses writes (EROFS) instead of failing each with EIO."""
    assert call(fs.write, DISK_INO, 0, b"before") == 6
    real = os.fdatasync

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    assert errno_of(fs.fsync, DISK_INO, True) == errno.EIO
    monkeypatch.setattr(os, "fdatasync", real)
    assert fs.failed is not None and "flush" in fs.failed
    assert errno_of(fs.write, DISK_INO, 0, b"after") == errno.EROFS
    assert call(fs.read, DISK_INO, 0, 6) == b"before"  # reads go on
