"""Receive a send stream into an image as a new read-only snapshot.

A full stream starts from an empty subvolume.  An incremental stream starts
from an O(1) snapshot of the local snapshot whose content is the stream's
parent: the one received from it (its received UUID matches, as Btrfs
matches received_uuid), or the parent itself when the stream comes back to
the image it was sent from.

The whole receive is one transaction.  :func:`receive` commits only after
the END record has been read and checked, and drops the transaction on any
error.  So a truncated, damaged or out-of-order stream, a missing parent,
an existing name or a full image leaves the image at its last commit.

Each record keeps the image consistent by itself.  A LINK or an UNLINK
updates the entry's three items, the directory's size and link count, and
the inode's link count.  A DELETE needs an inode without names.
What a stream cannot leave behind is checked at the END record: an inode
without a name, an inode created without its ATTR record, and a directory
cut off from the root by a cycle.  ATTR records also carry the sender's
link count and directory size, and a difference means that the local
parent's content is not the sender's: the receive then fails.

NOTE: the root check keeps the numbers of the directories the stream
linked in memory until the END record, and a full stream links every
directory.  Everything else is streamed: at most one record and up to one
data extent of pending writes are held at a time.
"""

from __future__ import annotations

import logging
import stat as stat_module
import time
import uuid as uuid_module

from . import ondisk
from .errors import CorruptionError, CowtreeError, Exists, NoSpaceError, StreamError
from .fs import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, INLINE, LINK_MAX, MAX_FILE_SIZE, FileExtent, FileSystem,
                 Inode, decode_dirents, dtype_of)
from .stream import (ATTR_CODEC, CREATE_CODEC, END_CODEC, ENTRY_CODEC, HOLE_CODEC, INODE_CODEC, RECORD_ATTR,
                     RECORD_CREATE, RECORD_DELETE, RECORD_END, RECORD_HOLE, RECORD_LINK, RECORD_SYMLINK,
                     RECORD_UNLINK, RECORD_WRITE, RECORD_XATTR_REMOVE, RECORD_XATTR_SET, WRITE_CODEC, XATTR_CODEC,
                     Record, StreamHeader, StreamReader)
from .subvolume import (READONLY, ZERO_UUID, Identity, Subvolume, add_empty_subvolume, add_snapshot, check_new_name,
                        find, format_uuid, list_subvolumes)

log = logging.getLogger(__name__)

ROOT = ondisk.ROOT_DIR_INO
DIR_INDEX = ondisk.DIR_INDEX
INODE_REF = ondisk.INODE_REF
FILE_TYPES = {stat_module.S_IFREG, stat_module.S_IFDIR, stat_module.S_IFLNK, stat_module.S_IFIFO,
              stat_module.S_IFCHR, stat_module.S_IFBLK, stat_module.S_IFSOCK}
# Bound of DIR_INDEX offsets and of a directory's next offset, far above
# any real one, so that adding one to them never overflows their u64.
MAX_INDEX = 1 << 63
# The inode flags a receiver accepts.  PREALLOC is dropped, because a
# stream carries no blocks past a file's size.
KNOWN_INODE_FLAGS = ondisk.INODE_PREALLOC

# The phase of each record type; a stream never goes back to an earlier phase.
PHASES = {
    RECORD_UNLINK: 1, RECORD_DELETE: 2, RECORD_CREATE: 2, RECORD_LINK: 3, RECORD_XATTR_SET: 4,
    RECORD_XATTR_REMOVE: 4, RECORD_WRITE: 4, RECORD_HOLE: 4, RECORD_SYMLINK: 4, RECORD_ATTR: 4, RECORD_END: 5,
}
PHASE_NAMES = {1: "UNLINK", 2: "DELETE and CREATE", 3: "LINK", 4: "inode content and ATTR", 5: "END"}


def receive(volume, infile) -> Subvolume:
    """Read a send stream from infile (a binary file object) into volume; return the new snapshot.

    Commits the running transaction first, then commits the snapshot once
    the stream is complete.  On any error the transaction is dropped and
    the image stays at its last commit.
    """
    volume.check_writable()
    volume.commit()
    try:
        receiver = _Receiver(volume, StreamReader(infile))
        name = receiver.run()
        volume.commit()
    except BaseException:
        volume.abort()
        raise
    sub = find(volume, name)
    log.info("received snapshot '%s' into %s (id %d): %d records, %d bytes", sub.display_name, volume.path,
             sub.tree_id, receiver.reader.records, receiver.reader.bytes)
    return sub


class _Receiver:
    """One receive: the stream, the new subvolume, and the checks that span records."""

    def __init__(self, volume, reader: StreamReader):
        self.vol = volume
        self.reader = reader
        self.fs: FileSystem | None = None
        self.header: StreamHeader | None = None
        # Inodes without a name right now: files with no link, directories
        # without an entry.  Zero at the END record, or inodes are lost.
        self.nameless = 0
        self.created = 0
        self.created_with_attr = 0
        self.linked_dirs: list[int] = []
        self.phase = 0
        self.position = None            # ordering key of the last record in the current phase
        self.attr_done = True           # phase 4: the current inode's ATTR record was applied
        self.pending = None             # (record seq, ino, offset, [chunks], length): writes to coalesce

    # -- the stream ---------------------------------------------------------------

    def run(self) -> bytes:
        """Apply the whole stream; return the new snapshot's name."""
        self.header = self.reader.header()
        self._begin(self.header)
        handlers = {
            RECORD_UNLINK: self._unlink, RECORD_DELETE: self._delete, RECORD_CREATE: self._create,
            RECORD_LINK: self._link, RECORD_XATTR_SET: self._xattr_set, RECORD_XATTR_REMOVE: self._xattr_remove,
            RECORD_WRITE: self._write, RECORD_HOLE: self._hole, RECORD_SYMLINK: self._symlink,
            RECORD_ATTR: self._attr,
        }
        while True:
            record = self.reader.next()
            self._enter_phase(record)
            if record.type != RECORD_WRITE:
                self._flush()
            if record.type == RECORD_END:
                self._end(record)
                return self.header.name
            try:
                handlers[record.type](record)
            except (StreamError, NoSpaceError, CorruptionError):
                raise
            except (OSError, CowtreeError) as exc:
                raise self._mismatch(record, str(exc)) from exc

    def _begin(self, header: StreamHeader) -> None:
        """Check the header against the image and add the new subvolume to the transaction."""
        volume = self.vol
        name = header.name
        check_new_name(volume, name)
        subvolumes = list_subvolumes(volume)

        # The header itself, and whether this content is here already.
        for sub in subvolumes:
            if sub.stream_identity[0] == header.snapshot_uuid:
                raise Exists(f"snapshot {format_uuid(header.snapshot_uuid)} was already received as "
                             f"'{sub.display_name}'")
        if header.next_ino < ondisk.FIRST_FREE_INO or header.next_ino >= ondisk.CHUNK_OBJECTID:
            raise StreamError(f"invalid stream: next inode number {header.next_ino} is out of range")
        if header.incremental != (header.parent_uuid != ZERO_UUID):
            raise StreamError("invalid stream: the incremental flag and the parent UUID disagree")

        # The new subvolume: a snapshot of the local parent, or empty.
        identity = Identity(uuid_module.uuid4().bytes, received_uuid=header.snapshot_uuid,
                            sent_gen=header.snapshot_gen, received_gen=volume.transid)
        if header.incremental:
            base = self._parent(subvolumes, header)
            identity.parent_uuid = base.identity.uuid
            tree_id = add_snapshot(volume, base, name, READONLY, identity)
            self.fs = FileSystem(volume, tree_id, readonly=False)
            # Unlinked inodes kept open when the parent was snapshotted are not
            # part of the sent content.
            for ino in self.fs.orphans():
                self.fs.free_inode(ino)
        else:
            tree_id = add_empty_subvolume(volume, name, READONLY, identity)
            self.fs = FileSystem(volume, tree_id, readonly=False)
            self.fs.init_root()

        item = self.fs.tree.root_item
        item.next_ino = max(item.next_ino, header.next_ino)
        log.debug("receiving %s stream of snapshot %s as '%s' (id %d) into %s",
                  "an incremental" if header.incremental else "a full", format_uuid(header.snapshot_uuid),
                  name.decode("utf-8", "surrogateescape"), tree_id, volume.path)

    def _parent(self, subvolumes: list, header: StreamHeader) -> Subvolume:
        """Return the local snapshot whose content is the stream's parent."""
        for sub in subvolumes:
            uuid, generation = sub.stream_identity
            if uuid != header.parent_uuid or not sub.readonly:
                continue
            if generation != header.parent_gen:
                raise StreamError(f"stream does not apply: its parent snapshot is '{sub.display_name}', but "
                                  f"at generation {header.parent_gen}, not {generation}")
            return sub
        raise StreamError(f"stream does not apply: its parent snapshot {format_uuid(header.parent_uuid)} "
                          f"(generation {header.parent_gen}) is not in {self.vol.path}; receive the parent's "
                          f"stream first")

    def _enter_phase(self, record: Record) -> None:
        phase = PHASES[record.type]
        if phase < self.phase:
            raise StreamError(f"invalid stream: record {record.seq} ({record.name}) comes after the "
                              f"{PHASE_NAMES[self.phase]} records (records out of order)")
        if phase > self.phase:
            self._flush()
            self._close_inode(record)
            self.phase = phase
            self.position = None

    def _order(self, record: Record, position: tuple) -> None:
        """Raise unless position follows the last record's in the current phase."""
        if self.position is not None and position <= self.position:
            raise StreamError(f"invalid stream: record {record.seq} ({record.name}) for {position} comes after "
                              f"{self.position} (records out of order)")
        self.position = position

    def _inode_record(self, record: Record, ino: int) -> None:
        """Check the order of a phase 4 record: inodes ascending, each ending with its ATTR record."""
        if self.position is None or ino > self.position[0]:
            self._close_inode(record)
            self._flush()
            self.position = (ino,)
            self.attr_done = False
        elif ino < self.position[0] or self.attr_done:
            raise StreamError(f"invalid stream: record {record.seq} ({record.name}) for inode {ino} comes after "
                              f"{'the ATTR record of ' if ino == self.position[0] else ''}inode "
                              f"{self.position[0]} (records out of order)")

    def _close_inode(self, record: Record) -> None:
        if self.phase == 4 and not self.attr_done:
            raise StreamError(f"invalid stream: inode {self.position[0]} has no ATTR record before record "
                              f"{record.seq} ({record.name})")

    def _mismatch(self, record: Record, reason: str) -> StreamError:
        return StreamError(f"stream does not apply: record {record.seq} ({record.name}): {reason}")

    def _end(self, record: Record) -> None:
        _, _, snapshot_uuid = END_CODEC.unpack(record.payload)
        if snapshot_uuid != self.header.snapshot_uuid:
            raise StreamError("invalid stream: the END record names another snapshot than the header")
        if self.nameless:
            raise StreamError(f"invalid stream: it leaves {self.nameless} inodes without a name")
        if self.created != self.created_with_attr:
            raise StreamError(f"invalid stream: {self.created - self.created_with_attr} of the {self.created} "
                              f"inodes it creates have no ATTR record")
        self._check_reachable()

    def _check_reachable(self) -> None:
        """Raise unless every directory the stream linked has a path to the root."""
        fs = self.fs
        connected = {ROOT}
        for directory in self.linked_dirs:
            path: list[int] = []
            on_path: set[int] = set()
            current = directory
            while current not in connected:
                if current in on_path:
                    raise StreamError(f"invalid stream: directory inode {directory} is in a cycle of directories "
                                      f"that the root does not reach")
                path.append(current)
                on_path.add(current)
                current = fs.parent_of(current)
            connected.update(path)

    # -- phases 1 to 3: names and inodes -------------------------------------------

    def _entry(self, record: Record) -> tuple[int, int, int, int, bytes]:
        dir_ino, index, ino, dtype, name_len = record.fixed(ENTRY_CODEC)
        name = record.payload[ENTRY_CODEC.size:]
        if len(name) != name_len:
            raise StreamError(f"invalid stream: record {record.seq} ({record.name}) has a {len(name)}-byte name, "
                              f"its name length says {name_len}")
        self._order(record, (dir_ino, index))
        return dir_ino, index, ino, dtype, name

    def _unlink(self, record: Record) -> None:
        dir_ino, index, ino, dtype, name = self._entry(record)
        fs = self.fs
        data = fs.tree.get((dir_ino, DIR_INDEX, index))
        if data is None:
            raise self._mismatch(record, f"directory inode {dir_ino} has no entry at index {index}")
        found = list(decode_dirents(data, f"directory {dir_ino} index {index}"))
        if found != [(ino, dtype, name)]:
            raise self._mismatch(record, f"entry {index} of directory inode {dir_ino} is {found}, the stream "
                                         f"expects {[(ino, dtype, name)]}")
        parent = fs.get_inode(dir_ino)
        fs._remove_entry(parent, name, stamp=False)
        child = fs.get_inode(ino)
        if child.is_dir:
            parent.nlink -= 1
            fs.put_inode(parent)
            self.nameless += 1
        else:
            child.nlink -= 1
            fs.put_inode(child)
            if child.nlink == 0:
                self.nameless += 1

    def _delete(self, record: Record) -> None:
        (ino,) = record.exact(INODE_CODEC)
        self._order(record, (ino, 0))
        fs = self.fs
        if ino == ROOT:
            raise StreamError(f"invalid stream: record {record.seq} deletes the root directory")
        inode = fs.get_inode(ino)
        if inode.is_dir and not fs.is_empty_dir(ino):
            raise self._mismatch(record, f"directory inode {ino} is not empty")
        if self._has_name(inode):
            raise self._mismatch(record, f"inode {ino} still has a name")
        fs.free_inode(ino)
        self.nameless -= 1

    def _create(self, record: Record) -> None:
        ino, mode, rdev = record.exact(CREATE_CODEC)
        self._order(record, (ino, 1))
        if not ondisk.FIRST_FREE_INO <= ino < self.header.next_ino:
            raise StreamError(f"invalid stream: record {record.seq} creates inode {ino}, outside "
                              f"[{ondisk.FIRST_FREE_INO}, {self.header.next_ino})")
        if stat_module.S_IFMT(mode) not in FILE_TYPES or mode & ~0o177777:
            raise StreamError(f"invalid stream: record {record.seq} creates inode {ino} with invalid mode "
                              f"{mode:#o}")
        fs = self.fs
        if fs.tree.get((ino, ondisk.INODE_ITEM, 0)) is not None:
            raise self._mismatch(record, f"inode {ino} exists")
        now = time.time_ns()
        directory = stat_module.S_ISDIR(mode)
        fs.put_inode(Inode(ino, self.vol.transid, nlink=2 if directory else 0, mode=mode, rdev=rdev,
                           atime_ns=now, mtime_ns=now, ctime_ns=now, otime_ns=now))
        self.nameless += 1
        self.created += 1

    def _link(self, record: Record) -> None:
        dir_ino, index, ino, dtype, name = self._entry(record)
        fs = self.fs
        parent = fs._dir(dir_ino)
        child = fs.get_inode(ino)
        if dtype != dtype_of(child.mode):
            raise self._mismatch(record, f"entry type {dtype} differs from inode {ino}'s {dtype_of(child.mode)}")
        if not 2 <= index < MAX_INDEX:
            raise StreamError(f"invalid stream: record {record.seq} (LINK) uses index {index}, outside "
                              f"[2, {MAX_INDEX})")
        if fs.tree.get((dir_ino, DIR_INDEX, index)) is not None:
            raise self._mismatch(record, f"index {index} of directory inode {dir_ino} is not free")
        if child.is_dir and (ino == ROOT or self._has_name(child)):
            raise self._mismatch(record, f"directory inode {ino} already has a name")
        if not child.is_dir and child.nlink >= LINK_MAX:
            raise self._mismatch(record, f"inode {ino} has {child.nlink} links already")
        fs._add_entry(parent, name, child, index=index, stamp=False)
        if child.is_dir:
            parent.nlink += 1
            fs.put_inode(parent)
            self.nameless -= 1
            self.linked_dirs.append(ino)
        else:
            child.nlink += 1
            fs.put_inode(child)
            if child.nlink == 1:
                self.nameless -= 1

    def _has_name(self, inode: Inode) -> bool:
        if not inode.is_dir:
            return inode.nlink > 0
        ino = inode.ino
        return self.fs.tree.first((ino, INODE_REF, 0), (ino, INODE_REF + 1, 0)) is not None

    # -- phase 4: content and attributes -------------------------------------------

    def _xattr(self, record: Record) -> tuple[int, bytes, bytes]:
        ino, name_len, value_len = record.fixed(XATTR_CODEC)
        if len(record.payload) != XATTR_CODEC.size + name_len + value_len:
            raise StreamError(f"invalid stream: record {record.seq} ({record.name}) is {len(record.payload)} "
                              f"bytes, its lengths say {XATTR_CODEC.size + name_len + value_len}")
        self._inode_record(record, ino)
        name = record.payload[XATTR_CODEC.size:XATTR_CODEC.size + name_len]
        return ino, name, record.payload[XATTR_CODEC.size + name_len:]

    def _xattr_set(self, record: Record) -> None:
        ino, name, value = self._xattr(record)
        self.fs.setxattr(ino, name, value)

    def _xattr_remove(self, record: Record) -> None:
        ino, name, value = self._xattr(record)
        if value:
            raise StreamError(f"invalid stream: record {record.seq} (XATTR_REMOVE) carries a value")
        self.fs.removexattr(ino, name)

    def _regular(self, record: Record, ino: int) -> Inode:
        inode = self.fs.get_inode(ino)
        if not inode.is_reg:
            raise self._mismatch(record, f"inode {ino} is not a regular file")
        return inode

    def _write(self, record: Record) -> None:
        ino, offset = record.fixed(WRITE_CODEC)
        self._inode_record(record, ino)
        data = memoryview(record.payload)[WRITE_CODEC.size:]
        if not data or offset + len(data) > MAX_FILE_SIZE:
            raise StreamError(f"invalid stream: record {record.seq} (WRITE) writes {len(data)} bytes at offset "
                              f"{offset}")
        pending = self.pending
        if pending is not None and pending[1] == ino and pending[2] + pending[4] == offset \
                and pending[4] + len(data) <= self.vol.max_extent:
            pending[3].append(data)
            pending[4] += len(data)
            return
        self._flush()
        self._regular(record, ino)
        self.pending = [record, ino, offset, [data], len(data)]

    def _flush(self) -> None:
        """Write the coalesced WRITE records, so that each data extent is as large as one may be."""
        if self.pending is None:
            return
        record, ino, offset, chunks, _ = self.pending
        self.pending = None
        try:
            self.fs.write(ino, offset, b"".join(chunks))
        except (NoSpaceError, CorruptionError):
            raise
        except (OSError, CowtreeError) as exc:
            raise self._mismatch(record, str(exc)) from exc

    def _hole(self, record: Record) -> None:
        ino, offset, length = record.exact(HOLE_CODEC)
        self._inode_record(record, ino)
        inode = self._regular(record, ino)
        fs = self.fs
        first = next(iter(fs.extents(ino, 0, 1)), None)
        if first is not None and first.kind == INLINE and offset == 0 and length >= inode.size:
            # The sender's file has no data here, and this one stores its
            # bytes inline: a punch would keep them as inline zeros.
            fs.tree.delete((ino, ondisk.EXTENT_DATA, 0))
            inode.nbytes = 0
            fs.put_inode(inode)
            return
        fs.fallocate(ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def _symlink(self, record: Record) -> None:
        (ino,) = record.fixed(INODE_CODEC)
        self._inode_record(record, ino)
        target = record.payload[INODE_CODEC.size:]
        fs = self.fs
        inode = fs.get_inode(ino)
        if not inode.is_symlink:
            raise self._mismatch(record, f"inode {ino} is not a symlink")
        limit = min(ondisk.SYMLINK_MAX, fs.inline_max)
        if not target or b"\0" in target or len(target) > limit:
            raise self._mismatch(record, f"symlink target of {len(target)} bytes is empty, has a NUL byte or is "
                                         f"longer than the {limit} bytes this image's node size allows")
        fs.tree.put((ino, ondisk.EXTENT_DATA, 0), FileExtent(0, self.vol.transid, INLINE, inline=target).encode())
        inode.size = len(target)
        fs.put_inode(inode)

    def _drop_empty_inline(self, inode: Inode) -> None:
        """Delete an inline item without bytes, which a truncate to 0 leaves.

        Growing the file would turn it into inline zeros, where a sender
        whose file has no item keeps a hole.
        """
        fs = self.fs
        first = next(iter(fs.extents(inode.ino, 0, 1)), None)
        if first is not None and first.kind == INLINE and not first.inline[:inode.size]:
            fs.tree.delete((inode.ino, ondisk.EXTENT_DATA, 0))
            inode.nbytes = 0
            fs.put_inode(inode)

    def _attr(self, record: Record) -> None:
        (ino, size, nlink, uid, gid, mode, rdev, flags, seq, atime_ns, mtime_ns, ctime_ns,
         otime_ns) = record.exact(ATTR_CODEC)
        self._inode_record(record, ino)
        fs = self.fs
        inode = fs.get_inode(ino)

        # The size first: a truncate sets the times, which are set last.
        if stat_module.S_IFMT(mode) != stat_module.S_IFMT(inode.mode) or mode & ~0o177777:
            raise self._mismatch(record, f"mode {mode:#o} does not fit inode {ino} of mode {inode.mode:#o}")
        if flags & ~KNOWN_INODE_FLAGS:
            raise StreamError(f"invalid stream: record {record.seq} (ATTR) sets unknown inode flags {flags:#x}")
        if inode.is_reg and size != inode.size:
            if size > MAX_FILE_SIZE:
                raise StreamError(f"invalid stream: record {record.seq} (ATTR) sets size {size}")
            self._drop_empty_inline(inode)
            fs.truncate(ino, size)
            inode = fs.get_inode(ino)
            self._drop_empty_inline(inode)

        # What the receiver counted must be what the sender had.
        if nlink != inode.nlink:
            raise self._mismatch(record, f"inode {ino} has {inode.nlink} links here, {nlink} in the sent snapshot")
        if inode.is_dir:
            if size != inode.size:
                raise self._mismatch(record, f"directory inode {ino} has size {inode.size} here, {size} in the "
                                             f"sent snapshot")
            last = fs.tree.floor((ino, DIR_INDEX, ondisk.MAX_KEY[2]))
            in_use = last is not None and last[0][:2] == (ino, DIR_INDEX) and seq <= last[0][2]
            if seq < 2 or seq > MAX_INDEX or in_use:
                raise StreamError(f"invalid stream: record {record.seq} (ATTR) sets the next index of directory "
                                  f"inode {ino} to {seq}, which is in use or outside [2, {MAX_INDEX}]")
            inode.seq = seq
        elif inode.is_symlink:
            if fs.tree.get((ino, ondisk.EXTENT_DATA, 0)) is None:
                raise StreamError(f"invalid stream: symlink inode {ino} has no SYMLINK record before its ATTR "
                                  f"record {record.seq}")
            if size != inode.size:
                raise self._mismatch(record, f"symlink inode {ino} has size {inode.size} here, {size} in the sent "
                                             f"snapshot")
        elif not inode.is_reg:
            inode.size = size

        inode.flags = flags & ~ondisk.INODE_PREALLOC
        inode.mode = mode
        inode.uid, inode.gid, inode.rdev = uid, gid, rdev
        inode.atime_ns, inode.mtime_ns, inode.ctime_ns, inode.otime_ns = atime_ns, mtime_ns, ctime_ns, otime_ns
        fs.put_inode(inode)
        self.attr_done = True
        if inode.generation == self.vol.transid and ino != ROOT:
            self.created_with_attr += 1
