"""FUSE export of vdisk images (pyfuse3 + trio): an export on top of the Image API,
like QEMU's block/export/fuse.c, not part of the block layer.

- :mod:`vdisk.export.fuse.fs`: the file system (``disk`` and ``snapshots/NAME``);
- :mod:`vdisk.export.fuse.daemon`: serving a mount, starting it in the background, unmounting;
- :mod:`vdisk.export.fuse.control`: the control socket of a read-write mount (live snapshots)
  and its client.
"""
