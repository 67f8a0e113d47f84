"""The VM layer: real QEMU guests on vdisk disks.

* :mod:`.guest` builds a bootable Debian guest (kernel, initramfs, golden vdk image)
  from the distribution's own packages;
* :mod:`.qemu` runs it under ``qemu-system-x86_64 -accel tcg`` and talks to its agent;
* :mod:`.run` boots it from an image served by ``vdisk mount``.

``python -m vdisk.vm`` (``scripts/guest``) is the command line.  This layer uses only
vdisk's Python API and its exports, never a driver.
"""
