"""Command modules of the ``vdisk`` CLI, imported lazily by :mod:`vdisk.cli`."""
