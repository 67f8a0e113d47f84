"""``vdisk command-server start|stop|status``: the opt-in command server.

A running server has vdisk's command line imported already, and runs each command
in a fresh forked worker with the caller's argv, cwd, environment, umask and
stdin/stdout/stderr, so a command that does little starts about as fast as the
interpreter itself.  Without a server every command runs in-process as before: the
server is never started automatically.  (:mod:`vdisk.cmdserver`.)
"""

from __future__ import annotations

import os
import select
import sys
import time

import click

from vdisk.cmdserver import server
from vdisk.errors import VdiskError


def _run_dir() -> str:
    from vdisk.export.fuse import control

    return control.ensure_run_dir()


class _Group(click.Group):
    def resolve_command(self, ctx: click.Context, args: list[str]):
        from vdisk.cli import remember_command

        name, cmd, rest = super().resolve_command(ctx, args)
        remember_command(ctx, cmd)
        return name, cmd, rest


@click.group("command-server", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def command_server() -> None:
    """Start, stop or query the command server.

    While a command server runs (one per user: its socket is cmdserver.sock in the
    run directory, /run/vdisk for root, else $XDG_RUNTIME_DIR/vdisk or
    /tmp/vdisk-UID, or $VDISK_RUN_DIR), `vdisk` hands each command to it instead of
    importing vdisk anew, which makes short commands (info, snapshot create, clone)
    several times faster.  Output, exit codes and errors are the same either way.
    mount, umount, serve, fleet, bench, command-server, pool replicate and pool
    promote always run in-process, as does every command when
    VDISK_NO_COMMAND_SERVER=1 is set.  When vdisk's source files change, the server
    notices at the next command (which then runs in-process) and restarts itself."""


@command_server.command("start")
@click.option("--workers", type=click.IntRange(1, 16), default=server.DEFAULT_WORKERS, show_default=True,
              help="Pre-forked workers kept ready.")
@click.option("--foreground", is_flag=True, help="Do not detach; log to stderr (for a service manager).")
def start(workers: int, foreground: bool) -> None:
    """Start a command server (nothing happens if one is running)."""
    d = _run_dir()
    st = server.status(d)
    if st is not None:
        click.echo(f"command server already running (pid {st['pid']}, socket {st['socket']})")
        return
    if foreground:
        argv = server.daemon_argv(workers)
        sys.stdout.flush()
        os.execv(argv[0], argv)
    sock, _lock, log = server.paths(d)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # detach: a new session, and a grandchild that init adopts
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                os.chdir("/")
                null = os.open(os.devnull, os.O_RDWR)
                logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(null, 0)
                os.dup2(null, 1)
                os.dup2(logfd, 2)
                os.set_inheritable(w, True)
                argv = server.daemon_argv(workers, w)
                os.execv(argv[0], argv)
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    answer = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        readable, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        chunk = os.read(r, 4096)
        if not chunk:
            break
        answer += chunk
    os.close(r)
    line = answer.decode(errors="replace").strip()
    if line.startswith("ok "):
        click.echo(f"command server started (pid {line[3:]}, socket {sock})")
        return
    if line.startswith("error "):
        raise VdiskError(f"the command server did not start: {line[6:]}")
    raise VdiskError(f"the command server did not start (its log: {log})")


@command_server.command("stop")
def stop() -> None:
    """Stop the command server (commands it is running finish first)."""
    d = _run_dir()
    line = server.query(d, b"stop")
    if line is None or not line.startswith("stopping "):
        click.echo("no command server running")
        return
    pid = int(line.split()[1])
    # stopped when the instance lock is free (the master may linger as a zombie
    # where nothing reaps orphans, so its pid is no sign)
    import fcntl

    fd = os.open(server.paths(d)[1], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VdiskError(f"the command server (pid {pid}) did not stop within 10 s") from None
                time.sleep(0.01)
    finally:
        os.close(fd)
    click.echo(f"command server stopped (pid {pid})")


@command_server.command("status")
def status() -> None:
    """Whether a command server runs (exit 0) or not (exit 1), and its facts."""
    d = _run_dir()
    st = server.status(d)
    if st is None:
        raise VdiskError(f"no command server running (socket {server.paths(d)[0]})")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["started"]))
    click.echo(f"command server running: pid {st['pid']}, socket {st['socket']}, {st['workers']} workers, "
               f"{st['modules']} modules loaded, since {since}")
