"""Exceptions raised by cowtree.

Every error derives from CowtreeError.  Errors about names and files also
derive from the matching builtin (FileNotFoundError, IsADirectoryError, ...)
and carry an errno, so the CLI and the FUSE adapter map them to messages and
error numbers in one place.
"""

from __future__ import annotations

import errno as _errno
import os


class CowtreeError(Exception):
    """Base class of every error cowtree raises on purpose."""

    errno = _errno.EIO


class CorruptionError(CowtreeError):
    """On-disk data failed a check: checksum, address, generation or layout.

    The message names what was read (superblock, node, leaf, data block),
    where it sits (tree, block address, slot) and why it was rejected, with
    the found and expected values where they exist.  It names the affected
    file when the reader knows it, and advises running ``cowtree fsck``.
    """

    errno = _errno.EIO

    def __init__(self, what: str, where: str, why: str, found=None, expected=None, file: str | None = None):
        self.what = what
        self.where = where
        self.why = why
        self.found = found
        self.expected = expected
        self.file = file
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"corrupt {self.what} {self.where}: {self.why}"
        if self.found is not None or self.expected is not None:
            text += f" (found {self.found}, expected {self.expected})"
        if self.file:
            text += f"; affected file: {self.file}"
        return text + "; run 'cowtree fsck IMAGE' to check the whole image"

    def name_file(self, file: str) -> None:
        """Record the file whose read hit the damaged block, replacing a less specific name."""
        self.file = file
        self.args = (self._message(),)


class StreamError(CowtreeError):
    """A send stream is invalid: truncated, damaged, out of order, or made for other content."""

    errno = _errno.EBADMSG


class NotAnImageError(CowtreeError):
    """The file holds no valid cowtree superblock, or is too short."""

    errno = _errno.EINVAL


class UnsupportedFeatureError(CowtreeError):
    """The image uses a format version or feature this version does not know."""

    errno = _errno.EOPNOTSUPP


class ImageInUseError(CowtreeError):
    """Another process holds the image's lock."""

    errno = _errno.EBUSY


class FsError(CowtreeError, OSError):
    """A namespace error with an errno; subclasses fix the errno."""

    errno = _errno.EIO

    def __init__(self, message: str | None = None):
        err = type(self).errno
        text = message or os.strerror(err)
        CowtreeError.__init__(self, text)
        self.args = (text,)
        self.errno = err
        self.strerror = os.strerror(err)

    def __str__(self) -> str:
        return self.args[0]


class NoSpaceError(FsError):
    """No space left on device: the image reached its size limit, or the host disk is full."""
    errno = _errno.ENOSPC


class NotFound(FsError, FileNotFoundError):
    """No such file or directory."""
    errno = _errno.ENOENT


class Exists(FsError, FileExistsError):
    """File exists."""
    errno = _errno.EEXIST


class NotADirectory(FsError, NotADirectoryError):
    """A path component, or the target, is not a directory."""
    errno = _errno.ENOTDIR


class IsADirectory(FsError, IsADirectoryError):
    """The operation needs a non-directory."""
    errno = _errno.EISDIR


class NotEmpty(FsError):
    """Directory not empty."""
    errno = _errno.ENOTEMPTY


class NameTooLong(FsError):
    """A name is longer than 255 bytes."""
    errno = _errno.ENAMETOOLONG


class InvalidArgument(FsError):
    """The request is not valid for this object."""
    errno = _errno.EINVAL


class ReadOnly(FsError):
    """The subvolume or image is read-only."""
    errno = _errno.EROFS


class NoData(FsError):
    """No such extended attribute."""
    errno = _errno.ENODATA


class RangeError(FsError):
    """The caller's buffer is too small for the value."""
    errno = _errno.ERANGE


class TooBig(FsError):
    """The value is larger than the image allows."""
    errno = _errno.E2BIG


class SymlinkLoop(FsError):
    """Too many levels of symbolic links."""
    errno = _errno.ELOOP


class TooManyLinks(FsError):
    """Too many hard links to one inode."""
    errno = _errno.EMLINK


class CrossDevice(FsError):
    """The objects live in different subvolumes or images."""
    errno = _errno.EXDEV


class NoSuchOffset(FsError):
    """No data (SEEK_DATA) or hole (SEEK_HOLE) at or after an offset: it is at or past the end of the file."""
    errno = _errno.ENXIO


class FileTooLarge(FsError):
    """An offset or size is past the largest file size."""
    errno = _errno.EFBIG


class NotSupported(FsError):
    """The operation, or this mode of it, is not supported."""
    errno = _errno.EOPNOTSUPP


class NotPermitted(FsError, PermissionError):
    """Operation not permitted."""
    errno = _errno.EPERM
