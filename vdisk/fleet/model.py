"""What every disk of the fleet must hold, known without storing its bytes.

The simulator writes whole 4 KiB blocks (``BLOCK``) whose content is a function of a
*token* (an integer) and the block's number: :func:`block_bytes`.  The model of a
disk is then its base (the golden image, or nothing: zeros) plus a map from block
number to the token last written there -- about 100 bytes per distinct block a VM
wrote, whatever the content, so a fleet of a hundred VMs stays small in memory.

Tokens: 0 is a block of zeros (discard, write zeroes); a VM's write gets a token made
of its VM number and a sequence number (every write in the fleet is distinct); the
golden image's blocks carry ``GOLDEN`` plus the fleet's seed; the OS-upgrade workload
writes ``UPGRADE`` tokens shared by every VM that runs the same upgrade, so identical
files are identical blocks, as in real fleets (a pool's dedup can find them).

A checkpoint or a live clone copies the map (:meth:`DiskModel.copy`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

BLOCK = 4096
_UNIT = struct.Struct("<QQQQ")
_MAGIC = 0x7664_6973_6B46_4C54  # "vdiskFLT"
_ZERO = bytes(BLOCK)
GOLDEN = 1 << 62
UPGRADE = 1 << 63
_VM_SHIFT = 40
_MASK64 = (1 << 64) - 1


def block_bytes(token: int, blockno: int) -> bytes:
    """The 4 KiB a block with ``token`` holds at block number ``blockno``: 32 bytes
    (token, blockno, a magic number, a check word) repeated, so that a block moved to
    another place or carrying another token never matches, and :func:`describe` can
    tell the simulator's content from anything else."""
    if token == 0:
        return _ZERO
    return _UNIT.pack(token, blockno, _MAGIC, ((token * 31 + blockno) ^ _MAGIC) & _MASK64) * (BLOCK // 32)


def describe(data: bytes, blockno: int) -> str:
    """What a 4 KiB block read back seems to hold, for a mismatch message."""
    if data == _ZERO[: len(data)]:
        return "zeros"
    if len(data) >= 32:
        token, where, magic, check = _UNIT.unpack_from(data)
        if magic == _MAGIC and check == ((token * 31 + where) ^ _MAGIC) & _MASK64 \
                and data == data[:32] * (len(data) // 32):
            moved = "" if where == blockno else f" written for block {where}"
            return f"{token_name(token)}{moved}"
    return "bytes no simulator write produced"


def vm_token(vm: int, seq: int) -> int:
    return ((vm + 1) << _VM_SHIFT) | (seq & ((1 << _VM_SHIFT) - 1))


def token_name(token: int) -> str:
    if token == 0:
        return "zeros"
    if token & UPGRADE:
        return f"upgrade block (version {token & 0xFFFFFFFF})"
    if token & GOLDEN:
        return "golden image content"
    return f"write #{token & ((1 << _VM_SHIFT) - 1)} of VM number {(token >> _VM_SHIFT) - 1}"


class Golden:
    """The golden image's content: which blocks hold data (a bitmap), and the token
    they carry.  ``fill`` of the disk's 64 KiB extents are chosen by a hash of the
    seed; ``extra`` blocks (those a boot trace reads) are added to them."""

    EXTENT_BLOCKS = 16

    def __init__(self, size: int, seed: int, fill: float, extra: Iterable[int] = ()):
        self.size = size
        self.seed = seed
        self.token = GOLDEN | (seed & 0xFFFFFFFF)
        nblocks = -(-size // BLOCK)
        self.nblocks = nblocks
        self.bitmap = bytearray(-(-nblocks // 8))
        next_ = self.EXTENT_BLOCKS
        threshold = int(fill * (1 << 32))
        for e in range(-(-nblocks // next_)):
            if _hash32(seed, e) < threshold:
                for b in range(e * next_, min(nblocks, (e + 1) * next_)):
                    self.bitmap[b >> 3] |= 1 << (b & 7)
        for b in extra:
            if 0 <= b < nblocks:
                self.bitmap[b >> 3] |= 1 << (b & 7)

    def has(self, b: int) -> bool:
        return 0 <= b < self.nblocks and bool(self.bitmap[b >> 3] & (1 << (b & 7)))

    def token_of(self, b: int) -> int:
        return self.token if self.has(b) else 0

    def blocks(self) -> Iterator[int]:
        for i, byte in enumerate(self.bitmap):
            if byte:
                for j in range(8):
                    if byte & (1 << j):
                        yield i * 8 + j

    def count(self) -> int:
        return sum(x.bit_count() for x in self.bitmap)

    def runs(self, max_blocks: int = 256) -> Iterator[tuple[int, int]]:
        """(first block, count) of the runs of data blocks, each at most ``max_blocks``."""
        yield from runs(self.blocks(), max_blocks)


def _hash32(seed: int, n: int) -> int:
    x = (seed * 0x9E3779B97F4A7C15 + n * 0xBF58476D1CE4E5B9 + 1) & _MASK64
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 29
    return x & 0xFFFFFFFF


def runs(blocks: Iterable[int], max_blocks: int = 256) -> Iterator[tuple[int, int]]:
    """Sorted block numbers grouped into (first, count) runs of consecutive blocks."""
    start = prev = None
    for b in blocks:
        if start is None:
            start = prev = b
            continue
        if b == prev + 1 and b - start < max_blocks:
            prev = b
            continue
        yield start, prev - start + 1
        start = prev = b
    if start is not None:
        yield start, prev - start + 1


class DiskModel:
    """One disk's expected content: ``base`` (a :class:`Golden`, or None for zeros)
    under the tokens written since (block number -> token)."""

    __slots__ = ("base", "own", "size")

    def __init__(self, base: Golden | None, size: int, own: dict[int, int] | None = None):
        self.base = base
        self.size = size
        self.own: dict[int, int] = own if own is not None else {}

    def copy(self) -> DiskModel:
        return DiskModel(self.base, self.size, dict(self.own))

    def token_of(self, b: int) -> int:
        t = self.own.get(b)
        if t is not None:
            return t
        return self.base.token_of(b) if self.base is not None else 0

    def write(self, first: int, count: int, token: int) -> None:
        own = self.own
        for b in range(first, first + count):
            own[b] = token

    def expected(self, first: int, count: int) -> bytes:
        return b"".join(block_bytes(self.token_of(b), b) for b in range(first, first + count))

    @staticmethod
    def data(first: int, count: int, token: int) -> bytes:
        return b"".join(block_bytes(token, b) for b in range(first, first + count))

    def written_blocks(self) -> list[int]:
        return sorted(self.own)
