"""Image operations: the work under the CLI, done through the ``Image`` API only.

Each operation takes opened :class:`vdisk.Image` objects (or paths it creates) and
returns plain data; rendering and argument parsing belong to :mod:`vdisk.cli`.
"""

from .compare import CompareResult, compare
from .convert import ConvertStats, convert, copy_content
from .mapping import chain_info, image_info, map_extents

__all__ = [
    "CompareResult",
    "ConvertStats",
    "chain_info",
    "compare",
    "convert",
    "copy_content",
    "image_info",
    "map_extents",
]
