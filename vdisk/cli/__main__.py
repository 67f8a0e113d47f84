"""``python -m vdisk.cli``."""

from . import main

main()
