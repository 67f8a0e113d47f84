"""The layering rules of ../shared/DESIGN.md that code can check: operations open,
create and remove images only through the OpenContext they are given, and never
reach a mount, the session or the CLI (data flows down, never back up)."""

from __future__ import annotations

import ast
import contextlib
import os

import pytest

import vdisk
from vdisk import block
from vdisk.ops import chain, holds
from vdisk.ops.context import OpenContext

OPS = os.path.join(os.path.dirname(vdisk.__file__), "ops")
#: the one module that may call them: OpenContext itself
CONTEXT = "context.py"
FORBIDDEN_CALLS = {("block", "open"), ("block", "create"), ("block", "remove"), ("vdisk", "open"),
                   ("vdisk", "create")}
FORBIDDEN_IMPORTS = ("vdisk.session", "vdisk.cli", "vdisk.export", "vdisk.fleet", "vdisk.vm")


def _ops_sources() -> list[str]:
    return sorted(f for f in os.listdir(OPS) if f.endswith(".py") and f != CONTEXT)


def _violations(path: str) -> list[str]:
    tree = ast.parse(open(path).read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in FORBIDDEN_CALLS:
            out.append(f"{os.path.basename(path)}:{node.lineno}: calls {node.func.value.id}.{node.func.attr}")
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative to vdisk.ops
                mod = ("vdisk." if node.level == 2 else "vdisk.ops.") + mod if node.level <= 2 else mod
            names = [f"{mod}.{a.name}" for a in node.names]
            if any(m.startswith(FORBIDDEN_IMPORTS) for m in [mod, *names]):
                out.append(f"{os.path.basename(path)}:{node.lineno}: imports {mod}")
            if mod in ("vdisk.block", "vdisk") and any(a.name in ("open", "create", "remove") for a in node.names):
                out.append(f"{os.path.basename(path)}:{node.lineno}: imports an opener from {mod}")
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(FORBIDDEN_IMPORTS):
                    out.append(f"{os.path.basename(path)}:{node.lineno}: imports {a.name}")
    return out


@pytest.mark.parametrize("name", _ops_sources())
def test_operations_open_images_only_through_their_context(name):
    assert _violations(os.path.join(OPS, name)) == []


def test_the_layer_check_finds_a_direct_open(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .. import block\nfrom ..session import SESSION\n\n"
                   "def f(p):\n    with block.open(p) as img:\n        return img\n")
    found = _violations(str(bad))
    assert any("calls block.open" in v for v in found) and any("imports vdisk.session" in v for v in found)


class Recording(OpenContext):
    """Counts what goes through the context, and is the only way images open."""

    def __init__(self):
        self.opened, self.writable_paths, self.created, self.removed = [], [], [], []
        self.inside = 0

    @contextlib.contextmanager
    def _allowed(self):
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    def open(self, path, **kw):
        self.opened.append(os.path.basename(path))
        with self._allowed():
            return super().open(path, **kw)

    @contextlib.contextmanager
    def writable(self, path, fmt=None):
        self.writable_paths.append(os.path.basename(path))
        with self._allowed(), super().writable(path, fmt) as img:
            yield img

    def create(self, path, size, **kw):
        self.created.append(os.path.basename(path))
        with self._allowed():
            super().create(path, size, **kw)

    def remove(self, path):
        self.removed.append(os.path.basename(path))
        with self._allowed():
            super().remove(path)


def guard(monkeypatch) -> Recording:
    """A Recording context; from now on vdisk.open outside it fails the test."""
    ctx = Recording()
    real_open = block.open

    def guarded_open(*a, **kw):
        assert ctx.inside, f"an operation opened {a[0] if a else kw} itself, not through its context"
        return real_open(*a, **kw)

    monkeypatch.setattr(block, "open", guarded_open)
    return ctx


def test_chain_operations_open_everything_through_their_context(tmp_path, monkeypatch):
    base = str(tmp_path / "base.vdk")
    vdisk.create(base, 1 << 20, format="vdk")
    with vdisk.open(base) as img:
        img.write(0, b"b" * 4096)
        img.snapshot_create("s1")
    ctx = guard(monkeypatch)
    chain.clone(base + "@s1", str(tmp_path / "c1.vdk"), ctx=ctx)
    chain.clone(base, str(tmp_path / "c2.vdk"), ctx=ctx)  # live: a snapshot first, through ctx.writable
    assert ctx.created == ["c1.vdk", "c2.vdk"] and ctx.writable_paths.count("base.vdk") == 3
    chain.flatten(str(tmp_path / "c2.vdk"), ctx=ctx)
    deps = holds.dependants(base, ctx)
    assert [os.path.basename(d.path) for d in deps] == ["c1.vdk"]
    assert chain.remove(base, recursive=True, ctx=ctx) == [str(tmp_path / "c1.vdk"), base]
    assert ctx.removed == ["c1.vdk", "base.vdk"]
    assert "c1.vdk" in ctx.opened and not os.path.exists(base)
    with pytest.raises(AssertionError, match="opened"):
        block.open(str(tmp_path / "c2.vdk"))  # the guard itself works
