"""qcow2's internal snapshot table: bytes <-> :class:`Snapshot`, no I/O.

From QEMU ``docs/interop/qcow2.txt`` ("Snapshots"): each entry is a 40-byte
big-endian fixed part, its extra data (the 64-bit VM state size and the virtual
disk size, then anything a newer writer added, kept verbatim), the ID and the
name, padded to a multiple of 8.  The driver (:mod:`vdisk.drivers.qcow2.snapshots`)
bounds the table against the file and reads it; this module only knows the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import CorruptImage

_SNAP_FIXED = struct.Struct(">QIHHIIQII")  # 40 bytes
assert _SNAP_FIXED.size == 40
MAX_SNAPSHOT_EXTRA = 1024
SNAPSHOT_FIXED_SIZE = 40


def snapshot_entry_lengths(fixed: bytes) -> tuple[int, int]:
    """From the first 40 bytes of a snapshot table entry: (size of its extra data,
    bytes of the entry without the padding to 8 that follows it).  Lets a reader
    bound an entry before reading it whole."""
    _, _, id_len, name_len, _, _, _, _, extra = _SNAP_FIXED.unpack_from(fixed, 0)
    return extra, SNAPSHOT_FIXED_SIZE + extra + id_len + name_len


@dataclass(frozen=True, slots=True)  # slots: a table of 65536 records stays small
class Snapshot:
    """One internal snapshot of the snapshot table, decoded."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int | None = None  # None: not recorded (old version-2 entries)
    #: extra data past the two fields this module knows (e.g. icount), kept verbatim
    extra_tail: bytes = b""
    extra_size: int = 16  # size of the extra data area as stored

    def encoded_size(self) -> int:
        n = 40 + self.extra_size + len(self.id.encode()) + len(self.name.encode())
        return (n + 7) & ~7


def decode_snapshot(buf: bytes, pos: int) -> tuple[Snapshot, int]:
    """One snapshot table entry at ``buf[pos:]``; returns it and the next entry's position."""
    if pos + 40 > len(buf):
        raise CorruptImage(f"qcow2 snapshot table: entry at byte {pos} is truncated")
    l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate32, extra = _SNAP_FIXED.unpack_from(buf, pos)
    if extra > MAX_SNAPSHOT_EXTRA:
        raise CorruptImage(f"qcow2 snapshot table: entry at byte {pos} has {extra} bytes of extra data (too many)")
    p = pos + 40
    end = p + extra + id_len + name_len
    if end > len(buf):
        raise CorruptImage(f"qcow2 snapshot table: entry at byte {pos} runs past the table")
    ex = bytes(buf[p : p + extra])
    vmstate = vmstate32
    disk_size = None
    if extra >= 8:
        vmstate = struct.unpack_from(">Q", ex, 0)[0]
    if extra >= 16:
        disk_size = struct.unpack_from(">Q", ex, 8)[0]
    p += extra
    sid = bytes(buf[p : p + id_len]).decode("utf-8", "replace")
    p += id_len
    name = bytes(buf[p : p + name_len]).decode("utf-8", "replace")
    p += name_len
    p = pos + ((p - pos + 7) & ~7)
    snap = Snapshot(l1_off, l1_size, sid, name, dsec, dnsec, vmclock, vmstate, disk_size, ex[16:], extra)
    return snap, p


def encode_snapshot(s: Snapshot) -> bytes:
    extra = struct.pack(">QQ", s.vm_state_size, s.disk_size or 0) + s.extra_tail
    extra = extra[: max(s.extra_size, 16)] if s.extra_size >= 16 else extra
    sid, name = s.id.encode(), s.name.encode()
    out = _SNAP_FIXED.pack(
        s.l1_table_offset,
        s.l1_size,
        len(sid),
        len(name),
        s.date_sec,
        s.date_nsec,
        s.vm_clock_nsec,
        min(s.vm_state_size, 0xFFFFFFFF),
        len(extra),
    )
    out += extra + sid + name
    return out + bytes(-len(out) % 8)


def decode_snapshot_table(buf: bytes, count: int) -> list[Snapshot]:
    out = []
    pos = 0
    for _ in range(count):
        s, pos = decode_snapshot(buf, pos)
        out.append(s)
    return out


def encode_snapshot_table(snaps: list[Snapshot]) -> bytes:
    return b"".join(encode_snapshot(s) for s in snaps)
