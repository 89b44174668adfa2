"""Free space and delayed reference counts.

The extent tree is the only persistent record of allocation: an address is
free when no EXTENT_ITEM covers it.  :class:`FreeSpace` derives free runs
from it lazily, one 32 MiB chunk at a time, most room first, when the chunks
loaded so far have no gap that fits.  Opening an image reads no extent
items at all, and a transaction loads at most one chunk before it grows
the image instead.  Everything at or above the image's high-water mark is
free without a look.

Blocks freed by a transaction are *pinned*: they stay unavailable until the
superblock of that transaction is durable, because the previous superblock
still points at them.  Blocks allocated and freed inside one transaction
were never committed and return to the free runs at once.

Reference count changes do not touch the extent tree while a transaction
runs.  :class:`DelayedRefs` collects them per address, and the commit
applies them (see ``transaction.Volume._run_delayed_refs``).
"""

from __future__ import annotations

import dataclasses
import logging
from bisect import bisect_left, bisect_right
from itertools import chain

from . import ondisk
from .errors import NoSpaceError

log = logging.getLogger(__name__)

# Free space is read from the extent tree in chunks of this many bytes of
# address space: at most 8,192 extents of one 4 KiB block each.
CHUNK = ondisk.CHUNK_SIZE
# A transaction loads at most this many chunks that give no usable room
# before it grows the image.
LOADS_PER_TRANSACTION = 4


class FreeSpace:
    """Free runs of the image's address space, loaded a chunk at a time.

    ``scan(lo, hi)`` yields (address, length) of every allocated extent that
    starts in [lo, hi); it reads the extent tree.
    """

    def __init__(self, scan, first_alloc: int, high_water: int, size_limit: int, block: int,
                 chunk_used: dict | None = None):
        self.scan = scan
        # Committed bytes in use per chunk index (CHUNK_ITEMs); None: unknown,
        # so every chunk is a candidate.
        self.chunk_used = chunk_used
        self.first_alloc = first_alloc
        self.high_water = high_water
        self.size_limit = size_limit
        self.block = block
        self.starts: list[int] = []
        self.ends: list[int] = []
        # Chunks below the high-water mark at open time are read on demand;
        # space above it is known to be free.
        self.unloaded = list(range((high_water - 1) // CHUNK, -1, -1)) if high_water > first_alloc else []
        self.unloaded_set = set(self.unloaded)
        # Loads read extent items below this address only: what lies above it
        # was free at open, and is tracked in the runs since.
        self.scan_limit = high_water
        self.excluded: list[tuple[int, int]] = []  # pinned runs, kept out of chunk loads
        self.cursor = first_alloc
        # A transaction reads at most this many chunks that turn out to have
        # no usable room; past that it grows the image instead, so that no
        # single command on a large image pays for a scan of its whole
        # extent tree.
        self.load_budget = LOADS_PER_TRANSACTION

    # -- loading ---------------------------------------------------------

    def _chunk_room(self, chunk: int) -> int:
        """Return an upper bound of the free bytes in an unloaded chunk."""
        lo = max(chunk * CHUNK, self.first_alloc)
        hi = min((chunk + 1) * CHUNK, self.scan_limit)
        if self.chunk_used is None:
            return hi - lo
        return hi - lo - self.chunk_used.get(chunk, 0)

    def _load_chunk_with_room(self, length: int) -> bool:
        """Load the unloaded chunk with the most room, if it may hold length free bytes.

        The chunk with the most room has the fewest extent items to read,
        and the most space to give.  Return False when no chunk may hold
        length bytes.
        """
        best = None
        best_room = length - 1
        for position in range(len(self.unloaded) - 1, -1, -1):
            room = self._chunk_room(self.unloaded[position])
            if room > best_room:
                best, best_room = position, room
        if best is None:
            return False
        self._load_chunk(self.unloaded.pop(best))
        return True

    def _load_next_chunk(self) -> bool:
        if not self.unloaded:
            return False
        self._load_chunk(self.unloaded.pop())
        return True

    def _load_chunk(self, chunk: int) -> None:
        self.unloaded_set.discard(chunk)
        lo = max(chunk * CHUNK, self.first_alloc)
        hi = min((chunk + 1) * CHUNK, self.scan_limit)
        if lo >= hi:
            return
        position = lo
        for addr, length in self.scan(lo, hi):
            if addr > position:
                self._add_run(position, min(addr, hi))
            position = max(position, addr + length)
        if position < hi:
            self._add_run(position, hi)
        for start, length in self.excluded:
            self._remove_overlap(start, start + length)
        log.debug("loaded free space of chunk %d: %d runs in all", chunk, len(self.starts))

    def _chunk_loaded(self, addr: int) -> bool:
        return addr >= self.scan_limit or addr // CHUNK not in self.unloaded_set

    # -- run bookkeeping ---------------------------------------------------

    def _add_run(self, start: int, end: int) -> None:
        """Mark [start, end) free, merging with neighbours."""
        if start >= end:
            return
        starts, ends = self.starts, self.ends
        i = bisect_left(starts, start)
        if i > 0 and ends[i - 1] > start:
            raise AssertionError(f"double free of [{start}, {end}) overlapping [{starts[i - 1]}, {ends[i - 1]})")
        if i < len(starts) and starts[i] < end:
            raise AssertionError(f"double free of [{start}, {end}) overlapping [{starts[i]}, {ends[i]})")
        merge_left = i > 0 and ends[i - 1] == start
        merge_right = i < len(starts) and starts[i] == end
        if merge_left and merge_right:
            ends[i - 1] = ends[i]
            del starts[i]
            del ends[i]
        elif merge_left:
            ends[i - 1] = end
        elif merge_right:
            starts[i] = start
        else:
            starts.insert(i, start)
            ends.insert(i, end)

    def _remove_overlap(self, start: int, end: int) -> None:
        """Remove [start, end) from the free runs, wherever it overlaps them."""
        starts, ends = self.starts, self.ends
        i = bisect_right(ends, start)
        while i < len(starts) and starts[i] < end:
            run_start, run_end = starts[i], ends[i]
            pieces = []
            if run_start < start:
                pieces.append((run_start, start))
            if run_end > end:
                pieces.append((end, run_end))
            del starts[i]
            del ends[i]
            for piece in reversed(pieces):
                starts.insert(i, piece[0])
                ends.insert(i, piece[1])
            i += len(pieces)

    # -- allocation --------------------------------------------------------

    def allocate(self, length: int, reserve: int = 0, minimum: int | None = None) -> tuple[int, int]:
        """Allocate up to length bytes; return (address, allocated length).

        At least ``minimum`` bytes (default: all of length) are allocated in
        one run.  Free runs inside the image are used before the image grows.
        ``reserve`` bytes of the size limit stay unused, for deletions.
        """
        minimum = length if minimum is None else minimum
        while True:
            found = self._find(length, minimum)
            if found is not None:
                return found
            # Load a chunk that CHUNK_ITEMs say has room.  A load that gives
            # nothing usable (the room was pinned or in small pieces) counts
            # against load_budget (see __init__), unless the image cannot grow.
            if not self.unloaded or (self.load_budget <= 0 and self._can_grow(length, minimum, reserve)):
                break
            if not self._load_chunk_with_room(minimum):
                break
            found = self._find(length, minimum)
            if found is not None:
                return found
            self.load_budget -= 1
        addr = self.high_water
        limit = self.size_limit
        if limit and addr + length > limit - reserve:
            room = limit - reserve - addr
            room -= room % self.block
            if room < minimum:
                raise NoSpaceError()
            length = room
        self.high_water = addr + length
        return addr, length

    def _can_grow(self, length: int, minimum: int, reserve: int) -> bool:
        limit = self.size_limit
        return not limit or self.high_water + minimum <= limit - reserve

    def new_transaction(self) -> None:
        """Allow the next transaction its own chunk loads."""
        self.load_budget = LOADS_PER_TRANSACTION

    def _find(self, length: int, minimum: int):
        starts, ends = self.starts, self.ends
        if not starts:
            return None
        begin = bisect_right(ends, self.cursor)
        best = None
        for i in chain(range(begin, len(starts)), range(0, begin)):
            size = ends[i] - starts[i]
            if size >= length:
                best = i
                break
            if size >= minimum and (best is None or size > ends[best] - starts[best]):
                best = i
        if best is None:
            return None
        addr = starts[best]
        take = min(length, ends[best] - addr)
        if take == ends[best] - addr:
            del starts[best]
            del ends[best]
        else:
            starts[best] = addr + take
        self.cursor = addr + take
        return addr, take

    def release(self, addr: int, length: int) -> None:
        """Return [addr, addr + length) to the free runs."""
        if addr + length == self.high_water and not self.unloaded:
            self.high_water = addr
            # Free space just below may now touch the high-water mark too.
            while self.ends and self.ends[-1] == self.high_water:
                self.high_water = self.starts[-1]
                del self.starts[-1]
                del self.ends[-1]
            return
        if not self._chunk_loaded(addr):
            # Found free when its chunk is loaded, up to scan_limit; a part
            # above scan_limit is never scanned, so it goes to the runs now.
            if addr + length > self.scan_limit:
                self._add_run(self.scan_limit, addr + length)
            return
        self._add_run(addr, addr + length)

    def free_bytes_inside(self) -> int:
        """Return the free bytes known below the high-water mark."""
        return sum(e - s for s, e in zip(self.starts, self.ends))


@dataclasses.dataclass
class DelayedRef:
    """A pending change to one extent's reference count."""

    length: int
    delta: int = 0
    new: bool = False        # allocated in this transaction: no EXTENT_ITEM yet
    flags: int = 0
    owner: int = 0
    csums: bytes = b""       # data extents only: one CRC32C per block
    generation: int = 0
