"""Copying files and trees between the host and images, and between images.

One walker, :class:`Copier`, drives every direction.  A source
(:class:`HostSource`, :class:`ImageSource`) lists directories and yields
file data without its holes; a sink (:class:`HostSink`, :class:`ImageSink`)
creates entries.  A handle is a host path for HostSource, a directory file
descriptor for HostSink and an inode number on the image side, so a walk
never resolves a path twice.

Copying out never writes outside the destination:

- every name read from an image is checked (not empty, not ``.`` or ``..``,
  no ``/`` or NUL) before it is used;
- below the destination directory every entry is created or opened
  relative to its parent's descriptor, and directories are opened with
  ``O_NOFOLLOW``, so the copy never follows a symlink that it created or
  found in the destination tree.  A file that already exists is opened for
  writing only after ``lstat`` shows a regular file, and with ``O_NOFOLLOW``.

NOTE: only the destination path given on the command line is resolved the
usual way, following symlinks; that is the caller's choice of target.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import logging
import os
import stat as stat_module
import sys
import time

from . import ondisk
from .errors import CorruptionError, CowtreeError, NotADirectory
from .operands import CommandError

log = logging.getLogger(__name__)

CHUNK = 4 << 20                      # bytes read and written at a time
ERRORS = (OSError, CowtreeError)     # failures reported as "cannot ... 'operand'"

S_IFMT = 0o170000
S_IFDIR = stat_module.S_IFDIR
S_IFREG = stat_module.S_IFREG
S_IFLNK = stat_module.S_IFLNK
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
O_NOFOLLOW = os.O_NOFOLLOW
INLINE = ondisk.FILE_EXTENT_INLINE


@dataclasses.dataclass(slots=True)
class Meta:
    """What a copy needs to know of one source entry."""

    mode: int
    uid: int
    gid: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    link_key: tuple | None      # identity shared by hard links; None for directories and single links
    sparse: bool = True         # the data may have holes worth looking for


@dataclasses.dataclass
class CopyOptions:
    """The cp flags that change what a copy does."""

    recursive: bool = False
    preserve: bool = False      # -a: modes, owners, times, symlinks, hard links, xattrs
    excludes: tuple = ()        # fnmatch patterns matched against each entry name
    reflink: str = "auto"       # share data extents inside one image: "auto", "always" or "never"


class CopyConflict(Exception):
    """The destination has an entry of a kind the copy cannot replace."""

    def __init__(self, existing_is_dir: bool):
        super().__init__("directory" if existing_is_dir else "non-directory")
        self.existing_is_dir = existing_is_dir


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def join_text(parent: str, name: str) -> str:
    """Join a display path and a name without doubling the slash."""
    return parent + name if parent.endswith("/") else parent + "/" + name


def check_image_name(name: bytes, dir_ino: int) -> None:
    """Raise CorruptionError unless name from directory dir_ino is a safe single path component."""
    if not name or name == b"." or name == b".." or b"/" in name or b"\0" in name:
        raise CorruptionError("directory entry", f"in directory inode {dir_ino}", f"invalid name {name!r}")


# ---------------------------------------------------------------------------
# Sources


class HostSource:
    """Entries of the host's filesystem, named by path."""

    kind = "host"

    def __init__(self, skip: set | frozenset = frozenset(), warn=None):
        self.skip = skip                 # (st_dev, st_ino) of files to leave out: the open images
        self.warn = warn

    def top(self, path: str, follow: bool):
        """Return (handle, Meta) of a command-line operand."""
        if follow:
            path = os.path.realpath(path)
        st = os.stat(path) if follow else os.lstat(path)
        return path, meta_from_stat(st)

    def children(self, path: str):
        with os.scandir(path) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) in self.skip:
                    if self.warn is not None:
                        self.warn(f"skipping '{entry.path}': it is an image this command has open")
                    continue
                yield os.fsencode(entry.name), entry.path, meta_from_stat(st)

    def chunks(self, path: str, meta: Meta):
        """Yield (offset, data) for the file's data; holes are left out."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | O_NOFOLLOW)
        try:
            if meta.sparse:
                yield from _read_ranges(fd, _data_ranges(fd, meta.size))
                return
            offset = 0
            remaining = meta.size
            while True:
                data = os.read(fd, min(CHUNK, remaining) if remaining > 0 else 65536)
                if not data:
                    return
                yield offset, data
                offset += len(data)
                remaining -= len(data)
        finally:
            os.close(fd)

    def readlink(self, path: str) -> bytes:
        return os.readlink(os.fsencode(path))

    def xattrs(self, path: str) -> list[tuple[bytes, bytes]]:
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM):
                return []
            raise
        return [(os.fsencode(name), os.getxattr(path, name, follow_symlinks=False)) for name in names]


def meta_from_stat(st: os.stat_result) -> Meta:
    mode = st.st_mode
    link_key = None
    if st.st_nlink > 1 and mode & S_IFMT != S_IFDIR:
        link_key = ("host", st.st_dev, st.st_ino)
    return Meta(mode, st.st_uid, st.st_gid, st.st_size, st.st_rdev, st.st_atime_ns, st.st_mtime_ns,
                link_key, st.st_blocks * 512 < st.st_size)


def _data_ranges(fd: int, size: int):
    """Yield (start, end) of each data range of fd below size, found with SEEK_DATA and SEEK_HOLE."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return                    # only a hole is left
            if exc.errno == errno.EINVAL and position == 0:
                yield 0, size             # the host filesystem cannot report holes
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        position = end


def _read_ranges(fd: int, ranges):
    for start, end in ranges:
        position = start
        while position < end:
            data = os.pread(fd, min(CHUNK, end - position), position)
            if not data:
                return                    # the file shrank while being copied
            yield position, data
            position += len(data)


class ImageSource:
    """Entries of one image filesystem, named by inode number."""

    kind = "image"

    def __init__(self, fs):
        self.fs = fs

    def top(self, path: bytes, follow: bool):
        fs = self.fs
        ino = fs.resolve(path, follow=follow)
        inode = fs.get_inode(ino)
        if path.endswith(b"/") and not inode.is_dir:
            raise NotADirectory("Not a directory")
        return ino, self.meta(inode)

    def meta(self, inode) -> Meta:
        link_key = None
        if inode.nlink > 1 and not inode.is_dir:
            link_key = (id(self.fs), inode.ino)
        return Meta(inode.mode, inode.uid, inode.gid, inode.size, inode.rdev, inode.atime_ns, inode.mtime_ns,
                    link_key)

    def children(self, ino: int):
        fs = self.fs
        for _index, name, child, _dtype in fs.readdir(ino):
            check_image_name(name, ino)
            yield name, child, self.meta(fs.get_inode(child))

    def chunks(self, ino: int, meta: Meta):
        """Yield (offset, data) for each data extent below the file's size; holes are left out."""
        size = meta.size
        read_data = self.fs.vol.read_data
        for extent in self.fs.extents(ino):
            if extent.offset >= size:
                return
            if extent.kind == INLINE:
                data = extent.inline[:size - extent.offset]
                if data:
                    yield extent.offset, data
                continue
            if not extent.disk_addr:
                continue                  # a hole kept as an item
            end = min(extent.end, size)
            position = extent.offset
            while position < end:
                length = min(CHUNK, end - position)
                yield position, read_data(extent.disk_addr, extent.layer,
                                          extent.extent_offset + position - extent.offset, length,
                                          context=f" (inode {ino}, file offset {position})")
                position += length

    def readlink(self, ino: int) -> bytes:
        return self.fs.readlink(ino)

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        fs = self.fs
        return [(name, fs.getxattr(ino, name)) for name in fs.listxattr(ino)]


# ---------------------------------------------------------------------------
# Sinks


class HostSink:
    """Creates entries on the host, each relative to its parent's descriptor."""

    kind = "host"

    def __init__(self, options: CopyOptions, warn):
        self.preserve = options.preserve
        self.umask = current_umask()
        self.warn = warn

    # -- the command-line destination --------------------------------------

    def probe(self, path: str):
        """Return 'dir', 'other' or None for the destination operand, following symlinks."""
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG):
                return None               # creating it reports the error, if any
            raise
        return "dir" if stat_module.S_ISDIR(st.st_mode) else "other"

    def open_dir(self, path: str) -> int:
        return os.open(path or ".", O_DIR)

    def close_dir(self, fd: int) -> None:
        os.close(fd)

    def inode_of(self, parent_fd: int, name: bytes):
        return None

    # -- entries ----------------------------------------------------------

    def _clear(self, parent_fd: int, name: bytes, fresh: bool) -> None:
        """Remove a non-directory at name so that a new entry can take its place."""
        if fresh:
            return
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat_module.S_ISDIR(st.st_mode):
            raise CopyConflict(existing_is_dir=True)
        os.unlink(name, dir_fd=parent_fd)

    def make_dir(self, parent_fd: int, name: bytes, meta: Meta, fresh: bool):
        """Create or open directory name; return (fd, created)."""
        created = True
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            if fresh:
                raise
            created = False
        try:
            fd = os.open(name, O_DIR | O_NOFOLLOW, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CopyConflict(existing_is_dir=False) from exc
            raise
        return fd, created

    def finish_dir(self, fd: int, meta: Meta, created: bool, xattrs, text: str) -> None:
        if self.preserve:
            self._chown(fd, meta)
            os.fchmod(fd, meta.mode & 0o7777)
            self._set_xattrs(fd, xattrs, text)
            os.utime(fd, ns=(meta.atime_ns, meta.mtime_ns))
        elif created:
            os.fchmod(fd, meta.mode & 0o777 & ~self.umask)

    def create_file(self, parent_fd: int, name: bytes, meta: Meta, fresh: bool) -> "HostWriter":
        flags = os.O_WRONLY | os.O_CLOEXEC | O_NOFOLLOW
        if not fresh:
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if stat_module.S_ISDIR(st.st_mode):
                    raise CopyConflict(existing_is_dir=True)
                if stat_module.S_ISREG(st.st_mode):
                    return HostWriter(self, os.open(name, flags | os.O_TRUNC, dir_fd=parent_fd))
                os.unlink(name, dir_fd=parent_fd)
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, meta.mode & 0o777, dir_fd=parent_fd)
        return HostWriter(self, fd)

    def symlink(self, parent_fd: int, name: bytes, target: bytes, meta: Meta, fresh: bool, text: str):
        self._clear(parent_fd, name, fresh)
        os.symlink(target, name, dir_fd=parent_fd)
        if self.preserve:
            try:
                os.chown(name, meta.uid, meta.gid, dir_fd=parent_fd, follow_symlinks=False)
            except PermissionError:
                pass
            os.utime(name, ns=(meta.atime_ns, meta.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
        return os.fsencode(text)

    def hardlink(self, parent_fd: int, name: bytes, existing, fresh: bool) -> None:
        self._clear(parent_fd, name, fresh)
        os.link(existing, name, dst_dir_fd=parent_fd, follow_symlinks=False)

    def special(self, parent_fd: int, name: bytes, meta: Meta, fresh: bool, text: str):
        self._clear(parent_fd, name, fresh)
        mode = meta.mode & S_IFMT | (meta.mode & 0o7777 if self.preserve else meta.mode & 0o777)
        os.mknod(name, mode, meta.rdev, dir_fd=parent_fd)
        if self.preserve:
            try:
                os.chown(name, meta.uid, meta.gid, dir_fd=parent_fd, follow_symlinks=False)
            except PermissionError:
                pass
            os.utime(name, ns=(meta.atime_ns, meta.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
        return os.fsencode(text)

    # -- attributes -------------------------------------------------------

    def _chown(self, fd: int, meta: Meta) -> None:
        try:
            os.fchown(fd, meta.uid, meta.gid)
        except PermissionError:
            pass                          # as cp -a does for a user who may not give files away

    def _set_xattrs(self, fd: int, xattrs, text: str) -> None:
        for name, value in xattrs:
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                self.warn(f"cannot preserve extended attribute '{os.fsdecode(name)}' of '{text}': "
                          f"{exc.strerror}")


class HostWriter:
    """A host file being written by a copy."""

    __slots__ = ("sink", "fd", "end")

    def __init__(self, sink: HostSink, fd: int):
        self.sink = sink
        self.fd = fd
        self.end = 0

    def write(self, offset: int, data) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            offset += written
            view = view[written:]
        self.end = max(self.end, offset)

    def finish(self, meta: Meta, xattrs, text: str) -> None:
        fd = self.fd
        if self.end < meta.size:
            os.ftruncate(fd, meta.size)
        sink = self.sink
        if sink.preserve:
            sink._chown(fd, meta)
            os.fchmod(fd, meta.mode & 0o7777)
            sink._set_xattrs(fd, xattrs, text)
            os.utime(fd, ns=(meta.atime_ns, meta.mtime_ns))

    def close(self) -> None:
        os.close(self.fd)


class ImageSink:
    """Creates entries in one image filesystem, inside its running transaction."""

    kind = "image"

    def __init__(self, fs, options: CopyOptions):
        self.fs = fs
        self.preserve = options.preserve
        self.umask = current_umask()
        self.uid = os.getuid()
        self.gid = os.getgid()

    # -- the command-line destination --------------------------------------

    def probe(self, path: bytes):
        fs = self.fs
        try:
            ino = fs.resolve(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG):
                return None               # creating it reports the error, if any
            raise
        return "dir" if fs.get_inode(ino).is_dir else "other"

    def open_dir(self, path: bytes) -> int:
        fs = self.fs
        ino = fs.resolve(path or b"/")
        if not fs.get_inode(ino).is_dir:
            raise NotADirectory("Not a directory")
        return ino

    def close_dir(self, ino: int) -> None:
        pass

    def inode_of(self, dir_ino: int, name: bytes):
        try:
            return self.fs.lookup(dir_ino, name)
        except FileNotFoundError:
            return None

    # -- entries ----------------------------------------------------------

    def _owner(self, meta: Meta) -> tuple[int, int]:
        return (meta.uid, meta.gid) if self.preserve else (self.uid, self.gid)

    def _mode(self, meta: Meta) -> int:
        return meta.mode & 0o7777 if self.preserve else meta.mode & 0o777 & ~self.umask

    def _clear(self, dir_ino: int, name: bytes, fresh: bool) -> None:
        if fresh:
            return
        ino = self.inode_of(dir_ino, name)
        if ino is None:
            return
        if self.fs.get_inode(ino).is_dir:
            raise CopyConflict(existing_is_dir=True)
        self.fs.unlink(dir_ino, name)

    def make_dir(self, dir_ino: int, name: bytes, meta: Meta, fresh: bool):
        fs = self.fs
        if not fresh:
            ino = self.inode_of(dir_ino, name)
            if ino is not None:
                if not fs.get_inode(ino).is_dir:
                    raise CopyConflict(existing_is_dir=False)
                return ino, False
        uid, gid = self._owner(meta)
        return fs.mkdir(dir_ino, name, self._mode(meta), uid, gid).ino, True

    def finish_dir(self, ino: int, meta: Meta, created: bool, xattrs, text: str) -> None:
        if self.preserve:
            for name, value in xattrs:
                self.fs.setxattr(ino, name, value)
            self.fs.setattr(ino, mode=meta.mode, uid=meta.uid, gid=meta.gid, atime_ns=meta.atime_ns,
                            mtime_ns=meta.mtime_ns)

    def create_file(self, dir_ino: int, name: bytes, meta: Meta, fresh: bool) -> "ImageWriter":
        fs = self.fs
        if not fresh:
            ino = self.inode_of(dir_ino, name)
            if ino is not None:
                inode = fs.get_inode(ino)
                if inode.is_dir:
                    raise CopyConflict(existing_is_dir=True)
                if inode.is_reg:
                    fs.truncate(ino, 0)
                    return ImageWriter(self, ino)
                fs.unlink(dir_ino, name)
        uid, gid = self._owner(meta)
        return ImageWriter(self, fs.mknod(dir_ino, name, S_IFREG | self._mode(meta), uid, gid).ino)

    def symlink(self, dir_ino: int, name: bytes, target: bytes, meta: Meta, fresh: bool, text: str):
        self._clear(dir_ino, name, fresh)
        uid, gid = self._owner(meta)
        ino = self.fs.symlink(dir_ino, name, target, uid, gid).ino
        if self.preserve:
            self.fs.setattr(ino, atime_ns=meta.atime_ns, mtime_ns=meta.mtime_ns)
        return ino

    def hardlink(self, dir_ino: int, name: bytes, existing: int, fresh: bool) -> None:
        self._clear(dir_ino, name, fresh)
        self.fs.link(existing, dir_ino, name)

    def special(self, dir_ino: int, name: bytes, meta: Meta, fresh: bool, text: str):
        self._clear(dir_ino, name, fresh)
        uid, gid = self._owner(meta)
        inode = self.fs.mknod(dir_ino, name, meta.mode & S_IFMT | self._mode(meta), uid, gid, meta.rdev)
        if self.preserve:
            self.fs.setattr(inode.ino, atime_ns=meta.atime_ns, mtime_ns=meta.mtime_ns)
        return inode.ino


class ImageWriter:
    """An image file being written by a copy."""

    __slots__ = ("sink", "ino", "end")

    def __init__(self, sink: ImageSink, ino: int):
        self.sink = sink
        self.ino = ino
        self.end = 0

    def write(self, offset: int, data) -> None:
        self.sink.fs.write(self.ino, offset, data)
        self.end = max(self.end, offset + len(data))

    def finish(self, meta: Meta, xattrs, text: str) -> None:
        fs = self.sink.fs
        if self.end < meta.size:
            fs.truncate(self.ino, meta.size)
        if self.sink.preserve:
            for name, value in xattrs:
                fs.setxattr(self.ino, name, value)
            fs.setattr(self.ino, mode=meta.mode, uid=meta.uid, gid=meta.gid, atime_ns=meta.atime_ns,
                       mtime_ns=meta.mtime_ns)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------
# The walker


class Progress:
    """A one-line progress report on stderr, shown only on a terminal and after the first second."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.files = 0
        self.bytes = 0
        self.start = time.monotonic()
        self.next_draw = self.start + 1.0
        self.drawn = False

    def add(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes
        if self.enabled:
            now = time.monotonic()
            if now >= self.next_draw:
                self.next_draw = now + 0.2
                self.drawn = True
                sys.stderr.write(f"\rcopied {self.files} files, {self.bytes / (1 << 20):.1f} MiB ")
                sys.stderr.flush()

    def done(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


class Copier:
    """Copies entries from one source to one sink."""

    def __init__(self, source, sink, options: CopyOptions, progress: Progress):
        self.source = source
        self.sink = sink
        self.preserve = options.preserve
        self.excludes = options.excludes
        self.options = options
        self.progress = progress
        self.links: dict[tuple, object] = {}     # link key -> what sink.hardlink needs

    def copy(self, handle, meta: Meta, parent, name: bytes, src_text: str, dst_text: str, fresh: bool) -> None:
        """Copy one entry, and for a directory its whole tree, to name in directory parent.

        fresh says that parent was created by this copy, so name cannot exist yet.
        """
        kind = meta.mode & S_IFMT
        if kind == S_IFDIR:
            self._copy_dir(handle, meta, parent, name, src_text, dst_text, fresh)
            return
        key = meta.link_key if self.preserve else None
        if key is not None:
            existing = self.links.get(key)
            if existing is not None:
                try:
                    self.sink.hardlink(parent, name, existing, fresh)
                except CopyConflict:
                    raise CommandError(None, dst_text,
                                       message=f"cannot overwrite directory '{dst_text}' with non-directory")
                except ERRORS as exc:
                    raise CommandError("cannot create hard link", dst_text, exc) from exc
                self.progress.add(0)
                return
        if kind == S_IFREG:
            link = self._copy_file(handle, meta, parent, name, src_text, dst_text, fresh)
        elif kind == S_IFLNK:
            link = self._copy_symlink(handle, meta, parent, name, src_text, dst_text, fresh)
        else:
            link = self._copy_special(meta, parent, name, dst_text, fresh)
        if key is not None:
            self.links[key] = link

    def _xattrs(self, handle, src_text: str):
        if not self.preserve:
            return ()
        try:
            return self.source.xattrs(handle)
        except ERRORS as exc:
            raise CommandError("cannot read extended attributes of", src_text, exc) from exc

    def _copy_dir(self, handle, meta, parent, name, src_text, dst_text, fresh) -> None:
        sink = self.sink
        try:
            dir_handle, created = sink.make_dir(parent, name, meta, fresh)
        except CopyConflict:
            raise CommandError(None, dst_text, message=f"cannot overwrite non-directory '{dst_text}' "
                                                       f"with directory '{src_text}'") from None
        except ERRORS as exc:
            raise CommandError("cannot create directory", dst_text, exc) from exc
        try:
            self.copy_children(handle, dir_handle, src_text, dst_text, created)
            self.finish_dir(handle, dir_handle, meta, created, src_text, dst_text)
        finally:
            sink.close_dir(dir_handle)

    def finish_dir(self, handle, dir_handle, meta, created, src_text, dst_text) -> None:
        """Set a directory's attributes, after its contents, so that its times stay."""
        xattrs = self._xattrs(handle, src_text)
        try:
            self.sink.finish_dir(dir_handle, meta, created, xattrs, dst_text)
        except ERRORS as exc:
            raise CommandError("cannot set the attributes of", dst_text, exc) from exc

    def copy_children(self, handle, dir_handle, src_text: str, dst_text: str, fresh: bool) -> None:
        """Copy every entry of source directory handle into sink directory dir_handle."""
        entries = self.source.children(handle)
        excludes = self.excludes
        try:
            while True:
                try:
                    item = next(entries, None)
                except ERRORS as exc:
                    raise CommandError("cannot access", src_text, exc) from exc
                if item is None:
                    return
                name, child, meta = item
                text = os.fsdecode(name)
                if excludes and any(fnmatch.fnmatchcase(text, pattern) for pattern in excludes):
                    continue
                self.copy(child, meta, dir_handle, name, join_text(src_text, text), join_text(dst_text, text),
                          fresh)
        finally:
            entries.close()

    def _copy_file(self, handle, meta, parent, name, src_text, dst_text, fresh):
        try:
            writer = self.sink.create_file(parent, name, meta, fresh)
        except CopyConflict:
            raise CommandError(None, dst_text,
                               message=f"cannot overwrite directory '{dst_text}' with non-directory") from None
        except ERRORS as exc:
            raise CommandError("cannot create regular file", dst_text, exc) from exc
        if self._can_reflink(src_text, dst_text):
            try:
                try:
                    self.sink.fs.clone_file(self.source.fs, handle, writer.ino)
                except ERRORS as exc:
                    raise CommandError("cannot clone", f"{src_text}' to '{dst_text}", exc) from exc
                xattrs = self._xattrs(handle, src_text)
                try:
                    writer.finish(meta, xattrs, dst_text)
                except ERRORS as exc:
                    raise CommandError("error writing", dst_text, exc) from exc
            finally:
                writer.close()
            return writer.ino
        chunks = self.source.chunks(handle, meta)
        copied = 0
        try:
            while True:
                try:
                    piece = next(chunks, None)
                except ERRORS as exc:
                    raise CommandError("error reading", src_text, exc) from exc
                if piece is None:
                    break
                try:
                    writer.write(piece[0], piece[1])
                except ERRORS as exc:
                    raise CommandError("error writing", dst_text, exc) from exc
                copied += len(piece[1])
            xattrs = self._xattrs(handle, src_text)
            try:
                writer.finish(meta, xattrs, dst_text)
            except ERRORS as exc:
                raise CommandError("error writing", dst_text, exc) from exc
        finally:
            chunks.close()
            writer.close()
        self.progress.add(copied)
        return writer.ino if self.sink.kind == "image" else os.fsencode(dst_text)

    def _can_reflink(self, src_text: str, dst_text: str) -> bool:
        """Return True when the file can share its source's extents (same image, reflink allowed)."""
        mode = self.options.reflink
        same_image = (self.source.kind == "image" and self.sink.kind == "image"
                      and self.source.fs.vol is self.sink.fs.vol)
        if mode == "always" and not same_image:
            raise CommandError("failed to clone", f"{dst_text}' from '{src_text}",
                               message=f"failed to clone '{dst_text}' from '{src_text}': "
                                       f"Invalid cross-device link (reflinks work inside one image only)")
        return same_image and mode != "never"

    def _copy_symlink(self, handle, meta, parent, name, src_text, dst_text, fresh):
        try:
            target = self.source.readlink(handle)
        except ERRORS as exc:
            raise CommandError("cannot read symbolic link", src_text, exc) from exc
        try:
            link = self.sink.symlink(parent, name, target, meta, fresh, dst_text)
        except CopyConflict:
            raise CommandError(None, dst_text,
                               message=f"cannot overwrite directory '{dst_text}' with non-directory") from None
        except ERRORS as exc:
            raise CommandError("cannot create symbolic link", dst_text, exc) from exc
        self.progress.add(0)
        return link

    def _copy_special(self, meta, parent, name, dst_text, fresh):
        try:
            link = self.sink.special(parent, name, meta, fresh, dst_text)
        except CopyConflict:
            raise CommandError(None, dst_text,
                               message=f"cannot overwrite directory '{dst_text}' with non-directory") from None
        except ERRORS as exc:
            raise CommandError("cannot create special file", dst_text, exc) from exc
        self.progress.add(0)
        return link
