"""The image set of scripts/bench-pool-data: real Debian root file systems built with
debootstrap (a golden image, variants of its tree, independent builds, and clones of
its raw image changed in place), cached in the data directory and rebuilt when the
recipe changes.  Imported by bench-pool-data; see its docstring for the set.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

from bench_common import allocated

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdisk.sizes import format_size  # noqa: E402

SUITE = "bookworm"
# (name, kind, parent, packages).  Variants are made from the golden tree, clones
# from the golden raw image, independents by their own debootstrap.
IMAGES = [
    ("golden", "golden", None, []),
    ("variant-python", "variant", "golden", ["python3"]),
    ("variant-build", "variant", "golden", ["make", "gcc", "libc6-dev"]),
    ("variant-ssh", "variant", "golden", ["openssh-server"]),
    ("variant-vim-git", "variant", "golden", ["vim", "git"]),
    ("independent-minbase", "independent", None, []),
    ("independent-python", "independent", None, ["python3"]),
    ("clone-01", "clone", "golden", ["python3"]),
    ("clone-02", "clone", "golden", ["openssh-server"]),
    ("clone-03", "clone", "golden", ["curl", "ca-certificates"]),
    ("clone-04", "clone", "golden", ["git"]),
    ("clone-05", "clone", "golden", ["nginx-light"]),
    ("clone-06", "clone", "golden", ["vim"]),
    ("clone-07", "clone", "golden", ["rsync", "sqlite3", "jq"]),
    ("clone-08", "clone", "golden", ["python3", "python3-yaml", "cron"]),
]
QUICK = ["golden", "variant-python", "variant-ssh", "independent-minbase", "clone-01", "clone-02", "clone-03"]
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C",
              "HOME": "/root", "TERM": "dumb"}
RECIPE = 2  # cached images of another recipe are rebuilt


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], logf=None, env=None) -> None:
    """Run ``cmd``; its output goes to ``logf`` (kept) and, on failure, its tail to stderr."""
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                       errors="replace", check=False)
    if logf is not None:
        logf.write(f"$ {' '.join(cmd)}\n{r.stdout}\n")
        logf.flush()
    if r.returncode != 0:
        tail = "\n".join(r.stdout.splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}\n{tail}")


# -- mounts, kept safe ---------------------------------------------------------

def mounts_under(path: str) -> list[str]:
    path = os.path.realpath(path)
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp == path or mp.startswith(path + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def unmount_under(path: str) -> None:
    for mp in mounts_under(path):
        subprocess.run(["umount", mp], check=False)
    for mp in mounts_under(path):  # still busy: detach
        subprocess.run(["umount", "-l", mp], check=False)


def remove_tree(path: str) -> None:
    if os.path.lexists(path):
        unmount_under(path)
        if mounts_under(path):
            raise RuntimeError(f"{path}: still has mounts, not removing it")
        shutil.rmtree(path)


@contextlib.contextmanager
def chroot_ready(root: str):
    """/proc mounted and services kept from starting (policy-rc.d) while packages install."""
    policy = os.path.join(root, "usr/sbin/policy-rc.d")
    with open(policy, "w") as f:
        f.write("#!/bin/sh\nexit 101\n")
    os.chmod(policy, 0o755)
    os.makedirs(os.path.join(root, "proc"), exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", os.path.join(root, "proc")], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", os.path.join(root, "proc")], check=False)
        unmount_under(os.path.join(root, "proc"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(policy)


@contextlib.contextmanager
def loop_mounted(img: str, mnt: str):
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    try:
        yield mnt
    finally:
        unmount_under(mnt)


# -- building trees ------------------------------------------------------------

class Builder:
    def __init__(self, work: str, source: str, mirror: str | None, logf):
        self.work, self.source, self.mirror, self.logf = work, source, mirror, logf
        self.trees = os.path.join(work, "trees")
        os.makedirs(self.trees, exist_ok=True)

    # debootstrap ------------------------------------------------------------
    def debootstrap(self, dest: str, include: list[str]) -> None:
        if shutil.which("debootstrap") is None:
            log("installing debootstrap (apt-get)")
            run(["apt-get", "install", "-y", "-q", "debootstrap"], self.logf)
        cmd = ["debootstrap", "--variant=minbase"]
        if include:
            cmd.append("--include=" + ",".join(include))
        cmd += [SUITE, dest] + ([self.mirror] if self.mirror else [])
        run(cmd, self.logf)
        self.apt(dest, ["update"])
        self.apt(dest, ["clean"])

    def apt(self, root: str, args: list[str]) -> None:
        with chroot_ready(root):
            run(["chroot", root, "apt-get", "-q", "-y", *args], self.logf, env=CHROOT_ENV)

    # the host fallback --------------------------------------------------------
    _host_db: dict | None = None

    def host_closure(self, pkgs: list[str], have: set[str]) -> list[str]:
        """``pkgs`` and their installed dependencies (Depends, Pre-Depends) not in ``have``."""
        if Builder._host_db is None:
            r = subprocess.run(["dpkg-query", "-W", "-f",
                                "${Package}\t${Status}\t${Pre-Depends}, ${Depends}\t${Provides}\n"],
                               stdout=subprocess.PIPE, text=True, check=True).stdout
            deps, provides = {}, {}
            for ln in r.splitlines():
                name, status, dep, prov = ln.split("\t")
                if status.endswith("ok installed"):
                    deps[name] = dep
                    for v in prov.split(","):
                        provides.setdefault(v.strip().split(" ")[0], name)
            Builder._host_db = {"deps": deps, "provides": provides}
        deps, provides = Builder._host_db["deps"], Builder._host_db["provides"]
        out, todo, seen = [], list(pkgs), set(have)
        while todo:
            p = todo.pop()
            p = p if p in deps else provides.get(p, p)
            if p in seen or p not in deps:
                continue
            seen.add(p)
            out.append(p)
            for dep in deps[p].split(","):
                for alt in dep.split("|"):
                    name = alt.strip().split(" ")[0].split(":")[0]
                    if name in deps or name in provides:
                        todo.append(name)
                        break
        return out

    def host_copy(self, root: str, pkgs: list[str]) -> list[str]:
        """Copy the files of the installed host packages ``pkgs`` (and dependencies) into ``root``;
        returns the packages copied."""
        status = os.path.join(root, "var/lib/dpkg/status")
        have = set()
        if os.path.exists(status):
            with open(status) as f:
                have = {ln.split(":", 1)[1].strip() for ln in f if ln.startswith("Package:")}
        closure = self.host_closure(pkgs, have)
        if not closure:
            return []
        paths = set()
        for p in closure:
            listing = subprocess.run(["dpkg-query", "-L", p], stdout=subprocess.PIPE, text=True, check=True).stdout
            for path in listing.splitlines():
                if path.startswith("/") and (os.path.islink(path) or os.path.isfile(path)):
                    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
                    paths.add(real.lstrip("/"))
            info = "/var/lib/dpkg/info"
            for fn in os.listdir(info):
                if fn.rsplit(".", 1)[0].split(":")[0] == p:
                    paths.add(os.path.join(info, fn).lstrip("/"))
        lst = os.path.join(self.work, "host-files.lst")
        with open(lst, "w") as f:
            f.write("\0".join(sorted(paths)) + "\0")
        tar_c = subprocess.Popen(["tar", "-C", "/", "--null", "--no-recursion", "-cf", "-", "-T", lst],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        subprocess.run(["tar", "-C", root, "-xpf", "-"], stdin=tar_c.stdout, check=True)
        tar_c.wait()
        stanzas = subprocess.run(["dpkg-query", "-s", *closure], stdout=subprocess.PIPE, text=True, check=True).stdout
        os.makedirs(os.path.dirname(status), exist_ok=True)
        with open(status, "a") as f:
            f.write(stanzas.rstrip("\n") + "\n\n")
        return closure

    def host_base(self, dest: str, include: list[str]) -> list[str]:
        os.makedirs(dest)
        for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
            if os.path.islink("/" + name):
                os.symlink(os.readlink("/" + name), os.path.join(dest, name))
        for d in ("proc", "sys", "dev", "tmp", "root", "var/lib/dpkg/info", "etc"):
            os.makedirs(os.path.join(dest, d), exist_ok=True)
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Priority}\t${Status}\n"],
                           stdout=subprocess.PIPE, text=True, check=True).stdout
        base = [ln.split("\t")[0].split(":")[0] for ln in r.splitlines()
                if ln.split("\t")[1] == "required" and ln.endswith("ok installed")] + ["apt"]
        got = self.host_copy(dest, base + include)
        for fn in ("passwd", "group", "hostname", "hosts"):
            if os.path.exists("/etc/" + fn):
                shutil.copy2("/etc/" + fn, os.path.join(dest, "etc", fn))
        return got

    # the recipes -------------------------------------------------------------
    def fresh_tree(self, dest: str, include: list[str]) -> list[str]:
        """A new minbase tree at ``dest``; returns the packages asked for that it has."""
        if self.source == "debootstrap":
            self.debootstrap(dest, include)
            return include
        return [p for p in self.host_base(dest, include) if p in include]

    def install(self, root: str, pkgs: list[str]) -> list[str]:
        if self.source == "debootstrap":
            self.apt(root, ["install", "--no-install-recommends", *pkgs])
            self.apt(root, ["clean"])
            return pkgs
        got = self.host_copy(root, pkgs)
        return [p for p in pkgs if p in got]

    def golden_tree(self) -> tuple[str, str]:
        """The golden tree (built if missing) and its id."""
        dest = os.path.join(self.trees, "golden")
        marker = dest + ".json"
        if os.path.exists(marker) and os.path.isdir(dest):
            with open(marker) as f:
                m = json.load(f)
            if m["source"] == self.source:
                return dest, m["id"]
        tmp = dest + ".tmp"
        remove_tree(tmp)
        remove_tree(dest)
        log(f"golden tree: {self.source} minbase {SUITE}")
        t = time.perf_counter()
        self.fresh_tree(tmp, [])
        os.rename(tmp, dest)
        tid = uuid.uuid4().hex
        with open(marker, "w") as f:
            json.dump({"id": tid, "source": self.source, "seconds": round(time.perf_counter() - t, 1)}, f)
        return dest, tid


def mkfs(tree: str, img: str, size: int, logf) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(img)
    if mounts_under(tree):
        raise RuntimeError(f"{tree} still has mounts")
    run(["mkfs.ext4", "-q", "-d", tree, img, str(size // 1024) + "k"], logf)


def sidecar(img: str) -> dict | None:
    with contextlib.suppress(FileNotFoundError, ValueError), open(img + ".json") as f:
        return json.load(f)
    return None


def build(names: list[str], work: str, size: int, b: Builder, logf) -> list[dict]:
    imgdir = os.path.join(work, "images")
    os.makedirs(imgdir, exist_ok=True)
    built: dict[str, dict] = {}
    for name, kind, parent, pkgs in IMAGES:
        if name not in names and name != "golden":
            continue
        img = os.path.join(imgdir, name + ".raw")
        meta = sidecar(img)
        want_parent_id = None
        if kind == "variant" or name == "golden":
            _, want_parent_id = b.golden_tree()
        elif kind == "clone":
            want_parent_id = built["golden"]["id"]
        if (meta and os.path.exists(img) and meta.get("image_size") == size and meta.get("recipe") == RECIPE
                and meta.get("parent_id") == want_parent_id and meta.get("source") == b.source):
            built[name] = meta
            continue
        t = time.perf_counter()
        log(f"building {name} ({kind}{', ' + ' '.join(pkgs) if pkgs else ''})")
        tmp = img + ".tmp"
        got = pkgs
        if name == "golden":
            tree, _ = b.golden_tree()
            mkfs(tree, tmp, size, logf)
            derived = f"{b.source} minbase, then mkfs.ext4 -d"
        elif kind == "variant":
            tree, _ = b.golden_tree()
            vt = os.path.join(b.trees, name + ".tmp")
            remove_tree(vt)
            subprocess.run(["cp", "-a", tree, vt], check=True)
            got = b.install(vt, pkgs)
            mkfs(vt, tmp, size, logf)
            remove_tree(vt)
            derived = "copy of the golden tree, packages installed in chroot, new mkfs.ext4 -d"
        elif kind == "independent":
            vt = os.path.join(b.trees, name + ".tmp")
            remove_tree(vt)
            got = b.fresh_tree(vt, pkgs)
            mkfs(vt, tmp, size, logf)
            remove_tree(vt)
            derived = f"own {b.source} minbase run" + (f" with --include={','.join(pkgs)}" if pkgs else "") \
                + ", then mkfs.ext4 -d"
        else:
            gimg = os.path.join(imgdir, "golden.raw")
            subprocess.run(["cp", gimg, tmp], check=True)  # holes stay holes, allocated zeros stay allocated
            with loop_mounted(tmp, os.path.join(work, "mnt", name)) as mnt:
                got = b.install(mnt, pkgs)
            run(["e2fsck", "-fn", tmp], logf)
            derived = "copy of the golden raw image, loop-mounted, packages installed in chroot, unmounted"
        os.rename(tmp, img)
        meta = {"name": name, "id": uuid.uuid4().hex, "recipe": RECIPE, "kind": kind, "parent": parent,
                "parent_id": want_parent_id, "packages": got, "packages_asked": pkgs,
                "source": b.source, "derived": derived, "image_size": size,
                "build_seconds": round(time.perf_counter() - t, 1), "built": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(img + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        built[name] = meta
        log(f"  {name}: {format_size(allocated(img))} allocated, {meta['build_seconds']} s")
    out = []
    for name in names:
        img = os.path.join(imgdir, name + ".raw")
        m = built[name]
        out.append({"name": name, "path": img, "format": "raw", "kind": m["kind"], "parent": m["parent"],
                    "derived": m["derived"], "packages": m["packages"], "source": m["source"],
                    "virtual_size": os.path.getsize(img), "allocated_bytes": allocated(img)})
    return out


# -- measuring ---------------------------------------------------------------

