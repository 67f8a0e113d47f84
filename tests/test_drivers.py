"""Every driver (and a few chain shapes) passes the shared driver suite."""

import os

import pytest

import vdisk
from vdisk.testing import check_block_driver


def _plain(fmt, **kw):
    def factory(path, size):
        vdisk.create(path, size, format=fmt, **kw)
        return lambda read_only=False: vdisk.open(path, read_only=read_only, format=fmt)
    return factory


def _overlay(base_fmt):
    def factory(path, size):
        base = path + ".base"
        vdisk.create(base, size, format=base_fmt)
        with vdisk.open(base, format=base_fmt) as b:
            b.write(0, b"B" * 100)  # backing data under the overlay
            b.write_zeroes(0, 100)  # ...and zeroed again, so the suite's "new reads zero" holds
        vdisk.create(path, size, format="vdk", backing_file=base, backing_format=base_fmt)
        return lambda read_only=False: vdisk.open(path, read_only=read_only)
    return factory


def _pool_image(path, size):
    """An image in a pool made beside ``path``."""
    from vdisk.pool.store import Pool

    Pool.create(path + ".pool")
    name = path + ".pool/img"
    vdisk.create(name, size)
    return name


def _pool(path, size):
    name = _pool_image(path, size)
    return lambda read_only=False: vdisk.open(name, read_only=read_only)


def _pool_clone(path, size):
    """A native clone in a pool of a snapshot whose data was zeroed again."""
    parent = _pool_image(path, size)
    with vdisk.open(parent) as p:
        p.write(0, b"P" * 100_000)
        p.write_zeroes(0, 100_000)
        p.snapshot_create("s")
    name = path + ".pool/clone"
    vdisk.create(name, format="pool", backing_file=parent, backing_format="pool", backing_snapshot="s")
    return lambda read_only=False: vdisk.open(name, read_only=read_only)


def _vdk_over_pool(path, size):
    base = _pool_image(path, size)
    with vdisk.open(base) as b:
        b.write(0, b"B" * 100)
        b.write_zeroes(0, 100)
    vdisk.create(path, size, format="vdk", backing_file=base, backing_format="pool")
    return lambda read_only=False: vdisk.open(path, read_only=read_only)


def _pool_over_vdk(path, size):
    base = path + ".base"
    vdisk.create(base, size)
    with vdisk.open(base) as b:
        b.write(0, b"B" * 100)
        b.write_zeroes(0, 100)
    from vdisk.pool.store import Pool

    Pool.create(path + ".pool")
    name = path + ".pool/img"
    beside = [os.path.dirname(path)]  # the base is beside the pool's directory, not in it
    vdisk.create(name, size, format="pool", backing_file=base, backing_format="vdk", allow_backing_dirs=beside)
    return lambda read_only=False: vdisk.open(name, read_only=read_only, allow_backing_dirs=beside)


def _vmdk_child(path, size):
    """A VMDK differencing disk (parentFileNameHint + parentCID) on a VMDK parent."""
    base = path + ".base.vmdk"
    vdisk.create(base, size, format="vmdk")
    with vdisk.open(base, format="vmdk") as b:
        b.write(0, b"B" * 100)
        b.write_zeroes(0, 100)
    vdisk.create(path, size, format="vmdk", backing_file=base, backing_format="vmdk")
    return lambda read_only=False: vdisk.open(path, read_only=read_only)


def _vpc_child(path, size):
    """A differencing VHD (parent locator, relative path) on a dynamic VHD."""
    base = path + ".base.vhd"
    vdisk.create(base, size, format="vpc")
    with vdisk.open(base, format="vpc") as b:
        b.write(0, b"B" * 100)
        b.write_zeroes(0, 100)
    vdisk.create(path, size, format="vpc", backing_file=base, backing_format="vpc")
    return lambda read_only=False: vdisk.open(path, read_only=read_only)


FACTORIES = {
    "raw": _plain("raw"),
    "vdk": _plain("vdk"),
    "vdk-4k": _plain("vdk", cluster_size=4096),
    "vdk-2m": _plain("vdk", cluster_size=2 << 20),
    "vdk-zstd": _plain("vdk", compression="zstd"),
    "vdk-over-vdk": _overlay("vdk"),
    "vdk-over-raw": _overlay("raw"),
    "qcow2": _plain("qcow2"),
    "qcow2-zstd": _plain("qcow2", compression="zstd"),
    "vdk-over-qcow2": _overlay("qcow2"),
    "vmdk": _plain("vmdk"),
    "vmdk-4k": _plain("vmdk", cluster_size=4096),
    "vmdk-child": _vmdk_child,
    "vdk-over-vmdk": _overlay("vmdk"),
    "pool": _pool,
    "pool-clone": _pool_clone,
    "vdk-over-pool": _vdk_over_pool,
    "pool-over-vdk": _pool_over_vdk,
    "vhdx": _plain("vhdx"),
    "vhdx-fixed-1m": _plain("vhdx", cluster_size=1 << 20, options={"subformat": "fixed"}),
    "vdk-over-vhdx": _overlay("vhdx"),
    "vpc": _plain("vpc"),
    "vpc-fixed": _plain("vpc", options={"subformat": "fixed"}),
    "vpc-4k": _plain("vpc", cluster_size=4096),
    "vpc-child": _vpc_child,
    "vdk-over-vpc": _overlay("vpc"),
    "vdi": _plain("vdi"),
    "vdi-static": _plain("vdi", options={"static": "on"}),
    "vdk-over-vdi": _overlay("vdi"),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_driver_suite(name, tmp_path):
    ran = check_block_driver(FACTORIES[name], str(tmp_path))
    assert len(ran) >= 9
    if name != "raw":
        for f in os.listdir(tmp_path):
            if f.endswith(".img"):
                paths = [str(tmp_path / f)]
            elif f.endswith(".pool"):  # every image of the pool
                paths = vdisk.block.images_in(str(tmp_path / f))
            else:
                continue
            for path in paths:
                with vdisk.open(path, allow_backing_dirs=[str(tmp_path)]) as img:
                    res = img.check()
                    assert res.corruptions == [] and res.leaks == [], (path, res)


def test_probe_table_agrees_with_every_driver():
    """vdisk.drivers.probe reads a magic table so that probing imports no driver; each
    driver's own probe must say the same of every magic and of raw bytes."""
    from vdisk.drivers import MAGICS, all_drivers, probe

    drivers = all_drivers()
    for name, magics in MAGICS.items():
        for off, magic in magics:
            head = bytes(off) + magic + bytes(8192 - off - len(magic))
            assert probe(head) == name
            assert [n for n, cls in drivers.items() if cls.probe(head)] == [name]
    assert probe(bytes(8192)) is None and not any(cls.probe(bytes(8192)) for cls in drivers.values())
