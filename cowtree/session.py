"""The images one CLI command works on, each opened once, and their transaction.

A command opens every image it writes first, with an exclusive lock, then
the images it only reads, with a shared lock; an image named twice is opened
once, writable if any use writes it.  :meth:`Session.finish` commits each
writable image once at the end.  On any error :meth:`Session.abort` drops
the running transactions, so every image stays at its last commit
(``Volume.abort`` also cuts the file back to the length it had at open).
"""

from __future__ import annotations

import logging
import os

from . import image as image_module
from .errors import CorruptionError
from .fs import FileSystem
from .operands import CommandError, ImagePath

log = logging.getLogger(__name__)


class OpenImage:
    """One image file opened by a command."""

    def __init__(self, path: str, volume, writable: bool):
        self.path = path
        self.volume = volume
        self.writable = writable
        self.file_size = volume.dev.size()
        self.filesystems: dict[str | None, FileSystem] = {}


class Session:
    """The images of one command; use as a context manager."""

    def __init__(self):
        self.images: dict[tuple[int, int], OpenImage] = {}

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    def open(self, image: str, writable: bool) -> OpenImage:
        """Open the image file at path image, or return it if already open."""
        try:
            st = os.stat(image)
        except OSError as exc:
            raise CommandError("cannot open image", image, exc) from exc
        key = (st.st_dev, st.st_ino)
        opened = self.images.get(key)
        if opened is not None:
            if writable and not opened.writable:
                raise RuntimeError(f"{image} was opened read-only before a writer asked for it")
            return opened
        try:
            volume = image_module.open_image(image, writable=writable, base=os.environ.get("COWTREE_BASE") or None)
        except CorruptionError as exc:
            raise CommandError(None, image, exc) from exc
        except OSError as exc:
            raise CommandError("cannot open image", image, exc) from exc
        opened = OpenImage(image, volume, writable)
        self.images[key] = opened
        log.debug("opened %s %s at generation %d", image, "read-write" if writable else "read-only",
                  volume.generation)
        return opened

    def filesystem(self, location: ImagePath, writable: bool = False) -> FileSystem:
        """Return the filesystem (live or snapshot) that location names."""
        opened = self.open(location.image, writable)
        fs = opened.filesystems.get(location.snapshot)
        if fs is not None:
            return fs
        if location.snapshot is None:
            fs = image_module.live(opened.volume)
        else:
            fs = open_snapshot(opened.volume, location)
        opened.filesystems[location.snapshot] = fs
        return fs

    def finish(self) -> None:
        """Commit every writable image, then close them all."""
        try:
            for opened in self.images.values():
                if opened.writable:
                    generation = opened.volume.commit()
                    log.info("%s: committed generation %d", opened.path, generation)
        except BaseException:
            self.abort()
            raise
        self.close()

    def abort(self) -> None:
        """Drop every running transaction, cut each image file back, and close."""
        for opened in self.images.values():
            if not opened.writable:
                continue
            volume = opened.volume
            try:
                volume.abort()
                log.info("%s: aborted; the image stays at generation %d", opened.path, volume.generation)
            except (OSError, CorruptionError) as exc:
                log.warning("%s: cleaning up after the failed command also failed: %s", opened.path, exc)
        self.close()

    def close(self) -> None:
        for opened in self.images.values():
            opened.volume.close()
        self.images = {}


def open_snapshot(volume, location: ImagePath) -> FileSystem:
    """Return the filesystem of snapshot location.snapshot.

    Raise CommandError when the snapshot does not exist, or when this
    version of the engine has no snapshots.
    """
    opener = getattr(image_module, "open_filesystem", None)
    message = f"{location.image}: snapshot '{location.snapshot}' not found"
    if opener is None:
        raise CommandError(None, location.image, message=message)
    try:
        return opener(volume, location.snapshot)
    except (KeyError, FileNotFoundError) as exc:
        raise CommandError(None, location.image, message=message) from exc
