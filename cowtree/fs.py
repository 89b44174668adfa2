"""Filesystem objects inside one subvolume tree: inodes, directories, file
extents, inline data, symlinks, hard links and xattrs.

Every method works inside the volume's running transaction; the caller
commits.  Names are bytes of 1 to 255 bytes without ``/`` or NUL.  Methods
raise the namespace errors of :mod:`cowtree.errors`, which are also the
matching builtin exceptions (``NotFound`` is a ``FileNotFoundError``).

File data: a file of at most ``inline_max`` bytes with no other extent is
kept inline in its leaf.  Larger files are block-aligned extent items; a
range without an item is a hole and reads as zeros.  A write never changes
a block in place: it writes new blocks and splits or drops the items it
covers (see :meth:`FileSystem._punch`).
"""

from __future__ import annotations

import dataclasses
import os
import stat as stat_module
import time
from collections.abc import Generator, Iterator

from . import ondisk
from .checksum import crc32c
from .errors import (CorruptionError, CrossDevice, Exists, FileTooLarge, InvalidArgument, IsADirectory, NameTooLong,
                     NoData, NoSpaceError, NoSuchOffset, NotADirectory, NotEmpty, NotFound, NotPermitted,
                     NotSupported, RangeError, ReadOnly, SymlinkLoop, TooBig, TooManyLinks)

INODE = ondisk.INODE_ITEM_CODEC
DIRENT = ondisk.DIR_ENTRY_CODEC
IREF = ondisk.INODE_REF_CODEC
XATTR = ondisk.XATTR_ENTRY_CODEC
FE_HEAD = ondisk.FILE_EXTENT_HEAD_CODEC
FE_REG = ondisk.FILE_EXTENT_REG_CODEC
BLOCK = ondisk.BLOCK_SIZE
INODE_ITEM = ondisk.INODE_ITEM
INODE_REF = ondisk.INODE_REF
DIR_ITEM = ondisk.DIR_ITEM
DIR_INDEX = ondisk.DIR_INDEX
XATTR_ITEM = ondisk.XATTR_ITEM
EXTENT_DATA = ondisk.EXTENT_DATA
INLINE = ondisk.FILE_EXTENT_INLINE
REGULAR = ondisk.FILE_EXTENT_REGULAR

LINK_MAX = 65000
SYMLINK_HOPS = 40
XATTR_FLAG_CREATE = 1
XATTR_FLAG_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# fallocate(2) mode bits, as in <linux/falloc.h>.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_NO_HIDE_STALE = 0x04
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40
# The largest file offset, as off_t allows on Linux.
MAX_FILE_SIZE = (1 << 63) - 1
# fallocate writes zeros in pieces of this many bytes, so its memory use
# does not grow with the range.
ZERO_CHUNK = 4 << 20


def name_hash(name: bytes) -> int:
    """Return the DIR_ITEM and XATTR_ITEM key offset of a name."""
    return crc32c(name, 0xFFFFFFFE)


def dtype_of(mode: int) -> int:
    """Return the directory entry type (DT_*) of a file mode."""
    return (mode >> 12) & 0xF


def round_up(value: int) -> int:
    return -(-value // BLOCK) * BLOCK


@dataclasses.dataclass
class Inode:
    """The decoded INODE_ITEM of one inode."""

    ino: int
    generation: int = 0
    size: int = 0
    nbytes: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    mode: int = 0
    rdev: int = 0
    flags: int = 0
    seq: int = 2
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    otime_ns: int = 0

    def encode(self) -> bytes:
        return INODE.pack(self.generation, self.size, self.nbytes, self.nlink, self.uid, self.gid,
                          self.mode, self.rdev, self.flags, self.seq, self.atime_ns, self.mtime_ns,
                          self.ctime_ns, self.otime_ns)

    @classmethod
    def decode(cls, ino: int, data: bytes) -> "Inode":
        if len(data) != INODE.size:
            raise CorruptionError("inode", f"{ino}", "INODE_ITEM has the wrong size", len(data), INODE.size)
        return cls(ino, *INODE.unpack(data))

    @property
    def is_dir(self) -> bool:
        return stat_module.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat_module.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat_module.S_ISLNK(self.mode)


def check_name(name: bytes) -> None:
    """Raise unless name is a valid directory entry name."""
    if not name or name in (b".", b".."):
        raise InvalidArgument(f"invalid name {name!r}")
    if len(name) > ondisk.NAME_MAX:
        raise NameTooLong("File name too long")
    if b"/" in name or b"\0" in name:
        raise InvalidArgument(f"invalid name {name!r}: contains '/' or NUL")


def encode_dirent(ino: int, dtype: int, name: bytes) -> bytes:
    return DIRENT.pack(ino, dtype, len(name)) + name


def decode_dirents(data: bytes, where: str):
    """Yield (ino, dtype, name) for each entry packed in a DIR_ITEM or DIR_INDEX."""
    pos = 0
    while pos < len(data):
        if pos + DIRENT.size > len(data):
            raise CorruptionError("item", where, "truncated directory entry")
        ino, dtype, name_len = DIRENT.unpack_from(data, pos)
        pos += DIRENT.size
        if pos + name_len > len(data):
            raise CorruptionError("item", where, "directory entry name past the item's end")
        yield ino, dtype, data[pos:pos + name_len]
        pos += name_len


def decode_refs(data: bytes, where: str):
    """Yield (index, name) for each entry of an INODE_REF."""
    pos = 0
    while pos < len(data):
        if pos + IREF.size > len(data):
            raise CorruptionError("item", where, "truncated INODE_REF entry")
        index, name_len = IREF.unpack_from(data, pos)
        pos += IREF.size
        yield index, data[pos:pos + name_len]
        pos += name_len


def decode_xattrs(data: bytes, where: str):
    """Yield (name, value) for each entry of an XATTR_ITEM."""
    pos = 0
    while pos < len(data):
        if pos + XATTR.size > len(data):
            raise CorruptionError("item", where, "truncated xattr entry")
        name_len, value_len = XATTR.unpack_from(data, pos)
        pos += XATTR.size
        yield data[pos:pos + name_len], data[pos + name_len:pos + name_len + value_len]
        pos += name_len + value_len


@dataclasses.dataclass
class FileExtent:
    """A decoded EXTENT_DATA item."""

    offset: int          # file offset
    generation: int
    kind: int
    disk_addr: int = 0
    disk_len: int = 0
    extent_offset: int = 0
    num_bytes: int = 0
    layer: int = 0
    inline: bytes = b""

    @property
    def end(self) -> int:
        return self.offset + (len(self.inline) if self.kind == INLINE else self.num_bytes)

    def encode(self) -> bytes:
        head = FE_HEAD.pack(self.generation, self.kind)
        if self.kind == INLINE:
            return head + self.inline
        return head + FE_REG.pack(self.disk_addr, self.disk_len, self.extent_offset, self.num_bytes, self.layer)

    @classmethod
    def decode(cls, offset: int, data: bytes, where: str) -> "FileExtent":
        if len(data) < FE_HEAD.size:
            raise CorruptionError("item", where, "EXTENT_DATA too short", len(data), f">= {FE_HEAD.size}")
        generation, kind = FE_HEAD.unpack_from(data)
        if kind == INLINE:
            return cls(offset, generation, kind, inline=bytes(data[FE_HEAD.size:]))
        if kind != REGULAR or len(data) != FE_HEAD.size + FE_REG.size:
            raise CorruptionError("item", where, "invalid EXTENT_DATA", f"kind {kind} size {len(data)}",
                                  f"kind 0 or 1, size {FE_HEAD.size + FE_REG.size}")
        return cls(offset, generation, kind, *FE_REG.unpack_from(data, FE_HEAD.size))


class FileSystem:
    """The files of one subvolume."""

    def __init__(self, volume, tree_id: int, readonly: bool = False, label: str = ""):
        self.vol = volume
        self.tree_id = tree_id
        self.readonly = readonly or not volume.writable
        self.label = label or volume.path
        self.inline_max = ondisk.inline_max(volume.nodesize)
        self.max_item = ondisk.max_item_size(volume.nodesize)

    @property
    def tree(self):
        return self.vol.tree(self.tree_id)

    def _writable(self, adds: int | None = None) -> None:
        """Raise unless this filesystem may change.

        An operation that adds items passes ``adds``, the bytes of data it
        adds, and fails with no space before it changes anything when the
        commit after it would not fit (Volume.check_space).  Operations that
        only remove pass nothing, so they still work on a full image.
        """
        if self.readonly:
            raise ReadOnly("Read-only file system")
        if adds is not None:
            self.vol.check_space(adds)

    # -- inodes --------------------------------------------------------------

    def get_inode(self, ino: int) -> Inode:
        data = self.tree.get((ino, INODE_ITEM, 0))
        if data is None:
            raise NotFound(f"inode {ino} not found")
        return Inode.decode(ino, data)

    def put_inode(self, inode: Inode) -> None:
        self.tree.put((inode.ino, INODE_ITEM, 0), inode.encode())

    def _new_ino(self) -> int:
        item = self.tree.root_item
        ino = item.next_ino
        item.next_ino += 1
        self.tree.changed = True
        return ino

    def init_root(self, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Inode:
        """Create the root directory of an empty subvolume."""
        now = time.time_ns()
        root = Inode(ondisk.ROOT_DIR_INO, self.vol.transid, nlink=2, uid=uid, gid=gid,
                     mode=stat_module.S_IFDIR | (mode & 0o7777), atime_ns=now, mtime_ns=now, ctime_ns=now,
                     otime_ns=now)
        self.put_inode(root)
        return root

    # -- directories ---------------------------------------------------------

    def _dir(self, ino: int) -> Inode:
        inode = self.get_inode(ino)
        if not inode.is_dir:
            raise NotADirectory("Not a directory")
        return inode

    def lookup(self, dir_ino: int, name: bytes) -> int:
        """Return the inode number that name has in directory dir_ino."""
        if name == b".":
            return dir_ino
        if name == b"..":
            return self.parent_of(dir_ino)
        if len(name) > ondisk.NAME_MAX:
            raise NameTooLong("File name too long")
        data = self.tree.get((dir_ino, DIR_ITEM, name_hash(name)))
        if data is not None:
            for ino, _dtype, entry_name in decode_dirents(data, f"dir {dir_ino}"):
                if entry_name == name:
                    return ino
        if self.tree.get((dir_ino, INODE_ITEM, 0)) is None:
            raise NotFound(f"directory inode {dir_ino} not found")
        raise NotFound("No such file or directory")

    def parent_of(self, ino: int) -> int:
        """Return the parent directory of a directory (the root is its own parent)."""
        if ino == ondisk.ROOT_DIR_INO:
            return ino
        found = self.tree.first((ino, INODE_REF, 0), (ino, INODE_REF + 1, 0))
        if found is None:
            raise NotFound(f"inode {ino} has no parent")
        return found[0][2]

    def readdir(self, dir_ino: int, after: int = 0):
        """Yield (index, name, ino, dtype) for entries with DIR_INDEX offset > after."""
        for key, data in self.tree.items((dir_ino, DIR_INDEX, after + 1), (dir_ino, DIR_INDEX + 1, 0)):
            for ino, dtype, name in decode_dirents(data, f"dir {dir_ino} index {key[2]}"):
                yield key[2], name, ino, dtype

    def is_empty_dir(self, ino: int) -> bool:
        return self.tree.first((ino, DIR_INDEX, 0), (ino, DIR_INDEX + 1, 0)) is None

    def _add_entry(self, parent: Inode, name: bytes, inode: Inode, index: int | None = None,
                   stamp: bool = True) -> None:
        """Add name -> inode to directory parent; update parent in the tree.

        The entry gets DIR_INDEX offset index, or the parent's next one when
        index is None.  The caller must check that a given index is free.
        Without stamp the parent's times stay as they are (receive sets them
        from the stream).
        """
        check_name(name)
        tree = self.tree
        dtype = dtype_of(inode.mode)
        hash_key = (parent.ino, DIR_ITEM, name_hash(name))
        existing = tree.get(hash_key)
        entry = encode_dirent(inode.ino, dtype, name)
        if existing is not None:
            for _, _, entry_name in decode_dirents(existing, f"dir {parent.ino}"):
                if entry_name == name:
                    raise Exists("File exists")
            if len(existing) + len(entry) > self.max_item:
                raise TooBig(f"too many names with hash {hash_key[2]:#x} in directory {parent.ino}")
            entry_all = existing + entry
        else:
            entry_all = entry
        ref_key = (inode.ino, INODE_REF, parent.ino)
        old_ref = tree.get(ref_key)
        if old_ref and len(old_ref) + IREF.size + len(name) > self.max_item:
            raise TooManyLinks(f"Too many links: the names of inode {inode.ino} in directory {parent.ino} "
                               f"fill one INODE_REF item")
        if index is None:
            index = parent.seq
        parent.seq = max(parent.seq, index + 1)
        tree.put(hash_key, entry_all)
        tree.put((parent.ino, DIR_INDEX, index), entry)
        ref = IREF.pack(index, len(name)) + name
        tree.put(ref_key, old_ref + ref if old_ref else ref)
        parent.size += 2 * len(name)
        if stamp:
            parent.mtime_ns = parent.ctime_ns = time.time_ns()
        self.put_inode(parent)

    def _remove_entry(self, parent: Inode, name: bytes, stamp: bool = True) -> tuple[int, int]:
        """Remove name from directory parent; return (ino, index).  Updates parent, and its times with stamp."""
        tree = self.tree
        hash_key = (parent.ino, DIR_ITEM, name_hash(name))
        data = tree.get(hash_key)
        found = None
        keep = []
        if data is not None:
            for ino, dtype, entry_name in decode_dirents(data, f"dir {parent.ino}"):
                if entry_name == name and found is None:
                    found = ino
                else:
                    keep.append(encode_dirent(ino, dtype, entry_name))
        if found is None:
            raise NotFound("No such file or directory")
        if keep:
            tree.put(hash_key, b"".join(keep))
        else:
            tree.delete(hash_key)
        ref_key = (found, INODE_REF, parent.ino)
        ref_data = tree.get(ref_key)
        index = None
        rest = []
        if ref_data is not None:
            for ref_index, ref_name in decode_refs(ref_data, f"inode {found}"):
                if ref_name == name and index is None:
                    index = ref_index
                else:
                    rest.append(IREF.pack(ref_index, len(ref_name)) + ref_name)
        if index is None:
            raise CorruptionError("inode", f"{found}", f"no INODE_REF for name {name!r} in directory {parent.ino}")
        if rest:
            tree.put(ref_key, b"".join(rest))
        else:
            tree.delete(ref_key)
        tree.delete((parent.ino, DIR_INDEX, index))
        parent.size -= 2 * len(name)
        if stamp:
            parent.mtime_ns = parent.ctime_ns = time.time_ns()
        self.put_inode(parent)
        return found, index

    def names_of(self, ino: int):
        """Yield (parent ino, name) for every link to ino."""
        for key, data in self.tree.items((ino, INODE_REF, 0), (ino, INODE_REF + 1, 0)):
            for _, name in decode_refs(data, f"inode {ino}"):
                yield key[2], name

    # -- creating and removing -------------------------------------------------

    def mknod(self, dir_ino: int, name: bytes, mode: int, uid: int = 0, gid: int = 0, rdev: int = 0,
              now: int | None = None) -> Inode:
        """Create a file of any type but directory and symlink (regular, fifo, device, socket)."""
        self._writable(0)
        check_name(name)
        parent = self._dir(dir_ino)
        if stat_module.S_IFMT(mode) == 0:
            mode |= stat_module.S_IFREG
        now = time.time_ns() if now is None else now
        inode = Inode(self._new_ino(), self.vol.transid, nlink=1, uid=uid, gid=gid, mode=mode, rdev=rdev,
                      atime_ns=now, mtime_ns=now, ctime_ns=now, otime_ns=now)
        self._add_entry(parent, name, inode)
        self.put_inode(inode)
        return inode

    def mkdir(self, dir_ino: int, name: bytes, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Inode:
        self._writable(0)
        check_name(name)
        parent = self._dir(dir_ino)
        if parent.nlink >= LINK_MAX:
            raise TooManyLinks("Too many links")
        now = time.time_ns()
        inode = Inode(self._new_ino(), self.vol.transid, nlink=2, uid=uid, gid=gid,
                      mode=stat_module.S_IFDIR | (mode & 0o7777), atime_ns=now, mtime_ns=now, ctime_ns=now,
                      otime_ns=now)
        self._add_entry(parent, name, inode)
        parent.nlink += 1
        self.put_inode(parent)
        self.put_inode(inode)
        return inode

    def symlink(self, dir_ino: int, name: bytes, target: bytes, uid: int = 0, gid: int = 0) -> Inode:
        self._writable(len(target))
        check_name(name)
        if not target or b"\0" in target:
            raise InvalidArgument("invalid symlink target")
        if len(target) > min(ondisk.SYMLINK_MAX, self.inline_max):
            raise NameTooLong("File name too long")
        parent = self._dir(dir_ino)
        now = time.time_ns()
        inode = Inode(self._new_ino(), self.vol.transid, nlink=1, uid=uid, gid=gid,
                      mode=stat_module.S_IFLNK | 0o777, size=len(target), atime_ns=now, mtime_ns=now,
                      ctime_ns=now, otime_ns=now)
        self._add_entry(parent, name, inode)
        self.tree.put((inode.ino, EXTENT_DATA, 0),
                      FileExtent(0, self.vol.transid, INLINE, inline=target).encode())
        self.put_inode(inode)
        return inode

    def readlink(self, ino: int) -> bytes:
        inode = self.get_inode(ino)
        if not inode.is_symlink:
            raise InvalidArgument("Invalid argument")
        data = self.tree.get((ino, EXTENT_DATA, 0))
        if data is None:
            raise CorruptionError("inode", f"{ino}", "symlink without target")
        return FileExtent.decode(0, data, f"inode {ino}").inline

    def link(self, ino: int, dir_ino: int, name: bytes) -> Inode:
        self._writable(0)
        check_name(name)
        inode = self.get_inode(ino)
        if inode.is_dir:
            raise NotPermitted("Operation not permitted")
        if inode.nlink >= LINK_MAX:
            raise TooManyLinks("Too many links")
        parent = self._dir(dir_ino)
        self._add_entry(parent, name, inode)
        inode.nlink += 1
        inode.ctime_ns = time.time_ns()
        self.put_inode(inode)
        return inode

    def unlink(self, dir_ino: int, name: bytes, keep_if_open=None) -> Inode:
        """Remove a non-directory entry; free the inode when its last link goes.

        ``keep_if_open(ino)`` returning True keeps an unlinked inode with an
        ORPHAN_ITEM instead, for a file that is still open.
        """
        self._writable()
        parent = self._dir(dir_ino)
        ino = self.lookup(dir_ino, name)
        inode = self.get_inode(ino)
        if inode.is_dir:
            raise IsADirectory("Is a directory")
        self._remove_entry(parent, name)
        self._drop_link(inode, keep_if_open)
        return inode

    def _drop_link(self, inode: Inode, keep_if_open=None) -> None:
        inode.nlink -= 1
        inode.ctime_ns = time.time_ns()
        if inode.nlink > 0:
            self.put_inode(inode)
        elif keep_if_open is not None and keep_if_open(inode.ino):
            self.put_inode(inode)
            self.tree.put((ondisk.ORPHAN_OBJECTID, ondisk.ORPHAN_ITEM, inode.ino), b"")
        else:
            self.free_inode(inode.ino)

    def rmdir(self, dir_ino: int, name: bytes) -> None:
        self._writable()
        parent = self._dir(dir_ino)
        if name in (b".", b".."):
            raise InvalidArgument("Invalid argument")
        ino = self.lookup(dir_ino, name)
        inode = self.get_inode(ino)
        if not inode.is_dir:
            raise NotADirectory("Not a directory")
        if not self.is_empty_dir(ino):
            raise NotEmpty("Directory not empty")
        self._remove_entry(parent, name)
        parent.nlink -= 1
        self.put_inode(parent)
        self.free_inode(ino)

    def free_inode(self, ino: int) -> None:
        """Delete every item of inode ino and drop its data extents."""
        tree = self.tree
        vol = self.vol
        keys = [key for key, _ in tree.items((ino, 0, 0), (ino + 1, 0, 0))]
        for key in keys:
            if key[1] == EXTENT_DATA:
                extent = FileExtent.decode(key[2], tree.get(key), f"inode {ino}")
                if extent.kind == REGULAR and extent.layer == 0:
                    vol.add_ref(extent.disk_addr, extent.disk_len, -1)
            tree.delete(key)
        tree.delete((ondisk.ORPHAN_OBJECTID, ondisk.ORPHAN_ITEM, ino))

    def orphans(self) -> list[int]:
        return [key[2] for key, _ in self.tree.items((ondisk.ORPHAN_OBJECTID, ondisk.ORPHAN_ITEM, 0),
                                                      (ondisk.ORPHAN_OBJECTID, ondisk.ORPHAN_ITEM + 1, 0))]

    def rename(self, old_dir: int, old_name: bytes, new_dir: int, new_name: bytes, flags: int = 0,
               keep_if_open=None) -> None:
        """Rename with POSIX semantics; flags are RENAME_NOREPLACE and RENAME_EXCHANGE.

        A replaced file whose last link goes is kept as an orphan when
        ``keep_if_open(ino)`` returns True, as in :meth:`unlink`.
        """
        self._writable(0)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise InvalidArgument("Invalid argument")
        check_name(new_name)
        if old_name in (b".", b".."):
            raise InvalidArgument("Invalid argument")
        src_ino = self.lookup(old_dir, old_name)
        src = self.get_inode(src_ino)
        try:
            dst_ino = self.lookup(new_dir, new_name)
        except FileNotFoundError:
            dst_ino = None
        if flags & RENAME_EXCHANGE:
            if dst_ino is None:
                raise NotFound("No such file or directory")
            return self._exchange(old_dir, old_name, src, new_dir, new_name, self.get_inode(dst_ino))
        if dst_ino is not None and flags & RENAME_NOREPLACE:
            raise Exists("File exists")
        if dst_ino == src_ino:
            return
        if src.is_dir and new_dir != old_dir:
            self._check_not_ancestor(src_ino, new_dir)
        dst = self.get_inode(dst_ino) if dst_ino is not None else None
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise NotADirectory("Not a directory")
            if not src.is_dir and dst.is_dir:
                raise IsADirectory("Is a directory")
            if dst.is_dir and not self.is_empty_dir(dst_ino):
                raise NotEmpty("Directory not empty")
        old_parent = self._dir(old_dir)
        self._remove_entry(old_parent, old_name)
        new_parent = old_parent if new_dir == old_dir else self._dir(new_dir)
        if dst is not None:
            self._remove_entry(new_parent, new_name)
            if dst.is_dir:
                new_parent.nlink -= 1
                self.free_inode(dst_ino)
            else:
                self._drop_link(dst, keep_if_open)
        if src.is_dir and new_dir != old_dir:
            old_parent.nlink -= 1
            new_parent.nlink += 1
            self.put_inode(old_parent)
        self._add_entry(new_parent, new_name, src)
        src = self.get_inode(src_ino)
        src.ctime_ns = time.time_ns()
        self.put_inode(src)

    def _exchange(self, old_dir, old_name, src, new_dir, new_name, dst) -> None:
        if src.ino == dst.ino:
            return
        if new_dir != old_dir:
            if src.is_dir:
                self._check_not_ancestor(src.ino, new_dir)
            if dst.is_dir:
                self._check_not_ancestor(dst.ino, old_dir)
        old_parent = self._dir(old_dir)
        self._remove_entry(old_parent, old_name)
        new_parent = old_parent if new_dir == old_dir else self._dir(new_dir)
        self._remove_entry(new_parent, new_name)
        if new_dir != old_dir and src.is_dir != dst.is_dir:
            delta = 1 if src.is_dir else -1
            new_parent.nlink += delta
            old_parent.nlink -= delta
            self.put_inode(new_parent)
            self.put_inode(old_parent)
        self._add_entry(new_parent, new_name, src)
        old_parent = self.get_inode(old_dir)
        self._add_entry(old_parent, old_name, dst)
        now = time.time_ns()
        for ino in (src.ino, dst.ino):
            inode = self.get_inode(ino)
            inode.ctime_ns = now
            self.put_inode(inode)

    def _check_not_ancestor(self, ino: int, dir_ino: int) -> None:
        """Raise EINVAL when directory ino is dir_ino or one of its ancestors."""
        current = dir_ino
        for _ in range(100000):
            if current == ino:
                raise InvalidArgument("Invalid argument: cannot move a directory into itself")
            if current == ondisk.ROOT_DIR_INO:
                return
            current = self.parent_of(current)
        raise CorruptionError("directory", f"{dir_ino}", "parent chain does not reach the root")

    # -- attributes -----------------------------------------------------------

    def setattr(self, ino: int, mode=None, uid=None, gid=None, atime_ns=None, mtime_ns=None,
                ctime_ns=None, size=None) -> Inode:
        # Copying the inode's leaf needs nodes too, so only a bare cut to
        # size 0 (a removal) skips the space check.
        only_cut = size == 0 and mode is None and uid is None and gid is None and atime_ns is None \
            and mtime_ns is None and ctime_ns is None
        self._writable(None if only_cut else 0)
        if size is not None:
            self.truncate(ino, size)
        inode = self.get_inode(ino)
        if mode is not None:
            inode.mode = stat_module.S_IFMT(inode.mode) | (mode & 0o7777)
        if uid is not None:
            inode.uid = uid
        if gid is not None:
            inode.gid = gid
        if atime_ns is not None:
            inode.atime_ns = atime_ns
        if mtime_ns is not None:
            inode.mtime_ns = mtime_ns
        inode.ctime_ns = time.time_ns() if ctime_ns is None else ctime_ns
        self.put_inode(inode)
        return inode

    # -- xattrs ---------------------------------------------------------------

    def listxattr(self, ino: int) -> list[bytes]:
        self.get_inode(ino)
        names = []
        for _, data in self.tree.items((ino, XATTR_ITEM, 0), (ino, XATTR_ITEM + 1, 0)):
            names.extend(name for name, _ in decode_xattrs(data, f"inode {ino}"))
        return names

    def getxattr(self, ino: int, name: bytes) -> bytes:
        data = self.tree.get((ino, XATTR_ITEM, name_hash(name)))
        if data is not None:
            for entry_name, value in decode_xattrs(data, f"inode {ino}"):
                if entry_name == name:
                    return value
        self.get_inode(ino)
        raise NoData("No data available")

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._writable(len(name) + len(value))
        if not name or len(name) > 255:
            raise RangeError("Numerical result out of range") if name else InvalidArgument("empty xattr name")
        inode = self.get_inode(ino)
        key = (ino, XATTR_ITEM, name_hash(name))
        data = self.tree.get(key)
        entries = list(decode_xattrs(data, f"inode {ino}")) if data is not None else []
        exists = any(entry_name == name for entry_name, _ in entries)
        if flags & XATTR_FLAG_CREATE and exists:
            raise Exists("File exists")
        if flags & XATTR_FLAG_REPLACE and not exists:
            raise NoData("No data available")
        entries = [(n, v) for n, v in entries if n != name] + [(name, bytes(value))]
        packed = b"".join(XATTR.pack(len(n), len(v)) + n + v for n, v in entries)
        if len(packed) > self.max_item:
            raise TooBig(f"xattr value too large: at most {self.max_item - XATTR.size - len(name)} bytes "
                         f"fit with this node size")
        self.tree.put(key, packed)
        inode.ctime_ns = time.time_ns()
        self.put_inode(inode)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        inode = self.get_inode(ino)
        key = (ino, XATTR_ITEM, name_hash(name))
        data = self.tree.get(key)
        entries = list(decode_xattrs(data, f"inode {ino}")) if data is not None else []
        rest = [(n, v) for n, v in entries if n != name]
        if len(rest) == len(entries):
            raise NoData("No data available")
        if rest:
            self.tree.put(key, b"".join(XATTR.pack(len(n), len(v)) + n + v for n, v in rest))
        else:
            self.tree.delete(key)
        inode.ctime_ns = time.time_ns()
        self.put_inode(inode)

    # -- file data --------------------------------------------------------------

    def extents(self, ino: int, start: int = 0, end: int | None = None):
        """Yield the FileExtent items of ino that overlap [start, end), in file order."""
        tree = self.tree
        hi = (ino, EXTENT_DATA + 1, 0) if end is None else (ino, EXTENT_DATA, end)
        before = tree.floor((ino, EXTENT_DATA, start))
        if before is not None and before[0][:2] == (ino, EXTENT_DATA) and before[0][2] < start:
            extent = FileExtent.decode(before[0][2], before[1], f"inode {ino}")
            if extent.end > start:
                yield extent
        for key, data in tree.items((ino, EXTENT_DATA, start), hi):
            yield FileExtent.decode(key[2], data, f"inode {ino} offset {key[2]}")

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Return up to size bytes of file ino from offset; holes read as zeros.

        A CorruptionError names inode ino as the affected file; the caller
        may replace that with the file's path.
        """
        try:
            return self._read(ino, offset, size)
        except CorruptionError as exc:
            if exc.file is None:
                exc.name_file(f"inode {ino} of {self.label}")
            raise

    def _read(self, ino: int, offset: int, size: int) -> bytes:
        inode = self.get_inode(ino)
        if inode.is_dir:
            raise IsADirectory("Is a directory")
        end = min(offset + size, inode.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        for extent in self.extents(ino, offset, end):
            lo = max(extent.offset, offset)
            hi = min(extent.end, end)
            if lo >= hi:
                continue
            if extent.kind == INLINE:
                piece = extent.inline[lo - extent.offset:hi - extent.offset]
            else:
                piece = self.vol.read_data(extent.disk_addr, extent.layer, extent.extent_offset + lo - extent.offset,
                                           hi - lo, context=f" (inode {ino}, file offset {lo})")
            out[lo - offset:lo - offset + len(piece)] = piece
        return bytes(out)

    def _inline_extent(self, ino: int):
        data = self.tree.get((ino, EXTENT_DATA, 0))
        if data is None:
            return None
        extent = FileExtent.decode(0, data, f"inode {ino}")
        return extent if extent.kind == INLINE else None

    def _has_regular_extents(self, ino: int) -> bool:
        found = self.tree.first((ino, EXTENT_DATA, 0), (ino, EXTENT_DATA + 1, 0))
        if found is None:
            return False
        return FileExtent.decode(0, found[1], f"inode {ino}").kind == REGULAR or \
            self.tree.first((ino, EXTENT_DATA, 1), (ino, EXTENT_DATA + 1, 0)) is not None

    def write(self, ino: int, offset: int, data) -> int:
        """Write data at offset in file ino; return the number of bytes written."""
        self._writable()
        inode = self.get_inode(ino)
        if inode.is_dir:
            raise IsADirectory("Is a directory")
        if not inode.is_reg:
            raise InvalidArgument("Invalid argument: not a regular file")
        length = len(data)
        if length == 0:
            return 0
        self.vol.check_space(length)
        end = offset + length
        tree = self.tree
        now = time.time_ns()
        if end <= self.inline_max and inode.size <= self.inline_max and not self._has_regular_extents(ino):
            old = self._inline_extent(ino)
            current = (old.inline if old else b"")[:inode.size].ljust(inode.size, b"\0")
            new = current[:offset].ljust(offset, b"\0") + bytes(data) + current[end:]
            tree.put((ino, EXTENT_DATA, 0), FileExtent(0, self.vol.transid, INLINE, inline=new).encode())
            inode.size = len(new)
            inode.nbytes = len(new)
        else:
            self._uninline(inode)
            self._write_blocks(inode, offset, data)
            inode.size = max(inode.size, end)
        inode.mtime_ns = inode.ctime_ns = now
        self.put_inode(inode)
        return length

    def _uninline(self, inode: Inode) -> None:
        """Turn an inline file into a regular extent."""
        old = self._inline_extent(inode.ino)
        if old is None:
            return
        self.tree.delete((inode.ino, EXTENT_DATA, 0))
        inode.nbytes = 0
        content = old.inline[:inode.size]
        if content.strip(b"\0"):
            self._write_blocks(inode, 0, content)

    def _write_blocks(self, inode: Inode, offset: int, data) -> None:
        """Write data at offset as new block-aligned extents, merging partial blocks."""
        ino = inode.ino
        end = offset + len(data)
        start = offset - offset % BLOCK
        stop = round_up(end)
        head = b""
        tail = b""
        if start < offset and start < inode.size:
            head = self.read(ino, start, offset - start).ljust(offset - start, b"\0")
        elif start < offset:
            head = bytes(offset - start)
        if end < stop and end < inode.size:
            tail = self.read(ino, end, stop - end)
        if head or tail:
            data = b"".join((head, bytes(data), tail))
        # Data first: when it finds no space, nothing has changed yet.
        pieces = self.vol.write_data(data, self.tree_id)
        self._punch(inode, start, stop)
        self._put_extents(inode, start, pieces)

    def _put_extents(self, inode: Inode, position: int, pieces) -> None:
        """Add EXTENT_DATA items for the (address, disk length, data length) pieces that write_data returned."""
        for addr, disk_len, data_len in pieces:
            num_bytes = round_up(data_len)
            extent = FileExtent(position, self.vol.transid, REGULAR, addr, disk_len, 0, num_bytes, 0)
            self.tree.put((inode.ino, EXTENT_DATA, position), extent.encode())
            inode.nbytes += num_bytes
            position += num_bytes

    def _punch(self, inode: Inode, start: int, stop: int | None) -> None:
        """Remove file extents from [start, stop) (stop None: to the end), splitting as needed."""
        ino = inode.ino
        tree = self.tree
        vol = self.vol
        for extent in list(self.extents(ino, start, stop)):
            if extent.kind == INLINE:
                tree.delete((ino, EXTENT_DATA, extent.offset))
                inode.nbytes = 0
                continue
            ext_end = extent.end
            if ext_end <= start or (stop is not None and extent.offset >= stop):
                continue
            keeps_left = extent.offset < start
            keeps_right = stop is not None and ext_end > stop
            if keeps_left:
                left = dataclasses.replace(extent, num_bytes=start - extent.offset)
                tree.put((ino, EXTENT_DATA, extent.offset), left.encode())
            else:
                tree.delete((ino, EXTENT_DATA, extent.offset))
            if keeps_right:
                right = dataclasses.replace(extent, offset=stop,
                                            extent_offset=extent.extent_offset + stop - extent.offset,
                                            num_bytes=ext_end - stop)
                tree.put((ino, EXTENT_DATA, stop), right.encode())
            removed = min(ext_end, stop if stop is not None else ext_end) - max(extent.offset, start)
            inode.nbytes -= removed
            if extent.layer == 0:
                if keeps_left and keeps_right:
                    vol.add_ref(extent.disk_addr, extent.disk_len, +1)
                elif not keeps_left and not keeps_right:
                    vol.add_ref(extent.disk_addr, extent.disk_len, -1)

    def truncate(self, ino: int, size: int) -> None:
        """Set the size of file ino; growing adds a hole, shrinking drops data."""
        # A cut to a size inside a block rewrites that block, so only a cut
        # to 0 (a removal) skips the space check.
        self._writable(None if size == 0 else 0)
        if size < 0:
            raise InvalidArgument("Invalid argument: negative size")
        inode = self.get_inode(ino)
        if inode.is_dir:
            raise IsADirectory("Is a directory")
        if not inode.is_reg:
            raise InvalidArgument("Invalid argument: not a regular file")
        if size == inode.size:
            return
        inline = self._inline_extent(ino)
        if inline is not None and size <= self.inline_max:
            content = inline.inline[:size].ljust(size, b"\0")
            self.tree.put((ino, EXTENT_DATA, 0), FileExtent(0, self.vol.transid, INLINE, inline=content).encode())
            inode.nbytes = size
        else:
            if inline is not None:
                self._uninline(inode)
            if size < inode.size:
                # This also drops blocks that fallocate kept past the old size.
                self._punch(inode, round_up(size), None)
                inode.flags &= ~ondisk.INODE_PREALLOC
                if size % BLOCK:
                    block = size - size % BLOCK
                    if any(True for _ in self.extents(ino, block, block + BLOCK)):
                        keep = self.read(ino, block, size - block)
                        self._punch(inode, block, block + BLOCK)
                        self._write_blocks_raw(inode, block, keep)
        inode.size = size
        inode.mtime_ns = inode.ctime_ns = time.time_ns()
        self.put_inode(inode)

    def _write_blocks_raw(self, inode: Inode, block: int, data: bytes) -> None:
        """Write data (shorter than a block) at block-aligned offset, zero-padded."""
        saved = inode.size
        inode.size = block  # nothing past block is merged back in
        self._write_blocks(inode, block, data)
        inode.size = saved

    # -- holes and preallocation --------------------------------------------------

    def _regular_file(self, ino: int) -> Inode:
        inode = self.get_inode(ino)
        if inode.is_dir:
            raise IsADirectory("Is a directory")
        if not inode.is_reg:
            raise InvalidArgument("Invalid argument: not a regular file")
        return inode

    def seek_data(self, ino: int, offset: int) -> int:
        """Return the first offset at or after offset that lies in data, as lseek(2) SEEK_DATA does.

        Data is any range with an extent, inline or regular, so blocks that
        fallocate allocated count as data.  Raises NoSuchOffset (ENXIO) when
        offset is negative or not below the size, or only a hole follows it.
        """
        inode = self._regular_file(ino)
        if offset < 0 or offset >= inode.size:
            raise NoSuchOffset(f"No such device or address: offset {offset} is not below the file size {inode.size}")
        for extent in self.extents(ino, offset, inode.size):
            start = max(extent.offset, offset)
            if start < extent.end:
                return start
        raise NoSuchOffset(f"No such device or address: no data at or after offset {offset}")

    def seek_hole(self, ino: int, offset: int) -> int:
        """Return the first offset at or after offset that lies in a hole, as lseek(2) SEEK_HOLE does.

        A hole is a range without an extent.  The end of the file counts as
        a hole, so the size is returned when only data follows offset.
        Raises NoSuchOffset (ENXIO) when offset is negative or not below the size.
        """
        inode = self._regular_file(ino)
        if offset < 0 or offset >= inode.size:
            raise NoSuchOffset(f"No such device or address: offset {offset} is not below the file size {inode.size}")
        position = offset
        for extent in self.extents(ino, offset, inode.size):
            if extent.offset > position:
                break
            position = max(position, extent.end)
            if position >= inode.size:
                break
        return min(position, inode.size)

    def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        """Allocate, punch or zero the byte range [offset, offset + length) of file ino, as fallocate(2) does.

        - mode 0 writes zero-filled blocks into the holes of the range and
          leaves data alone; the size grows to offset + length if smaller.
          FALLOC_FL_KEEP_SIZE keeps the size, and blocks past it are kept
          too (the inode gets the PREALLOC flag).
        - FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE frees the blocks inside
          the range and writes zeros into the partial blocks at its ends.
        - FALLOC_FL_ZERO_RANGE punches the range, then allocates it as mode
          0 does, with or without FALLOC_FL_KEEP_SIZE.

        Before it changes anything, it checks that the blocks to allocate fit
        and raises NoSpaceError if not.  Like Linux 6.18 (tried on ext4 and
        through FUSE), it raises NotSupported (EOPNOTSUPP) for PUNCH_HOLE
        without KEEP_SIZE or with ZERO_RANGE.  COLLAPSE_RANGE, INSERT_RANGE,
        UNSHARE_RANGE and unknown bits raise NotSupported too.
        """
        for _ in self.fallocate_steps(ino, mode, offset, length):
            pass

    def fallocate_steps(self, ino: int, mode: int, offset: int, length: int) -> Iterator[None]:
        """Do what fallocate() does, yielding between two pieces of zero-filled blocks (ZERO_CHUNK bytes each).

        Every check, the space check included, runs before the first
        change.  Between two yields the inode item in the tree is stale,
        because the size, nbytes and flags are written at the end.  Until
        the generator is exhausted, the caller must therefore let nothing
        else change the file and must not commit.
        """
        self._check_fallocate_mode(mode)
        if offset < 0 or length <= 0:
            raise InvalidArgument(f"Invalid argument: offset {offset}, length {length}")
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise FileTooLarge(f"File too large: offset {offset} + length {length} is past {MAX_FILE_SIZE}")
        self._writable(0)
        inode = self._regular_file(ino)
        keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
        first_block = offset - offset % BLOCK
        if mode & FALLOC_FL_PUNCH_HOLE:
            self._zero_range(inode, offset, end)
            changed = True
        else:
            zero = bool(mode & FALLOC_FL_ZERO_RANGE)
            changed = zero
            inline = self._inline_extent(ino)
            if inline is not None and end <= inode.size:
                # Inline data has no holes, so the range needs zeroing at most.
                if zero:
                    self._zero_range(inode, offset, end)
            else:
                if zero:
                    # An upper bound: every block of the range, the partial ones included.
                    needed = round_up(end) - first_block
                else:
                    needed = sum(hi - lo for lo, hi in self._holes(ino, first_block, round_up(end)))
                if inline is not None:
                    needed += BLOCK
                # NOTE: the check is an estimate.  An allocation that still fails
                # (free space in small pieces, a full host disk) leaves part of
                # the range allocated in the running transaction.
                self._check_free_space(needed)
                if inline is not None:
                    self._uninline(inode)
                if zero:
                    self._zero_range(inode, offset, end)
                allocated = yield from self._allocate_holes(inode, first_block, round_up(end))
                if keep_size and allocated and round_up(end) > round_up(inode.size):
                    inode.flags |= ondisk.INODE_PREALLOC
                    self.vol.use_features(ro_compat=ondisk.RO_COMPAT_PREALLOC)
        now = time.time_ns()
        if not keep_size and end > inode.size:
            inode.size = end
            changed = True
        if changed:
            inode.mtime_ns = now
        inode.ctime_ns = now
        self.put_inode(inode)

    @staticmethod
    def _check_fallocate_mode(mode: int) -> None:
        """Raise NotSupported for a mode that Linux rejects or that cowtree does not implement."""
        known = (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_NO_HIDE_STALE | FALLOC_FL_COLLAPSE_RANGE
                 | FALLOC_FL_ZERO_RANGE | FALLOC_FL_INSERT_RANGE | FALLOC_FL_UNSHARE_RANGE)
        if mode < 0 or mode & ~known:
            raise NotSupported(f"Operation not supported: fallocate mode {mode:#x} has unknown bits")
        if mode & FALLOC_FL_PUNCH_HOLE and mode & FALLOC_FL_ZERO_RANGE:
            raise NotSupported("Operation not supported: FALLOC_FL_PUNCH_HOLE with FALLOC_FL_ZERO_RANGE")
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise NotSupported("Operation not supported: FALLOC_FL_PUNCH_HOLE without FALLOC_FL_KEEP_SIZE")
        if mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE | FALLOC_FL_UNSHARE_RANGE | FALLOC_FL_NO_HIDE_STALE):
            raise NotSupported(f"Operation not supported: fallocate mode {mode:#x}")

    def _holes(self, ino: int, start: int, stop: int):
        """Yield (start, end) of each block-aligned range inside [start, stop) that no extent covers."""
        position = start
        for extent in list(self.extents(ino, start, stop)):
            if extent.offset > position:
                yield position, min(extent.offset, stop)
            position = max(position, round_up(extent.end))
            if position >= stop:
                return
        if position < stop:
            yield position, stop

    def _check_free_space(self, needed: int) -> None:
        """Raise NoSpaceError unless needed bytes of new data blocks fit in the image now.

        With a size limit, Volume.check_space decides.  Without one, free
        space is the free space inside the image plus the host's, and the new
        EXTENT_DATA items need node space too, estimated as four nodes and
        128 bytes per data extent.
        """
        if needed <= 0:
            return
        vol = self.vol
        if vol.sb.size_limit:
            vol.check_space(needed)
            return
        needed += 4 * vol.nodesize + (needed // vol.max_extent + 1) * 128
        used = ondisk.FIRST_ALLOC + vol.bytes_used + vol.pending_bytes()
        host = os.statvfs(os.path.dirname(os.path.abspath(vol.path)))
        free = max(0, vol.free.high_water - used) + host.f_bavail * host.f_frsize
        if needed > free:
            raise NoSpaceError(f"No space left on device: fallocate needs about {needed} bytes, "
                               f"{max(free, 0)} are free in {self.label}")

    def _allocate_holes(self, inode: Inode, start: int, stop: int) -> Generator[None, None, int]:
        """Write zero-filled blocks into every hole of the block-aligned range [start, stop); return the bytes.

        A generator: it yields between two pieces of at most ZERO_CHUNK bytes.
        """
        zeros = memoryview(bytes(min(ZERO_CHUNK, stop - start)))
        allocated = 0
        for lo, hi in list(self._holes(inode.ino, start, stop)):
            position = lo
            while position < hi:
                if allocated:
                    yield
                length = min(ZERO_CHUNK, hi - position)
                pieces = self.vol.write_data(zeros[:length], self.tree_id)
                self._put_extents(inode, position, pieces)
                position += length
                allocated += length
        return allocated

    def _zero_range(self, inode: Inode, start: int, end: int) -> None:
        """Make [start, end) of a file read as zeros: free its whole blocks and zero the partial ones.

        A partial block with data below the size is rewritten with zeros in
        the range.  Bytes past the size read as zeros already.
        """
        ino = inode.ino
        inline = self._inline_extent(ino)
        if inline is not None:
            content = inline.inline[:inode.size]
            if start < len(content):
                content = content[:start] + bytes(min(end, len(content)) - start) + content[end:]
                self.tree.put((ino, EXTENT_DATA, 0), FileExtent(0, self.vol.transid, INLINE, inline=content).encode())
            return
        partial_blocks = set()
        if start % BLOCK:
            partial_blocks.add(start - start % BLOCK)
        if end % BLOCK:
            partial_blocks.add(end - end % BLOCK)
        for block in sorted(partial_blocks):
            lo = max(start, block)
            hi = min(end, block + BLOCK, inode.size)
            if lo < hi and any(True for _ in self.extents(ino, block, block + BLOCK)):
                self._write_blocks(inode, lo, bytes(hi - lo))
        whole_start = round_up(start)
        whole_end = end - end % BLOCK
        if whole_start < whole_end:
            self._punch(inode, whole_start, whole_end)

    def clone_file(self, src_fs: "FileSystem", src_ino: int, dst_ino: int) -> None:
        """Make file dst_ino share all of src_ino's data extents (a reflink copy).

        The destination's old content is dropped.  Both files must be in the
        same image; they may be in different subvolumes.
        """
        self._writable(0)
        if src_fs.vol is not self.vol:
            raise CrossDevice("Invalid cross-device link")
        src = src_fs.get_inode(src_ino)
        dst = self.get_inode(dst_ino)
        if src.is_dir or dst.is_dir:
            raise IsADirectory("Is a directory")
        if not src.is_reg or not dst.is_reg:
            raise InvalidArgument("Invalid argument: not a regular file")
        if src_fs.tree_id == self.tree_id and src_ino == dst_ino:
            return
        self._punch(dst, 0, None)
        dst.nbytes = 0
        transid = self.vol.transid
        # Items are collected first: when both files sit in one tree, the
        # puts below change the leaves that the scan reads.
        for extent in list(src_fs.extents(src_ino)):
            copy = dataclasses.replace(extent, generation=transid)
            self.tree.put((dst_ino, EXTENT_DATA, extent.offset), copy.encode())
            if extent.kind == REGULAR:
                dst.nbytes += extent.num_bytes
                if extent.layer == 0:
                    self.vol.add_ref(extent.disk_addr, extent.disk_len, +1)
            else:
                dst.nbytes = len(extent.inline)
        dst.size = src.size
        # The source's blocks past its size, if any, came along.
        dst.flags = (dst.flags & ~ondisk.INODE_PREALLOC) | (src.flags & ondisk.INODE_PREALLOC)
        if dst.flags & ondisk.INODE_PREALLOC:
            self.vol.use_features(ro_compat=ondisk.RO_COMPAT_PREALLOC)
        dst.mtime_ns = dst.ctime_ns = time.time_ns()
        self.put_inode(dst)

    # -- paths ------------------------------------------------------------------

    def resolve(self, path: bytes, follow: bool = True, cwd: int = ondisk.ROOT_DIR_INO) -> int:
        """Return the inode at path (absolute or relative to cwd), following symlinks inside the image."""
        hops = 0
        current = ondisk.ROOT_DIR_INO if path.startswith(b"/") else cwd
        parts = [p for p in path.split(b"/") if p and p != b"."]
        while parts:
            name = parts.pop(0)
            directory = self.get_inode(current)
            if not directory.is_dir:
                raise NotADirectory("Not a directory")
            child = self.lookup(current, name)
            if (parts or follow) and name != b"..":
                inode = self.get_inode(child)
                if inode.is_symlink:
                    hops += 1
                    if hops > SYMLINK_HOPS:
                        raise SymlinkLoop("Too many levels of symbolic links")
                    target = self.readlink(child)
                    if target.startswith(b"/"):
                        current = ondisk.ROOT_DIR_INO
                    parts = [p for p in target.split(b"/") if p and p != b"."] + parts
                    continue
            current = child
        return current

    def resolve_parent(self, path: bytes) -> tuple[int, bytes]:
        """Return (directory inode, last name) of path, following symlinks in the directory part."""
        stripped = path.rstrip(b"/")
        if not stripped:
            raise InvalidArgument("Invalid argument: the root has no parent")
        head, _, name = stripped.rpartition(b"/")
        dir_ino = self.resolve(head or b"/")
        if not self.get_inode(dir_ino).is_dir:
            raise NotADirectory("Not a directory")
        return dir_ino, name

