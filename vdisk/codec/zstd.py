"""Bounded zstd decoding of one compressed cluster: bytes -> bytes, no I/O
(and :func:`compress_frame`, its encoding counterpart).

A compressed cluster is decoded into a buffer of the size the caller expects
(one cluster), never more: a hostile frame may claim (or, without a content
size in its header, simply produce) gigabytes from a few kilobytes, so neither
its header nor its data may decide how much is allocated.

:func:`decompress_bounded` is the one decoder vdisk's formats share.  Its two
modes are the two formats' rules:

``exact=True`` (vdk)
    ``buf`` is exactly one zstd frame: its header states a content size equal
    to ``expected``, it decodes to exactly ``expected`` bytes, and no byte
    follows it.
``exact=False`` (qcow2, as QEMU's ``qcow2_zstd_decompress``)
    One or more frames from the start of ``buf`` decode to exactly ``expected``
    bytes, the last of them ending there; bytes after that frame (the rest of
    the last 512-byte sector of the compressed range) are ignored.  A frame
    header need not state its content size; one that states more than the
    bytes still missing is refused before anything is decoded.  A frame that
    would produce more than ``expected`` bytes is refused (QEMU: EIO).

Memory: at most ``expected + 1`` bytes of output are allocated (the decoder
reads into a buffer of that size and stops), and frames whose window exceeds
:func:`window_limit` are refused before decoding, which bounds the decoder's
own buffers.  Skippable frames are skipped; frames needing a dictionary are
refused.

Errors are :class:`CorruptFrame` (a :class:`~vdisk.errors.CorruptImage`) with a
message that names no file: callers prefix it with the cluster they decoded,
e.g. ``f"{image}: compressed cluster at guest offset {g:#x}: {exc}"``.
"""

from __future__ import annotations

import threading

from ..errors import CorruptImage

MAGIC = b"\x28\xb5\x2f\xfd"
_SKIPPABLE_LOW, _SKIPPABLE_HIGH = 0x184D2A50, 0x184D2A5F
_CONTENTSIZE_UNKNOWN = (1 << 64) - 1
#: the largest window accepted for any cluster (QEMU's qcow2 clusters reach 2 MiB)
MIN_WINDOW_LIMIT = 2 << 20
#: frames per cluster (each at least a few bytes; QEMU writes one)
MAX_FRAMES = 1024


class CorruptFrame(CorruptImage):
    """A compressed cluster is not valid zstd data of the expected size."""


def window_limit(expected: int) -> int:
    """The largest frame window accepted when decoding ``expected`` bytes."""
    return max(MIN_WINDOW_LIMIT, 1 << max(expected - 1, 1).bit_length())


_local = threading.local()


def _decompressor(limit: int):
    """A decompressor per thread (a zstd context is not thread-safe) and window limit."""
    import zstandard

    cache = getattr(_local, "dctx", None)
    if cache is None:
        cache = _local.dctx = {}
    d = cache.get(limit)
    if d is None:
        d = cache[limit] = zstandard.ZstdDecompressor(max_window_size=limit)
    return d


def frame_end(buf, pos: int = 0) -> tuple[int, object]:
    """(offset just past the frame that starts at ``buf[pos]``, its
    ``zstandard.FrameParameters`` or None for a skippable frame), found from the
    frame and block headers alone; ``CorruptFrame`` if it does not end inside ``buf``."""
    import zstandard

    n = len(buf)
    if pos + 4 > n:
        raise CorruptFrame(f"truncated zstd frame at byte {pos}")
    magic = int.from_bytes(buf[pos : pos + 4], "little")
    if _SKIPPABLE_LOW <= magic <= _SKIPPABLE_HIGH:
        if pos + 8 > n:
            raise CorruptFrame(f"truncated skippable frame at byte {pos}")
        end = pos + 8 + int.from_bytes(buf[pos + 4 : pos + 8], "little")
        if end > n:
            raise CorruptFrame(f"skippable frame at byte {pos} runs past the compressed data")
        return end, None
    if bytes(buf[pos : pos + 4]) != MAGIC:
        raise CorruptFrame(f"no zstd frame at byte {pos} (magic {bytes(buf[pos:pos + 4]).hex()})")
    head = bytes(buf[pos : pos + 18])  # the longest frame header
    try:
        p = pos + zstandard.frame_header_size(head)
        params = zstandard.get_frame_parameters(head)
    except zstandard.ZstdError as exc:
        raise CorruptFrame(f"bad zstd frame header at byte {pos}: {exc}") from None
    while True:
        if p + 3 > n:
            raise CorruptFrame(f"zstd frame at byte {pos} is truncated")
        bh = int.from_bytes(buf[p : p + 3], "little")
        last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
        if btype == 3:
            raise CorruptFrame(f"zstd frame at byte {pos} has a block of reserved type")
        p += 3 + (1 if btype == 1 else bsize)
        if last:
            break
    if params.has_checksum:
        p += 4
    if p > n:
        raise CorruptFrame(f"zstd frame at byte {pos} is truncated")
    return p, params


def decompress_bounded(buf, expected: int, *, exact: bool = True) -> bytes:
    """Decode the zstd data in ``buf`` to exactly ``expected`` bytes (see the module
    docstring for ``exact``), allocating no more than ``expected + 1`` bytes of output."""
    import zstandard

    limit = window_limit(expected)
    dctx = _decompressor(limit)
    mv = memoryview(buf)
    pieces: list[bytes] = []
    have = 0
    pos = 0
    for _ in range(MAX_FRAMES):
        end, params = frame_end(mv, pos)
        if params is None:  # skippable frame
            if exact:
                raise CorruptFrame("is a skippable frame, not one zstd frame")
            pos = end
            if pos >= len(mv):
                break
            continue
        want = expected - have
        if params.dict_id:
            raise CorruptFrame(f"zstd frame at byte {pos} needs dictionary {params.dict_id}")
        if params.window_size > limit:
            raise CorruptFrame(
                f"zstd frame at byte {pos} needs a window of {params.window_size} bytes (limit {limit})"
            )
        size = params.content_size
        if size == _CONTENTSIZE_UNKNOWN:
            if exact:
                raise CorruptFrame(f"zstd frame states no content size (must be {expected})")
        elif size > want or (exact and size != expected):
            raise CorruptFrame(f"zstd frame claims a content size of {size} bytes, not {want}")
        if exact and end != len(mv):
            raise CorruptFrame(f"is not exactly one zstd frame ({len(mv) - end} bytes follow it)")
        try:
            # read() allocates its argument's size and stops there (or at the frame's end)
            data = dctx.stream_reader(mv[pos:end], read_across_frames=False).read(want + 1)
        except zstandard.ZstdError as exc:
            raise CorruptFrame(f"does not decompress: {exc}") from None
        if len(data) > want:
            raise CorruptFrame(f"decompresses to more than {expected} bytes")
        if size != _CONTENTSIZE_UNKNOWN and len(data) != size:
            raise CorruptFrame(f"zstd frame decompresses to {len(data)} bytes, not its stated {size}")
        pieces.append(data)
        have += len(data)
        pos = end
        if have == expected:
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if exact or pos >= len(mv):
            break
    else:
        raise CorruptFrame(f"more than {MAX_FRAMES} zstd frames for one cluster")
    raise CorruptFrame(f"decompresses to {have} bytes, not {expected}")


def _compressor(level: int):
    """A compressor per thread (a zstd context is not thread-safe) and level."""
    cache = _local.__dict__.setdefault("cctx", {})
    c = cache.get(level)
    if c is None:
        import zstandard

        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def compress_frame(data, level: int) -> bytes:
    """``data`` as one zstd frame at ``level`` whose header states its content size
    (what both the ``exact`` rules and QEMU's decoder accept).  Safe to call from
    several threads at once: each thread has its own context."""
    return _compressor(level).compress(data)
