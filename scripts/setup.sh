#!/usr/bin/env bash
# Set up everything vdisk needs, on a Debian 12 machine, as root, without a prompt:
#   - the Debian packages: FUSE 3 (runtime, and headers + pkg-config + gcc to build pyfuse3),
#     qemu-img / qemu-storage-daemon (reference implementation for tests and benchmarks),
#     fio (benchmarks), e2fsprogs and util-linux (mkfs.ext4, losetup on a mounted disk),
#     qemu-system-x86 and debootstrap (real guests: scripts/guest, tests/test_guest.py);
#   - a virtualenv in .venv at the repository root with vdisk installed in editable mode
#     together with its test dependencies, and vdisk's launcher over pip's `vdisk` console
#     script (vdisk/cmdserver/launcher.py: the same under python -S, without pip's `import re`).
# Idempotent and quick when nothing changed: apt is skipped when dpkg says every package
# is installed; pip is skipped while pyproject.toml and the Python are the same as at the
# last successful install (stamp file .venv/.vdisk-setup-stamp).
# Environment: PYTHON (default python3, must be >= 3.11).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
export DEBIAN_FRONTEND=noninteractive PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

die() { echo "setup: ERROR: $*" >&2; exit 1; }

APT_PACKAGES=(
    fuse3 libfuse3-dev pkg-config gcc libc6-dev   # FUSE runtime (fusermount3) + what pyfuse3 builds against
    python3-dev python3-venv                      # headers and venv for Debian's own python3
    qemu-utils                                    # qemu-img, qemu-io, qemu-nbd
    qemu-system-common                            # qemu-storage-daemon (FUSE export, the benchmark reference)
    fio                                           # benchmarks
    e2fsprogs util-linux                          # mkfs.ext4, losetup, mount
    qemu-system-x86 debootstrap                   # real guests (vdisk/vm): QEMU under TCG, the guest's root
)

# Several people (or CI and a person) may run this at once in one tree: serialise.
command -v flock >/dev/null || die "flock (util-linux) is missing"
LOCK=${TMPDIR:-/tmp}/vdisk-setup.$(printf %s "$ROOT" | md5sum | cut -c1-12).lock
exec 9>"$LOCK"
flock 9

# ---------------------------------------------------------------- Debian packages
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "not root and no sudo: install these Debian packages first: ${missing[*]}"
        SUDO=(sudo -n)
    fi
    echo "setup: installing Debian packages: ${missing[*]}"
    log=$(mktemp)
    apt_opts=(-y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
    # A failing extra source must not stop us: the install below fails loudly if it matters.
    "${SUDO[@]}" apt-get "${apt_opts[@]}" update >"$log" 2>&1 ||
        echo "setup: warning: apt-get update failed (trying the install anyway):$(tail -3 "$log")" >&2
    if ! "${SUDO[@]}" apt-get "${apt_opts[@]}" install --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "apt-get failed"
    fi
    rm -f "$log"
fi

# FUSE needs the device node; the fuse module loads on first open of /dev/fuse on most
# kernels, but a machine without the node cannot mount at all.
if [ ! -c /dev/fuse ]; then
    command -v modprobe >/dev/null && modprobe fuse 2>/dev/null || true
    [ -c /dev/fuse ] || die "/dev/fuse does not exist: FUSE mounts (vdisk mount, its tests) cannot work here"
fi

# ---------------------------------------------------------------- Python venv
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=/path/to/python3.11+)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is $("$PYTHON" -V 2>&1); vdisk needs Python >= 3.11"

if ! .venv/bin/python -c '' 2>/dev/null; then
    rm -rf .venv
    echo "setup: creating .venv with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv .venv || die "'$PYTHON -m venv' failed"
fi

STAMP=.venv/.vdisk-setup-stamp
# editable_mode=compat: a path entry instead of an import hook, which would cost every
# Python start in the venv (and so every vdisk command) about 10 ms
PIP_EDITABLE=(--config-settings editable_mode=compat)
want=$( { cat pyproject.toml; .venv/bin/python -VV; echo "${PIP_EDITABLE[*]}"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || [ ! -x .venv/bin/vdisk ]; then
    echo "setup: pip install -e '.[test]' into .venv"
    rm -f "$STAMP"
    log=$(mktemp)
    if ! .venv/bin/python -m pip install -q "${PIP_EDITABLE[@]}" -e '.[test]' >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "pip install failed"
    fi
    rm -f "$log"
    .venv/bin/python -c 'import vdisk, pyfuse3, trio, pytest, pytest_timeout' || die "the venv cannot import vdisk's dependencies"
    echo "$want" >"$STAMP"
fi

# The vdisk launcher over pip's console script (vdisk/cmdserver/launcher.py): pip's starts
# with `import re`, 12-15 ms of every command; the launcher also runs python -S (site, ~2 ms).
# At every run, also when pip was skipped, so that a `pip install -e .` run by hand is
# undone here.
.venv/bin/python -m vdisk.cmdserver.launcher .venv/bin/vdisk || die "cannot write the vdisk launcher"

# Byte-compile the sources: a command that compiles its modules at every start (as
# with PYTHONDONTWRITEBYTECODE) pays tens of milliseconds for it.  Quick when current.
.venv/bin/python -m compileall -q vdisk >/dev/null || true
