"""Writer leases of images in a pool on an object store (formats/pool.md 13.3).

An object store has no locks that die with their holder, so the writer of an image
holds a *lease*: the object ``leases/img-<image id>/<epoch>`` (16 hex digits), made
with ``put_if_absent`` and renewed by rewriting it every ``ttl/3`` seconds.  The
highest epoch is the current lease; it is held while it was renewed less than
``ttl`` seconds ago, judged by the store's clock (its Date header against the
object's Last-Modified), and is free once released (rewritten with
``"released": true``) or expired.  Taking a free lease puts epoch+1: of two hosts
that try at once, one gets the name.

The lease only keeps honest writers apart and names the holder.  Safety against a
writer that *lost* its lease (paused, cut off, its clock wrong) is fencing in the
catalog: the new writer first commits a generation whose image record names its
epoch (``"writer"``), and every commit of a writer checks, on the exact catalog it
builds the next generation on, that the record still names its own epoch.  See
``Pool.commit`` and formats/pool.md for why this is enough.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from ..errors import HostIOError, ImageLocked
from . import backend as be

DEFAULT_TTL = 30.0
PREFIX = "leases/"


def ttl_from_env() -> float:
    try:
        return max(1.0, float(os.environ.get("VDISK_S3_LEASE_TTL", DEFAULT_TTL)))
    except ValueError:
        return DEFAULT_TTL


def lease_dir(image_id: str) -> str:
    return f"{PREFIX}img-{image_id}/"


def describe(rec: dict, age: float | None = None) -> str:
    since = rec.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else "?"
    out = f"host {rec.get('host', '?')} (pid {rec.get('pid', '?')}) since {when}, lease epoch {rec.get('epoch', '?')}"
    if rec.get("by"):  # not a writer: pool gc or dedup, which fenced the writers (formats/pool.md 9)
        out = f"{rec['by']} on {out}"
    if age is not None:
        out += f", renewed {age:.0f} s ago (expires {float(rec.get('ttl', DEFAULT_TTL)):.0f} s after a renewal)"
    return out


def current(backend, image_id: str) -> tuple[int, dict | None, float]:
    """(highest epoch, its record or None, its age in seconds)."""
    best = 0
    for n in backend.list(lease_dir(image_id)):
        try:
            best = max(best, int(n.rpartition("/")[2], 16))
        except ValueError:
            continue
    if not best:
        return 0, None, 0.0
    name = f"{lease_dir(image_id)}{best:016x}"
    try:
        if hasattr(backend, "get_with_age"):
            raw, age = backend.get_with_age(name)
        else:
            raw, age = backend.get(name), 0.0
        rec = json.loads(raw)
        if not isinstance(rec, dict):
            rec = {}
    except be.ObjectMissing:
        return best, None, 0.0
    except ValueError:
        rec = {}  # unreadable: treat as held (expires like any other)
    return best, rec, age


def held(rec: dict | None, age: float) -> bool:
    if rec is None or rec.get("released"):
        return False
    try:
        ttl = float(rec.get("ttl", DEFAULT_TTL))
    except (TypeError, ValueError):
        ttl = DEFAULT_TTL
    return age < ttl


class Lease:
    """The writer lease of one image, taken by :meth:`acquire`, renewed by a thread."""

    def __init__(self, backend, image_id: str, what: str, ttl: float | None = None):
        self.backend = backend
        self.image_id = image_id
        self.what = what
        self.ttl = ttl_from_env() if ttl is None else ttl
        self.epoch = 0
        self.record: dict = {}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"{lease_dir(self.image_id)}{self.epoch:016x}"

    def acquire(self, floor: int = 0) -> None:
        """Take the lease; ``floor`` is the epoch the catalog last named (the new
        epoch is above both it and every lease object's)."""
        top, rec, age = current(self.backend, self.image_id)
        if held(rec, age):
            raise ImageLocked(f"{self.what}: image is being written by {describe(rec, age)}")
        self.epoch = max(top, floor) + 1
        self.record = {"epoch": self.epoch, "host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.time(), "ttl": self.ttl, "image": self.image_id}
        if not self.backend.put_if_absent(self.name, json.dumps(self.record).encode()):
            _, rec, age = current(self.backend, self.image_id)
            raise ImageLocked(f"{self.what}: image was just taken for writing by "
                              f"{describe(rec or {}, age)}")
        # older epochs are history now (a paused writer may still rewrite its own: harmless)
        for n in self.backend.list(lease_dir(self.image_id)):
            if n != self.name:
                try:
                    self.backend.delete(n)
                except HostIOError:
                    pass
        self._thread = threading.Thread(target=self._renew_loop, name="vdisk-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                top, _, _ = current(self.backend, self.image_id)
                if top > self.epoch:
                    self.lost = f"a newer lease (epoch {top}) was taken"
                    return
                self.backend.put(self.name, json.dumps({**self.record, "renewed": time.time()}).encode())
            except HostIOError:
                continue  # try again; past the ttl another writer may take over (fencing keeps it safe)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)
            self._thread = None
        if self.epoch and self.lost is None:
            try:
                self.backend.put(self.name, json.dumps({**self.record, "released": True}).encode())
            except HostIOError:
                pass  # it expires
        self.epoch = 0


def check_no_writer(backend, image_id: str, what: str) -> None:
    """For a reader of the live state that does not share: refuse while a writer holds
    the image, as a local pool's shared lock does."""
    _, rec, age = current(backend, image_id)
    if held(rec, age):
        raise ImageLocked(f"{what}: image is being written by {describe(rec, age)}",
                          option_hint=("force_share", "(use -U/--force-share to read it anyway)"))
