"""The command server: an opt-in daemon that has vdisk's command line imported
already, so a command that does little does not pay for Python imports (click
alone costs about 19 ms), in the spirit of Mercurial's chg.

- :mod:`vdisk.cmdserver.client`: the ``vdisk`` entry point.  It imports almost
  nothing; it hands argv, cwd, the environment, the umask and fds 0, 1, 2 to a
  running server, or runs the command in-process when there is none (or anything
  is unusual), so behaviour never depends on the server.
- :mod:`vdisk.cmdserver.server`: the daemon (``vdisk command-server start``):
  pre-forked workers, one fresh worker per command.

This package's ``__init__`` must stay free of imports: the client pays for them.
"""
