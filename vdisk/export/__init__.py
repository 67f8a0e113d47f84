"""Exports: ways to serve an opened image to the outside, side by side as QEMU keeps
``block/export/``.  They sit on top of the block layer and never know a format.

``fuse``  ``vdisk mount``: the image as a file, MOUNTPOINT/disk, with its snapshots
          (the kernel-protocol engine, and pyfuse3 + trio).
"""
