"""Send a read-only snapshot as a stream, whole or as its changes since a parent snapshot.

The stream is object-level, as ZFS send is: it names inodes by their
numbers, which the receiver keeps, and directory entries by
(directory, DIR_INDEX offset).  So a rename, a directory move or a hard
link is a LINK or an UNLINK of one entry, and no record carries a path.

An incremental stream comes from one comparison of the two snapshots'
filesystem trees (:class:`cowtree.diff.TreeDiff`), which skips every
subtree that both share, so its cost follows the changes.  The records go
out in four phases, each from its own pass over the comparison, so that
every record finds what it needs on the receiving side:

1. UNLINK for each directory entry that is gone or different, so that
   every name a LINK needs is free and every inode to delete has no name.
2. DELETE for each inode that is gone, then CREATE for each new one, in
   inode order.  An inode number that names another inode than before
   (another creation generation or file type, possible only between
   snapshots of different clones) gets both.
3. LINK for each new or different directory entry.
4. Per changed inode, in inode order: XATTR_SET and XATTR_REMOVE, HOLE and
   WRITE for a regular file's data, SYMLINK for a symlink's target, and
   last ATTR with the final attributes.

File data goes out in WRITE records of at most
:data:`cowtree.stream.MAX_WRITE_DATA` bytes, read one at a time, and holes
are left out.  An unlinked inode that a snapshot still keeps (an
ORPHAN_ITEM) is not sent.
"""

from __future__ import annotations

import dataclasses
import logging
import stat as stat_module

from . import ondisk
from .diff import TreeDiff
from .errors import CorruptionError, InvalidArgument, NotFound
from .fs import FileExtent, FileSystem, Inode, decode_dirents, decode_xattrs
from .stream import (ATTR_CODEC, CREATE_CODEC, ENTRY_CODEC, HOLE_CODEC, INODE_CODEC, MAX_WRITE_DATA,
                     RECORD_ATTR, RECORD_CREATE, RECORD_DELETE, RECORD_HOLE, RECORD_LINK, RECORD_SYMLINK,
                     RECORD_UNLINK, RECORD_WRITE, RECORD_XATTR_REMOVE, RECORD_XATTR_SET, STREAM_INCREMENTAL,
                     WRITE_CODEC, XATTR_CODEC, StreamHeader, StreamWriter)
from .subvolume import ZERO_UUID, Subvolume, find

log = logging.getLogger(__name__)

INODE_ITEM = ondisk.INODE_ITEM
DIR_INDEX = ondisk.DIR_INDEX
XATTR_ITEM = ondisk.XATTR_ITEM
EXTENT_DATA = ondisk.EXTENT_DATA
ROOT = ondisk.ROOT_DIR_INO
GENERATION_SIZE = 8
BLOCK = ondisk.BLOCK_SIZE
REGULAR = ondisk.FILE_EXTENT_REGULAR
INLINE = ondisk.FILE_EXTENT_INLINE


@dataclasses.dataclass
class SendStats:
    """Counts of what one send wrote and read."""

    records: int = 0
    bytes: int = 0
    data_bytes: int = 0         # file data in WRITE records
    node_reads: int = 0         # filesystem tree nodes the comparisons read, a node read in two passes twice
    inodes: int = 0             # inodes with an ATTR record


def sendable(volume, name: bytes, role: str) -> Subvolume:
    """Return the read-only snapshot called name; role ("snapshot", "parent") names it in errors."""
    try:
        sub = find(volume, name)
    except NotFound:
        raise NotFound(f"{role} '{name.decode('utf-8', 'surrogateescape')}' not found") from None
    if not sub.readonly:
        raise InvalidArgument(f"{role} '{sub.display_name}' is writable; only read-only snapshots can be sent, "
                              f"because a writable one may change during or after the send")
    return sub


def send(volume, name: bytes, out, parent: bytes | None = None) -> SendStats:
    """Write a stream of the read-only snapshot called name to out (a binary file object).

    With parent, the name of another read-only snapshot of the same image,
    the stream holds only the changes from parent to name, and the receiver
    must hold a snapshot received from parent.
    """
    sub = sendable(volume, name, "snapshot")
    parent_sub = sendable(volume, parent, "parent") if parent is not None else None
    if parent_sub is not None and parent_sub.tree_id == sub.tree_id:
        raise InvalidArgument(f"snapshot '{sub.display_name}' cannot be its own parent")
    sender = _Sender(volume, sub, parent_sub, StreamWriter(out))
    stats = sender.run()
    log.info("sent %s'%s' of %s: %d records, %d bytes, %d bytes of file data, %d node reads",
             f"the changes from '{parent_sub.display_name}' to " if parent_sub else "", sub.display_name,
             volume.path, stats.records, stats.bytes, stats.data_bytes, stats.node_reads)
    return stats


def _live_inode(ino: int, data: bytes | None) -> Inode | None:
    """Return the decoded inode, or None when it is absent or unlinked (kept only by an ORPHAN_ITEM)."""
    if data is None:
        return None
    inode = Inode.decode(ino, data)
    if inode.nlink == 0 and not inode.is_dir:
        return None
    return inode


def _replaces(old: Inode, new: Inode) -> bool:
    """Return True when inode number old.ino names another inode in the new snapshot."""
    return old.generation != new.generation or stat_module.S_IFMT(old.mode) != stat_module.S_IFMT(new.mode)


def _single_entry(key, data) -> tuple[int, int, bytes]:
    entries = list(decode_dirents(data, f"DIR_INDEX {key}"))
    if len(entries) != 1:
        raise CorruptionError("dir index", f"key {key}", "wrong number of entries", len(entries), 1)
    return entries[0]


def _same_extent(old: bytes, new: bytes) -> bool:
    """Return True when two EXTENT_DATA items differ at most in their generation, their first field."""
    return old[GENERATION_SIZE:] == new[GENERATION_SIZE:]


def _subtract(ranges: list, cuts: list) -> list:
    """Return the parts of the sorted, disjoint ranges [(start, end)] that no range in cuts covers."""
    out = []
    cuts = sorted(cuts)
    for start, end in ranges:
        position = start
        for cut_start, cut_end in cuts:
            if cut_end <= position or cut_start >= end:
                continue
            if cut_start > position:
                out.append((position, cut_start))
            position = max(position, cut_end)
            if position >= end:
                break
        if position < end:
            out.append((position, end))
    return out


def _union(ranges: list) -> list:
    """Return the sorted ranges merged where they overlap or touch."""
    merged: list = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _round_up(offset: int) -> int:
    return -(-offset // BLOCK) * BLOCK


def _mapping(extent: FileExtent):
    """Return what the bytes of a regular extent are: (layer, disk address of file offset 0), or None."""
    if extent.kind != REGULAR or not extent.disk_addr:
        return None
    return extent.layer, extent.disk_addr + extent.extent_offset - extent.offset


class _Sender:
    """One send: the two trees, the record writer and the passes."""

    def __init__(self, volume, sub: Subvolume, parent: Subvolume | None, writer: StreamWriter):
        self.vol = volume
        self.sub = sub
        self.parent = parent
        self.writer = writer
        self.new_fs = FileSystem(volume, sub.tree_id, readonly=True)
        self.new = self.new_fs.tree
        self.old_fs = FileSystem(volume, parent.tree_id, readonly=True) if parent is not None else None
        self.old = self.old_fs.tree if parent is not None else None
        self.stats = SendStats()

    def run(self) -> SendStats:
        snapshot_uuid, snapshot_gen = self.sub.stream_identity
        parent_uuid, parent_gen = self.parent.stream_identity if self.parent else (ZERO_UUID, 0)
        self.writer.header(StreamHeader(STREAM_INCREMENTAL if self.parent else 0, snapshot_uuid, snapshot_gen,
                                        parent_uuid, parent_gen, self.new.root_item.next_ino, self.sub.name))
        replaced = self._replaced_inodes() if self.parent else set()
        if self.parent:
            self._send_unlinks(replaced)
        self._send_deletes_and_creates()
        self._send_links(replaced)
        self._send_contents()
        self.writer.end(snapshot_uuid)
        self.stats.records = self.writer.records
        self.stats.bytes = self.writer.bytes
        return self.stats

    def _changes(self, report_equal: bool = False):
        diff = TreeDiff(self.old, self.new)
        try:
            yield from diff.changes(report_equal)
        finally:
            self.stats.node_reads += diff.nodes_read

    # -- the passes ----------------------------------------------------------------

    def _replaced_inodes(self) -> set:
        """Return the inode numbers that name another inode in the new snapshot than in the parent."""
        replaced = set()
        for key, old, new in self._changes():
            if key[1] != INODE_ITEM or old is None or new is None:
                continue
            old_inode = _live_inode(key[0], old)
            new_inode = _live_inode(key[0], new)
            if old_inode and new_inode and key[0] != ROOT and _replaces(old_inode, new_inode):
                replaced.add(key[0])
        return replaced

    def _send_unlinks(self, replaced: set) -> None:
        # An entry that is the same in both trees but names a replaced inode
        # must go too.  Such entries lie only in leaves the comparison reads,
        # because a leaf both trees share predates every replacement.
        for key, old, new in self._changes(report_equal=bool(replaced)):
            if key[1] != DIR_INDEX or old is None:
                continue
            ino, dtype, name = _single_entry(key, old)
            if old == new and ino not in replaced:
                continue
            self._entry(RECORD_UNLINK, key, ino, dtype, name)

    def _send_deletes_and_creates(self) -> None:
        for key, old, new in self._changes():
            if key[1] != INODE_ITEM or key[0] == ROOT:
                continue
            old_inode = _live_inode(key[0], old)
            new_inode = _live_inode(key[0], new)
            replacing = old_inode is not None and new_inode is not None and _replaces(old_inode, new_inode)
            if old_inode is not None and (new_inode is None or replacing):
                self.writer.record(RECORD_DELETE, INODE_CODEC.pack(key[0]))
            if new_inode is not None and (old_inode is None or replacing):
                self.writer.record(RECORD_CREATE, CREATE_CODEC.pack(key[0], new_inode.mode, new_inode.rdev))

    def _send_links(self, replaced: set) -> None:
        for key, old, new in self._changes(report_equal=bool(replaced)):
            if key[1] != DIR_INDEX or new is None:
                continue
            ino, dtype, name = _single_entry(key, new)
            if old == new and ino not in replaced:
                continue
            self._entry(RECORD_LINK, key, ino, dtype, name)

    def _send_contents(self) -> None:
        group: list = []
        for change in self._changes():
            if change[0][0] == ondisk.ORPHAN_OBJECTID:
                continue
            if group and group[0][0][0] != change[0][0]:
                self._inode(group)
                group = []
            group.append(change)
        if group:
            self._inode(group)

    # -- one inode ----------------------------------------------------------------

    def _inode(self, changes: list) -> None:
        """Send the content and attributes of the inode whose changed items are changes."""
        ino = changes[0][0][0]
        first_key, first_old, first_new = changes[0]
        if first_key[1] == INODE_ITEM:
            old_data, new_data = first_old, first_new
        else:
            new_data = self.new.get((ino, INODE_ITEM, 0))
            old_data = self.old.get((ino, INODE_ITEM, 0)) if self.old is not None else None
        new_inode = _live_inode(ino, new_data)
        if new_inode is None:
            return
        old_inode = _live_inode(ino, old_data)
        if old_inode is None or (ino != ROOT and _replaces(old_inode, new_inode)):
            self._whole_inode(new_inode)
        else:
            self._changed_xattrs(ino, [c for c in changes if c[0][1] == XATTR_ITEM])
            extents = [c for c in changes if c[0][1] == EXTENT_DATA]
            if extents and new_inode.is_reg:
                self._changed_data(new_inode, extents)
            elif extents and new_inode.is_symlink:
                self.writer.record(RECORD_SYMLINK, INODE_CODEC.pack(ino), self.new_fs.readlink(ino))
        self._attr(new_inode)

    def _whole_inode(self, inode: Inode) -> None:
        """Send everything of an inode the receiver has just created."""
        ino = inode.ino
        for name in sorted(self.new_fs.listxattr(ino)):
            self._xattr_set(ino, name, self.new_fs.getxattr(ino, name))
        if inode.is_symlink:
            self.writer.record(RECORD_SYMLINK, INODE_CODEC.pack(ino), self.new_fs.readlink(ino))
        elif inode.is_reg:
            for extent in self.new_fs.extents(ino, 0, inode.size):
                self._write_extent(inode, extent, extent.offset, extent.end)

    def _changed_xattrs(self, ino: int, changes: list) -> None:
        for key, old, new in changes:
            before = dict(decode_xattrs(old, f"inode {ino}")) if old is not None else {}
            after = dict(decode_xattrs(new, f"inode {ino}")) if new is not None else {}
            for name in sorted(set(before) - set(after)):
                self.writer.record(RECORD_XATTR_REMOVE, XATTR_CODEC.pack(ino, len(name), 0), name)
            for name in sorted(after):
                if before.get(name) != after[name]:
                    self._xattr_set(ino, name, after[name])

    def _changed_data(self, inode: Inode, changes: list) -> None:
        """Send HOLE and WRITE records for the EXTENT_DATA items of a file that changed.

        An old item's range that no new item covers becomes a hole.  A new
        item's range is written, except where a changed old item mapped the
        same file offsets to the same data blocks, as when a punch or a
        truncate split or shortened an item.
        """
        ino = inode.ino
        old_extents = []
        new_extents = []
        for key, old, new in changes:
            if old is not None and new is not None and _same_extent(old, new):
                continue
            if old is not None:
                old_extents.append(FileExtent.decode(key[2], old, f"inode {ino} offset {key[2]}"))
            if new is not None:
                new_extents.append(FileExtent.decode(key[2], new, f"inode {ino} offset {key[2]}"))
        # Ranges in whole blocks: an inline item's bytes stand for its block.
        new_ranges = _union([(extent.offset, _round_up(extent.end)) for extent in new_extents])
        old_ranges = _union([(extent.offset, _round_up(extent.end)) for extent in old_extents])
        # A hole is cut at the end of the block that holds the last byte, not
        # at the size: a punch that ends inside a block writes zeros into it.
        last_block_end = _round_up(inode.size)
        for start, end in _subtract(old_ranges, new_ranges):
            end = min(end, last_block_end)
            if start < end:
                self.writer.record(RECORD_HOLE, HOLE_CODEC.pack(ino, start, end - start))
        for extent in new_extents:
            mapping = _mapping(extent)
            unchanged = [(old.offset, old.end) for old in old_extents
                         if mapping is not None and _mapping(old) == mapping]
            for start, end in _subtract([(extent.offset, extent.end)], unchanged):
                self._write_extent(inode, extent, start, end)

    def _write_extent(self, inode: Inode, extent: FileExtent, start: int, end: int) -> None:
        """Send the bytes [start, end) of a file that extent stores, cut at the file size."""
        ino = inode.ino
        end = min(end, inode.size)
        if extent.kind == INLINE:
            if start < end:
                self._write(ino, start, extent.inline[start - extent.offset:end - extent.offset])
            return
        if not extent.disk_addr:
            return      # an item that records a hole
        position = start
        while position < end:
            length = min(MAX_WRITE_DATA, end - position)
            data = self.vol.read_data(extent.disk_addr, extent.layer, extent.extent_offset + position - extent.offset,
                                      length, context=f" (inode {ino}, file offset {position})")
            self._write(ino, position, data)
            position += length

    # -- records ------------------------------------------------------------------

    def _entry(self, record_type: int, key, ino: int, dtype: int, name: bytes) -> None:
        self.writer.record(record_type, ENTRY_CODEC.pack(key[0], key[2], ino, dtype, len(name)), name)

    def _xattr_set(self, ino: int, name: bytes, value: bytes) -> None:
        self.writer.record(RECORD_XATTR_SET, XATTR_CODEC.pack(ino, len(name), len(value)), name + value)

    def _write(self, ino: int, offset: int, data) -> None:
        self.writer.record(RECORD_WRITE, WRITE_CODEC.pack(ino, offset), data)
        self.stats.data_bytes += len(data)

    def _attr(self, inode: Inode) -> None:
        self.writer.record(RECORD_ATTR, ATTR_CODEC.pack(
            inode.ino, inode.size, inode.nlink, inode.uid, inode.gid, inode.mode, inode.rdev, inode.flags,
            inode.seq, inode.atime_ns, inode.mtime_ns, inode.ctime_ns, inode.otime_ns))
        self.stats.inodes += 1
