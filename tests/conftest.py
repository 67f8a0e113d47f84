"""Fixtures shared by the whole test suite (keep this file small; no tests here).

``image_dir``        a fresh, empty directory for image files.
``run_vdisk``        run the installed ``vdisk`` console script in a subprocess, with a timeout::

                         r = run_vdisk("create", "-f", "vdk", img, "1M")          # asserts exit 0
                         r = run_vdisk("check", img, expect=2)                    # asserts exit 2
                         r = run_vdisk("info", img, expect=None); r.returncode   # no assertion
                     It returns the ``subprocess.CompletedProcess`` (text stdout/stderr); a
                     failed expectation shows the command, its exit code and its output.
``mountpoint``       an empty directory that is unmounted (``fusermount3 -u -z``) at
                     teardown if anything is still mounted on it.
``@pytest.mark.fuse``  the test mounts a FUSE file system: it needs root, ``/dev/fuse`` and
``@pytest.mark.root``  ``fusermount3`` (``root``: only root).  Such a test FAILS, never skips,
                     when they are missing: ``scripts/setup.sh`` installs all it needs and
                     the suite runs as root.  The fixture ``require_fuse`` does the same.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

VDISK_TIMEOUT = 120.0  # seconds, default for one ``vdisk`` command


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root; fails (never skips) without it")
    config.addinivalue_line("markers", "fuse: mounts a FUSE file system; needs root, /dev/fuse and fusermount3")


def _fuse_problem(need_fuse: bool) -> str | None:
    if os.geteuid() != 0:
        return "this test needs root (run the suite as root: bash scripts/test)"
    if not need_fuse:
        return None
    try:
        if not stat.S_ISCHR(os.stat("/dev/fuse").st_mode):
            return "/dev/fuse is not a character device"
    except OSError as exc:
        return f"/dev/fuse is not usable ({exc.strerror}); FUSE is not available on this machine"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing; run scripts/setup.sh (Debian package fuse3)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    need_fuse = item.get_closest_marker("fuse") is not None
    if need_fuse or item.get_closest_marker("root") is not None:
        problem = _fuse_problem(need_fuse)
        if problem:
            pytest.fail(problem, pytrace=False)


@pytest.fixture
def require_fuse() -> None:
    problem = _fuse_problem(True)
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.fixture
def require_qemu() -> None:
    """qemu-img and qemu-io are the reference the qcow2 tests hold vdisk against; a
    machine without them fails these tests (scripts/setup.sh installs qemu-utils)."""
    missing = [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup.sh", pytrace=False)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


def vdisk_command() -> list[str]:
    """argv prefix that runs the ``vdisk`` console script of the running interpreter."""
    script = Path(sysconfig.get_path("scripts")) / "vdisk"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from vdisk.cli import main; sys.exit(main())"]


@pytest.fixture
def run_vdisk():
    def run(
        *args: object,
        expect: int | None = 0,
        timeout: float = VDISK_TIMEOUT,
        input: str | None = None,  # noqa: A002
        cwd: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        argv = vdisk_command() + [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
        full_env = dict(os.environ, **(env or {}))
        try:
            r = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=cwd,
                env=full_env,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"`vdisk {' '.join(argv[1:])}` did not finish within {timeout}s\n"
                        f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}", pytrace=False)
        if expect is not None and r.returncode != expect:
            pytest.fail(
                f"`vdisk {' '.join(map(str, args))}` exited {r.returncode}, expected {expect}\n"
                f"--- stdout\n{r.stdout}--- stderr\n{r.stderr}",
                pytrace=False,
            )
        return r

    return run


def _mounted(path: str) -> bool:
    """Whether ``path`` is a mount point, from /proc/self/mountinfo (no stat on a maybe-hung mount)."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            field = line.split(" ")[4].encode().decode("unicode_escape")
            if field == path:
                return True
    return False


@pytest.fixture
def mountpoint(tmp_path: Path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    yield mp
    if _mounted(str(mp)):
        r = subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, timeout=30)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mp)], capture_output=True, timeout=30)
