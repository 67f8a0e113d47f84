"""The VHDX log: find the active sequence of entries, and replay it.

Contract:

- :func:`scan` reads the log region named by the current header and returns the
  writes of the active sequence, oldest first, as ``(file offset, 4 KiB sector)``
  (data descriptors) or ``(file offset, length)`` (zero descriptors) -- or ``[]``
  when no valid sequence exists.  Every entry is checked before it counts: its
  signature, its length (a multiple of 4 KiB, inside the log), its sequence number
  (non-zero), its log GUID (the header's), its CRC-32C over the whole entry, each
  descriptor (signature, sequence number, 4 KiB alignment) and each data sector
  (signature, sequence number), and its length exactly its descriptor sectors
  plus one sector per data descriptor, as [MS-VHDX] lays an entry out.  The active sequence is the valid entry with the
  highest sequence number (the head) together with the entries from the one its
  ``tail`` names up to it, each starting where the previous one ends with the next
  sequence number ([MS-VHDX], "Log Sequence").  The writes are bounded before they are
  returned: none reaches into the first 1 MiB (the headers and region tables are
  never logged) or the log itself, none ends past the larger of the file's size and
  the entry's LastFileOffset, and an entry whose FlushedFileOffset is past the end
  of the file (a truncated file) makes the image corrupt.
- :func:`replay` applies the writes to a writable host, extends the file to the
  head's LastFileOffset, and flushes; the caller then clears the log GUID.
- :class:`Overlay` applies them in memory over a read-only host: reads of the
  image then see what a replay would have written, and the file is not touched.

The scan reads the whole log region (charged to the metadata budget) and computes
at most ``SCAN_WORK`` times its length (plus 1 MiB) in checksums, after the cheap
checks of each candidate entry, so a log full of forged entry headers costs bounded
time; past that the image is refused (a real log, whose entries do not overlap, needs
at most its length plus the stale entries it still holds).
"""

from __future__ import annotations

import bisect

from ... import budget
from ...codec import vhdx as V
from ...errors import CorruptImage, UnsupportedFeature
from ...host import HostStorage

MAX_LOG_LENGTH = 1 << 30  # implementation limit (Hyper-V and qemu-img write 1 MiB logs)
SCAN_WORK = 2
MAX_LOG_GROWTH = 1 << 40  # how far past the file's end a log entry may extend it


def scan(host: HostStorage, hdr: V.Header, file_size: int) -> tuple[list, int]:
    """(writes of the active sequence, the head's LastFileOffset); see the module."""
    off, length = hdr.log_offset, hdr.log_length
    if length > MAX_LOG_LENGTH:
        raise UnsupportedFeature(f"vhdx: log of {length} bytes is larger than vdisk reads ({MAX_LOG_LENGTH})")
    budget.charge(length, "the vhdx log")
    log = host.pread(off, length)
    nsec = length // V.LOG_SECTOR
    entries: dict[int, tuple[V.LogEntryHeader, list]] = {}
    work = 0

    def circular(start_sector: int, nbytes: int) -> bytes:
        a = start_sector * V.LOG_SECTOR
        if a + nbytes <= length:
            return log[a:a + nbytes]
        return log[a:] + log[:nbytes - (length - a)]

    for s in range(nsec):
        h = V.decode_log_header(log[s * V.LOG_SECTOR:(s + 1) * V.LOG_SECTOR])
        if h is None or h.log_guid != hdr.log_guid or h.sequence_number == 0:
            continue
        if h.entry_length == 0 or h.entry_length % V.LOG_SECTOR or h.entry_length > length:
            continue
        dsec = V.descriptor_sectors(h.descriptor_count)
        if dsec * V.LOG_SECTOR > h.entry_length or h.tail % V.LOG_SECTOR or h.tail >= length:
            continue
        buf = circular(s, h.entry_length)
        writes = _entry_writes(buf, h, dsec)  # the cheap checks first: descriptors and data sectors
        if writes is None:
            continue
        work += h.entry_length
        if work > SCAN_WORK * length + (1 << 20):
            raise CorruptImage("vhdx log: too many overlapping entry headers to scan")
        if V.checksum(buf) == h.checksum:
            entries[s] = (h, writes)
    if not entries:
        return [], 0
    for head_s in sorted(entries, key=lambda k: -entries[k][0].sequence_number):
        head = entries[head_s][0]
        chain = _chain(entries, head.tail // V.LOG_SECTOR, head_s, nsec)
        if chain is None:
            continue
        out = []
        for s in chain:
            h, writes = entries[s]
            if h.flushed_file_offset > file_size:
                raise CorruptImage(f"vhdx log: entry {h.sequence_number} was written when the file held "
                                   f"{h.flushed_file_offset} bytes, but it holds {file_size}: the file is truncated")
            if h.last_file_offset > file_size + MAX_LOG_GROWTH:
                raise CorruptImage(f"vhdx log: entry {h.sequence_number} would grow the file to "
                                   f"{h.last_file_offset} bytes")
            limit = max(file_size, h.last_file_offset)
            for fo, what in writes:
                n = what if isinstance(what, int) else V.LOG_SECTOR
                if fo < V.HEADER_SECTION_SIZE or fo + n > limit or (fo < off + length and fo + n > off):
                    raise CorruptImage(f"vhdx log: entry {h.sequence_number} writes {n} bytes at {fo}, "
                                       "outside the area a log may update")
                out.append((fo, what))
        return out, head.last_file_offset
    return [], 0


def _entry_writes(buf: bytes, h: V.LogEntryHeader, dsec: int) -> list | None:
    """The writes of one checksummed entry, or None if a descriptor or data sector is invalid."""
    writes = []
    data_pos = dsec * V.LOG_SECTOR
    try:
        for i in range(h.descriptor_count):
            d = V.decode_log_descriptor(buf, 64 + 32 * i)
            if d.sequence_number != h.sequence_number or d.file_offset % V.LOG_SECTOR:
                return None
            if d.kind == "zero":
                if d.zero_length % V.LOG_SECTOR:
                    return None
                writes.append((d.file_offset, d.zero_length))
                continue
            if data_pos + V.LOG_SECTOR > len(buf):
                return None
            seq, middle = V.decode_log_data(buf, data_pos)
            if seq != h.sequence_number:
                return None
            data_pos += V.LOG_SECTOR
            writes.append((d.file_offset, d.leading + middle + d.trailing))
    except CorruptImage:
        return None
    if data_pos != len(buf):  # the entry is exactly its descriptor sectors and data sectors
        return None
    return writes


def _chain(entries: dict, start: int, head: int, nsec: int) -> list[int] | None:
    """Sectors of the entries from ``start`` to ``head``, each following the previous
    with the next sequence number; None if they do not."""
    out = [start]
    s = start
    while s != head:
        if s not in entries or len(out) > len(entries):
            return None
        h = entries[s][0]
        nxt = (s + h.entry_length // V.LOG_SECTOR) % nsec
        if nxt not in entries or entries[nxt][0].sequence_number != h.sequence_number + 1:
            return None
        out.append(nxt)
        s = nxt
    return out if start in entries else None


def replay(host: HostStorage, writes: list, last_file_offset: int) -> None:
    """Apply ``writes`` to ``host`` in order, grow the file to ``last_file_offset``
    (rounded up to 1 MiB) if it is smaller, and flush."""
    for fo, what in writes:
        if isinstance(what, int):
            size = host.size()
            end = min(fo + what, size)
            pos = fo
            while pos < end:
                n = min(end - pos, 1 << 20)
                host.pwrite(pos, bytes(n))
                pos += n
        else:
            host.pwrite(fo, what)
    if host.size() < last_file_offset:
        host.truncate(-(-last_file_offset // V.MiB) * V.MiB)
    host.flush()


class Overlay(HostStorage):
    """A read-only view of ``inner`` with the log's writes applied in memory."""

    def __init__(self, inner: HostStorage, writes: list, last_file_offset: int):
        self.inner = inner
        self.name = inner.name
        self.read_only = True
        self._starts: list[int] = []
        self._items: list[tuple[int, int, bytes | None]] = []  # sorted, disjoint (start, end, data or zeros)
        for fo, what in writes:
            if isinstance(what, int):
                self._put(fo, fo + what, None)
            else:
                self._put(fo, fo + V.LOG_SECTOR, what)
        self._size = max(inner.size(), -(-last_file_offset // V.MiB) * V.MiB)

    def _put(self, start: int, end: int, data: bytes | None) -> None:
        if end <= start:
            return
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._items[i][1] <= start:
            i += 1
        j = i
        keep = []
        while j < len(self._items) and self._items[j][0] < end:
            s, e, d = self._items[j]
            if s < start:
                keep.append((s, start, None if d is None else d[:start - s]))
            if e > end:
                keep.append((end, e, None if d is None else d[end - s:]))
            j += 1
        new = sorted(keep + [(start, end, data)])
        self._items[i:j] = new
        self._starts[i:j] = [x[0] for x in new]

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(self.inner.pread(offset, length))
        end = offset + length
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        while i < len(self._items) and self._items[i][0] < end:
            s, e, d = self._items[i]
            a, b = max(s, offset), min(e, end)
            if a < b:
                buf[a - offset:b - offset] = bytes(b - a) if d is None else d[a - s:b - s]
            i += 1
        return bytes(buf)

    def size(self) -> int:
        return self._size

    def allocated_bytes(self) -> int:
        return self.inner.allocated_bytes()

    def close(self) -> None:
        self.inner.close()
