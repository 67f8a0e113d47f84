"""Implementation limits of the qcow2 driver, kept apart from the format.

Every size read from a file is checked against these before anything is sized
from it (bounded allocation), and the caches and the flush policy are sized from
them.  No state, no I/O.
"""

from __future__ import annotations

MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
MAX_BACKING_NAME = 1023
MAX_HOST_OFFSET = 1 << 56
MAX_CHECK_CLUSTERS = 1 << 27  # check keeps one 8-byte counter per host cluster
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# clean tables kept in memory: by bytes (a table is one cluster, 512 bytes to 2 MiB),
# between 16 and 4096 tables -- 512 L2 tables and 256 refcount blocks of 64 KiB
L2_CACHE_BYTES = 32 << 20
RB_CACHE_BYTES = 16 << 20

DIRTY_FLUSH_THRESHOLD = 256  # metadata tables dirty before an automatic flush (fewer if they are big)
#: snapshot L1 bytes read at open to list the L2 tables only snapshots use (beyond
#: this, such tables are not in the metadata index: see ``cluster.MappingMixin._build_meta_index``)
MAX_SNAPSHOT_L1_SCAN = 64 << 20
TABLE_READ_CHUNK = 1 << 20  # big tables are read in pieces: no second copy in memory
SNAPSHOT_RECORD_BYTES = 400  # memory of one decoded snapshot table entry, its strings aside


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cache_tables(nbytes: int, cluster_size: int) -> int:
    """How many tables of one cluster fit ``nbytes`` (16 to 4096)."""
    return max(16, min(4096, nbytes // cluster_size))
