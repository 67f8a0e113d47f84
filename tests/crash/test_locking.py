"""Image locking (OFD locks, vdisk/host.py): one writer, shared readers, snapshot readers
beside a writer, and no stale lock after a process is killed.  RELIABILITY.md, "Locking".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import vdisk
from vdisk.errors import ImageLocked

HOLDER = textwrap.dedent("""
    import sys, vdisk
    path, mode = sys.argv[1], sys.argv[2]
    kw = {"rw": dict(read_only=False), "ro": dict(read_only=True), "snap": dict(snapshot="s1")}[mode]
    img = vdisk.open(path, **kw)
    if mode == "rw":
        img.write(0, b"held by a writer" * 300)   # dirty, never flushed: it dies like this
    print("ready", flush=True)
    sys.stdin.read()   # hold the image until told (or killed)
    img.close()
""")


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "disk.vdk")
    vdisk.create(path, 4 << 20, format="vdk")
    with vdisk.open(path) as img:
        img.write(0, b"A" * 65536)
        img.snapshot_create("s1")
        img.write(0, b"B" * 65536)
    return path


class Holder:
    """Another process that holds the image open in a mode until stopped or killed."""

    def __init__(self, path: str, mode: str):
        env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.p = subprocess.Popen([sys.executable, "-c", HOLDER, path, mode], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            self.p.kill()
            raise AssertionError(f"holder did not start: {line!r} {self.p.stderr.read()}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.communicate("", timeout=30)

    def kill9(self) -> None:
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=30)


def test_two_writers_in_one_process(image):
    with vdisk.open(image) as w:
        with pytest.raises(ImageLocked, match="in use"):
            vdisk.open(image)
        w.write(0, b"x")
    with vdisk.open(image) as w2:  # released on close
        assert w2.read(0, 1) == b"x"


def test_second_writer_from_another_process(image):
    with Holder(image, "rw") as h:
        with pytest.raises(ImageLocked):
            vdisk.open(image)
        with pytest.raises(ImageLocked):  # live readers are excluded by a writer too
            vdisk.open(image, read_only=True)
        h.stop()
    with vdisk.open(image) as img:
        assert img.read(0, 16) == b"held by a writer"


def test_readers_share_and_exclude_a_writer(image):
    with vdisk.open(image, read_only=True) as r1, vdisk.open(image, read_only=True) as r2:
        with Holder(image, "ro") as h:
            assert r1.read(0, 4) == r2.read(0, 4) == b"BBBB"
            with pytest.raises(ImageLocked):
                vdisk.open(image)
            h.stop()


def test_snapshot_readers_coexist_with_a_writer(image):
    with vdisk.open(image) as w:
        with vdisk.open(image, snapshot="s1") as s, Holder(image, "snap") as h:
            assert s.read(0, 4) == b"AAAA"
            w.write(0, b"C" * 65536)
            w.flush()
            assert s.read(0, 65536) == b"A" * 65536, "a snapshot reader must not see the writer's changes"
            h.stop()
    # and a writer can start while snapshot readers are there
    with Holder(image, "snap") as h:
        with vdisk.open(image) as w:
            w.write(0, b"D")
        h.stop()


def test_killed_writer_leaves_no_stale_lock(image):
    with Holder(image, "rw") as h:
        with pytest.raises(ImageLocked):
            vdisk.open(image)
        h.kill9()
    with vdisk.open(image) as img:  # not blocked by the dead process
        res = img.check()
        assert not res.corruptions, res.corruptions
        assert img.read(0, 65536) == b"B" * 65536, "the killed writer never flushed: the last commit stands"


def test_backing_file_is_read_locked_while_an_overlay_is_open(image, tmp_path):
    top = str(tmp_path / "top.vdk")
    vdisk.create(top, backing_file=image, backing_format="vdk")
    with vdisk.open(top) as t:
        assert t.read(0, 4) == b"BBBB"
        with pytest.raises(ImageLocked):
            vdisk.open(image)  # nobody may write under a live overlay
        with vdisk.open(image, read_only=True) as r:  # reading it is fine
            assert r.read(0, 4) == b"BBBB"
