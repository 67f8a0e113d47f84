"""A FUSE engine that speaks the kernel protocol on /dev/fuse itself, in plain Python.

- :mod:`vdisk.export.fuse.kernel.proto`: the structs of ``include/uapi/linux/fuse.h`` as pure
  encode/decode, no I/O;
- :mod:`vdisk.export.fuse.kernel.mount`: mounting (mount(2) as root, else fusermount3),
  cloning session descriptors (FUSE_DEV_IOC_CLONE), unmounting;
- :mod:`vdisk.export.fuse.kernel.engine`: the request loop, several reader threads on cloned
  descriptors, dispatching to :class:`vdisk.export.fuse.fs.VdiskFS`'s handlers.

``vdisk mount --engine kernel`` (or ``VDISK_FUSE_ENGINE=kernel``) uses it; the pyfuse3 +
trio engine serves the same handlers.  Why it exists: vdisk/export/fuse/PERFORMANCE.md.
"""
