"""The ``vdisk`` command line, in the spirit of ``qemu-img``.

This module only parses arguments, calls :mod:`vdisk.ops` and the ``Image`` API, and
renders results.  Errors are handled in one place (:class:`VdiskGroup.invoke`): a
:class:`~vdisk.errors.VdiskError` or ``OSError`` becomes one line ``vdisk: <message>``
on stderr and the error's exit code; anything else is a bug and is reported as one
``internal error`` line (``VDISK_DEBUG=1`` shows the traceback).

Adding commands from another module
-----------------------------------
Put the command in ``vdisk/commands/<name>.py`` as a click command or group named
like the module (``snapshot`` in ``vdisk/commands/snapshot.py``), reusing the
helpers below; nothing in this file needs to change::

    import click
    from vdisk.cli import emit, format_option, open_image, output_option

    @click.group()
    def snapshot():
        "Create, list, revert and delete internal snapshots."

    @snapshot.command("list")
    @format_option()
    @output_option()
    @click.argument("filename")
    def snapshot_list(fmt, output, filename):
        with open_image(filename, fmt=fmt) as img:
            emit(output, [...], human=lambda rows: ...)

(Decorating with ``@cli.command()`` after ``from vdisk.cli import cli`` works too.)
The module is imported lazily: ``vdisk snapshot ...`` imports
``vdisk.commands.snapshot`` only; ``vdisk --help`` imports them all.  A command that
lives elsewhere, or several in one module (``mount`` and ``umount`` in
``vdisk.cli_mount``), is named in :data:`EXTENSION_COMMANDS`; other distributions
can use the ``vdisk.commands`` entry-point group.  Errors raised as ``VdiskError``
by those commands get the same one-line handling.  Shared helpers: ``SIZE`` (a size
parameter type), ``format_option``, ``output_option``, ``unsafe_backing_option``,
``quiet_option``, ``progress_option``, ``open_image``, ``emit``/``emit_json``,
``progress_bar``, ``parse_o_options``, ``errors_exit_with``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import json
import os
import pkgutil
import sys
from typing import Any, Callable, Iterator

import click

from . import __version__
from . import block as _block
from .errors import BackingError, NotSupported, UsageError, VdiskError
from .sizes import format_size, parse_size

#: Commands defined outside ``vdisk.commands``: name -> ``"module:attribute"``.
EXTENSION_COMMANDS: dict[str, str] = {
    "mount": "vdisk.cli_mount:mount_command",
    "umount": "vdisk.cli_mount:umount_command",
}
#: Package whose modules are command modules (imported lazily, see the module docstring).
EXTENSION_PACKAGE = "vdisk.commands"
#: Entry-point group for commands from other distributions.
ENTRY_POINT_GROUP = "vdisk.commands"

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# ---------------------------------------------------------------------------- errors
def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "error"


def _fail(ctx: click.Context, message: str, code: int) -> None:
    click.echo(f"vdisk: {_one_line(message)}", err=True)
    ctx.exit(code)


def _oserror_message(exc: OSError) -> str:
    what = os.strerror(exc.errno) if exc.errno else str(exc)
    name = exc.filename if exc.filename is not None else None
    return f"{name}: {what}" if name else what


@contextlib.contextmanager
def errors_exit_with(code: int) -> Iterator[None]:
    """Within the block, errors that would exit 1 exit ``code`` instead (``compare``
    exits 2 on errors, since 1 means "different")."""
    try:
        yield
    except VdiskError as exc:
        if exc.exit_code < code:
            exc.exit_code = code
        raise
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        err = VdiskError(_oserror_message(exc))
        err.exit_code = code
        raise err from None


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` so ``finally`` clauses run
    (convert removes its half-written temporary file).  Main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class VdiskGroup(click.Group):
    """The top-level group: one place for error handling, and lazily imported commands."""

    _discovered = False

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except VdiskError as exc:
            _fail(ctx, getattr(exc, "message", None) or str(exc), exc.exit_code)
        except BrokenPipeError:
            # `vdisk map x | head`: the reader went away; not worth a message.
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(1)
        except OSError as exc:
            _fail(ctx, _oserror_message(exc), 1)
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", 130)
        except Exception as exc:  # a bug: still one line, unless debugging
            if os.environ.get("VDISK_DEBUG"):
                raise
            _fail(
                ctx,
                f"internal error: {type(exc).__name__}: {exc} (set VDISK_DEBUG=1 for a traceback)",
                EXIT_INTERNAL,
            )

    # -- lazily imported commands
    def _import_extension(self, name: str) -> None:
        spec = EXTENSION_COMMANDS.get(name)
        if spec:
            module, _, attr = spec.partition(":")
            cmd = getattr(importlib.import_module(module), attr or name)
            if name not in self.commands:
                self.add_command(cmd, name)
            return
        if not name.replace("-", "_").isidentifier():
            return
        modname = f"{EXTENSION_PACKAGE}.{name.replace('-', '_')}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name in (modname, EXTENSION_PACKAGE):
                return
            raise
        cmd = getattr(mod, name.replace("-", "_"), None)
        if name not in self.commands and isinstance(cmd, click.Command):
            self.add_command(cmd, name)

    def _discover(self) -> None:
        if VdiskGroup._discovered:
            return
        VdiskGroup._discovered = True
        for name in EXTENSION_COMMANDS:
            self._try(lambda n=name: self._import_extension(n))
        try:
            pkg = importlib.import_module(EXTENSION_PACKAGE)
        except ModuleNotFoundError as exc:
            if exc.name != EXTENSION_PACKAGE:
                raise
            pkg = None
        if pkg is not None:
            for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
                if not info.name.startswith("_"):
                    self._try(lambda n=info.name: self._import_extension(n))
        try:
            from importlib.metadata import entry_points

            eps = entry_points(group=ENTRY_POINT_GROUP)
        except Exception:  # noqa: BLE001 - broken metadata must not break the CLI
            eps = []
        for ep in eps:
            def load(ep=ep):
                cmd = ep.load()
                if ep.name not in self.commands and isinstance(cmd, click.Command):
                    self.add_command(cmd, ep.name)

            self._try(load)

    @staticmethod
    def _try(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one broken extension must not hide the others
            if os.environ.get("VDISK_DEBUG"):
                raise
            click.echo(f"vdisk: warning: a command module failed to load: {type(exc).__name__}: {exc}", err=True)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = self.commands.get(cmd_name)
        if cmd is None:
            self._import_extension(cmd_name)
            cmd = self.commands.get(cmd_name)
        if cmd is None:
            self._discover()
            cmd = self.commands.get(cmd_name)
        return cmd

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._discover()
        return sorted(self.commands)


@click.group(name="vdisk", cls=VdiskGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="vdisk", message="%(prog)s %(version)s")
def cli() -> None:
    """Create, inspect, convert and check virtual disk images (vdk, raw, ...).

    Sizes accept K, M, G, T suffixes (binary: 1K = 1024).  Errors print one line
    "vdisk: <message>" on stderr; exit codes: 0 success, 1 error (also a usage
    error), 2 corrupt image (check: also 3 = leaks only; compare: 1 = different,
    2 = error), 70 internal error (a bug: VDISK_DEBUG=1 shows its traceback).
    """


#: exit code of an internal error (a bug in vdisk), as BSD's EX_SOFTWARE
EXIT_INTERNAL = 70


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``vdisk``).  A usage error is one line and exits 1,
    as every other error does (click's own default, 2, means "corrupt" here)."""
    try:
        rv = cli.main(args=argv, prog_name="vdisk", standalone_mode=False)
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "vdisk"
        click.echo(f"vdisk: {_one_line(exc.format_message())} (see '{cmd} --help')", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"vdisk: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code if exc.exit_code != 2 else 1)
    except click.Abort:
        click.echo("vdisk: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


# ---------------------------------------------------------------------------- shared helpers
class SizeType(click.ParamType):
    """A size like ``10G``, ``512M``, ``4096``.  A bad one is a one-line ``vdisk:`` error."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except UsageError as exc:
            what = f"{param.human_readable_name}: " if param is not None else ""
            raise UsageError(f"{what}{exc.message}") from None


SIZE = SizeType()


def format_option(*names: str, default: str | None = None, help: str | None = None) -> Callable:  # noqa: A002
    """``-f/--format FMT``; passed to the command as ``fmt``."""
    names = names or ("-f", "--format")
    return click.option(
        *names,
        "fmt",
        default=default,
        metavar="FMT",
        help=help or "Image format (vdk, raw, ...); default: probed from the file, raw if no magic.",
    )


def output_option() -> Callable:
    """``--output human|json``; passed as ``output``."""
    return click.option(
        "--output",
        type=click.Choice(["human", "json"]),
        default="human",
        show_default=True,
        help="Output format; json is stable (keys documented in this help).",
    )


def unsafe_backing_option() -> Callable:
    """``--unsafe-backing``; passed as ``unsafe_backing``."""
    return click.option(
        "--unsafe-backing",
        is_flag=True,
        help="Follow backing files outside the image's directory and VDISK_BACKING_DIRS.",
    )


def quiet_option() -> Callable:
    return click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")


def progress_option() -> Callable:
    return click.option(
        "-p", "--progress", is_flag=True, help="Show progress even when stderr is not a terminal."
    )


def open_image(
    filename: str,
    *,
    fmt: str | None = None,
    read_only: bool = True,
    unsafe_backing: bool = False,
    snapshot: str | None = None,
    backing: bool = True,
    force_share: bool = False,
) -> _block.Image:
    """Open an image (and its chain) the way every command does; errors are VdiskErrors
    that name the file."""
    if os.path.isdir(filename):
        raise VdiskError(f"{filename}: is a directory, not an image file")
    return _block.open(
        filename,
        format=fmt,
        read_only=read_only,
        snapshot=snapshot,
        backing=backing,
        unsafe_backing=unsafe_backing,
        force_share=force_share,
    )


def force_share_option() -> Callable:
    """``-U/--force-share``; passed as ``force_share``."""
    return click.option(
        "-U", "--force-share", is_flag=True,
        help="Open even while another process (a mount) writes the image; the result may be stale.",
    )


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, enum.Enum):
        return obj.name.lower()
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def emit(output: str, obj: Any, human: Callable[[Any], str]) -> None:
    """Print ``obj`` as JSON or through ``human(obj) -> str``, following ``--output``."""
    if output == "json":
        emit_json(obj)
    else:
        text = human(obj)
        if text:
            click.echo(text)


class _Progress:
    """Progress on stderr: a click bar on a terminal, ``qemu-img -p``-style percentages
    otherwise.  ``update(n)`` adds ``n`` done units."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total = max(total, 1)
        self.label = label
        self.enabled = enabled
        self.done = 0
        self._bar = None
        self._tty = enabled and sys.stderr.isatty()
        self._last = -1

    def __enter__(self) -> _Progress:
        if self._tty:
            self._bar = click.progressbar(length=self.total, label=self.label, file=sys.stderr)
            self._bar.__enter__()
        elif self.enabled:
            self._print()
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            self._print()

    def _print(self) -> None:
        pct = min(100.0, 100.0 * self.done / self.total)
        if int(pct) != self._last:
            self._last = int(pct)
            sys.stderr.write(f"    ({pct:.2f}/100%)\r")
            sys.stderr.flush()

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_bar(total: int, label: str = "", *, force: bool = False, quiet: bool = False) -> _Progress:
    """A progress display for long work: on when stderr is a terminal (or ``force``),
    off with ``quiet``.  Use as a context manager; pass ``.update`` to an operation."""
    return _Progress(total, label, enabled=not quiet and (force or sys.stderr.isatty()))


#: ``-o`` keys that map to ``vdisk.create`` arguments; the rest go to ``options``.
_O_ALIASES = {
    "cluster_size": "cluster_size",
    "compression": "compression",
    "compression_type": "compression",
    "backing_file": "backing_file",
    "backing_fmt": "backing_format",
    "backing_format": "backing_format",
}


def parse_o_options(values: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Parse ``-o key=val,key=val`` (repeatable; ``,,`` is a literal comma) into
    keyword arguments for :func:`vdisk.create`: ``cluster_size`` (a size),
    ``compression``, ``backing_file``, ``backing_format``, and ``options`` (a dict of
    the other keys, values as strings)."""
    out: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for value in values:
        items, cur, i = [], "", 0
        while i < len(value):
            if value[i] == ",":
                if value[i + 1 : i + 2] == ",":
                    cur += ","
                    i += 2
                    continue
                items.append(cur)
                cur = ""
            else:
                cur += value[i]
            i += 1
        items.append(cur)
        for item in items:
            if not item.strip():
                continue
            key, sep, val = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise UsageError(f"invalid -o option {item!r}: expected key=value")
            if key in _O_ALIASES:
                name = _O_ALIASES[key]
                out[name] = SIZE.convert(val, None, None) if name == "cluster_size" else val.strip()
            else:
                extra[key] = val
    if extra:
        out["options"] = extra
    return out


# ---------------------------------------------------------------------------- create
@cli.command(context_settings=CONTEXT_SETTINGS)
@format_option(default="vdk", help="Image format: vdk (default), raw, ...")
@click.option(
    "-o",
    "opts",
    multiple=True,
    metavar="OPT=VAL[,...]",
    help="Format options: cluster_size=64K, compression=zstd, backing_file=, backing_fmt=, "
    "and any option the format defines.  Repeatable.",
)
@click.option("-b", "--backing", "backing_file", metavar="BACKING[@SNAP]",
              help="Create an overlay of BACKING (or of its snapshot SNAP); a relative BACKING is relative "
              "to FILENAME's directory, as in qemu-img.")
@click.option("-F", "--backing-format", "backing_format", metavar="FMT", help="BACKING's format (required for raw).")
@unsafe_backing_option()
@quiet_option()
@click.argument("filename")
@click.argument("size", type=SIZE, required=False)
def create(fmt, opts, backing_file, backing_format, unsafe_backing, quiet, filename, size):
    """Create a new image FILENAME of SIZE bytes (10G, 512M, ...).

    With -b, SIZE defaults to the backing image's size, and BACKING must lie where
    vdisk follows backing files (FILENAME's directory or below, or a directory in
    VDISK_BACKING_DIRS) unless --unsafe-backing.  An existing FILENAME is never
    overwritten.
    """
    kw = parse_o_options(opts)
    backing_file = backing_file or kw.pop("backing_file", None)
    backing_format = backing_format or kw.pop("backing_format", None)
    kw.pop("backing_file", None)
    kw.pop("backing_format", None)
    if backing_format and not backing_file:
        raise UsageError("-F needs a backing file (-b)")
    if size is None and not backing_file:
        raise UsageError("a size is needed (or a backing file to take it from with -b)")
    if backing_file:
        from .ops.chain import backing_spec

        backing_file, snap = backing_spec(filename, backing_file)
        if snap is not None:
            from .ops.chain import clone as _clone

            if backing_format not in (None, "vdk") or size is not None or kw:
                raise UsageError("-b BACKING@SNAP makes a linked clone of the snapshot: "
                                 "no -F other than vdk, no size and no -o")
            _clone(os.path.join(os.path.dirname(os.path.abspath(filename)), backing_file) + "@" + snap,
                   filename, fmt=fmt, unsafe_backing=unsafe_backing)
            if not quiet:
                click.echo(f"Formatting '{filename}', fmt={fmt} backing_file={backing_file}@{snap}")
            return
    _block.create(filename, size, format=fmt, backing_file=backing_file, backing_format=backing_format,
                  unsafe_backing=unsafe_backing, **kw)
    if not quiet:
        if size is None:
            with contextlib.suppress(VdiskError, OSError):
                with open_image(filename, fmt=fmt, backing=False) as img:
                    size = img.size
        parts = [f"Formatting '{filename}', fmt={fmt}", f"size={size}"]
        if kw.get("cluster_size"):
            parts.append(f"cluster_size={kw['cluster_size']}")
        if kw.get("compression"):
            parts.append(f"compression={kw['compression']}")
        if backing_file:
            parts.append(f"backing_file={backing_file}")
            if backing_format:
                parts.append(f"backing_fmt={backing_format}")
        for k, v in (kw.get("options") or {}).items():
            parts.append(f"{k}={v}")
        click.echo(" ".join(parts))


# ---------------------------------------------------------------------------- info
@cli.command(context_settings=CONTEXT_SETTINGS)
@format_option()
@output_option()
@click.option("--backing-chain", is_flag=True, help="Describe every image of the backing chain, top first.")
@unsafe_backing_option()
@force_share_option()
@click.argument("filename")
def info(fmt, output, backing_chain, unsafe_backing, force_share, filename):
    """Show facts about an image.

    \b
    JSON keys (an object; a list of them with --backing-chain):
      filename, format, virtual_size, disk_size (host bytes used),
      cluster_size, compression (null if off), read_only,
      backing_filename, backing_format, backing_snapshot,
      full_backing_filename (null if none or not opened),
      backing_snapshot_name (vdk clones, whose backing snapshot is "#ID"),
      snapshots: [{id, name, created (epoch seconds), size, generation,
                   unique_bytes, holds, extra}],
      then any format-specific keys.
    """
    from .ops.mapping import chain_info, image_info, render_info_human

    try:
        img = open_image(filename, fmt=fmt, unsafe_backing=unsafe_backing, force_share=force_share)
    except BackingError as exc:
        if backing_chain:
            raise
        # The image itself is fine: describe it without its (unreachable) backing chain.
        click.echo(f"vdisk: warning: {_one_line(exc.message)}", err=True)
        img = open_image(filename, fmt=fmt, backing=False, force_share=force_share)
    with img:
        if backing_chain:
            data = chain_info(img)
            emit(output, data, lambda d: "\n\n".join(render_info_human(i) for i in d))
        else:
            emit(output, image_info(img), render_info_human)


# ---------------------------------------------------------------------------- map
@cli.command("map", context_settings=CONTEXT_SETTINGS)
@format_option()
@output_option()
@click.option("--start-offset", type=SIZE, default=0, help="First guest byte to map.")
@click.option("--max-length", type=SIZE, default=None, help="Map at most this many bytes.")
@unsafe_backing_option()
@force_share_option()
@click.argument("filename")
def map_(fmt, output, start_offset, max_length, unsafe_backing, force_share, filename):
    """Show how the guest disk maps to data, zeros and backing images.

    Human output lists the ranges holding data (offset, length, host offset, file),
    like qemu-img map.

    \b
    JSON: a list of extents covering the range without gaps, each
      {start, length, depth (0 = top image), present, zero, data,
       compressed, offset (host offset of the data, or null)}.
    """
    from .ops.mapping import map_extents, render_map_human

    with open_image(filename, fmt=fmt, unsafe_backing=unsafe_backing, force_share=force_share) as img:
        if start_offset > img.size:
            raise UsageError(f"--start-offset {start_offset} is past the end of the image ({img.size} bytes)")
        extents = map_extents(img, start_offset, max_length)
        emit(output, extents, lambda e: render_map_human(img, e))


# ---------------------------------------------------------------------------- check
@cli.command(context_settings=CONTEXT_SETTINGS)
@format_option()
@output_option()
@click.option("-r", "--repair", type=click.Choice(["leaks", "all"]), default=None, help="Repair leaks, or everything.")
@unsafe_backing_option()
@force_share_option()
@click.argument("filename")
@click.pass_context
def check(ctx, fmt, output, repair, unsafe_backing, force_share, filename):
    """Check an image's metadata and data checksums, and its whole backing chain:
    a backing file that is missing, loops or lies outside the allowed directories is
    an error (exit 1), and each backing image's metadata is checked too.  For a vdk
    image, holds on its snapshots whose holder is gone count as leaks (-r leaks
    releases them).  Repairs apply to FILENAME only.

    Exit codes: 0 clean, 2 corruptions found, 3 only leaked clusters, 1 error
    (e.g. the format has no check, as raw, or the chain cannot be opened).

    \b
    JSON keys: filename, format, result ("clean" | "leaks" | "corrupt"),
      corruptions, leaks (counts), leaked_clusters, corruption_messages,
      leak_messages, repaired (messages), checked_clusters,
      allocated_clusters, compressed_clusters; backing: the same keys for
      each backing image, top to base.
    """
    if repair and force_share:
        raise UsageError("-r repairs the image and -U shares it with a writer: not both")
    from .ops.chain import release_stale_holds, stale_holds

    results = []
    with open_image(filename, fmt=fmt, read_only=repair is None, unsafe_backing=unsafe_backing,
                    force_share=force_share) as top:
        for depth, img in enumerate(top.chain()):
            try:
                res = img.check(repair=repair if depth == 0 else None)
            except NotSupported:
                if depth == 0:
                    raise NotSupported(f"{filename}: the {img.format} format has no consistency check") from None
                continue
            results.append((img, res, bool(repair) and depth == 0))
    entries = []
    worst = 0
    for img, res, stale_release in results:
        leaks = list(res.leaks)
        repaired = list(res.repaired)
        if img.format == "vdk" and img.snapshot is None:
            if stale_release:
                repaired += release_stale_holds(img.filename)
            leaks += [f"a hold that nothing uses: {h.reason}" for h in stale_holds(img.filename)]
        code = 2 if res.corruptions else 3 if leaks else 0
        if code == 2 or (code == 3 and worst != 2):
            worst = code
        entries.append({
            "filename": img.filename if entries else filename,
            "format": img.format,
            "result": {0: "clean", 2: "corrupt", 3: "leaks"}[code],
            "corruptions": len(res.corruptions),
            "leaks": len(leaks),
            "leaked_clusters": res.leaked_clusters,
            "corruption_messages": list(res.corruptions),
            "leak_messages": leaks,
            "repaired": repaired,
            "checked_clusters": res.checked_clusters,
            "allocated_clusters": res.allocated_clusters,
            "compressed_clusters": res.compressed_clusters,
        })
    data = dict(entries[0])
    data["backing"] = entries[1:]
    emit(output, data, _render_check)
    ctx.exit(worst)


def _render_check(d: dict) -> str:
    out = [_render_check_one(d)]
    for b in d.get("backing", ()):
        out.append(f"\nBacking image {b['filename']} ({b['format']}):\n" + _render_check_one(b))
    return "\n".join(out)


def _render_check_one(d: dict) -> str:
    lines = [f"ERROR {m}" for m in d["corruption_messages"]]
    lines += [f"Leak: {m}" for m in d["leak_messages"]]
    lines += [f"Repaired: {m}" for m in d["repaired"]]
    if lines:
        lines.append("")
    if d["corruptions"]:
        lines.append(f"{d['corruptions']} errors were found on the image.")
        lines.append("Data may be corrupted, or further writes to the image may corrupt it.")
    if d["leaks"]:
        if d["corruptions"]:
            lines.append("")
        n = d["leaked_clusters"] or d["leaks"]
        lines.append(f"{n} leaked clusters were found on the image.")
        lines.append("This means waste of disk space, but no harm to data.")
    if not d["corruptions"] and not d["leaks"]:
        lines.append("No errors were found on the image.")
    if d["checked_clusters"] or d["allocated_clusters"]:
        lines.append(
            f"{d['checked_clusters']} clusters checked; {d['allocated_clusters']} allocated, "
            f"{d['compressed_clusters']} compressed"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- convert
@cli.command(context_settings=CONTEXT_SETTINGS)
@format_option(help="Source format (default: probed, raw if no magic).")
@click.option("-O", "--output-format", "out_fmt", default="raw", show_default=True, metavar="FMT", help="Destination format.")
@click.option("-c", "--compress", is_flag=True, help="Compress the destination (zstd).")
@click.option("-o", "opts", multiple=True, metavar="OPT=VAL[,...]", help="Destination format options, as for create.")
@click.option("-s", "--snapshot", default=None, metavar="NAME", help="Copy this internal snapshot of SRC.")
@click.option(
    "-t",
    "--cache",
    type=click.Choice(["unsafe", "writeback"]),
    default="unsafe",
    show_default=True,
    help="writeback: flush DST to disk before exiting; unsafe: leave that to the OS (as qemu-img convert).",
)
@progress_option()
@quiet_option()
@unsafe_backing_option()
@click.argument("src")
@click.argument("dst")
def convert(fmt, out_fmt, compress, opts, snapshot, cache, progress, quiet, unsafe_backing, src, dst):
    """Copy SRC's guest content (its backing chain flattened) into a new image DST.

    Zero and unallocated ranges are neither read nor written, so DST is sparse.
    An existing DST is replaced once the copy is complete (unless it is in use).
    """
    from .ops.convert import convert as do_convert

    kw = parse_o_options(opts)
    if "backing_file" in kw or "backing_format" in kw:
        raise UsageError("convert makes a standalone image; backing_file cannot be set with -o")
    if compress:
        kw.setdefault("compression", "zstd")
    with sigterm_unwinds(), open_image(src, fmt=fmt, snapshot=snapshot, unsafe_backing=unsafe_backing) as img:
        with progress_bar(img.size, "Converting", force=progress, quiet=quiet) as bar:
            do_convert(img, dst, format=out_fmt, progress=bar.update, durable=cache == "writeback", **kw)


# ---------------------------------------------------------------------------- compare
@cli.command(context_settings=CONTEXT_SETTINGS)
@format_option("-f", "--format-a", help="Format of A (default: probed).")
@click.option("-F", "--format-b", "fmt_b", default=None, metavar="FMT", help="Format of B (default: probed).")
@click.option("-s", "--strict", is_flag=True, help="Images of different sizes are different.")
@progress_option()
@quiet_option()
@unsafe_backing_option()
@click.argument("a")
@click.argument("b")
@click.pass_context
def compare(ctx, fmt, fmt_b, strict, progress, quiet, unsafe_backing, a, b):
    """Compare the guest content of images A and B.

    Exit 0 if identical, 1 if different, 2 on error.  Like qemu-img, a size
    difference is allowed if the extra part reads as zeros, and a mismatch is
    reported at the start of the first differing 512-byte sector.
    """
    from .ops.compare import compare as do_compare

    with errors_exit_with(2):
        with open_image(a, fmt=fmt, unsafe_backing=unsafe_backing) as ia, open_image(
            b, fmt=fmt_b, unsafe_backing=unsafe_backing
        ) as ib:
            with progress_bar(max(ia.size, ib.size), "Comparing", force=progress, quiet=quiet) as bar:
                res = do_compare(ia, ib, strict=strict, progress=bar.update)
    say = (lambda s: None) if quiet else click.echo
    if res.size_mismatch:
        if strict:
            say("Strict mode: Image size mismatch!")
            ctx.exit(1)
        say("Warning: Image size mismatch!")
    if res.identical:
        say("Images are identical.")
        ctx.exit(0)
    off = res.mismatch_offset or 0
    say(f"Content mismatch at offset {off - off % 512}!")
    ctx.exit(1)


# ---------------------------------------------------------------------------- resize
@cli.command(context_settings={**CONTEXT_SETTINGS, "ignore_unknown_options": True})
@format_option()
@click.option("--shrink", is_flag=True, help="Allow making the image smaller (drops data past the new end).")
@quiet_option()
@click.argument("filename")
@click.argument("size")
def resize(fmt, shrink, quiet, filename, size):
    """Set the guest size of FILENAME to SIZE, or grow/shrink it by +SIZE/-SIZE.

    Shrinking needs --shrink.  Growing adds a range that reads as zeros.
    """
    text = size.strip()
    sign = text[:1] if text[:1] in "+-" else ""
    amount = SIZE.convert(text[1:] if sign else text, None, None)
    with open_image(filename, fmt=fmt, read_only=False, backing=True) as img:
        if sign == "+":
            new = img.size + amount
        elif sign == "-":
            new = img.size - amount
            if new < 0:
                raise UsageError(f"{filename}: cannot shrink by {format_size(amount)}: the image is only {img.size} bytes")
        else:
            new = amount
        img.resize(new, shrink=shrink)
        img.flush()
    if not quiet:
        click.echo("Image resized.")

if __name__ == "__main__":  # pragma: no cover
    main()
