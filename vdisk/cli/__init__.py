"""The ``vdisk`` command line, in the spirit of ``qemu-img``.

One module per command (or command group) in this package; each parses arguments,
calls :mod:`vdisk.ops` and the ``Image`` API, and renders results.  Shared pieces:
:mod:`.options` (sizes, -f, --output, -U, --unsafe-backing, -o lists, opening an
image), :mod:`.output` (JSON and text), :mod:`.progress` (progress bars),
:mod:`.errors` (one-line errors).

Commands load lazily, as click's documentation shows for large CLIs: the group
knows each command's ``module:attribute`` (:data:`COMMANDS`) and imports a module
only when its command runs (``vdisk --help`` imports them all), so a command pays
only for its own imports.  Other modules or distributions add commands by adding
to :data:`EXTENSION_COMMANDS` or through the ``vdisk.commands`` entry-point group.

Errors are handled in one place (:meth:`VdiskGroup.invoke`): a
:class:`~vdisk.errors.VdiskError` or ``OSError`` becomes one line ``vdisk: <message>``
on stderr and the error's exit code; anything else is a bug, reported as one
``internal error`` line and exit code 70 (``VDISK_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Any

import click

from .. import __version__
from ..errors import VdiskError
from .errors import fail, oserror_message
from .output import one_line

#: built-in commands: name -> "module:attribute"
COMMANDS: dict[str, str] = {
    "activate": "vdisk.cli.mount:activate_command",
    "bench": "vdisk.cli.bench:bench",
    "check": "vdisk.cli.check:check",
    "clone": "vdisk.cli.clone:clone",
    "command-server": "vdisk.cli.cmdserver:command_server",
    "commit": "vdisk.cli.commit:commit",
    "compare": "vdisk.cli.compare:compare",
    "convert": "vdisk.cli.convert:convert",
    "create": "vdisk.cli.create:create",
    "deactivate": "vdisk.cli.mount:deactivate_command",
    "diff": "vdisk.cli.diff:diff",
    "flatten": "vdisk.cli.flatten:flatten",
    "fleet": "vdisk.cli.fleet:fleet",
    "info": "vdisk.cli.info:info",
    "map": "vdisk.cli.map:map_",
    "measure": "vdisk.cli.measure:measure",
    "mount": "vdisk.cli.mount:mount_command",
    "pool": "vdisk.cli.pool:pool",
    "rebase": "vdisk.cli.rebase:rebase",
    "resize": "vdisk.cli.resize:resize",
    "rm": "vdisk.cli.rm:rm",
    "serve": "vdisk.cli.serve:serve",
    "snapshot": "vdisk.cli.snapshot:snapshot",
    "umount": "vdisk.cli.mount:umount_command",
}
#: commands added by other modules: name -> "module:attribute"
EXTENSION_COMMANDS: dict[str, str] = {}
#: entry-point group for commands from other distributions
ENTRY_POINT_GROUP = "vdisk.commands"
#: exit code of an internal error (a bug in vdisk), as BSD's EX_SOFTWARE
EXIT_INTERNAL = 70

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_RUNNING = "vdisk.running-command"


def remember_command(ctx: click.Context, cmd: click.Command | None) -> None:
    """Groups call this as they pick a subcommand (ctx.meta is shared by the whole
    context tree), so an error's hint can name only the options it really has."""
    if cmd is not None:
        ctx.meta[_RUNNING] = cmd


def _entry_points() -> dict[str, Any]:
    try:
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # noqa: BLE001 - broken metadata must not break the CLI
        return {}


class VdiskGroup(click.Group):
    """The top-level group: lazily imported commands, and one place for error handling."""

    def _spec(self, name: str) -> str | None:
        return COMMANDS.get(name) or EXTENSION_COMMANDS.get(name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(COMMANDS) | set(EXTENSION_COMMANDS) | set(_entry_points()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        spec = self._spec(cmd_name)
        if spec is not None:
            module, _, attr = spec.partition(":")
            cmd = getattr(importlib.import_module(module), attr)
        else:
            ep = _entry_points().get(cmd_name)
            if ep is None:
                return None
            cmd = ep.load()
        if not isinstance(cmd, click.Command):
            raise VdiskError(f"command {cmd_name!r} ({spec or 'entry point'}) is not a click command")
        return cmd

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        remember_command(ctx, cmd)
        return name, cmd, rest

    @staticmethod
    def _failing_params(ctx: click.Context) -> set[str]:
        """The parameter names of the (sub)command this invocation ran."""
        cmd = ctx.meta.get(_RUNNING)
        return {p.name for p in cmd.params} if cmd is not None else set()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except VdiskError as exc:
            message = getattr(exc, "message", None) or str(exc)
            hint = exc.option_hint
            if hint is not None and hint[0] in self._failing_params(ctx):
                message = f"{message} {hint[1]}"
            fail(ctx, message, exc.exit_code)
        except BrokenPipeError:
            # `vdisk map x | head`: the reader went away; not worth a message.
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(1)
        except OSError as exc:
            fail(ctx, oserror_message(exc), 1)
        except KeyboardInterrupt:
            fail(ctx, "interrupted", 130)
        except Exception as exc:  # a bug: still one line, unless debugging
            if os.environ.get("VDISK_DEBUG"):
                raise
            fail(ctx, f"internal error: {type(exc).__name__}: {exc} (set VDISK_DEBUG=1 for a traceback)",
                 EXIT_INTERNAL)


@click.group(name="vdisk", cls=VdiskGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="vdisk", message="%(prog)s %(version)s")
def cli() -> None:
    """Create, inspect, convert and check virtual disk images (vdk, qcow2, raw).

    Sizes accept K, M, G, T suffixes (binary: 1K = 1024).  IMAGE@SNAP names a
    snapshot of IMAGE wherever an image is read; a snapshot's id is spelled #ID
    (IMAGE@#3).  Errors print one line "vdisk: <message>" on stderr; exit codes:
    0 success, 1 error (also a usage error), 2 corrupt image (check: also 3 = leaks
    only; compare: 1 = different, 2 = error), 70 internal error (a bug:
    VDISK_DEBUG=1 shows its traceback).
    """


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``vdisk``).  A usage error is one line and exits 1,
    as every other error does (click's own default, 2, means "corrupt" here)."""
    try:
        rv = cli.main(args=argv, prog_name="vdisk", standalone_mode=False)
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "vdisk"
        click.echo(f"vdisk: {one_line(exc.format_message())} (see '{cmd} --help')", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"vdisk: {one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code if exc.exit_code != 2 else 1)
    except click.Abort:
        click.echo("vdisk: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


def __getattr__(name: str):
    # what commands and tests import from vdisk.cli, loaded on first use
    for mod in ("options", "output", "progress", "errors"):
        m = importlib.import_module(f"{__name__}.{mod}")
        if hasattr(m, name):
            return getattr(m, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
