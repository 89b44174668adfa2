"""cowtree: a copy-on-write B-tree filesystem in one image file.

Importing the package loads nothing heavy; the CLI imports the engine only
when a command needs it.
"""

__version__ = "0.1.0"


def tune_gc() -> None:
    """Make Python's cyclic garbage collector run less often, for a process that caches many nodes.

    Decoded nodes are lists of tuples that the collector scans again and
    again, though they form no cycles.  With the default thresholds a
    1,000,000-key B-tree lookup benchmark spent about a third of its time
    collecting (tools/bench_btree.py).  The CLI and the FUSE daemon call
    this; a library user may too.
    """
    import gc
    gc.set_threshold(100_000, 50, 100)
