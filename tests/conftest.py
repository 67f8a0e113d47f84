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

Hypothesis profiles (chosen here, before any test module builds its ``settings``, so
that every ``@settings(...)`` and ``TestCase.settings`` inherits from the profile what
it does not set itself; a test must not set ``derandomize`` or ``database``):

``ci``       derandomized (the same examples on every run), no example database,
             no deadline and no too_slow health check (both depend on the machine's
             load), failing examples printed as a blob.  Loaded when ``CI`` is set
             (``CI=true``), as Hypothesis itself does.
``dev``      the default elsewhere: random examples, no database, no deadline.
``explore``  the longer hunt for new bugs: random examples, 10x ``max_examples``
             (the model tests scale with it), failing examples printed as a blob::

                 VDISK_HYPOTHESIS=explore .venv/bin/python -m pytest -p no:cacheprovider \
                     --timeout=3600 tests/test_model.py tests/test_chain_model.py

             (a few minutes; ``--timeout`` lifts the 600 s per-test limit of
             pyproject.toml).  ``--hypothesis-seed=N`` repeats one exploring run
             exactly; tests with a fixed ``max_examples`` run their usual number.

``VDISK_HYPOTHESIS`` (or ``HYPOTHESIS_PROFILE``) names the profile; pytest's
``--hypothesis-profile NAME`` overrides both.
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
from hypothesis import HealthCheck, settings

# Parent: Hypothesis's own defaults, not the profile loaded when Hypothesis was imported
# (with CI set, that is its built-in "ci", derandomized, which "dev" and "explore" are not).
_BASE = settings.get_profile("default")
settings.register_profile("dev", _BASE, deadline=None, database=None)
settings.register_profile("ci", _BASE, derandomize=True, database=None, print_blob=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", _BASE, max_examples=10 * _BASE.max_examples, deadline=None,
                          database=None, print_blob=True)


def _hypothesis_profile() -> str:
    name = os.environ.get("VDISK_HYPOTHESIS") or os.environ.get("HYPOTHESIS_PROFILE")
    if name:
        return name
    return "ci" if os.environ.get("CI", "").lower() not in ("", "0", "false", "no") else "dev"


settings.load_profile(_hypothesis_profile())

VDISK_TIMEOUT = 120.0  # seconds, default for one ``vdisk`` command


#: test tiers, run in order by a developer (`bash scripts/test -m tier1`, ...; README):
#: 1 codec and spec, no I/O beyond small files; 2 drivers, operations and the CLI on
#: files; 3 the kernel: FUSE mounts, loop devices, QEMU's tools and daemons; 4 long
#: runs: crash states, fault injection, hostile images, fuzzing.  Every test module
#: is in exactly one tier (a new module must be added here, or collection fails).
TIERS = {
    "tier1": ["test_vdk_codec", "test_spec", "test_drivers", "test_fuse_ops", "test_pool_codec", "test_nbd_proto", "test_trace", "test_zeros",
              "test_layers", "test_worker", "test_unixaddr"],
    "tier2": ["test_chain", "test_chain_model", "test_cli", "test_cli_habits", "test_cli_json", "test_matrix",
              "test_model", "test_ops", "test_qcow2", "test_qcow2_safety", "test_safety", "test_vdk_safety",
              "test_rundir", "test_found_bugs", "test_pool", "test_pool_model", "test_pool_commands",
              "test_pool_admin", "test_diff", "test_vmdk", "test_vhdx", "test_fleet",
              "test_vhd", "test_vdi", "test_cmdserver"],
    "tier3": ["test_fuse", "test_fuse_kernel", "test_fuse_pyfuse3", "test_locks_qemu", "test_qcow2_qemu",
              "test_mount_powercut", "test_locking", "test_nbd", "test_guest", "test_fleet_tools", "test_pool_s3",
              "test_pool_replicate", "test_pool_s3_gc"],
    "tier4": ["test_crash", "test_faults", "test_flush_failure", "test_hostile", "test_fuzz", "test_pool_crash", "test_hostile_vmdk",
              "test_hostile_vhdx", "test_hostile_vhd_vdi"],
}
_TIER_OF = {mod: tier for tier, mods in TIERS.items() for mod in mods}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root; fails (never skips) without it")
    config.addinivalue_line("markers", "fuse: mounts a FUSE file system; needs root, /dev/fuse and fusermount3")
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: test tier {tier[-1]} (tests/conftest.py TIERS)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = set()
    for item in items:
        mod = item.module.__name__.rpartition(".")[2] if item.module is not None else ""
        tier = _TIER_OF.get(mod)
        if tier is None:
            missing.add(mod)
            continue
        item.add_marker(getattr(pytest.mark, tier))
    if missing:
        raise pytest.UsageError(f"test modules in no tier (add them to TIERS in tests/conftest.py): "
                                f"{', '.join(sorted(missing))}")
    # the whole suite runs tier by tier, fastest first (a stable sort keeps each
    # module's own order)
    order = {tier: i for i, tier in enumerate(TIERS)}
    items.sort(key=lambda it: order.get(_TIER_OF.get(it.module.__name__.rpartition(".")[2], ""), len(order)))


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


@pytest.fixture
def pool(tmp_path) -> str:
    """A new, empty pool directory (test_pool*.py)."""
    from vdisk.pool.store import Pool

    p = str(tmp_path / "pool")
    Pool.create(p)
    return p
