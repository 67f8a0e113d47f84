"""Image operations: the work under the CLI, done through the ``Image`` API only.

Each operation takes opened :class:`vdisk.Image` objects (or paths it creates) and
returns plain data; rendering and argument parsing belong to :mod:`vdisk.cli`.
"""

import importlib

# ``compare`` and ``convert`` are both a module and the function it exports: import
# the functions now, so the package attribute is always the function (an import of
# the submodule later would otherwise replace a lazily loaded one with the module).
from .compare import compare as compare  # noqa: E402
from .convert import convert as convert  # noqa: E402

_WHERE = {
    "CompareResult": "compare",
    "ConvertStats": "copier", "copy_content": "copier",
    "chain_info": "mapping", "image_info": "mapping", "map_extents": "mapping",
}
__all__ = sorted([*_WHERE, "compare", "convert"])


def __getattr__(name: str):
    # each operation's module loads when first used (start-up of the CLI)
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
