"""Incremental export and import between snapshots (``formats/diff.md``), as
``rbd export-diff`` and ``zfs send -i`` do.

:func:`export_diff` walks the base A and the target B by extents: a range that
reads as zeros in both without being read (no data after resolving the chains) is
skipped; elsewhere both are read a chunk (1 MiB) at a time and a chunk that differs
becomes a ZERO record (B reads as zeros there) or a DATA record.  Each record also
carries the xxh3-64 of A's bytes over its range, so :func:`import_diff` refuses a
target that does not hold A where the stream changes it.  Without A (a full stream)
every byte of B is covered, so it can be applied to any image of the same size.

Resumable, precisely:

- export writes ``FILE.part`` and renames it to ``FILE`` only after the END record
  is written and fsynced.  ``resume=True`` keeps the records of ``FILE.part`` up to
  the last one that is whole and whose checksum holds, cuts off the rest, checks
  that the images still give the same last record (else they changed: refused), and
  continues the walk where that record ended.  A and B must be unchanged in between
  (snapshots are).
- import applies records in order, each after its checksum and its base check
  hold.  Every ``checkpoint_every`` records (and when it stops on an error) it
  flushes the image and then writes ``FILE.import-progress`` (JSON: the stream's
  header checksum, the image, the number of records applied and the digest of
  their checksums).  ``resume=True`` verifies and skips that many records, and
  refuses if their digest differs (another stream).  A record applied after the
  last checkpoint is applied again; this is harmless because a record whose range
  already holds its result is accepted in place of its base.  The progress file is
  removed once the END record is verified.  An import is not atomic: a stream that
  turns out truncated or damaged leaves the records before the damage applied.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import xxhash

from .. import block
from ..block import Image
from ..codec import diff as codec
from ..codec.diff import DATA, END, ZERO, DiffStreamError
from ..errors import ImageExists, UsageError, VdiskError
from . import tmpfile
from .compare import chunks, data_runs, is_zero, overlay_pieces

DEFAULT_CHUNK = 1 << 20
#: import reads the target in pieces of at most this for its base checks
_READ_PIECE = 4 << 20

ProgressFn = Callable[[int], None]


class BaseMismatch(VdiskError):
    """The image an import writes does not hold the stream's base."""


class Interrupted(Exception):
    """Raised by the ``stop_after`` test hook to simulate a process that dies."""


@dataclass
class DiffSummary:
    records: int = 0
    data_records: int = 0
    zero_records: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    stream_size: int = 0
    size: int = 0
    full: bool = False
    resumed_records: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"records": self.records, "data_records": self.data_records, "zero_records": self.zero_records,
                "data_bytes": self.data_bytes, "zero_bytes": self.zero_bytes, "stream_size": self.stream_size,
                "size": self.size, "full": self.full, "resumed_records": self.resumed_records}

    def add(self, rec: codec.Record) -> None:
        self.records += 1
        if rec.kind == DATA:
            self.data_records += 1
            self.data_bytes += rec.length
        else:
            self.zero_records += 1
            self.zero_bytes += rec.length


# -- reading a stream ---------------------------------------------------------------


def _read_exact(f, n: int) -> bytes:
    return f.read(n)


def read_records(f, name: str, header: codec.Header, *, tolerate_tail: bool = False
                 ) -> Iterator[tuple[int, codec.Record, bytes, int]]:
    """Yield ``(index, record, payload, end_position)`` for each verified record after
    the header, END included (last).  A damaged or truncated record raises
    DiffStreamError naming it; with ``tolerate_tail`` the walk just stops there."""
    pos_guest = 0
    index = 0
    while True:
        where = f.tell()
        head = _read_exact(f, codec.RECORD_SIZE)
        try:
            if len(head) < codec.RECORD_SIZE:
                raise DiffStreamError(f"{name}: truncated at record {index} (stream ends at byte "
                                      f"{where + len(head)}, no END record)")
            try:
                rec = codec.decode_record_head(index, head, header, pos_guest)
            except DiffStreamError as exc:
                raise DiffStreamError(f"{name}: {exc}") from None
            payload = b""
            if rec.kind == DATA:
                payload = _read_exact(f, rec.length)
                if len(payload) < rec.length:
                    raise DiffStreamError(f"{name}: truncated in record {index} (offset {rec.offset}): "
                                          f"{len(payload)} of {rec.length} payload bytes")
            try:
                codec.verify_record(index, head, rec, payload)
            except DiffStreamError as exc:
                raise DiffStreamError(f"{name}: {exc}") from None
        except DiffStreamError:
            if tolerate_tail:
                return
            raise
        yield index, rec, payload, f.tell()
        if rec.kind == END:
            return
        pos_guest = rec.end
        index += 1


def _open_stream(path: str) -> tuple:
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise VdiskError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise VdiskError(f"{path}: is a directory, not a diff stream") from None
    try:
        header = codec.decode_header(f.read(codec.HEADER_SIZE))
    except DiffStreamError as exc:
        f.close()
        raise DiffStreamError(f"{path}: {exc}") from None
    return f, header


# -- export -------------------------------------------------------------------------


def _plan(base: Image | None, target: Image, start: int, chunk: int) -> Iterator[tuple[int, int, bool, bool]]:
    """``(offset, length, read_a, read_b)`` pieces of ``[start, size)``; a piece with
    neither side read reads as zeros on both."""
    size = target.size
    runs_b = data_runs(target, start, size)
    runs_a = data_runs(base, start, size) if base is not None else [(start, size, False)] if size > start else []
    yield from overlay_pieces(runs_a, runs_b, chunk)


def _records(base: Image | None, target: Image, start: int, chunk: int, tick: ProgressFn
             ) -> Iterator[tuple[int, int, int, int, bytes]]:
    """``(kind, offset, length, base_hash, payload)`` for each record from ``start``."""
    full = base is None
    for off, n, ra, rb in _plan(base, target, start, chunk):
        if not ra and not rb:
            if full:  # a full stream sets every byte: say these read as zeros
                yield ZERO, off, n, 0, b""
            tick(n)
            continue
        a = base.read(off, n) if ra else None
        b = target.read(off, n) if rb else None
        if not full and (a is None and is_zero(b) or b is None and is_zero(a) or a is not None and a == b):
            tick(n)
            continue
        bh = 0 if full else codec.xxh64(a if a is not None else bytes(n))
        if b is None or is_zero(b):
            yield ZERO, off, n, bh, b""
        else:
            yield DATA, off, n, bh, b
        tick(n)


def export_diff(base: Image | None, target: Image, path: str, *, resume: bool = False,
                progress: ProgressFn | None = None, chunk: int = DEFAULT_CHUNK,
                stop_after: int | None = None) -> DiffSummary:
    """Write the stream that turns ``base`` (None: a full stream) into ``target`` to
    ``path`` (through ``path.part``).  ``stop_after`` (a test hook) raises
    :class:`Interrupted` after that many records are written, as a killed process."""
    path = os.fspath(path)
    if base is not None and base.size != target.size:
        raise UsageError(f"the images differ in size ({base.size} and {target.size} bytes); a diff needs "
                         "two images of the same size")
    if not 0 < chunk <= codec.MAX_DATA:
        raise UsageError(f"chunk size {chunk} is out of range")
    tick = progress or (lambda n: None)
    part = path + ".part"
    if os.path.lexists(path):
        raise ImageExists(f"{path}: already exists")
    header = codec.Header(size=target.size, full=base is None, chunk=chunk)
    hbytes = codec.encode_header(header)
    summary = DiffSummary(size=target.size, full=base is None)
    digest = xxhash.xxh3_64()
    index = 0
    start = 0
    if resume:
        if not os.path.exists(part):
            raise UsageError(f"{part}: no interrupted export to resume")
        f = open(part, "r+b")  # noqa: SIM115
        try:
            got = f.read(codec.HEADER_SIZE)
            if got != hbytes:
                raise UsageError(f"{part}: was begun for other images or options (its header differs); "
                                 "remove it to start again")
            good = codec.HEADER_SIZE
            last = None
            for i, rec, payload, endpos in read_records(f, part, header, tolerate_tail=True):
                if rec.kind == END:
                    break
                summary.add(rec)
                digest.update(codec.pack_checksum(rec.checksum))
                index, good, start, last = i + 1, endpos, rec.end, (rec, payload)
            if last is not None:
                rec, payload = last
                again = next(_records(base, target, rec.offset, chunk, lambda n: None), None)
                if again is None or again[:4] != (rec.kind, rec.offset, rec.length, rec.base_hash) or \
                        (rec.kind == DATA and again[4] != payload):
                    raise UsageError(f"{part}: its last record no longer matches the images (they changed "
                                     "since the export began); remove it to start again")
            summary.resumed_records = index
            f.seek(good)
            f.truncate(good)
        except BaseException:
            f.close()
            raise
    else:
        if os.path.lexists(part):
            raise UsageError(f"{part}: an interrupted export is in the way; give --resume to continue it, "
                             "or remove it")
        f = open(part, "xb")  # noqa: SIM115
        f.write(hbytes)
    with f:
        if resume and start:
            tick(start)
        for kind, off, n, bh, payload in _records(base, target, start, chunk, tick):
            data, cs = codec.encode_record(index, kind, off, n, bh, payload)
            f.write(data)
            digest.update(codec.pack_checksum(cs))
            summary.add(codec.Record(kind, off, n, bh, cs))
            index += 1
            if stop_after is not None and index - summary.resumed_records >= stop_after:
                f.flush()
                raise Interrupted(f"stopped after {index} records")
        data, _cs = codec.encode_record(index, END, index, summary.data_bytes, digest.intdigest())
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        summary.stream_size = f.tell()
    os.rename(part, path)
    tmpfile.fsync_dir(os.path.dirname(os.path.abspath(path)))
    return summary



# -- import -------------------------------------------------------------------------


def progress_path(path: str) -> str:
    return os.fspath(path) + ".import-progress"


def _image_id(name: str) -> str:
    key = block.image_key(name)
    return repr(key) if key is not None else os.path.abspath(name)


def _hash_range(img: Image, off: int, n: int) -> tuple[int, bool]:
    """xxh3-64 of the image's bytes over the range, and whether they are all zero."""
    h = xxhash.xxh3_64()
    zero = True
    for o, m in chunks(off, off + n, _READ_PIECE):
        buf = img.read(o, m)
        h.update(buf)
        zero = zero and is_zero(buf)
    return h.intdigest(), zero


def _load_progress(ppath: str) -> dict:
    try:
        with open(ppath, "rb") as f:
            raw = f.read(4097)
        if len(raw) > 4096:
            raise ValueError("too long")
        state = json.loads(raw)
        if not isinstance(state, dict) or not isinstance(state.get("records"), int) or state["records"] < 0:
            raise ValueError("bad fields")
        return state
    except FileNotFoundError:
        raise UsageError(f"{ppath}: no interrupted import to resume") from None
    except (ValueError, UnicodeDecodeError):
        raise VdiskError(f"{ppath}: is not an import progress file; remove it to import from the start") from None


def _save_progress(ppath: str, state: dict) -> None:
    tmp = ppath + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ppath)


def import_diff(path: str, image: Image, *, image_name: str, resume: bool = False,
                progress: ProgressFn | None = None, checkpoint_every: int = 64,
                stop_after: int | None = None) -> DiffSummary:
    """Apply the stream at ``path`` to ``image`` (opened read-write; ``image_name`` is
    how it was named, recorded in the progress file).  ``stop_after`` (a test hook)
    raises :class:`Interrupted` after that many records are applied, without a
    checkpoint, as a killed process."""
    path = os.fspath(path)
    tick = progress or (lambda n: None)
    f, header = _open_stream(path)
    with f:
        if image.size != header.size:
            raise UsageError(f"{image_name}: is {image.size} bytes, but the stream {path} is for a "
                             f"{header.size}-byte disk")
        stream_size = os.fstat(f.fileno()).st_size
        ppath = progress_path(path)
        ident = {"stream": f"{header.checksum:016x}", "image": _image_id(image_name)}
        skip = 0
        prefix = None
        if resume:
            state = _load_progress(ppath)
            if any(state.get(k) != v for k, v in ident.items()):
                raise UsageError(f"{ppath}: records an import of another stream or into another image; "
                                 "remove it to import from the start")
            skip, prefix = state["records"], state.get("prefix")
        elif os.path.lexists(ppath):
            raise UsageError(f"{ppath}: an interrupted import of this stream is in the way; give --resume "
                             "to continue it, or remove it")
        summary = DiffSummary(size=header.size, full=header.full, resumed_records=skip)
        digest = xxhash.xxh3_64()
        applied = skip  # records whose effects are in the image
        checkpointed = skip
        applied_digest = prefix
        done = 0

        def checkpoint() -> None:
            nonlocal checkpointed
            if applied > checkpointed:
                image.flush()
                _save_progress(ppath, dict(ident, records=applied, prefix=applied_digest))
                checkpointed = applied

        try:
            for index, rec, payload, _end in read_records(f, path, header):
                if index == skip and resume and prefix != f"{digest.intdigest():016x}":
                    raise UsageError(f"{ppath}: records an import of another stream (its first {skip} records "
                                     "differ); remove it to import from the start")
                if rec.kind == END:
                    if index < skip:
                        raise UsageError(f"{ppath}: records {skip} applied records, but the stream has {index}; "
                                         "remove it to import from the start")
                    if rec.offset != index or rec.length != summary.data_bytes or \
                            rec.base_hash != digest.intdigest():
                        raise DiffStreamError(f"{path}: END record does not match the records before it "
                                              "(records missing, reordered or from another stream)")
                    if f.read(1):
                        raise DiffStreamError(f"{path}: bytes follow the END record")
                    break
                digest.update(codec.pack_checksum(rec.checksum))
                summary.add(rec)
                if index < skip:
                    continue
                if not header.full:
                    have, zero = _hash_range(image, rec.offset, rec.length)
                    if have != rec.base_hash:
                        done_already = zero if rec.kind == ZERO else (have == codec.xxh64(payload))
                        if not done_already:
                            raise BaseMismatch(
                                f"{image_name}: does not hold the stream's base at record {index} (offset "
                                f"{rec.offset}, {rec.length} bytes); nothing of that record was written")
                if rec.kind == DATA:
                    image.write(rec.offset, payload)
                else:
                    image.write_zeroes(rec.offset, rec.length)
                applied = index + 1
                applied_digest = f"{digest.intdigest():016x}"
                done += 1
                tick(rec.length)
                if stop_after is not None and done >= stop_after:
                    raise Interrupted(f"stopped after {applied} records")
                if applied - checkpointed >= checkpoint_every:
                    checkpoint()
            image.flush()
        except Interrupted:
            raise
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                checkpoint()
            raise
        summary.stream_size = stream_size
    if os.path.lexists(ppath):
        os.unlink(ppath)
    return summary
