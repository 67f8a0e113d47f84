"""The control socket of a read-write NBD export: snapshot commands on a served image.

While ``vdisk serve`` has an image open read-write it holds the image's write lock,
so ``vdisk snapshot``, ``vdisk clone IMAGE@SNAP`` (which records a hold) and the like
cannot open it.  As a mount does (:mod:`vdisk.export.fuse.control`: the same socket
name, the same JSON protocol, so :class:`vdisk.session.Session` finds either), the
server listens on a unix socket in the run directory and does the change itself.

Concurrency: one thread accepts control connections and serves them one after the
other; each request runs under :attr:`NbdServer.lock <vdisk.export.nbd.server.NbdServer.lock>`,
the lock every NBD request's image call holds.  So a snapshot lands between two
requests and holds every write the server replied to before it (a write's reply
leaves only after the write is in the image), and every change is flushed before its
reply.  A request that comes after the final flush (the server shutting down) is
refused.  Reverting changes the disk under its clients, so it is refused while any
client is connected.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from ...errors import UsageError, VdiskError
from ..fuse import control

log = logging.getLogger("vdisk.export.nbd")


class NbdControl:
    """Serves control requests for ``server`` (an NbdServer of a read-write image
    named ``image_path``) until :meth:`close`."""

    def __init__(self, server, image_path: str):
        self.server = server
        self.image_path = image_path
        self.sock = control.bind_socket(image_path)
        self.path = control.socket_path(image_path)
        self._thread = threading.Thread(target=control.serve_blocking, args=(self.sock, self.handle),
                                        name="nbd-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving and remove the socket (idempotent)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(5)
        self.sock.close()
        try:
            os.unlink(self.path)  # ours: we still hold the image's write lock
        except OSError:
            pass

    def handle(self, req: dict):
        server = self.server
        with server.lock:
            if server.closed:
                raise VdiskError(f"{self.image_path}: the NBD server is shutting down")
            return self._do(req, server.image)

    def _do(self, req: dict, image):
        op = req["op"]
        if op == "ping":
            return "pong"
        if op == "status":
            return {"pid": os.getpid(), "image": self.image_path, "export": self.server.export.name,
                    "read_only": self.server.read_only, "connections": self.server.connections(),
                    "snapshots": [s.name for s in image.snapshot_list()]}
        if op == "flush":
            image.flush()
            return {"flushed": True}
        if op == "snapshot-list":
            infos = image.snapshot_list(space=True) if req.get("space") else image.snapshot_list()
            return [control.snapshot_to_json(i) for i in infos]
        if self.server.read_only:
            raise UsageError(f"{self.image_path}: served read-only; its snapshots cannot change here")
        name = req.get("name")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{op}: a snapshot name is needed")
        if op == "snapshot-create":
            info = image.snapshot_create(name)
            image.flush()
            log.info("snapshot %s created (live)", name)
            return control.snapshot_to_json(info)
        if op == "snapshot-delete":
            image.snapshot_delete(name)
            image.flush()
            log.info("snapshot %s deleted (live)", name)
            return {"name": name, "deleted": True}
        if op == "snapshot-rename":
            new_name = req.get("new_name")
            if not isinstance(new_name, str) or not new_name:
                raise UsageError("snapshot-rename: a new name is needed")
            info = image.snapshot_rename(name, new_name)
            image.flush()
            return control.snapshot_to_json(info)
        if op == "snapshot-hold":
            info = image.snapshot_hold(name, *control.hold_args(req))
            image.flush()
            return control.snapshot_to_json(info)
        if op == "snapshot-revert":
            n = self.server.connections()
            if n:
                raise UsageError(f"{self.image_path}: {n} NBD client(s) are connected; reverting would change "
                                 "the disk under them: disconnect them first")
            image.snapshot_revert(name)
            image.flush()
            log.info("disk reverted to snapshot %s", name)
            return {"name": name, "reverted": True}
        raise UsageError(f"unknown control operation {op!r}")

