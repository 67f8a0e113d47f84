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
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_driver_suite(name, tmp_path):
    ran = check_block_driver(FACTORIES[name], str(tmp_path))
    assert len(ran) >= 9
    if name != "raw":
        for f in os.listdir(tmp_path):
            if f.endswith(".img"):
                with vdisk.open(str(tmp_path / f)) as img:
                    res = img.check()
                    assert res.corruptions == [] and res.leaks == [], (f, res)


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
