"""Mount an image through FUSE (pyfuse3), read-write, with POSIX semantics.

Caveats first:

- pyfuse3 3.5 registers no ``lseek`` and no ``fallocate`` operation with
  libfuse.  The C extension cowtree._fuse_ops adds both: it defines
  fuse_session_new(), which pyfuse3's call binds to because this module
  loads the extension into the global symbol scope before importing
  pyfuse3.  The ``lseek`` and ``fallocate`` methods below run synchronously
  from C, inside pyfuse3's request processing, but a long fallocate
  replies later (see the next item).  Without the extension (no C
  compiler or libfuse 3 headers at install time, or libfuse 3.17 headers,
  where fuse_session_new is a macro), the mount logs a warning and the
  kernel's generic behaviour applies: SEEK_DATA and SEEK_HOLE treat the
  whole file as data, and fallocate(2) fails with EOPNOTSUPP.
- A fallocate that fills more than ZERO_CHUNK bytes (4 MiB) of holes with
  zero-filled blocks writes them in pieces of that size, and other requests
  are handled between two pieces.  Until it ends, requests that change the
  filesystem, and commits, wait for it.  The kernel keeps a directory's
  lock while such a request (a create, unlink or rename) waits, so lookups
  in that directory wait as well.
- Blocks that fallocate allocates are data to SEEK_DATA, and a later write
  to them allocates new blocks (copy-on-write), so fallocate does not
  guarantee that later writes find space.
- Access times are never updated by reads (as with ``noatime``).
- POSIX ACLs are not supported: their xattrs fail with EOPNOTSUPP.
- In a mount of the live filesystem the name ``.snapshots`` in the root
  always means the virtual snapshots directory, as ``.zfs`` does on ZFS,
  even when the image has no snapshot.  readdir of the root lists neither
  it (as ZFS does by default, with snapdir=hidden) nor a real entry of
  that name, which stays reachable only through the CLI (``cowtree ls
  IMAGE:/.snapshots``).  Creating the name there fails with EEXIST, and
  removing it or renaming it away fails with EBUSY (unlink(2) gets EISDIR
  from the kernel).  A mount of one snapshot (IMAGE@NAME) has no virtual
  directory, so there the name is an ordinary one.
- A mutating operation that fails half-way (no space, a corrupt node, a bug)
  cannot be undone on its own.  The mount then aborts the running
  transaction, which returns the image to its last commit, and turns
  read-only; the error is logged.  Changes since the last commit are lost.

Inode numbers: the kernel's ROOT_INODE (1) is the mounted subvolume's root
directory, which is inode 256 in the image.  Every other inode of the
mounted subvolume keeps its image number.  Snapshots appear read-only under
``MOUNTPOINT/.snapshots/NAME``.  The ``.snapshots`` directory is inode 2,
and inode ``ino`` of the snapshot with tree id ``t`` is ``(t << 40) | ino``.
Image inode numbers start at 256 and subvolume tree ids at 256, so a
snapshot inode is at least 2**48 and cannot collide with a live inode as
long as the live filesystem has used fewer than 2**40 inode numbers and
tree ids stay below 2**24 (both are checked, failing with EOVERFLOW).

Durability: every change goes into the volume's running transaction, which
is committed every ``commit_interval`` seconds, on fsync and fsyncdir, and
at unmount, including the unmount that SIGINT, SIGTERM or SIGHUP starts.
After a crash of the mount process the image opens at its last commit.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import logging
import math
import os
import signal
import stat as stat_module
import subprocess
import sys


def _load_fuse_ops():
    """Import cowtree._fuse_ops into the global symbol scope; return (module or None, why not).

    This must run before pyfuse3 is imported: Python loads extensions with
    RTLD_NOW, so pyfuse3's reference to fuse_session_new is bound when it
    loads, to the first definition in the global scope.
    """
    if "pyfuse3" in sys.modules:
        return None, "pyfuse3 was imported before cowtree.fuse, so its fuse_session_new is bound to libfuse's"
    try:
        from . import _fuse_ops
    except ImportError as exc:
        return None, f"the cowtree._fuse_ops extension is not built ({exc}); reinstall cowtree with a C compiler " \
                     f"and the libfuse 3 headers (Debian: gcc libfuse3-dev)"
    if not _fuse_ops.INTERPOSITION_BUILT:
        return None, f"cowtree._fuse_ops was built without its fuse_session_new: {_fuse_ops.NO_INTERPOSITION_REASON}"
    try:
        # Loading the already imported library again with RTLD_GLOBAL adds it to the global scope.
        ctypes.CDLL(_fuse_ops.__file__, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError as exc:
        return None, f"loading {_fuse_ops.__file__} into the global symbol scope failed: {exc}"
    return _fuse_ops, ""


_fuse_ops, _FUSE_OPS_MISSING = _load_fuse_ops()

import pyfuse3  # noqa: E402 - must follow _load_fuse_ops()
import trio  # noqa: E402

from . import ondisk
from .errors import (CorruptionError, CowtreeError, CrossDevice, Exists, FsError, NoSpaceError, NotADirectory,
                     ReadOnly)
from .fs import RENAME_EXCHANGE, FileSystem
from .image import open_image
from .subvolume import find, list_subvolumes

log = logging.getLogger(__name__)

ROOT_INO = ondisk.ROOT_DIR_INO
SNAPSHOTS_NAME = b".snapshots"
SNAPSHOTS_DIR = 2                # kernel inode of MOUNTPOINT/.snapshots
SNAPSHOT_SHIFT = 40              # kernel inode = (tree id << 40) | image inode, for snapshots
INO_MASK = (1 << SNAPSHOT_SHIFT) - 1
MAX_TREE_ID = 1 << 24

# Cache timeouts, in seconds, for the kernel's dentry and attribute caches.
# Every change to the mounted subvolume goes through this mount, because the
# mount holds the image's exclusive lock.  The kernel invalidates what each
# of its own requests changes: the attributes of the inode after setattr,
# write, link, unlink and rename, and those of the directories involved.
# The kernel keeps one inode per inode number, so every hard link of a file
# shares one cached nlink, mode and owner.  The cost: a file's st_atime
# stays stale for up to this long, and stat(2) and lookups within the
# timeout skip this process, which is what makes a cached `ls -l` or `git
# status` several times faster than with timeouts of 0.  Snapshots never
# change while mounted, so their entries are cached longer.
LIVE_TIMEOUT = 1.0
SNAPSHOT_TIMEOUT = 300.0

DEFAULT_COMMIT_INTERVAL = 5.0
# Each of these makes the mount process unmount, commit and exit 0, as umount does.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")


@dataclasses.dataclass
class OpenFile:
    """State of one file handle returned by open or create."""

    fs: FileSystem
    ino: int            # image inode number
    append: bool        # opened with O_APPEND: every write goes to the end


def _run_request(self, body, args, mutating: bool):
    """Run one handler body; map every error to pyfuse3.FUSEError with its errno."""
    before = self.vol.changes
    try:
        try:
            return body(self, *args)
        except NoSpaceError:
            # Space freed in the running transaction is free only once
            # it is committed, so commit and try once more, as Btrfs
            # does, when the request itself changed nothing.
            if not mutating or self.vol.changes != before or not self.vol.has_changes():
                raise
            self.vol.commit()
            before = self.vol.changes
            return body(self, *args)
    except pyfuse3.FUSEError:
        raise
    except BaseException as exc:   # noqa: B902 - every error must become an errno reply
        # A request that failed before changing anything has nothing to undo.
        changed = mutating and self.vol.changes != before
        raise pyfuse3.FUSEError(self.errno_of(body.__name__, args, exc, changed)) from None


def _fuse_operation(mutating: bool, sync: bool = False, waits=None):
    """Wrap a synchronous handler body as a pyfuse3 handler with one errno mapping.

    The body never awaits, so each request runs to completion before the
    next one starts, and two requests never change the transaction at once.
    The one exception is a long fallocate, which runs in pieces (see
    CowtreeOperations.fallocate).  While it runs, a mutating request waits
    for it before its body starts (with waits given, only a request for
    which waits(args) is true).  With sync, the handler stays a plain
    function, for the lseek requests that cowtree._fuse_ops calls from C.
    """
    def wrap(body):
        if sync:
            @functools.wraps(body)
            def sync_handler(self, *args):
                return _run_request(self, body, args, mutating)
            return sync_handler

        @functools.wraps(body)
        async def handler(self, *args):
            if self.long_request is not None and (waits(args) if waits else mutating):
                await self.wait_for_long_request()
            return _run_request(self, body, args, mutating)
        return handler
    return wrap


def _truncates(args) -> bool:
    """Return True for the arguments (inode, flags, ctx) of an open that truncates, the only open that changes data."""
    return bool(args[1] & os.O_TRUNC)


class CowtreeOperations(pyfuse3.Operations):
    """The pyfuse3 request handlers over one mounted subvolume and its snapshots."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, volume, fs: FileSystem, show_snapshots: bool = True):
        super().__init__()
        self.vol = volume
        self.fs = fs
        self.readonly = fs.readonly
        # In a mount of the live filesystem, the name .snapshots in the root
        # always means the virtual directory, with or without snapshots.
        self.show_snapshots = show_snapshots
        self.snapshots: dict[int, FileSystem] = {}
        self.snapshot_names: dict[bytes, int] = {}
        if show_snapshots:
            for sub in list_subvolumes(volume):
                if sub.name and sub.tree_id != fs.tree_id:
                    if sub.tree_id >= MAX_TREE_ID:
                        log.warning("snapshot %s has tree id %d, too large to map to inode numbers; not shown",
                                    sub.display_name, sub.tree_id)
                        continue
                    self.snapshots[sub.tree_id] = FileSystem(volume, sub.tree_id, readonly=True)
                    self.snapshot_names[sub.name] = sub.tree_id
        self.lookup_counts: dict[int, int] = {}
        self.open_counts: dict[tuple[int, int], int] = {}
        self.handles: dict[int, OpenFile] = {}
        self.next_fh = 1
        # Set while a fallocate runs in pieces; Mount sets the nursery those pieces run in.
        self.long_request: trio.Event | None = None
        self.nursery: trio.Nursery | None = None

    # -- inode numbers -----------------------------------------------------------

    def resolve(self, kernel_ino: int) -> tuple[FileSystem, int]:
        """Return (filesystem, image inode) of a kernel inode number; .snapshots has none."""
        if kernel_ino == pyfuse3.ROOT_INODE:
            return self.fs, ROOT_INO
        tree_id = kernel_ino >> SNAPSHOT_SHIFT
        if tree_id == 0:
            if kernel_ino < ROOT_INO:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.fs, kernel_ino
        fs = self.snapshots.get(tree_id)
        if fs is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return fs, kernel_ino & INO_MASK

    def kernel_ino(self, fs: FileSystem, ino: int) -> int:
        """Return the kernel inode number of image inode ino in fs (see the module docstring)."""
        if ino > INO_MASK:
            raise pyfuse3.FUSEError(errno.EOVERFLOW)
        if fs is self.fs:
            return pyfuse3.ROOT_INODE if ino == ROOT_INO else ino
        return (fs.tree_id << SNAPSHOT_SHIFT) | ino

    def is_snapshots_entry(self, fs: FileSystem, dir_ino: int, name: bytes) -> bool:
        """Return True for the name .snapshots in the mounted root, where the virtual directory hides any real entry."""
        return self.show_snapshots and fs is self.fs and dir_ino == ROOT_INO and name == SNAPSHOTS_NAME

    def reject_snapshots_entry(self, fs: FileSystem, dir_ino: int, name: bytes, removing: bool = False) -> None:
        """Raise for a request that would create (EEXIST) or remove (EBUSY) the name .snapshots in the root.

        The kernel's lookup of that name returns the virtual directory, so
        the kernel fails most of these requests itself.  This check keeps the requests that
        still arrive (rmdir, rename) from changing a real entry of that name.
        EBUSY is the errno that rmdir(2), unlink(2) and rename(2) document
        for a name the system is using, such as a mount point.  OpenZFS on
        Linux returns EEXIST for ``.zfs`` in both directions instead
        (zfs_dirent_lock in module/os/linux/zfs/zfs_dir.c), but for rmdir
        POSIX gives EEXIST the meaning "directory not empty".
        """
        if not self.is_snapshots_entry(fs, dir_ino, name):
            return
        if removing:
            raise pyfuse3.FUSEError(errno.EBUSY)
        raise Exists("File exists: .snapshots in the root is the snapshots directory")

    def writable_fs(self, kernel_ino: int) -> tuple[FileSystem, int]:
        """Resolve a kernel inode that a request is about to change."""
        if kernel_ino == SNAPSHOTS_DIR:
            raise ReadOnly("Read-only file system")
        return self.resolve(kernel_ino)

    # -- attributes ----------------------------------------------------------------

    def attributes(self, fs: FileSystem, ino: int, inode=None) -> pyfuse3.EntryAttributes:
        inode = inode or fs.get_inode(ino)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self.kernel_ino(fs, ino)
        attr.generation = inode.generation
        attr.st_mode = inode.mode
        attr.st_nlink = inode.nlink
        attr.st_uid = inode.uid
        attr.st_gid = inode.gid
        attr.st_rdev = inode.rdev
        attr.st_size = inode.size
        attr.st_blksize = ondisk.BLOCK_SIZE
        # nbytes counts allocated data bytes only, so a sparse file's holes take no blocks.
        attr.st_blocks = -(-inode.nbytes // 512)
        attr.st_atime_ns = inode.atime_ns
        attr.st_mtime_ns = inode.mtime_ns
        attr.st_ctime_ns = inode.ctime_ns
        timeout = LIVE_TIMEOUT if fs is self.fs else SNAPSHOT_TIMEOUT
        attr.entry_timeout = timeout
        attr.attr_timeout = timeout
        return attr

    def snapshots_dir_attributes(self) -> pyfuse3.EntryAttributes:
        root = self.fs.get_inode(ROOT_INO)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = SNAPSHOTS_DIR
        attr.st_mode = stat_module.S_IFDIR | 0o555
        attr.st_nlink = 2 + len(self.snapshots)
        attr.st_uid = root.uid
        attr.st_gid = root.gid
        attr.st_size = 0
        attr.st_blksize = ondisk.BLOCK_SIZE
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = root.otime_ns
        attr.entry_timeout = attr.attr_timeout = SNAPSHOT_TIMEOUT
        return attr

    def attributes_of(self, kernel_ino: int) -> pyfuse3.EntryAttributes:
        if kernel_ino == SNAPSHOTS_DIR and self.show_snapshots:
            return self.snapshots_dir_attributes()
        fs, ino = self.resolve(kernel_ino)
        return self.attributes(fs, ino)

    def remember(self, attr: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """Count one kernel lookup of attr's inode and return attr."""
        self.lookup_counts[attr.st_ino] = self.lookup_counts.get(attr.st_ino, 0) + 1
        return attr

    # -- errors --------------------------------------------------------------------

    def errno_of(self, operation: str, args, exc: BaseException, mutating: bool) -> int:
        """Log exc if it needs logging, and return the errno the kernel gets for it."""
        target = args[0] if args else None
        if isinstance(exc, CorruptionError):
            # The message names the block address; only this request fails.
            log.error("%s on inode %s: %s", operation, target, exc)
            if mutating:
                self.fail_transaction(operation, exc)
            return errno.EIO
        if isinstance(exc, NoSpaceError):
            if mutating:
                self.fail_transaction(operation, exc)
            return errno.ENOSPC
        if isinstance(exc, (FsError, CowtreeError)):
            return exc.errno
        if isinstance(exc, OSError) and exc.errno:
            log.error("%s on inode %s: %s", operation, target, exc)
            if mutating:
                self.fail_transaction(operation, exc)
            return exc.errno
        log.error("%s on inode %s failed", operation, target, exc_info=exc)
        if mutating:
            self.fail_transaction(operation, exc)
        return errno.EIO

    def fail_transaction(self, operation: str, exc: BaseException) -> None:
        """Return the image to its last commit and stop accepting changes."""
        if self.readonly:
            return
        log.error("%s failed half-way (%s): aborting the running transaction, which returns the image to "
                  "generation %d, and continuing read-only; unmount and run fsck", operation, exc,
                  self.vol.generation)
        self.vol.abort()
        self.readonly = True
        self.fs.readonly = True

    # -- the request handlers ------------------------------------------------------

    @_fuse_operation(mutating=False)
    def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == SNAPSHOTS_DIR and self.show_snapshots:
            if name == b".":
                return self.remember(self.snapshots_dir_attributes())
            if name == b"..":
                return self.remember(self.attributes(self.fs, ROOT_INO))
            tree_id = self.snapshot_names.get(name)
            if tree_id is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.remember(self.attributes(self.snapshots[tree_id], ROOT_INO))
        fs, dir_ino = self.resolve(parent_inode)
        if self.is_snapshots_entry(fs, dir_ino, name):
            return self.remember(self.snapshots_dir_attributes())
        if fs is not self.fs and dir_ino == ROOT_INO and name == b"..":
            return self.remember(self.snapshots_dir_attributes())
        ino = fs.lookup(dir_ino, name)
        return self.remember(self.attributes(fs, ino))

    async def forget(self, inode_list):
        for kernel_ino, count in inode_list:
            left = self.lookup_counts.get(kernel_ino, 0) - count
            if left > 0:
                self.lookup_counts[kernel_ino] = left
            else:
                if left < 0:
                    log.warning("kernel forgot inode %d %d more times than it looked it up", kernel_ino, -left)
                self.lookup_counts.pop(kernel_ino, None)

    @_fuse_operation(mutating=False)
    def getattr(self, inode, ctx=None):
        return self.attributes_of(inode)

    @_fuse_operation(mutating=True)
    def setattr(self, inode, attr, fields, fh, ctx):
        fs, ino = self.writable_fs(inode)
        changes = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_ctime:
            changes["ctime_ns"] = attr.st_ctime_ns
        if fields.update_size:
            changes["size"] = attr.st_size
        inode_item = fs.setattr(ino, **changes)
        return self.attributes(fs, ino, inode_item)

    @_fuse_operation(mutating=False)
    def readlink(self, inode, ctx):
        fs, ino = self.resolve(inode)
        return fs.readlink(ino)

    def owner(self, fs: FileSystem, dir_ino: int, mode: int, ctx) -> tuple[int, int, int]:
        """Return (mode, uid, gid) of a new inode, applying the parent's set-group-ID bit."""
        parent = fs.get_inode(dir_ino)
        if not parent.is_dir:
            raise NotADirectory("Not a directory")
        gid = ctx.gid
        if parent.mode & stat_module.S_ISGID:
            gid = parent.gid
            if stat_module.S_ISDIR(mode):
                mode |= stat_module.S_ISGID
        return mode, ctx.uid, gid

    @_fuse_operation(mutating=True)
    def mknod(self, parent_inode, name, mode, rdev, ctx):
        fs, dir_ino = self.writable_fs(parent_inode)
        self.reject_snapshots_entry(fs, dir_ino, name)
        mode, uid, gid = self.owner(fs, dir_ino, mode, ctx)
        inode = fs.mknod(dir_ino, name, mode, uid=uid, gid=gid, rdev=rdev)
        return self.remember(self.attributes(fs, inode.ino, inode))

    @_fuse_operation(mutating=True)
    def mkdir(self, parent_inode, name, mode, ctx):
        fs, dir_ino = self.writable_fs(parent_inode)
        self.reject_snapshots_entry(fs, dir_ino, name)
        mode, uid, gid = self.owner(fs, dir_ino, stat_module.S_IFDIR | mode, ctx)
        inode = fs.mkdir(dir_ino, name, mode, uid=uid, gid=gid)
        return self.remember(self.attributes(fs, inode.ino, inode))

    @_fuse_operation(mutating=True)
    def symlink(self, parent_inode, name, target, ctx):
        fs, dir_ino = self.writable_fs(parent_inode)
        self.reject_snapshots_entry(fs, dir_ino, name)
        _, uid, gid = self.owner(fs, dir_ino, stat_module.S_IFLNK, ctx)
        inode = fs.symlink(dir_ino, name, target, uid=uid, gid=gid)
        return self.remember(self.attributes(fs, inode.ino, inode))

    @_fuse_operation(mutating=True)
    def link(self, inode, new_parent_inode, new_name, ctx):
        fs, ino = self.writable_fs(inode)
        dir_fs, dir_ino = self.writable_fs(new_parent_inode)
        if dir_fs is not fs:
            raise CrossDevice("Invalid cross-device link")
        self.reject_snapshots_entry(fs, dir_ino, new_name)
        linked = fs.link(ino, dir_ino, new_name)
        return self.remember(self.attributes(fs, ino, linked))

    def is_open(self, fs: FileSystem):
        """Return the keep_if_open callback for fs: True while a handle has the inode open."""
        return lambda ino: self.open_counts.get((fs.tree_id, ino), 0) > 0

    @_fuse_operation(mutating=True)
    def unlink(self, parent_inode, name, ctx):
        fs, dir_ino = self.writable_fs(parent_inode)
        self.reject_snapshots_entry(fs, dir_ino, name, removing=True)
        fs.unlink(dir_ino, name, keep_if_open=self.is_open(fs))

    @_fuse_operation(mutating=True)
    def rmdir(self, parent_inode, name, ctx):
        fs, dir_ino = self.writable_fs(parent_inode)
        self.reject_snapshots_entry(fs, dir_ino, name, removing=True)
        fs.rmdir(dir_ino, name)

    @_fuse_operation(mutating=True)
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        fs, old_dir = self.writable_fs(parent_inode_old)
        new_fs, new_dir = self.writable_fs(parent_inode_new)
        if new_fs is not fs:
            raise CrossDevice("Invalid cross-device link")
        self.reject_snapshots_entry(fs, old_dir, name_old, removing=True)
        # RENAME_EXCHANGE would move the target away, as removing it does.
        self.reject_snapshots_entry(fs, new_dir, name_new, removing=bool(flags & RENAME_EXCHANGE))
        fs.rename(old_dir, name_old, new_dir, name_new, flags, keep_if_open=self.is_open(fs))

    # -- files -----------------------------------------------------------------------

    def new_handle(self, fs: FileSystem, ino: int, flags: int) -> pyfuse3.FileInfo:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = OpenFile(fs, ino, bool(flags & os.O_APPEND))
        key = (fs.tree_id, ino)
        self.open_counts[key] = self.open_counts.get(key, 0) + 1
        # keep_cache: the page cache stays valid across opens because every
        # write goes through this mount.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_fuse_operation(mutating=True, waits=_truncates)
    def open(self, inode, flags, ctx):
        if inode == SNAPSHOTS_DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fs, ino = self.resolve(inode)
        node = fs.get_inode(ino)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            fs._writable()
        if flags & os.O_TRUNC and node.is_reg and node.size:
            fs.truncate(ino, 0)
        return self.new_handle(fs, ino, flags)

    @_fuse_operation(mutating=True)
    def create(self, parent_inode, name, mode, flags, ctx):
        fs, dir_ino = self.writable_fs(parent_inode)
        self.reject_snapshots_entry(fs, dir_ino, name)
        mode, uid, gid = self.owner(fs, dir_ino, mode, ctx)
        inode = fs.mknod(dir_ino, name, mode, uid=uid, gid=gid)
        info = self.new_handle(fs, inode.ino, flags)
        return info, self.remember(self.attributes(fs, inode.ino, inode))

    @_fuse_operation(mutating=False)
    def read(self, fh, off, size):
        handle = self.handles[fh]
        return handle.fs.read(handle.ino, off, size)

    @_fuse_operation(mutating=True)
    def write(self, fh, off, buf):
        handle = self.handles[fh]
        if handle.append:
            # The kernel computed off from its cached size; the inode's size is authoritative.
            off = handle.fs.get_inode(handle.ino).size
        return handle.fs.write(handle.ino, off, buf)

    @_fuse_operation(mutating=False)
    def flush(self, fh):
        return None

    @_fuse_operation(mutating=True)
    def release(self, fh):
        handle = self.handles.pop(fh)
        key = (handle.fs.tree_id, handle.ino)
        left = self.open_counts.get(key, 0) - 1
        if left > 0:
            self.open_counts[key] = left
            return
        self.open_counts.pop(key, None)
        if handle.fs.readonly:
            return
        # The last handle of an unlinked file is gone: free its data now.
        # A crash before this point leaves an ORPHAN_ITEM, freed at the next mount.
        try:
            inode = handle.fs.get_inode(handle.ino)
        except FileNotFoundError:
            return
        if inode.nlink == 0:
            handle.fs.free_inode(handle.ino)
            log.debug("freed unlinked inode %d at its last release", handle.ino)

    @_fuse_operation(mutating=True)
    def fsync(self, fh, datasync):
        self.commit()

    def handle_of(self, fh: int) -> OpenFile:
        handle = self.handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    @_fuse_operation(mutating=False, sync=True)
    def lseek(self, inode, fh, off, whence):
        # The kernel sends only SEEK_DATA and SEEK_HOLE; it handles the other whence values itself.
        handle = self.handle_of(fh)
        if whence == os.SEEK_DATA:
            return handle.fs.seek_data(handle.ino, off)
        if whence == os.SEEK_HOLE:
            return handle.fs.seek_hole(handle.ino, off)
        raise pyfuse3.FUSEError(errno.EINVAL)

    def fallocate(self, inode, fh, mode, offset, length):
        """Handle a fallocate request, which cowtree._fuse_ops passes in synchronously from C.

        The checks and the first piece of zero-filled blocks (ZERO_CHUNK
        bytes) run at once.  A request with more pieces takes over its reply
        with defer_reply() and goes on in a task, and other requests run
        between two pieces.  Requests that change the filesystem, and
        commits, wait until it ends, because the inode item and the running
        transaction are not consistent before then.
        """
        args = (inode, fh, mode, offset, length)
        steps = None
        if self.long_request is None:
            steps = _run_request(self, CowtreeOperations.fallocate_start, args, mutating=True)
            if steps is None:
                return None
        if self.nursery is None or not hasattr(_fuse_ops, "defer_reply"):
            # Without a trio loop, or with an extension built before defer_reply
            # existed, the pieces run here, and no long request can be running.
            while self.advance_fallocate(steps, args):
                pass
            return None
        reply = _fuse_ops.defer_reply()
        if steps is not None:
            self.long_request = trio.Event()
        self.nursery.start_soon(self.finish_fallocate, reply, steps, args)
        return None

    def fallocate_start(self, inode, fh, mode, offset, length):
        """Run the checks and the first piece of a fallocate; return the steps left, or None when it is done."""
        # The kernel returns EBADF itself for a handle opened without write access.
        handle = self.handle_of(fh)
        steps = handle.fs.fallocate_steps(handle.ino, mode, offset, length)
        for _ in steps:
            return steps
        return None

    def advance_fallocate(self, steps, args) -> bool:
        """Write the next piece of a fallocate; return False once it is done.  Errors raise pyfuse3.FUSEError."""
        try:
            next(steps)
        except StopIteration:
            return False
        except Exception as exc:
            # The earlier pieces changed the running transaction, so as for
            # any request that fails half-way, errno_of aborts it.
            raise pyfuse3.FUSEError(self.errno_of("fallocate", args, exc, True)) from None
        return True

    async def finish_fallocate(self, reply, steps, args) -> None:
        """Run the rest of a fallocate, letting other requests run between two pieces, then send its reply."""
        err = errno.EIO
        try:
            if steps is None:
                # Another fallocate was running in pieces when this one arrived.
                await self.wait_for_long_request()
                steps = _run_request(self, CowtreeOperations.fallocate_start, args, mutating=True)
                if steps is not None:
                    self.long_request = trio.Event()
            if steps is not None:
                # Shielded, because a fallocate stopped half-way would leave a
                # stale inode item that the next commit would write.
                with trio.CancelScope(shield=True):
                    try:
                        await trio.sleep(0)
                        while self.advance_fallocate(steps, args):
                            await trio.sleep(0)
                    finally:
                        event, self.long_request = self.long_request, None
                        event.set()
            err = 0
        except pyfuse3.FUSEError as exc:
            err = exc.errno
        finally:
            reply.send(err)

    async def wait_for_long_request(self) -> None:
        """Wait until no fallocate runs in pieces."""
        while self.long_request is not None:
            await self.long_request.wait()

    # -- directories -----------------------------------------------------------------

    @_fuse_operation(mutating=False)
    def opendir(self, inode, ctx):
        if inode == SNAPSHOTS_DIR and self.show_snapshots:
            return inode
        fs, ino = self.resolve(inode)
        if not fs.get_inode(ino).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_fuse_operation(mutating=False)
    def readdir(self, fh, start_id, token):
        # Offsets: "." is 1, ".." is 2, and an entry's offset is its DIR_INDEX
        # offset plus 2 (DIR_INDEX offsets start at 2 and are never reused),
        # so a listing resumes at the right entry while the directory changes.
        if fh == SNAPSHOTS_DIR:
            self.readdir_snapshots(start_id, token)
            return
        fs, dir_ino = self.resolve(fh)
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", self.attributes(fs, dir_ino), 1):
                return
        if start_id < 2:
            if fs is not self.fs and dir_ino == ROOT_INO:
                parent = self.snapshots_dir_attributes()
            else:
                parent = self.attributes(fs, fs.parent_of(dir_ino))
            if not pyfuse3.readdir_reply(token, b"..", parent, 2):
                return
        for index, name, ino, _dtype in fs.readdir(dir_ino, after=max(start_id - 2, 0)):
            if self.is_snapshots_entry(fs, dir_ino, name):
                continue   # hidden by the virtual directory, which readdir does not list
            try:
                attr = self.attributes(fs, ino)
            except (CorruptionError, FileNotFoundError) as exc:
                log.error("readdir of inode %d: skipping entry %r: %s", dir_ino, name, exc)
                continue
            if not pyfuse3.readdir_reply(token, name, attr, index + 2):
                return
            self.remember(attr)

    def readdir_snapshots(self, start_id: int, token) -> None:
        """List .snapshots; a snapshot's offset is its tree id (at least 256)."""
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", self.snapshots_dir_attributes(), 1):
                return
        if start_id < 2:
            if not pyfuse3.readdir_reply(token, b"..", self.attributes(self.fs, ROOT_INO), 2):
                return
        for name, tree_id in sorted(self.snapshot_names.items(), key=lambda pair: pair[1]):
            if tree_id <= start_id:
                continue
            attr = self.attributes(self.snapshots[tree_id], ROOT_INO)
            if not pyfuse3.readdir_reply(token, name, attr, tree_id):
                return
            self.remember(attr)

    @_fuse_operation(mutating=False)
    def releasedir(self, fh):
        return None

    @_fuse_operation(mutating=True)
    def fsyncdir(self, fh, datasync):
        self.commit()

    # -- the filesystem --------------------------------------------------------------

    @_fuse_operation(mutating=False)
    def statfs(self, ctx):
        stats = pyfuse3.StatvfsData()
        block = ondisk.BLOCK_SIZE
        used = self.vol.bytes_used + self.vol.pending_bytes()
        limit = self.vol.sb.size_limit
        if limit:
            free = max(0, limit - used)
        else:
            # Without a size limit the image grows into the host filesystem.
            host = os.statvfs(os.path.dirname(os.path.abspath(self.vol.path)))
            free = host.f_bavail * host.f_frsize
        stats.f_bsize = block
        stats.f_frsize = block
        stats.f_blocks = (used + free) // block
        stats.f_bfree = free // block
        stats.f_bavail = free // block
        # Inodes are items in the tree, limited only by space.
        stats.f_files = stats.f_blocks
        stats.f_ffree = stats.f_bfree
        stats.f_favail = stats.f_bfree
        stats.f_namemax = ondisk.NAME_MAX
        return stats

    # -- extended attributes ---------------------------------------------------------

    @_fuse_operation(mutating=True)
    def setxattr(self, inode, name, value, ctx):
        # pyfuse3 handles XATTR_CREATE and XATTR_REPLACE by calling getxattr first.
        reject_acl(name)
        fs, ino = self.writable_fs(inode)
        fs.setxattr(ino, name, value)

    @_fuse_operation(mutating=False)
    def getxattr(self, inode, name, ctx):
        # pyfuse3 replies to the size probe (size 0) itself and returns ERANGE
        # when the caller's buffer is too small.
        reject_acl(name)
        if inode == SNAPSHOTS_DIR:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        fs, ino = self.resolve(inode)
        return fs.getxattr(ino, name)

    @_fuse_operation(mutating=False)
    def listxattr(self, inode, ctx):
        if inode == SNAPSHOTS_DIR:
            return []
        fs, ino = self.resolve(inode)
        return fs.listxattr(ino)

    @_fuse_operation(mutating=True)
    def removexattr(self, inode, name, ctx):
        fs, ino = self.writable_fs(inode)
        fs.removexattr(ino, name)

    # -- commits ---------------------------------------------------------------------

    def commit(self) -> None:
        """Commit the running transaction if anything changed."""
        if self.readonly or not self.vol.has_changes():
            return
        generation = self.vol.commit()
        log.debug("committed generation %d", generation)

    def free_orphans(self) -> int:
        """Free inodes that were unlinked while open when the last mount ended; return how many."""
        if self.readonly:
            return 0
        orphans = self.fs.orphans()
        for ino in orphans:
            self.fs.free_inode(ino)
        if orphans:
            log.info("freed %d unlinked inodes left open by the last mount", len(orphans))
            self.vol.commit()
        return len(orphans)


def reject_acl(name: bytes) -> None:
    """Raise EOPNOTSUPP for the POSIX ACL xattrs, which this mount does not implement.

    Stored as plain xattrs, they would be ignored by permission checks and
    would not change the mode, so `cp -a` and `tar --acls` would silently
    lose permissions.  With EOPNOTSUPP those tools fall back to chmod(2).
    """
    if name in ACL_XATTRS:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)


# -- mounting ----------------------------------------------------------------------------

def seek_and_fallocate_supported() -> bool:
    """Return True when the FUSE session has cowtree's lseek and fallocate handlers (see cowtree._fuse_ops)."""
    return _fuse_ops is not None and _fuse_ops.interposed()


def split_image_spec(spec: str) -> tuple[str, str | None]:
    """Split IMAGE[@SNAPSHOT] into the image path and the snapshot name (or None).

    A path that exists as given is taken whole, so image names containing
    "@" still work; snapshot names never contain "@".
    """
    if os.path.exists(spec) or "@" not in spec:
        return spec, None
    path, _, name = spec.rpartition("@")
    return path, name


@dataclasses.dataclass
class MountOptions:
    """The settings of one `cowtree mount` request."""

    image: str
    mountpoint: str
    snapshot: str | None = None
    readonly: bool = False
    allow_other: bool = False
    commit_interval: float = DEFAULT_COMMIT_INTERVAL


class Mount:
    """An image opened and mounted at a mountpoint, not yet serving requests."""

    def __init__(self, options: MountOptions):
        self.options = options
        if not os.path.isdir(options.mountpoint):
            raise NotADirectory(f"mountpoint {options.mountpoint}: not a directory")
        if not math.isfinite(options.commit_interval) or options.commit_interval <= 0:
            raise ValueError(f"invalid commit interval {options.commit_interval}: must be a finite number of "
                             f"seconds above 0")
        name = options.snapshot.encode("utf-8", "surrogateescape") if options.snapshot else None
        readonly = options.readonly
        base_override = os.environ.get("COWTREE_BASE") or None   # the CLI's global --base
        if name and not readonly:
            # A read-only snapshot mounts read-only and needs only the shared lock.
            probe = open_image(options.image, writable=False, base=base_override)
            try:
                readonly = find(probe, name).readonly
            finally:
                probe.close()
        self.volume = open_image(options.image, writable=not readonly, base=base_override)
        try:
            sub = find(self.volume, name)
            fs = FileSystem(self.volume, sub.tree_id, readonly=readonly or sub.readonly,
                            label=options.image if name is None else f"{options.image}@{options.snapshot}")
            self.ops = CowtreeOperations(self.volume, fs, show_snapshots=name is None)
            self.ops.free_orphans()
            fuse_options = set(pyfuse3.default_options)
            fuse_options.add(f"fsname={os.path.abspath(options.image)}")
            fuse_options.add("subtype=cowtree")
            if fs.readonly:
                fuse_options.add("ro")
            if options.allow_other:
                fuse_options.add("allow_other")
            if _fuse_ops is not None:
                _fuse_ops.set_handlers(self.ops.lseek, self.ops.fallocate)
            # From here on a stop signal is recorded until serve() handles it,
            # so it cannot kill the process and leave a dead mount behind.
            self.stop_signal: int | None = None
            self.previous_handlers = {signum: signal.signal(signum, self._record_signal) for signum in STOP_SIGNALS}
            try:
                pyfuse3.init(self.ops, options.mountpoint, fuse_options)
            except BaseException:
                self.restore_signal_handlers()
                raise
        except BaseException:
            self.volume.close()
            raise
        self.mountpoint = os.path.abspath(options.mountpoint)
        self.detached = False
        if not seek_and_fallocate_supported():
            reason = _FUSE_OPS_MISSING or "pyfuse3 did not create its session through cowtree._fuse_ops"
            log.warning("%s: SEEK_DATA and SEEK_HOLE report the whole file as data, and fallocate fails with "
                        "EOPNOTSUPP, because %s", options.mountpoint, reason)
        log.info("mounted %s at %s (%s, generation %d)", fs.label, options.mountpoint,
                 "read-only" if fs.readonly else "read-write", self.volume.generation)

    def _record_signal(self, signum: int, frame) -> None:
        """Remember the first stop signal that arrives outside the trio loop."""
        if self.stop_signal is None:
            self.stop_signal = signum

    def restore_signal_handlers(self) -> None:
        """Put back the signal handlers that were in place before this mount."""
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)

    def serve(self) -> None:
        """Serve requests until the filesystem is unmounted or a stop signal arrives, then commit and close.

        On SIGINT, SIGTERM or SIGHUP the mountpoint is detached (as with
        ``umount -l``), requests that are being handled finish, the running
        transaction is committed and the session closes.  Processes that
        still have files open inside get ENOTCONN from then on.
        """
        # The loop ends by itself only when the kernel has closed the
        # connection, and then close() must not unmount again.
        unmount = True
        try:
            trio.run(self._main)
            unmount = self.stop_signal is not None and not self.detached
        finally:
            try:
                self.ops.commit()
            finally:
                pyfuse3.close(unmount=unmount)
                if _fuse_ops is not None:
                    _fuse_ops.set_handlers(None, None)
                self.volume.close()
                self.restore_signal_handlers()
        log.info("unmounted %s at generation %d", self.options.mountpoint, self.volume.generation)

    async def _main(self) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            # Long fallocate requests finish in this nursery, which outlives
            # pyfuse3.main(), so they reply before the final commit.
            try:
                async with trio.open_nursery() as requests:
                    self.ops.nursery = requests
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._commit_periodically)
                        nursery.start_soon(self._stop_on_signal, signals)
                        await pyfuse3.main()
                        nursery.cancel_scope.cancel()
            finally:
                self.ops.nursery = None

    async def _commit_periodically(self) -> None:
        while True:
            await trio.sleep(self.options.commit_interval)
            await self.ops.wait_for_long_request()
            try:
                self.ops.commit()
            except Exception as exc:
                self.ops.errno_of("commit", (), exc, mutating=True)

    def _detach(self) -> None:
        """Detach the mountpoint lazily with fusermount3 -u -z.  On failure, close() unmounts it later."""
        try:
            umount(self.mountpoint, lazy=True)
        except MountError as exc:
            log.error("detaching %s failed (%s); unmounting it when the session closes", self.mountpoint, exc)
            return
        self.detached = True

    async def _stop_on_signal(self, signals) -> None:
        """Wait for a stop signal (or take the one recorded before the loop started), then stop serving."""
        if self.stop_signal is None:
            async for signum in signals:
                self.stop_signal = signum
                break
        log.info("received %s: unmounting %s", signal.Signals(self.stop_signal).name, self.options.mountpoint)

        # Detach first, so that new path lookups no longer reach this mount.
        # Processes with files open inside keep the connection, and their
        # requests are served while fusermount3 runs.
        await trio.to_thread.run_sync(self._detach)

        # Stop reading requests.  pyfuse3.main() returns once the requests
        # that are being handled have replied.
        pyfuse3.terminate()
        async for signum in signals:
            log.info("received %s while unmounting; already stopping", signal.Signals(signum).name)


def mount(options: MountOptions, foreground: bool = False) -> None:
    """Mount an image; without foreground, return once the mount works and serve from a daemon.

    The image is opened and mounted in the calling process, so a failure
    raises here with its own error class in both modes.  Only then does the
    daemon fork: it inherits the image's lock (flock locks belong to the
    open file, which both processes share) and the FUSE session.
    """
    mounted = Mount(options)
    if foreground:
        mounted.serve()
        return
    if os.fork():
        # The daemon serves the mount.  This process must not close the
        # session or the image; exiting only drops its copies of the descriptors.
        mounted.restore_signal_handlers()
        return
    exit_status = 1
    try:
        os.setsid()
        _detach_stdio()
        mounted.serve()
        exit_status = 0
    except BaseException:   # noqa: B902 - the daemon must never return into the caller's code
        log.exception("mount process for %s failed", options.mountpoint)
    finally:
        os._exit(exit_status)


class MountError(CowtreeError):
    """Unmounting failed; the message is fusermount3's."""


def _detach_stdio() -> None:
    """Point stdin, stdout and stderr at /dev/null and send logs to syslog when it exists."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
            root.removeHandler(handler)
    if os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler
        root.addHandler(SysLogHandler(address="/dev/log"))


def umount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount a FUSE mount with fusermount3; raise MountError with its message on failure."""
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise MountError("fusermount3 not found: install the fuse3 package") from None
    if result.returncode:
        raise MountError(result.stderr.strip() or f"fusermount3 -u {mountpoint} failed")
