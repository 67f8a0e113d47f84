"""The ``gc`` lock of a pool on an object store (formats/pool.md 9 and 13.3).

A store has no lock that dies with its holder, so a holder *announces* itself: it
puts ``locks/<name>/<shared|exclusive>-<16 hex random>`` (a JSON record naming its
host, pid and start), then lists ``locks/<name>/``.  An object is *fresh* while its
age -- the Date header of the list answer minus the object's LastModified, both the
store's clock, so no host clock is involved -- is below the ttl its record names
(its holder's ``VDISK_S3_LEASE_TTL``, as for leases, :mod:`.lease`).  A shared holder conflicts
with a fresh exclusive object, an exclusive one with any fresh object but its own;
on a conflict the new object is deleted and :class:`~.backend.LockBusy` raised.
Two that announce at once may both see the other and both give up: never both win.
A holder re-puts its object every ``ttl/3`` seconds (a daemon thread) and deletes it
on release.  Stale objects (a holder that died) are deleted by whoever lists them.

What this lock does *not* give: a holder paused (SIGSTOP, a VM frozen, a network cut)
past the ttl looks gone, and resumes believing it still holds the lock.  ``pool gc``
therefore does not rely on it for safety; it fences every writer through the catalog
before it marks (see :mod:`.gc` and formats/pool.md 9).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from ..errors import HostIOError
from . import backend as be
from .lease import ttl_from_env

PREFIX = "locks/"


def describe(rec: dict, age: float | None = None) -> str:
    since = rec.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else "?"
    out = (f"{rec.get('what', 'a process')} on host {rec.get('host', '?')} (pid {rec.get('pid', '?')}) "
           f"since {when}")
    if age is not None:
        out += f", renewed {max(0.0, age):.0f} s ago"
    return out


def list_with_age(backend, prefix: str) -> list[tuple[str, float]]:
    """(name, age in seconds by the store's clock) of every object under ``prefix``."""
    if hasattr(backend, "list_with_age"):
        return backend.list_with_age(prefix)
    return [(n, 0.0) for n in backend.list(prefix)]


class ObjectLock:
    """A shared or exclusive lock ``name`` on a pool on an object store; taken at once
    or refused (:class:`~.backend.LockBusy`, its message naming the holder), never
    waited for."""

    def __init__(self, backend, name: str, exclusive: bool, *, ttl: float | None = None,
                 what: str | None = None):
        be._check_name(name)
        self.backend = backend
        self.lock_name = name
        self.ttl = ttl_from_env() if ttl is None else ttl
        self.exclusive = exclusive
        kind = "exclusive" if exclusive else "shared"
        self.dir = f"{PREFIX}{name}/"
        self.name = f"{self.dir}{kind}-{os.urandom(8).hex()}"
        self.record = {"kind": kind, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                       "ttl": self.ttl, "what": what or ("pool gc" if exclusive else "a process with the pool open")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._acquire()

    def _data(self) -> bytes:
        return json.dumps({**self.record, "renewed": time.time()}).encode()

    def _acquire(self) -> None:
        self.backend.put(self.name, self._data())
        try:
            busy = self._conflict()
        except BaseException:
            self._delete_quietly(self.name)
            raise
        if busy is not None:
            self._delete_quietly(self.name)
            raise be.LockBusy(self.lock_name, busy)
        self._held = True
        self._thread = threading.Thread(target=self._renew_loop, name="vdisk-objlock", daemon=True)
        self._thread.start()

    def _conflict(self) -> str | None:
        """A description of a fresh conflicting holder, or None."""
        for n, age in list_with_age(self.backend, self.dir):
            if n == self.name:
                continue
            if not self.exclusive and not n.rpartition("/")[2].startswith("exclusive-"):
                continue  # shared holders do not conflict (the exclusive one cleans them up)
            try:
                rec = json.loads(self.backend.get(n))
                if not isinstance(rec, dict):
                    rec = {}
            except be.ObjectMissing:
                continue  # released since we listed
            except ValueError:
                rec = {}
            try:  # the holder's own ttl, as for leases (hosts may be set differently)
                ttl = float(rec.get("ttl", self.ttl))
            except (TypeError, ValueError):
                ttl = self.ttl
            if age >= ttl:
                self._delete_quietly(n)  # its holder died (or is paused: it re-puts it, see above)
                continue
            return describe(rec, age)
        return None

    def _delete_quietly(self, name: str) -> None:
        try:
            self.backend.delete(name)
        except HostIOError:
            pass

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.backend.put(self.name, self._data())
            except HostIOError:
                continue  # try again; past the ttl others take it as gone

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)
            self._thread = None
        if self._held:
            self._held = False
            self._delete_quietly(self.name)
