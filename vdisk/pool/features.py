"""Similarity features of blocks (formats/pool.md 8): super-features for delta
compression and the sampled sketch of an image.

Super-features, after Finesse (FAST'19) but aligned: a 4 KiB block is cut into 64
chunks of 64 bytes; each chunk gets a 64-bit hash; four min-hashes (four random
affine permutations, the minimum over chunks) pair up into two super-features.
Two blocks that differ in a few chunks (an inode table after a timestamp change, a
file block after a small edit) share most chunk hashes and so, likely, a
super-feature.  All-zero chunks are left out (they would make every sparse block
look alike).  Computed for a batch of blocks at once with numpy.
"""

from __future__ import annotations

N_SF = 2
_CHUNKS = 64


def _consts():
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(0x5EED_F00D))
    k = rng.integers(1, 2**63, size=8, dtype=np.uint64) | np.uint64(1)
    a = rng.integers(1, 2**63, size=2 * N_SF, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(1, 2**63, size=2 * N_SF, dtype=np.uint64)
    return np, k, a, b


_C = None


def superfeatures(buf: bytes, n: int) -> list[tuple[int, ...]]:
    """The ``N_SF`` super-features of each of the ``n`` 4 KiB blocks in ``buf``."""
    global _C
    if _C is None:
        _C = _consts()
    np, k, a, b = _C
    words = np.frombuffer(buf, dtype="<u8", count=n * 512).reshape(n, _CHUNKS, 8)
    with np.errstate(over="ignore"):
        h = (words * k).sum(axis=2, dtype=np.uint64)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
        zero = ~words.any(axis=2)
        out = np.empty((n, 2 * N_SF), dtype=np.uint64)
        for j in range(2 * N_SF):
            p = h * a[j] + b[j]
            p[zero] = np.uint64(0xFFFFFFFFFFFFFFFF)
            out[:, j] = p.min(axis=1)
        sf = out[:, 0::2] * np.uint64(0x9E3779B97F4A7C15) ^ out[:, 1::2]
    return [tuple(int(x) for x in row) for row in sf]


# ------------------------------------------------------------------ sketches
SKETCH_MAX = 16384  # sampled hashes kept per image
SKETCH_SHIFT0 = 0  # start with every distinct block: small images are compared exactly


def sampled(h: int, shift: int) -> bool:
    return (h >> (64 - shift)) == 0 if shift else True


class Sketch:
    """A content sample of one image: every block hash below ``2**(64-shift)``, with
    how many of the image's blocks hold it (so that overwrites can take a hash out).
    When it grows past ``SKETCH_MAX``, ``shift`` grows and the hashes no longer
    sampled are dropped: a sample of a sample is a sample."""

    def __init__(self, items: dict[int, int] | None = None, shift: int = SKETCH_SHIFT0):
        self.items = dict(items or {})
        self.shift = shift
        self.changed = False

    def add(self, h: int) -> None:
        if sampled(h, self.shift):
            self.items[h] = self.items.get(h, 0) + 1
            self.changed = True
            if len(self.items) > SKETCH_MAX:
                self.shift += 1
                self.items = {k: v for k, v in self.items.items() if sampled(k, self.shift)}

    def remove(self, h: int) -> None:
        if sampled(h, self.shift):
            c = self.items.get(h)
            if c is not None:
                self.changed = True
                if c <= 1:
                    del self.items[h]
                else:
                    self.items[h] = c - 1

    def at(self, shift: int) -> frozenset[int]:
        return frozenset(k for k in self.items if sampled(k, shift))


def estimate(a: Sketch, b: Sketch) -> dict:
    """Estimated distinct-block counts and shared fractions of two images from their
    sketches: Jaccard |A∩B|/|A∪B| and containment |A∩B|/|A| (``a_in_b``)."""
    shift = max(a.shift, b.shift)
    sa, sb = a.at(shift), b.at(shift)
    inter = len(sa & sb)
    union = len(sa) + len(sb) - inter
    scale = 1 << shift
    return {"jaccard": inter / union if union else 0.0,
            "a_in_b": inter / len(sa) if sa else 0.0,
            "b_in_a": inter / len(sb) if sb else 0.0,
            "shared_blocks": inter * scale, "a_blocks": len(sa) * scale, "b_blocks": len(sb) * scale}
