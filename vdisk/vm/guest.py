"""Building a bootable Linux guest from the distribution's own packages.

:func:`build` makes, in one directory:

* ``vmlinuz`` -- Debian's kernel, from ``apt-get download linux-image-amd64`` and
  the versioned package it depends on, unpacked with ``dpkg -x`` (nothing is
  installed on the host);
* ``initrd.img`` -- a small initramfs (an uncompressed newc cpio archive written
  here): a static busybox (package ``busybox-static``, unpacked the same way), the
  kernel modules a virtio disk with ext4 needs, and an ``/init`` that loads them,
  mounts ``/dev/vda`` and switches to it.  Debian's kernel package ships no
  ``modules.dep`` (``depmod`` runs at install time), so the modules are ordered
  here from the ``depends=`` and ``softdep=`` strings in each module's
  ``.modinfo``;
* ``golden.vdk`` -- the root file system: ``debootstrap --variant=minbase`` of the
  host's own Debian release from the host's own apt source, plus ``/sbin/vdisk-init``
  (:data:`GUEST_INIT`), put into an ext4 image by ``mke2fs -d`` (no mount, no loop
  device) and converted to vdk (zstd-compressed);
* ``manifest.json`` -- what was built from what.

The guest's PID 1 is ``/sbin/vdisk-init``, a shell script from the guest's own root:
it mounts /proc, /sys and /run, then serves a line-based agent on the second
serial port (``/dev/ttyS1``): each line the host sends is run by ``/bin/sh -c`` on
the guest, its output comes back, then one line ``@@RC <status>``.  The kernel's
console stays on ``ttyS0``.  :mod:`vdisk.vm.qemu` is the host side.

A build takes about a minute (debootstrap dominates); :func:`ensure` reuses a
finished build whose recipe (:data:`RECIPE_VERSION`, the kernel package's version,
the release) is unchanged.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time

from ..errors import VdiskError

#: bump when anything below changes what a build contains
RECIPE_VERSION = 2
DEFAULT_CACHE = "/var/tmp/vdisk-guest"
ROOT_FS_SIZE = 1 << 30
#: modules the guest needs (their dependencies are added): the virtio PCI transport
#: and block device, ext4, and the crc32c ext4 and jbd2 ask for
NEEDED_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
#: a softdep alias -> the module that provides it
SOFTDEP_PROVIDERS = {"crypto-crc32c": "crc32c_generic", "crc32c": "crc32c_generic"}

INIT = """#!/bin/busybox sh
# vdisk guest initramfs: load the modules for a virtio disk with ext4, mount
# /dev/vda (read-write, noatime) and hand over to the root's /sbin/vdisk-init.
B=/bin/busybox
$B mkdir -p /proc /sys /dev /newroot
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /modules.list); do
    $B insmod /modules/$m.ko || echo "vdisk-initramfs: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do $B sleep 0.1; i=$((i + 1)); done
if ! $B mount -t ext4 -o rw,noatime /dev/vda /newroot; then
    echo "vdisk-initramfs: cannot mount /dev/vda"; $B sleep 1; echo o > /proc/sysrq-trigger
fi
$B mount --move /dev /newroot/dev
$B umount /proc /sys
exec $B switch_root /newroot /sbin/vdisk-init
"""

#: PID 1 of the guest (on its own root file system)
GUEST_INIT = """#!/bin/sh
# vdisk guest init (PID 1): mount the API file systems, then serve the host's
# commands on /dev/ttyS1, one line each: run by /bin/sh -c, output back, then
# "@@RC <status>".  Built by vdisk/vm/guest.py.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname vdisk-guest
echo "vdisk-init: userland up on $(cat /proc/cmdline)" > /dev/console
stty -F /dev/ttyS1 raw -echo
exec < /dev/ttyS1 > /dev/ttyS1 2>&1
echo "@@READY"
while IFS= read -r line; do
    /bin/sh -c "$line" < /dev/null
    echo "@@RC $?"
done
echo o > /proc/sysrq-trigger
"""


class GuestBuildError(VdiskError):
    """Building the guest failed (a tool is missing, a download failed, ...)."""


def _run(cmd: list[str], cwd: str | None = None, what: str | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise GuestBuildError(f"{cmd[0]} is missing (run scripts/setup.sh)") from None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise GuestBuildError(f"{what or ' '.join(cmd[:3])} failed (exit {p.returncode}): {' / '.join(tail)}")
    return p.stdout


def host_release() -> str:
    """The host's Debian release code name (the guest is the same release)."""
    with open("/etc/os-release") as f:
        for line in f:
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    raise GuestBuildError("/etc/os-release names no VERSION_CODENAME; not a Debian host?")


def host_mirror(release: str) -> str:
    """The host's own apt source for ``release`` (deb822 ``.sources`` or ``sources.list``)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            for stanza in f.read().split("\n\n"):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
                if release in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                    return fields["URIs"].split()[0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            with open(path) as f:
                for line in f:
                    words = re.sub(r"\[[^]]*\]", "", line).split()
                    if len(words) >= 3 and words[0] == "deb" and words[2] == release:
                        return words[1]
        except FileNotFoundError:
            continue
    raise GuestBuildError(f"no apt source for Debian {release} found in /etc/apt")


def _download(pkg: str, into: str) -> str:
    _run(["apt-get", "download", "-q", pkg], cwd=into, what=f"apt-get download {pkg}")
    debs = [d for d in os.listdir(into) if d.startswith(pkg + "_") and d.endswith(".deb")]
    if len(debs) != 1:
        raise GuestBuildError(f"apt-get download {pkg} left {len(debs)} packages")
    return os.path.join(into, debs[0])


def kernel_package() -> tuple[str, str]:
    """(versioned kernel package, its version) that linux-image-amd64 depends on now."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"], what="apt-cache depends linux-image-amd64")
    m = re.search(r"Depends:\s*(linux-image-[\w.+-]+)", out)
    if not m:
        raise GuestBuildError("linux-image-amd64 depends on no kernel package here")
    pkg = m.group(1)
    pol = _run(["apt-cache", "policy", pkg], what=f"apt-cache policy {pkg}")
    cand = re.search(r"Candidate:\s*(\S+)", pol)
    return pkg, cand.group(1) if cand else "unknown"


def module_info(path: str) -> dict[str, list[str]]:
    """``depends`` and ``softdep pre:`` of one kernel module, from its .modinfo strings."""
    with open(path, "rb") as f:
        data = f.read()
    info = {"depends": [], "softdep": []}
    for key, value in re.findall(rb"(?:^|\x00)(depends|softdep)=([^\x00]*)", data):
        text = value.decode(errors="replace")
        if key == b"depends":
            info["depends"] += [d for d in text.split(",") if d]
        else:
            pre = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", text)
            if pre:
                info["softdep"] += pre.group(1).split()
    return info


def module_order(moddir: str, wanted=NEEDED_MODULES) -> list[tuple[str, str]]:
    """(name, path) of ``wanted`` and everything they need, each after what it needs."""
    paths: dict[str, str] = {}
    for p in glob.glob(os.path.join(moddir, "**", "*.ko"), recursive=True):
        paths[os.path.basename(p)[:-3].replace("-", "_")] = p
    order: list[tuple[str, str]] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str) -> None:
        name = SOFTDEP_PROVIDERS.get(name, name).replace("-", "_")
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise GuestBuildError(f"kernel module dependency loop at {name}")
        if name not in paths:
            raise GuestBuildError(f"kernel module {name} is not in the kernel package")
        state[name] = 1
        info = module_info(paths[name])
        for dep in info["softdep"] + info["depends"]:
            visit(dep)
        state[name] = 2
        order.append((name, paths[name]))

    for w in wanted:
        visit(w)
    return order


def write_cpio(out_path: str, entries: list[tuple[str, int, bytes]]) -> None:
    """An uncompressed newc cpio archive (the initramfs format the kernel unpacks):
    ``entries`` are (name, mode, data), directories before their contents."""
    def pad(n: int) -> bytes:
        return b"\0" * (-n % 4)

    with open(out_path, "wb") as f:
        ino = 1
        for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
            bname = name.encode() + b"\0"
            fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(bname), 0)
            head = b"070701" + b"".join(b"%08X" % v for v in fields)
            f.write(head + bname + pad(len(head) + len(bname)) + data + pad(len(data)))
            ino += 1


def _initramfs(out_path: str, busybox: str, modules: list[tuple[str, str]]) -> None:
    dirs = ["bin", "dev", "proc", "sys", "newroot", "modules"]
    entries = [(d, stat.S_IFDIR | 0o755, b"") for d in dirs]
    with open(busybox, "rb") as f:
        entries.append(("bin/busybox", stat.S_IFREG | 0o755, f.read()))
    for name, path in modules:
        with open(path, "rb") as f:
            entries.append((f"modules/{name}.ko", stat.S_IFREG | 0o644, f.read()))
    entries.append(("modules.list", stat.S_IFREG | 0o644, "".join(f"{n}\n" for n, _ in modules).encode()))
    entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
    write_cpio(out_path, entries)


def _root_fs(work: str, release: str, mirror: str, raw_path: str, log) -> None:
    root = os.path.join(work, "root")
    log(f"debootstrap --variant=minbase {release} (from the host's apt source)")
    _run(["debootstrap", "--variant=minbase", release, root, mirror], what="debootstrap")
    # the image's own init, and the files a booted system expects
    with open(os.path.join(root, "sbin", "vdisk-init"), "w") as f:
        f.write(GUEST_INIT)
    os.chmod(os.path.join(root, "sbin", "vdisk-init"), 0o755)
    with open(os.path.join(root, "etc", "fstab"), "w") as f:
        f.write("/dev/vda / ext4 rw,noatime 0 1\n")
    with open(os.path.join(root, "etc", "hostname"), "w") as f:
        f.write("vdisk-guest\n")
    # apt's downloaded packages are no use in the guest
    for p in glob.glob(os.path.join(root, "var", "cache", "apt", "archives", "*.deb")):
        os.unlink(p)
    # inode tables and journal written now, as in an installed system: the guest
    # must not spend its first boot zeroing them (ext4lazyinit)
    log("mke2fs -t ext4 -d (the root file system, no mount needed)")
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "vdisk-root", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", root, raw_path, f"{ROOT_FS_SIZE // 1024}k"],
         what="mke2fs")


def build(out_dir: str, *, log=lambda msg: None) -> dict:
    """Build the guest into ``out_dir`` (made; must not exist).  Returns the manifest."""
    if os.path.lexists(out_dir):
        raise GuestBuildError(f"{out_dir}: exists already")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    t0 = time.monotonic()
    release = host_release()
    mirror = host_mirror(release)
    kpkg, kver = kernel_package()
    work = tempfile.mkdtemp(prefix=".guest-build-", dir=parent)
    try:
        log(f"kernel: {kpkg} {kver}")
        kdir = os.path.join(work, "kernel")
        os.mkdir(kdir)
        _run(["dpkg", "-x", _download(kpkg, work), kdir], what=f"dpkg -x {kpkg}")
        vmlinuz = glob.glob(os.path.join(kdir, "boot", "vmlinuz-*"))
        moddirs = glob.glob(os.path.join(kdir, "lib", "modules", "*"))
        if len(vmlinuz) != 1 or len(moddirs) != 1:
            raise GuestBuildError(f"{kpkg} holds {len(vmlinuz)} kernels and {len(moddirs)} module trees")
        modules = module_order(moddirs[0])
        log("busybox-static")
        bdir = os.path.join(work, "busybox")
        _run(["dpkg", "-x", _download("busybox-static", work), bdir], what="dpkg -x busybox-static")
        result = os.path.join(work, "out")
        os.mkdir(result)
        shutil.copyfile(vmlinuz[0], os.path.join(result, "vmlinuz"))
        _initramfs(os.path.join(result, "initrd.img"), os.path.join(bdir, "bin", "busybox"), modules)
        raw = os.path.join(work, "root.raw")
        _root_fs(work, release, mirror, raw, log)
        log("vdisk convert -c -O vdk (the golden image)")
        import vdisk

        from ..ops.convert import convert

        with vdisk.open(raw, format="raw", read_only=True) as src:
            convert(src, os.path.join(result, "golden.vdk"), format="vdk", compression="zstd", durable=True)
        manifest = {
            "recipe": RECIPE_VERSION, "release": release, "kernel_package": kpkg, "kernel_version": kver,
            "kernel_release": os.path.basename(moddirs[0]), "modules": [n for n, _ in modules],
            "root_fs_size": ROOT_FS_SIZE, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        with open(os.path.join(result, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        os.rename(result, out_dir)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def recipe_key() -> str:
    """Names a build: what it is built from (the release and kernel package version)."""
    release = host_release()
    kpkg, kver = kernel_package()
    return hashlib.sha256(f"{RECIPE_VERSION} {release} {kpkg} {kver} {INIT} {GUEST_INIT}".encode()).hexdigest()[:16]


def ensure(cache_dir: str = DEFAULT_CACHE, *, log=lambda msg: None) -> str:
    """The directory of a finished build for today's recipe, building it if needed."""
    out = os.path.join(cache_dir, recipe_key())
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    import fcntl

    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait for it
        if os.path.exists(os.path.join(out, "manifest.json")):
            return out
        if os.path.lexists(out):  # a build that did not finish
            shutil.rmtree(out)
        build(out, log=log)
    return out
